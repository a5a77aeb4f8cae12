"""The compute floor of a benchmark: its FLOPs ÷ the best GEMM/conv rate of this machine.

    floor (s)   = FLOPs of the run / best rate (FLOP/s)
    reached     = floor / measured seconds          (1.0 would be every FLOP at the best rate)

FLOPs are counted by `torch.utils.flop_counter` on meta-device copies of the model's UNet and VAE
(shapes only, no data, no time): the explicit path's matmuls, bmms and convolutions -- the same
count on either path, since the fast path changes kernels, not arithmetic. SD 1.5 at 512²: 803.3
GFLOP per image per UNet call, 2514.5 GFLOP per decoded image. The best rate is measured in the
same run, on the same threads: the best of PyTorch's F.linear (MKL) and oneDNN's matmul at three
of the UNet's GEMM shapes, and of a 3×3 convolution in both memory layouts, each the best of a few
tries (autotune.best_times). Used by tools/bench.py and tools/bench_unet.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from minip2p.fast import kernels as ops
from minip2p.fast.autotune import best_times

# (tokens, in, out) of the UNet's big GEMMs at 512 px, and a 3×3 conv of its first level
GEMMS = [(4096, 1280, 320), (4096, 640, 2560), (1024, 1280, 5120)]
CONV = (2, 320, 64, 64)


def _count(fn) -> int:
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def configs(folder) -> tuple:
    """(UNetConfig, VAEConfig) of a diffusers-layout folder, without loading any weight."""
    from minip2p.model.config import UNetConfig, VAEConfig
    return tuple(cls.from_dict(json.loads((Path(folder) / sub / "config.json").read_text()))
                 for sub, cls in (("unet", UNetConfig), ("vae", VAEConfig)))


def unet_flops(ucfg, vcfg, batch: int, height: int, width: int) -> int:
    """FLOPs of one UNet call on `batch` latents of an height × width image."""
    from minip2p.model.unet import UNet2DConditionModel
    f = vcfg.downscale
    with torch.device("meta"):
        unet = UNet2DConditionModel(ucfg)

    def call():
        z = torch.empty(batch, ucfg.in_channels, height // f, width // f)
        unet(z, torch.tensor(500.0), torch.empty(batch, 77, ucfg.cross_attention_dim))
    return _count(call)


def decode_flops(vcfg, height: int, width: int) -> int:
    """FLOPs of decoding one height × width image."""
    from minip2p.model.vae import AutoencoderKL
    f = vcfg.downscale
    with torch.device("meta"):
        vae = AutoencoderKL(vcfg)
    return _count(lambda: vae.decode(torch.empty(1, vcfg.latent_channels, height // f, width // f)))


@torch.no_grad()
def best_rate() -> tuple[float, str]:
    """(FLOP/s, which kernel and shape) -- the fastest GEMM or conv measured now."""
    g = torch.Generator().manual_seed(0)
    rates = {}
    for n, cin, cout in GEMMS:
        x, w = torch.randn(n, cin, generator=g), torch.randn(cout, cin, generator=g)
        flop = 2 * n * cin * cout
        run = {f"F.linear {n}x{cin}->{cout}": lambda: F.linear(x, w)}
        if ops.ONEDNN:
            run[f"oneDNN matmul {n}x{cin}->{cout}"] = lambda: ops._dnn(x, w, None)
        rates.update({name: flop / t for name, t in best_times(run).items()})
    b, c, h, w_ = CONV
    x, k = torch.randn(b, c, h, w_, generator=g), torch.randn(c, c, 3, 3, generator=g)
    flop = 2 * b * c * c * 9 * h * w_
    xl, kl = (t.contiguous(memory_format=torch.channels_last) for t in (x, k))
    run = {f"conv3x3 {b}x{c}x{h}x{w_}": lambda: F.conv2d(x, k, padding=1),
           f"conv3x3 channels-last {b}x{c}x{h}x{w_}": lambda: F.conv2d(xl, kl, padding=1)}
    rates.update({name: flop / t for name, t in best_times(run).items()})
    best = max(rates, key=rates.get)
    return rates[best], best


def floor_text(flops: float, seconds: float, rate: float) -> str:
    floor = flops / rate
    return f"{flops / 1e9:,.1f} GFLOP, floor {floor:.2f} s, reached {floor / seconds:.0%} ({seconds / floor:.2f}x the floor)"


def bench_table(res: dict, args, folder: Path, rate: float, kernel: str):
    """Each row's s/step and decode against the floor (tools/floor.py): FLOPs of one step (the
    UNet on 4 rows: 2 prompts with guidance) and of decoding 2 images, ÷ the best rate measured
    in this run."""
    from tools.harness import table as markdown
    ucfg, vcfg = configs(folder)
    step = unet_flops(ucfg, vcfg, 4, args.size, args.size)
    dec = 2 * decode_flops(vcfg, args.size, args.size)
    print(f"\nFloor: best rate measured in this run {rate / 1e9:.0f} GFLOP/s ({kernel}); one step "
          f"{step / 1e9:,.1f} GFLOP -> {step / rate:.2f} s; decoding 2 images {dec / 1e9:,.1f} "
          f"GFLOP -> {dec / rate:.2f} s\n")
    total = (args.steps * step + dec) / rate
    markdown(["row", "s/step", "step / floor", "decode s", "decode / floor", "run s",
              "run / floor"],
             [[name, f"{r['s_step']:.2f}", f"{r['s_step'] / (step / rate):.2f}x",
               f"{r['decode']:.1f}", f"{r['decode'] / (dec / rate):.2f}x", f"{r['run']:.1f}",
               f"{r['run'] / total:.2f}x"] for name, r in res.items()], "l" + "r" * 6)
