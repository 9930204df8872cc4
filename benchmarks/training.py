"""Training throughput of the default config (configs/emoji.toml): destatic's training step
against the same architecture trained through diffusers' UNet2DConditionModel in a plain loop.

    python benchmarks/training.py [--config configs/emoji.toml] [--reps 5]
    python benchmarks/training.py --costs    # the model-size tables of BENCHMARKS.md "Training"
    python benchmarks/training.py --device cuda --compile     # the same sides on a GPU

Each side runs in fp32 and under bf16 autocast (with ``--compile`` also compiled block by block,
``train.compile``) (destatic: ``train.precision = "bf16"``, whose
attention runs in fp32 on the CPU, ``destatic.models.sdpa``; diffusers: its model inside
``torch.autocast("cpu", torch.bfloat16)``, what a diffusers user writes). All sides get the
same global batch (destatic's own draw: emoji images, cached MiniLM caption
tokens, logit-normal σ, noise) and the same initial weights. destatic runs its full step
(``_Run.train_step``: loss, backward, clipping, AdamW, LR schedule, EMA, NaN checks); the plain
loop does the rectified-flow loss, backward, clipping, AdamW and a ``swa_utils`` EMA update
with diffusers' model. Steps are interleaved so that other load hits both alike; medians are
reported with model-FLOPs utilisation against a measured matmul peak (fp32 on the CPU, bf16 on
a GPU, where autocast is ``torch.autocast("cuda", torch.bfloat16)``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from models import count_flops, device_sync, interleaved, matmul_peak

from destatic.models.speedups import compile_blocks
from destatic.pipelines.devices import cpu_description
from destatic.training import load_config
from destatic.training.distributed import World
from destatic.training.tasks import make_task
from destatic.training.trainer import _Run, batch_indices

THREADS = 2
# U-Net candidates for the default model: (block_out_channels, cross-attention per level, resnets)
CANDIDATES = [
    ((64, 128, 192), (0, 1, 1), 2),
    ((64, 128, 192), (0, 1, 1), 1),
    ((64, 128, 192), (0, 0, 1), 2),
    ((32, 64, 128), (0, 1, 1), 2),
    ((32, 64, 128), (0, 1, 1), 1),
    ((32, 64, 128), (0, 0, 1), 1),
]


def _unet(channels, attention, layers):
    from destatic.models import UNet2DCondition, UNetConfig

    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    up = [d.replace("Down", "Up") for d in reversed(down)]
    return UNet2DCondition(
        UNetConfig(
            in_channels=3,
            out_channels=3,
            sample_size=32,
            cross_attention_dim=384,
            block_out_channels=channels,
            down_block_types=down,
            up_block_types=up,
            layers_per_block=layers,
            attention_head_dim=4,
            norm_num_groups=16,
        )
    )


def costs() -> None:
    """Params, training GFLOP per sample (forward + backward) and forward + backward samples/s
    of the pixel U-Net candidates and of the latent route (autoencoder + MMDiT)."""
    import time

    from destatic.models import AutoencoderConfig, AutoencoderKL, MMDiT, MMDiTConfig

    def measure(model, step, batch):
        flops = count_flops(lambda: step(1))
        step(batch)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            step(batch)
            best = min(best, time.perf_counter() - t0)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        return params, flops, batch / best

    def unet_step(m):
        return lambda b: (
            m(torch.randn(b, 3, 32, 32), torch.rand(b) * 1000, torch.randn(b, 24, 384))
            .square()
            .mean()
            .backward()
        )

    print(
        "| block_out_channels | cross-attention | resnets | params M | GFLOP/sample | samples/s |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for channels, attention, layers in CANDIDATES:
        m = _unet(channels, attention, layers)
        params, flops, rate = measure(m, unet_step(m), 64)
        print(f"| {channels} | {attention} | {layers} | {params:.1f} | {flops:.2f} | {rate:.0f} |")

    ae_cfg = load_config("configs/emoji_autoencoder.toml").autoencoder.config
    ae = AutoencoderKL(AutoencoderConfig(sample_size=64, **ae_cfg))

    def ae_step(b):
        x = torch.randn(b, 3, 64, 64)
        post = ae.encode(x)
        z = post.mean + post.std * torch.randn_like(post.std)
        (ae.decode(z) - x).abs().mean().backward()

    print("\n| latent route | params M | GFLOP/sample | samples/s |")
    print("|---|---:|---:|---:|")
    params, flops, rate = measure(ae, ae_step, 32)
    print(f"| autoencoder 64² → 16×16×4 | {params:.1f} | {flops:.2f} | {rate:.0f} |")
    for layers, heads in ((8, 4), (6, 3)):
        dit = MMDiT(
            MMDiTConfig(
                sample_size=16, patch_size=2, in_channels=4, num_layers=layers,
                attention_head_dim=64, num_attention_heads=heads, joint_attention_dim=384,
                pooled_projection_dim=384, pos_embed_max_size=16,
            )
        )  # fmt: skip

        def dit_step(b, dit=dit):
            out = dit(torch.randn(b, 4, 16, 16), torch.rand(b) * 1000, torch.randn(b, 24, 384),
                      torch.randn(b, 384))  # fmt: skip
            out.square().mean().backward()

        params, flops, rate = measure(dit, dit_step, 64)
        name = f"MMDiT {layers} × {heads * 64} on 16×16×4"
        print(f"| {name} | {params:.1f} | {flops:.2f} | {rate:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/emoji.toml")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--costs", action="store_true", help="print the model-size tables")
    parser.add_argument(
        "--compile", action="store_true", help="add torch.compile sides (minutes of compiling)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    device = torch.device(args.device)
    if args.costs:
        costs()
        return
    from diffusers import UNet2DConditionModel

    runs = {}
    variants = {"fp32": ("fp32", False), "bf16 autocast": ("bf16", False)}
    if args.compile:
        variants["bf16 autocast + compile"] = ("bf16", True)
    for name, (precision, compiled) in variants.items():
        overrides = {"train.progress": False, "train.tensorboard": False}
        overrides |= {"train.precision": precision, "train.compile": compiled}
        cfg = load_config(args.config, overrides)
        cfg.output.dir = "/tmp/destatic-bench-training"
        torch.manual_seed(0)
        task = make_task(cfg, device, progress=False)
        runs[name] = _Run(cfg, World(), device, task)
    ours = runs["fp32"].trainable
    b = cfg.train.batch_size
    batch = task.draw(batch_indices(0, 0, b, task.num_items), torch.Generator().manual_seed(0))

    def plain_loop(amp: bool, compiled: bool):
        """diffusers' model in the loop of its training examples; ``compiled``: compiled block
        by block like ours (``compile_blocks``; compiled whole, the U-Net's gradients come out
        wrong under bf16 autocast, see its docstring)."""
        theirs = UNet2DConditionModel.from_config(ours.config.to_dict())
        theirs.load_state_dict(ours.state_dict(), strict=True)
        theirs.to(device).train()
        opt = torch.optim.AdamW(theirs.parameters(), lr=cfg.optim.lr, weight_decay=0.0)
        ema = torch.optim.swa_utils.AveragedModel(
            theirs, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.optim.ema_decay)
        )
        model = compile_blocks(theirs) if compiled else theirs

        x0, noise = batch["x0"].to(device), batch["noise"].to(device)
        context = task.bank.tokens[batch["caption"]].to(device)
        sigma = batch["sigma"].float().to(device)[:, None, None, None]

        def step() -> None:
            t = sigma / (1 + sigma)
            x_t = (1 - t) * x0 + t * noise
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(x_t, t.flatten() * 1000, encoder_hidden_states=context).sample
                loss = (out.float() - (noise - x0)).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), cfg.optim.grad_clip)
            opt.step()
            ema.update_parameters(theirs)

        return step

    sides = {("destatic train_step", name): run.train_step for name, run in runs.items()}
    for name, (precision, compiled) in variants.items():
        sides[("diffusers UNet + plain loop", name)] = plain_loop(precision == "bf16", compiled)
    per_sample = count_flops(
        lambda: (
            UNet2DConditionModel.from_config(ours.config.to_dict())(
                batch["x0"][:1], torch.tensor([500.0]), encoder_hidden_states=task.bank.tokens[:1]
            )
            .sample.sum()
            .backward()
        )
    )
    peak_name, peak_dtype = (
        ("fp32", torch.float32) if device.type == "cpu" else ("bf16", torch.bfloat16)
    )
    peak = matmul_peak(5, device, peak_dtype)
    times = interleaved(list(sides.values()), warmup=2, reps=args.reps, sync=device_sync(device))
    params = sum(p.numel() for p in ours.parameters()) / 1e6
    chip = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    print(f"machine: {chip}, torch {torch.__version__}; {peak_name} matmul peak {peak:.0f} GFLOP/s")
    print(
        f"model: {params:.2f} M parameters, {per_sample:.2f} GFLOP per training sample, batch {b}"
    )
    base = times[len(variants)]  # diffusers fp32
    print(f"| trainer | precision | s/step | samples/s | {peak_name} MFU | diffusers fp32 ÷ this |")
    print("|---|---|---:|---:|---:|---:|")
    for (name, precision), t in zip(sides, times, strict=True):
        mfu = b * per_sample / t / peak
        print(f"| {name} | {precision} | {t:.2f} | {b / t:.1f} | {mfu:.0%} | {base / t:.2f}× |")


if __name__ == "__main__":
    main()
