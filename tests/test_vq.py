"""The VQ tokenizer: parity with diffusers' VQModel, the code round trip, bad input, and the
``tokenizer`` training task end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from destatic.metrics.tokenizer import tokenizer_report
from destatic.models.registry import load_component, save_component
from destatic.models.vq import VQConfig, VQModel
from destatic.training import ConfigError, latest_checkpoint, load_config, train
from destatic.training.state import load_checkpoint
from destatic.training.tasks.tokenizer import SMOOTHING, CodebookEMA, TokenizerTask
from tests.training_fixtures import assert_same, write_config, write_squares

TINY = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    norm_num_groups=8,
    num_vq_embeddings=16,
    latent_channels=4,
    sample_size=16,
)


def _diffusers_pair(tmp_path: Path, **overrides) -> tuple[torch.nn.Module, VQModel]:
    """A tiny random diffusers VQModel (codebook spread out, so codes vary) and destatic's copy
    loaded from its saved folder."""
    from diffusers import VQModel as DiffusersVQ

    torch.manual_seed(0)
    ref = DiffusersVQ(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        ref.quantize.embedding.weight.normal_()
    ref.save_pretrained(tmp_path / "vq")
    ours = load_component(tmp_path / "vq")
    assert isinstance(ours, VQModel)
    return ref, ours


@pytest.mark.parametrize("vq_embed_dim", [None, 3])
def test_matches_diffusers_vqmodel(tmp_path, vq_embed_dim):
    ref, ours = _diffusers_pair(tmp_path, vq_embed_dim=vq_embed_dim)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        h_ref = ref.encode(x).latents
        h = ours.encode(x)
        torch.testing.assert_close(h, h_ref, atol=1e-5, rtol=0)
        _, _, (_, _, idx) = ref.quantize(h_ref)
        codes = ours.codes_from_images(x)
        assert codes.shape == (2, 8, 8) and codes.dtype == torch.long
        assert torch.equal(codes.flatten(), idx.flatten())
        assert len(codes.unique()) > 1  # a test of the argmin, not of a constant
        z_q, _ = ours.quantize_latents(h)
        dec_ref = ref.decode(z_q, force_not_quantize=True).sample
        torch.testing.assert_close(ours.decode_latents(z_q), dec_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(x), ref(x).sample, atol=1e-5, rtol=0)
    assert ours.downsample_factor == 2 and ours.num_codes == 16
    assert ours.code_dim == (vq_embed_dim or 4)


def test_codes_round_trip(tmp_path):
    """Codebook rows quantise to their own codes; images_from_codes(codes_from_images(x)) is the
    decoded quantised latent; export → load keeps every weight."""
    torch.manual_seed(0)
    vq = VQModel(VQConfig(**TINY, vq_embed_dim=3)).eval()
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_()
        rows = vq.quantize.embedding.weight.T.reshape(1, 3, 4, 4)  # the 16 rows as a 4×4 grid
        assert torch.equal(vq.quantize_latents(rows)[1].flatten(), torch.arange(16))
        x = torch.rand(3, 3, 16, 16) * 2 - 1
        codes = vq.codes_from_images(x)
        expected = vq.decode_latents(vq.quantize_latents(vq.encode(x))[0])
        assert torch.equal(vq.images_from_codes(codes), expected)
    save_component(vq, tmp_path / "t", class_name="VQModel", config=vq.config.to_dict())
    back = load_component(tmp_path / "t")
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in vq.state_dict().items())
    from diffusers import VQModel as DiffusersVQ

    theirs = DiffusersVQ.from_pretrained(tmp_path / "t").eval()  # diffusers reads it too
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).sample, vq(x), atol=1e-5, rtol=0)


def test_bad_input_is_one_line():
    vq = VQModel(VQConfig(**TINY))
    for call, arg, words in (
        (vq.encode, torch.zeros(1, 4, 16, 16), "images [B, 3, H, W]"),
        (vq.encode, torch.zeros(1, 3, 15, 16), "multiple of the tokenizer's factor 2"),
        (vq.quantize_latents, torch.zeros(1, 5, 4, 4), "latents must be [B, 4, h, w]"),
        (vq.images_from_codes, torch.zeros(1, 4, 4), "integer tensor"),
        (vq.images_from_codes, torch.full((1, 4, 4), 16), "[0, 16)"),
    ):
        with pytest.raises(ValueError) as e:
            call(arg)
        assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="norm_type 'spatial'"):
        VQConfig(**TINY, norm_type="spatial")


def test_tokenizer_report_counts_codes():
    torch.manual_seed(0)
    vq = VQModel(VQConfig(**TINY)).eval()
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_()
    images = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8)
    report = tokenizer_report(vq, images, batch_size=2)
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        codes = vq.codes_from_images(x)
        recon = (vq(x) / 2 + 0.5).clamp(0, 1)
    used = len(codes.unique())
    assert 1 < used < 16 and report["codebook_usage"] == pytest.approx(used / 16)
    p = torch.bincount(codes.flatten(), minlength=16).double() / codes.numel()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    assert report["perplexity"] == pytest.approx(float(entropy.exp()))
    rmse = float((recon - (x / 2 + 0.5)).pow(2).mean().sqrt())
    assert report["rmse"] == pytest.approx(rmse, rel=1e-5)
    assert report["psnr"] == pytest.approx(-20 * torch.tensor(rmse).log10().item(), rel=1e-5)


def test_codebook_moves_by_ema_and_restarts_dead_codes():
    """One training forward: used codes move to the smoothed EMA means, dead ones jump to the
    worst-quantised encodings; the codebook gets no gradient, the encoder gets the decoder's."""
    torch.manual_seed(0)
    vq = VQModel(VQConfig(**TINY, vq_embed_dim=3))
    model = CodebookEMA(vq, decay=0.9, restart_after=2)
    model.idle.zero_()  # nothing is dead yet
    model.idle[5] = 1  # code 5 dies at this update unless chosen
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        flat = vq.encode(x).permute(0, 2, 3, 1).reshape(-1, 3)
        old = vq.quantize.embedding.weight.clone()
        codes = vq.quantize.nearest(flat)
    error = (flat - old[codes]).pow(2).sum(1)
    counts = torch.bincount(codes, minlength=16).float()
    sums = torch.zeros(16, 3).index_add_(0, codes, flat)
    size = 0.9 + 0.1 * counts
    total = size.sum()
    smoothed = (size + SMOOTHING) / (total + 16 * SMOOTHING) * total
    expected = (0.9 * old + 0.1 * sums) / smoothed[:, None]
    recon, commitment, critic = model(x)
    new = vq.quantize.embedding.weight
    dead = counts[5] == 0
    assert dead  # the tiny random encoder sends everything to a few codes
    torch.testing.assert_close(new[5], flat[error.argmax()])
    keep = torch.arange(16) != 5
    torch.testing.assert_close(new[keep], expected[keep])
    assert model.idle[5] == 0 and model.cluster_size[5] == 1
    assert torch.equal(model.idle[keep], (counts[keep] == 0).long())
    torch.testing.assert_close(commitment, (flat - old[codes]).pow(2).view(2, -1).mean(1))
    (recon.abs().mean() + commitment.mean()).backward()
    assert new.grad is None and not new.requires_grad
    assert vq.encoder.conv_in.weight.grad.abs().sum() > 0
    assert critic is None


def test_tokenizer_task_trains_exports_and_resumes_exactly(tmp_path, monkeypatch):
    """4 tiny steps export a loadable VQModel; the EMA codebook state is in the checkpoints, and
    a run stopped mid-step and resumed ends with the same weights and buffers."""
    folder = write_squares(tmp_path / "shapes", 8)
    extra = 'task = "tokenizer"\n\n[tokenizer]\nrestart_after = 2\n'
    extra += "\n[tokenizer.config]\nblock_out_channels = [8, 16]\nnorm_num_groups = 4\n"
    extra += 'down_block_types = ["DownEncoderBlock2D", "DownEncoderBlock2D"]\n'
    extra += 'up_block_types = ["UpDecoderBlock2D", "UpDecoderBlock2D"]\n'
    extra += "num_vq_embeddings = 16\nlatent_channels = 4\nvq_embed_dim = 2\n"
    text = write_config(tmp_path / "a.toml", folder, tmp_path / "a", extra).read_text()
    text = text.replace('schedule = "cosine"', 'schedule = "cosine"\nema_decay = 0.0')
    text = text.replace("steps = 6", "steps = 4")
    (tmp_path / "a.toml").write_text(text)
    (tmp_path / "b.toml").write_text(text.replace(str(tmp_path / "a"), str(tmp_path / "b")))
    with pytest.raises(ConfigError, match=r"optim\.ema_decay = 0\.999: the tokenizer task"):
        cfg = load_config(tmp_path / "a.toml", {"optim.ema_decay": 0.999})
        TokenizerTask(cfg, torch.device("cpu"), progress=False)
    out = train(load_config(tmp_path / "a.toml"))
    vq = load_component(out)
    assert isinstance(vq, VQModel) and vq.num_codes == 16 and vq.code_dim == 2
    state = load_checkpoint(latest_checkpoint(tmp_path / "a" / "checkpoints"))["model"]
    assert {"cluster_size", "embed_sum", "idle"} <= set(state)
    torch.testing.assert_close(state["vq.quantize.embedding.weight"], vq.quantize.embedding.weight)
    assert (tmp_path / "a" / "samples" / "step-00000004.png").is_file()

    real, calls = TokenizerTask.loss, {"n": 0}

    def stopped(self, model, batch, device):
        loss = real(self, model, batch, device)  # the forward has already moved the codebook
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return loss

    monkeypatch.setattr(TokenizerTask, "loss", stopped)
    with pytest.raises(KeyboardInterrupt):
        train(load_config(tmp_path / "b.toml"))
    monkeypatch.setattr(TokenizerTask, "loss", real)
    train(load_config(tmp_path / "b.toml"))
    resumed = load_checkpoint(latest_checkpoint(tmp_path / "b" / "checkpoints"))["model"]
    assert_same(state, resumed)
