"""AudioLDM folders saved by diffusers (Liu et al. 2023, "AudioLDM: Text-to-Audio Generation
with Latent Diffusion Models"; diffusers' ``AudioLDMPipeline``): text → audio as a latent
diffusion model over log-mel spectrogram "images".

* **Latents.** A mel spectrogram of T frames and M mel bins is a one-channel image (B, 1, T, M);
  the ``AutoencoderKL`` maps it to latents (B, C, T/f, M/f), f = 2^(levels − 1).
* **Text.** CLAP's text tower (``ClapTextModelWithProjection``, RoBERTa tokens) gives one
  vector per prompt, the projected ``text_embeds`` scaled to unit length, c = e/‖e‖. An empty
  negative prompt is the encoding of "" (no zeros).
* **Network.** Our :class:`~destatic.models.unet.UNet2DCondition` with
  ``class_embed_type="simple_projection"``: c enters through the timestep embedding
  (``class_labels``); the transformers get no context and attend to the feature map itself.
* **Vocoder.** transformers' ``SpeechT5HifiGan`` (HiFi-GAN, Kong et al. 2020) turns the decoded
  mel (B, T, M) into a waveform (B, T·h) at its ``sampling_rate``, h = ∏ ``upsample_rates``
  samples per mel frame: the folder's ``vocoder/``, in :attr:`PipelineBase.extras`.

**Duration, as AudioLDMPipeline rounds it.** s seconds are T = ⌊s / (h / sr)⌋ mel frames, raised
to a multiple of f; the latents are (B, C, T/f, M/f); the waveform of T·h samples is cut to
⌊s·sr⌋ by the pipeline. No duration given: the network's ``sample_size`` latent frames. AudioLDM
has no timing conditioning, so the audio always starts at 0 s.

One deliberate difference: diffusers pads and truncates a negative prompt to ``projection_dim``
tokens (its ``max_length = prompt_embeds.shape[1]``), the prompt to the tokenizer's
``model_max_length``; destatic treats both as prompts (``model_max_length``). Both lengths are
512 for the released CLAP and padding is masked, so they differ only for a negative prompt
longer than ``projection_dim`` tokens on a checkpoint whose two lengths differ. And as for every
family, a guidance scale w < 1 is applied as given, where AudioLDMPipeline skips guidance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from destatic.io import CheckpointError
from destatic.models.config import MAX_SAMPLE_SIZE
from destatic.models.text import (
    _WEIGHTS,
    TextEmbedding,
    TextEncoder,
    _check_dir,
    _load_local,
    _offline,
    _tokenize,
)
from destatic.models.unet import UNet2DCondition
from destatic.pipelines.families.base import (
    ConditioningContext,
    Family,
    entry,
    register_family,
)

__all__ = ["AUDIOLDM", "CLAPTextEncoder"]


class CLAPTextEncoder(TextEncoder):
    """CLAP's text tower as ``AudioLDMPipeline._encode_prompt`` uses it: ``pooled`` is the
    projected ``text_embeds`` scaled to unit L2 norm (B, projection_dim); ``tokens`` the last
    hidden state (B, T, hidden), ``mask`` the attention mask."""

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.dim = int(model.config.hidden_size)
        self.pooled_dim = int(model.config.projection_dim)
        self.max_length = int(tokenizer.model_max_length)

    @classmethod
    def from_folders(cls, text_encoder_dir: Path, tokenizer_dir: Path) -> CLAPTextEncoder:
        """Load ``ClapTextModelWithProjection`` and its RoBERTa tokenizer, offline."""
        from transformers import ClapTextModelWithProjection, RobertaTokenizer

        model_dir = _check_dir(text_encoder_dir, "text encoder", _WEIGHTS)
        tokens = [["vocab.json", "merges.txt"], ["tokenizer.json"]]
        tok_dir = _check_dir(tokenizer_dir, "tokenizer", tokens)
        model, tokenizer = _load_local(
            ClapTextModelWithProjection, model_dir, RobertaTokenizer, tok_dir
        )
        return cls(model, tokenizer)

    def _encode(self, prompts: list[str]) -> TextEmbedding:
        batch = _tokenize(self.tokenizer, prompts, self.max_length)
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        out = self.model(ids, attention_mask=mask)
        pooled = F.normalize(out.text_embeds, dim=-1)  # (B, projection_dim), unit length
        return TextEmbedding(tokens=out.last_hidden_state, pooled=pooled, mask=mask.bool())


def _matches(index: Mapping[str, Any]) -> bool:
    """An ``AudioLDMPipeline`` folder: a U-Net, CLAP's text tower and a vocoder."""
    clap = entry(index, "text_encoder") == "ClapTextModelWithProjection"
    parts = "unet" in index and clap and entry(index, "vocoder") is not None
    return index.get("_class_name") == "AudioLDMPipeline" or parts


def _text_encoder(folder: Path, index: Mapping[str, Any], network: nn.Module) -> CLAPTextEncoder:
    """CLAP, checked against the U-Net's class embedding (its input is CLAP's vector)."""
    config = getattr(network, "config", None)
    if not isinstance(network, UNet2DCondition) or config.class_embed_type is None:
        raise CheckpointError(
            f"{folder}: an AudioLDM pipeline needs a UNet with class_embed_type='simple_projection'"
        )
    if entry(index, "text_encoder") != "ClapTextModelWithProjection":
        raise CheckpointError(
            f"{folder / 'model_index.json'}: AudioLDM's text_encoder must be "
            f"ClapTextModelWithProjection, got {entry(index, 'text_encoder')!r}"
        )
    encoder = CLAPTextEncoder.from_folders(folder / "text_encoder", folder / "tokenizer")
    if encoder.pooled_dim != config.projection_class_embeddings_input_dim:
        raise CheckpointError(
            f"{folder}: CLAP's projection_dim is {encoder.pooled_dim} but the UNet's "
            f"class embedding takes {config.projection_class_embeddings_input_dim} inputs"
        )
    return encoder


def _load_vocoder(folder: Path, index: Mapping[str, Any]) -> dict[str, nn.Module]:
    """``vocoder/``: transformers' ``SpeechT5HifiGan``, offline."""
    from transformers import SpeechT5HifiGan

    if entry(index, "vocoder") != "SpeechT5HifiGan":
        raise CheckpointError(
            f"{folder / 'model_index.json'}: AudioLDM's vocoder must be SpeechT5HifiGan, got "
            f"{entry(index, 'vocoder')!r}"
        )
    where = _check_dir(folder / "vocoder", "vocoder", _WEIGHTS)
    with _offline():
        vocoder = SpeechT5HifiGan.from_pretrained(str(where), local_files_only=True)
    return {"vocoder": vocoder.eval()}


def _conditioning(
    network: nn.Module, embedding: TextEmbedding, context: ConditioningContext
) -> dict[str, Any]:
    """CLAP's unit vector as the U-Net's ``class_labels``; no cross-attention context."""
    return {"class_labels": embedding.pooled}


def _frame_seconds(pipe: Any) -> float:
    """Seconds per mel frame: the vocoder's samples per frame over its sample rate."""
    config = pipe.extras["vocoder"].config
    return math.prod(config.upsample_rates) / config.sampling_rate


def _span(pipe: Any, start: float, seconds: float | None) -> tuple[float, float]:
    """(0, seconds): the network's ``sample_size`` latent frames when None; one line for a
    start other than 0 (no timing conditioning) or a duration under one latent frame or over
    :data:`~destatic.models.config.MAX_SAMPLE_SIZE` of them."""
    frame = _frame_seconds(pipe) * pipe.latent_factor
    if start != 0:
        raise ValueError(f"seconds_start={start:g}: AudioLDM always starts its audio at 0 s")
    if seconds is None:
        # diffusers' order of operations, so the cut lands on the same sample
        seconds = int(pipe.network.config.sample_size) * pipe.latent_factor * _frame_seconds(pipe)
    if not frame <= seconds <= MAX_SAMPLE_SIZE * frame:
        raise ValueError(
            f"seconds={seconds:g}: this AudioLDM model makes {frame:.3g} … "
            f"{MAX_SAMPLE_SIZE * frame:.4g} s of audio"
        )
    return 0.0, float(seconds)


def _shape(pipe: Any, batch: int, span: tuple[float, float]) -> tuple[int, ...]:
    """(B, C, T/f, M/f), T = ⌊s / (h / sr)⌋ mel frames raised to a multiple of f (module
    docstring)."""
    f = pipe.latent_factor
    frames = int((span[1] - span[0]) / _frame_seconds(pipe))
    frames = -(-frames // f) * f
    bins = int(pipe.extras["vocoder"].config.model_in_dim)
    if bins % f:
        raise ValueError(f"the vocoder's {bins} mel bins are not a multiple of the VAE's {f}")
    return (batch, pipe.latent_channels, frames // f, bins // f)


def _waveforms(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """latents → mel (B, 1, T, M) by the VAE → waveforms (B, 1, T·h) by the vocoder."""
    vocoder = pipe.extras["vocoder"]
    mel = pipe.autoencoder.images_from_latents(latents)  # (B, 1, T, M)
    dtype = next(vocoder.parameters()).dtype
    return vocoder(mel.squeeze(1).to(dtype)).float().unsqueeze(1)  # (B, 1, T·h)


def _rate(pipe: Any) -> int:
    return int(pipe.extras["vocoder"].config.sampling_rate)


AUDIOLDM = register_family(
    Family(
        name="audioldm",
        description="AudioLDM: UNet on mel latents + CLAP + HiFi-GAN vocoder",
        matches=_matches,
        text_encoder=_text_encoder,
        conditioning=_conditioning,
        # AudioLDMPipeline's defaults: 10 steps, guidance 2.5; the hub's folders use DDIM
        # ("leading" timesteps)
        defaults={"steps": 10, "sampler": "ddim", "grid": "leading", "guidance": 2.5},
        media="audio",
        diffusers_pipeline="AudioLDMPipeline",
        load_extras=_load_vocoder,
        audio_span=_span,
        audio_shape=_shape,
        decode_audio=_waveforms,
        sample_rate=_rate,
    )
)
