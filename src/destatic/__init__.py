"""destatic: diffusion models in one σ-space core. See DESIGN.md for the map."""

__version__ = "0.1.0"
