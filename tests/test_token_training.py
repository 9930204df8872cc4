"""The autoregressive and MaskGIT token tasks on tiny captioned squares with a tiny random VQ
tokenizer: they train and export a TokenPipeline that generates, their losses are the stated
cross-entropies, a bad [tokens] table is one line, kill -9 and resume gives the same weights and
the NaN guard holds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import destatic
from destatic.io import load_weights
from destatic.models.registry import save_component
from destatic.models.unet import UNet2DCondition, UNetConfig
from destatic.models.vq import VQConfig, VQModel
from destatic.pipelines.tokens import TokenPipeline
from destatic.training import ConfigError, TrainingError, latest_checkpoint, load_config, train
from destatic.training.state import load_checkpoint
from destatic.training.tasks import TokenTask, make_task
from destatic.training.tasks.tokens import mask_positions
from tests.training_fixtures import (
    PIXEL_UNET,
    assert_same,
    final_weights,
    kill_after_checkpoint,
    poison_losses,
    write_config,
    write_squares,
)

#: A 16² → 4² tokenizer with 32 codes (random weights: the tasks only need its codes).
TINY_VQ = dict(
    block_out_channels=(8, 8, 16),
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    latent_channels=4,
    norm_num_groups=4,
    num_vq_embeddings=32,
    sample_size=16,
)
TASK_NAMES = ["autoregressive", "maskgit"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_squares(tmp_path_factory.mktemp("shapes"), 12)


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DESTATIC_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    vq = VQModel(VQConfig(**TINY_VQ))
    with torch.no_grad():  # spread the codebook so that the squares use several codes
        vq.quantize.embedding.weight.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("vq") / "model"
    save_component(vq, folder, class_name="VQModel", config=vq.config.to_dict())
    return folder


def _tables(
    task: str, tokenizer: Path | str, config: str = "", tokens: str = "", train: str = ""
) -> str:
    """[train] lines naming the task (and ``train``), then a [tokens] table (with ``tokens``)
    of a 2-layer transformer (and ``config``)."""
    return (
        f'task = "{task}"\n{train}\n\n[tokens]\ntokenizer = "{tokenizer}"\n{tokens}\n'
        f"[tokens.config]\nwidth = 32\nlayers = 2\nheads = 2\n{config}\n"
    )


def _config_path(tmp_path: Path, name: str, folder: Path, tables: str) -> Path:
    return write_config(tmp_path / f"{name}.toml", folder, tmp_path / name, tables)


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("task", TASK_NAMES)
def test_each_task_trains_and_exports_a_pipeline_that_generates(folder, tokenizer, tmp_path, task):
    cfg = load_config(_config_path(tmp_path, "run", folder, _tables(task, tokenizer)))
    model = train(cfg)
    out = tmp_path / "run"
    assert (out / "samples" / "step-00000006.png").is_file()
    losses = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6
    pipe = destatic.load(model)
    assert isinstance(pipe, TokenPipeline)
    assert pipe.bidirectional == (task == "maskgit")
    defaults = pipe.sampling_defaults
    assert defaults["sampler"] == task and defaults["guidance"] == cfg.sample.guidance
    assert defaults["steps"] == (cfg.sample.steps if task == "maskgit" else 16)
    images = pipe.generate("a red square", seed=1)
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()
    # the exported transformer is the EMA of the last checkpoint, the tokenizer the given one
    ema = load_checkpoint(latest_checkpoint(out / "checkpoints"))["ema"]
    exported = load_weights(model / "transformer")
    assert_same(exported, {k[7:]: v for k, v in ema.items() if k.startswith("module.")})
    assert_same(load_weights(model / "tokenizer"), load_weights(tokenizer))


def _task(folder: Path, tokenizer: Path, tmp_path: Path, task: str) -> TokenTask:
    cfg = load_config(_config_path(tmp_path, task, folder, _tables(task, tokenizer)))
    return make_task(cfg, torch.device("cpu"), progress=False)


def test_the_codes_are_the_tokenizers_and_the_losses_are_the_stated_cross_entropies(
    folder, tokenizer, tmp_path
):
    """Autoregressive: the mean CE of every code; MaskGIT: mask_id exactly at the masked
    positions and the mean CE over those only; each batch a pure function of the generator."""
    ar = _task(folder, tokenizer, tmp_path, "autoregressive")
    vq = ar.tokenizer
    from destatic.training.data import load_training_images, pixels

    images = pixels(torch.from_numpy(load_training_images(ar.cfg.data, progress=False).images))
    assert torch.equal(ar.codes, vq.codes_from_images(images).flatten(1))
    assert ar.codes.shape == (len(images), 16) and len(ar.codes.unique()) > 1
    index = torch.arange(8)
    batch = ar.draw(index, torch.Generator().manual_seed(0))
    model = ar.trainable.eval()
    context = ar.bank.tokens[batch["caption"]]
    logits = model(batch["codes"], context)
    expected = F.cross_entropy(logits.transpose(1, 2), batch["codes"], reduction="none")
    torch.testing.assert_close(ar.loss(model, batch, torch.device("cpu")), expected.mean(1))

    mg = _task(folder, tokenizer, tmp_path, "maskgit")
    batch = mg.draw(index, torch.Generator().manual_seed(0))
    again = mg.draw(index, torch.Generator().manual_seed(0))
    assert all(torch.equal(batch[k], again[k]) for k in batch)
    mask = batch["mask"]
    assert mask.any(1).all() and not mask.all()
    seen = {}
    model = mg.trainable.eval()

    def spy(codes, context):
        seen["codes"] = codes
        return model(codes, context)

    loss = mg.loss(spy, batch, torch.device("cpu"))
    assert torch.equal(seen["codes"] == mg.trainable.mask_id, mask)
    assert torch.equal(seen["codes"][~mask], batch["codes"][~mask])
    ce = F.cross_entropy(
        model(seen["codes"], mg.bank.tokens[batch["caption"]]).transpose(1, 2),
        batch["codes"],
        reduction="none",
    )
    torch.testing.assert_close(loss, (ce * mask).sum(1) / mask.sum(1))


def test_maskgit_masks_follow_the_cosine_schedule():
    """⌈cos(π/2·u)·N⌉ positions, at least one, those of smallest score."""
    u = torch.tensor([0.0, 0.3, 0.7, 0.999999])
    scores = torch.rand(4, 64, generator=torch.Generator().manual_seed(0))
    mask = mask_positions(u, scores)
    counts = [max(1, math.ceil(math.cos(math.pi / 2 * float(v)) * 64)) for v in u]
    assert mask.sum(1).tolist() == counts == [64, 58, 30, 1]
    for row, k in zip(range(4), counts, strict=True):
        assert torch.equal(mask[row], scores[row] <= scores[row].sort().values[k - 1])


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("unet") / "unet"
    unet = UNet2DCondition(UNetConfig(**PIXEL_UNET))
    config = UNetConfig(**PIXEL_UNET).to_dict()
    save_component(unet, folder, class_name="UNet2DCondition", config=config)
    return folder


BAD = {
    "no tokenizer": ("", "", "", "tokens.tokenizer is not set"),
    "missing folder": ("/nowhere/vq", "", "", "does not exist"),
    "not a VQModel": ("UNET", "", "", "holds a UNet2DCondition, not a VQModel"),
    "conflicting num_codes": ("VQ", "num_codes = 99", "", "tokens.config.num_codes = 99"),
    "conflicting causal": ("VQ", "causal = false", "", "tokens.config.causal = False"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_tokens_table_is_one_line(folder, tokenizer, unet_folder, tmp_path, case):
    where, config, tokens, expected = BAD[case]
    path = {"VQ": tokenizer, "UNET": unet_folder}.get(where, where)
    cfg = load_config(
        _config_path(tmp_path, "run", folder, _tables("autoregressive", path, config, tokens))
    )
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert expected in _one_line(err)


@pytest.mark.parametrize(
    "tokens,config,expected",
    [
        ("label_smoothing = 1.5", "", "tokens.label_smoothing"),
        ("top_p = 0", "", "tokens.top_p"),
        ("", "widht = 3", "[tokens.config]: unknown TokenTransformerConfig field"),
        ("", "mlp_hidden = -5", "[tokens.config]: mlp_hidden"),
    ],
)
def test_bad_tokens_options_fail_when_the_config_is_read(
    folder, tokenizer, tmp_path, tokens, config, expected
):
    tables = _tables("maskgit", tokenizer, config=config, tokens=tokens)
    with pytest.raises(ConfigError) as err:
        load_config(_config_path(tmp_path, "run", folder, tables))
    assert expected in _one_line(err)


def test_a_table_named_after_a_token_task_is_refused(folder, tokenizer, tmp_path):
    tables = _tables("maskgit", tokenizer) + "\n[maskgit]\nlabel_smoothing = 0.1\n"
    with pytest.raises(ConfigError) as err:
        load_config(_config_path(tmp_path, "run", folder, tables))
    assert "unknown table(s) ['maskgit']" in _one_line(err)


def test_kill_9_and_resume_gives_the_same_weights(folder, tokenizer, tmp_path):
    """MaskGIT (its masks drawn per step too): 6 steps straight = killed after a checkpoint
    past step 3, then the same command again."""
    tables = _tables("maskgit", tokenizer)
    train(load_config(_config_path(tmp_path, "straight", folder, tables)))
    cfg_path = _config_path(tmp_path, "killed", folder, tables)
    stopped = kill_after_checkpoint(cfg_path, tmp_path / "killed", 3)
    assert 3 <= stopped < 6
    train(load_config(cfg_path))
    assert_same(final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed"))


def test_nan_losses_skip_then_stop_without_a_nan_checkpoint(
    folder, tokenizer, tmp_path, monkeypatch
):
    """Steps 1–2 train, 3 and 4 are NaN: skipped, and the second in a row stops the run naming
    step 3's checkpoint (the weights of step 2: a skipped update leaves them alone); none is
    written from step 4."""
    tables = _tables("autoregressive", tokenizer, train="max_bad_steps = 2")
    poison_losses(monkeypatch, TokenTask, lambda n: n >= 3)
    cfg = load_config(_config_path(tmp_path, "run", folder, tables))
    with pytest.warns(UserWarning, match="update skipped"), pytest.raises(TrainingError) as err:
        train(cfg)
    message = _one_line(err)
    assert "2 steps in a row" in message and "(step 4)" in message
    root = tmp_path / "run" / "checkpoints"
    assert str(root / "step-00000003") in message
    assert latest_checkpoint(root).name == "step-00000003"
    step2, step3 = (load_checkpoint(root / f"step-0000000{i}") for i in (2, 3))
    assert step3["bad_steps"] == 1
    assert all(torch.isfinite(v).all() for v in step3["model"].values())
    assert_same(step2["model"], step3["model"])
