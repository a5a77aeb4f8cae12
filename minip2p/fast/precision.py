"""The compute precision, chosen by measurement: bf16 where the CPU computes it natively and the
tuner measured it faster at the model's width, fp32 elsewhere. One place decides
(`load_model(dtype="auto")`, the CLI's default); `--dtype fp32|fp16|bf16` forces a choice.

    auto on a CPU:  native bf16 (AVX512-BF16 or AMX-BF16 in the CPU's flags, oneDNN's bf16 on)
                    and the tuner's "precision" measurement at the UNet's width picks bf16
                    -> bf16, else fp32
    auto elsewhere: fp32 (a GPU keeps the precision it had; `--dtype fp16` asks for half)
    --no-autotune:  fp32 (PyTorch's defaults, reproducible runs; autotune.DEFAULT)
    MINIP2P_DTYPE:  fp32|fp16|bf16 answers "auto" without measuring (the tests set fp32, so
                    their references do not depend on the machine)

The measurement (`Tuner.pick("precision", …)`, cached like every choice, fast/autotune.py) times
a UNet-shaped slice in each precision: a 3×3 convolution and a linear layer of the model's
second level width on 32×32 latents (a ResBlock and a projection). A CPU without native bf16
converts every operand (AVX512 without BF16 emulates it): bf16 is then not even measured.

Whether the pictures hold is a measurement too, not a rule (tools/README.md, "Precision"):
the toy model's accuracy and cleanliness, and at SD 1.5 shape the decoded images' PSNR against
fp32. What stays in fp32 when the weights and activations are bf16, and why:

  - the latents z_t, the scheduler's ᾱ_t and every sampler step (pipeline.denoise, samplers/):
    ε_θ is cast to fp32 before guidance and the step, so rounding does not accumulate over 50
    steps (bf16 keeps 8 bits of mantissa: a step's update is often below z's last bit);
  - softmax in the explicit attention path (attention.py computes it in fp32, then M is cast):
    exp of a bf16 logit is off by up to 2⁻⁸ relative, which P2P's maps and MasaCtrl's masks read;
    PyTorch's fused CPU SDPA and `kernels.dnn_attention` accumulate the softmax in fp32 too;
  - GroupNorm's and LayerNorm's statistics: PyTorch's CPU kernels accumulate mean and variance of
    bf16 inputs in fp32 (a sum of 4096·c bf16 values would lose the mean);
  - inversions' optimisation: null-text inversion keeps an fp32 master copy of ∅ and its Adam
    state (real/invert.py), only the UNet call is in the model's precision;
  - the timestep embedding's sinusoids (unet.py builds them in fp32, then casts).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from .autotune import tuner

NATIVE_FLAGS = ("avx512_bf16", "amx_bf16")
ENV = "MINIP2P_DTYPE"


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def bf16_native() -> bool:
    """Does this CPU compute bf16 in hardware (not by conversion), with oneDNN's bf16 on?"""
    return (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and any(f in cpu_flags() for f in NATIVE_FLAGS))


def _slice(width: int, dtype: torch.dtype):
    """A ResBlock's 3×3 convolution and a projection at `width` channels on 32×32 latents."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, width, 32, 32, generator=g).to(dtype)
    w = (torch.randn(width, width, 3, 3, generator=g) * 0.02).to(dtype)
    t = torch.randn(1024, width, generator=g).to(dtype)
    lw = (torch.randn(width, width, generator=g) * 0.02).to(dtype)

    def run():
        F.conv2d(x, w, padding=1)
        F.linear(t, lw)
    return run


def choose(device: torch.device | str, width: int) -> str:
    """"fp32" or "bf16" for a model whose UNet's working width is `width` on `device`."""
    if os.environ.get(ENV) in ("fp32", "fp16", "bf16"):
        return os.environ[ENV]
    if torch.device(device).type != "cpu" or not bf16_native():
        return "fp32"
    return tuner().pick("precision", (width,), lambda: {
        "fp32": _slice(width, torch.float32), "bf16": _slice(width, torch.bfloat16)})


def width_of(spec) -> int:
    """The UNet's second level width from a folder's unet/config.json (SD 1.x: 640), else the
    SD 1.x value (single files, Hub ids: the measurement needs only a typical width)."""
    from ..model.config import read_json
    try:
        channels = read_json(Path(spec) / "unet" / "config.json")["block_out_channels"]
        return int(channels[min(1, len(channels) - 1)])
    except Exception:                                    # no folder, no such key: typical width
        return 640
