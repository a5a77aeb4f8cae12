"""Memory pre-flight: estimate a request's peak memory before any work; refuse what cannot fit.

    peak ≈ runtime + weights + max(one UNet call, one VAE encode/decode)

    runtime     the interpreter, torch and its kernels (CPU only; a fixed allowance, RUNTIME)
    weights     every parameter and buffer × bytes per element (fp32 4, fp16/bf16 2, int8
                weights 1, load/int8.py, plus one layer dequantised at a time); a text encoder
                freed after encoding (the CLI's default) counts only until the UNet runs
    UNet call   rows = 2 per image (∅ and c; plug-and-play 3). At each level (n = h·w latent
                pixels, c channels) the skips the decoder will read stay alive; the worst
                moment is one block's temporaries -- a ResBlock's feature maps, the GEGLU's
                (rows, n, 8c), and every attention map M = softmax(QKᵀ/√d) the path forms:
                rows × heads × n × m, three alive during the softmax (QKᵀ, QKᵀ/√d, M). The
                explicit path forms them all (at 1024² px, SD 1.x: 16k × 16k per head); the fast
                path only those a controller reads (cross maps, self maps ≤ `controlled`
                pixels), elsewhere a 16 MB slice. With gradients (null-text inversion) every
                temporary is kept for the backward pass, so they add up instead.
    VAE         one image at a time: a ResBlock's temporaries at the finest level, and the
                bottleneck's single-head self-attention map, always formed (n² at latent size).

The multipliers are counts of live tensors, checked against measured peak RSS on the toy model
and a random SD-1.x-structured one (tests/test_memory.py: within ±35 %).
"""
from __future__ import annotations

import os

import torch

from .errors import ParameterError

GiB = 1024 ** 3
RUNTIME = int(0.37 * GiB)         # python + torch + oneDNN + tokenizer, before any tensor
TOKENS = 77
SLICE = 4 * (1 << 22)             # ops.sdpa's query slice: 4M fp32 entries


def _levels(cfg, lh: int, lw: int):
    """(level, channels, pixels, has attention) of each UNet level, finest first."""
    n = len(cfg.block_out_channels)
    for i, c in enumerate(cfg.block_out_channels):
        attn = i == n - 1 or cfg.down_block_types[i].startswith("CrossAttn")  # the mid block has
        yield i, c, lh * lw, attn                                             # attention too
        lh, lw = (lh + 1) // 2, (lw + 1) // 2                  # a stride-2 conv, padding 1


def unet_bytes(cfg, rows: int, lh: int, lw: int, nbytes: int, explicit: bool,
               controlled: int = 0, grad: bool = False) -> int:
    """Peak activations of one UNet call on (rows, 4, lh, lw) latents."""
    kept, worst, total = 0, 0, 0
    for level, c, n, attn in _levels(cfg, lh, lw):
        kept += (cfg.layers_per_block + 1) * rows * c * n * nbytes       # skips for the decoder
        block = 4 * rows * c * n * nbytes                                 # ResBlock temporaries
        if attn:
            heads = cfg.heads(level)
            mbytes = 4 if cfg.upcast_attention else nbytes               # upcast: fp32 maps
            self_map = rows * heads * n * n * mbytes
            cross_map = rows * heads * n * TOKENS * mbytes
            formed = explicit or n <= controlled
            block += 16 * rows * n * c * nbytes                           # q, k, v, GEGLU (8c) ...
            block += 3 * (self_map if formed else min(self_map, SLICE))
            block += 3 * cross_map if explicit or controlled else 0
        worst = max(worst, block)
        total += block * (cfg.layers_per_block + 1) * cfg.transformer_layers_per_block
    return kept + (total if grad else worst)


def vae_bytes(cfg, height: int, width: int, nbytes: int) -> int:
    """Peak activations of encoding or decoding one image."""
    f = cfg.downscale
    worst, h, w = 0, height, width
    for c in cfg.block_out_channels:                          # finest level first (the encoder's
        worst = max(worst, 6 * c * h * w * nbytes)            # order; the decoder mirrors it)
        h, w = (h + 1) // 2, (w + 1) // 2
    n = (height // f) * (width // f)                          # bottleneck attention, one head
    return max(worst, 3 * n * n * nbytes)


def weights_bytes(model, text: bool = True) -> int:
    """Every parameter's and buffer's bytes: UNet, VAE, text encoder (unless `text` is False),
    the ControlNets (conditioning/), and one int8 layer dequantised."""
    parts = [model.unet, model.vae] + ([model.text_encoder] if model.text_encoder and text
                                       else [])
    parts += [c.net for c in getattr(model.conditioning, "controls", [])]
    total = sum(t.numel() * t.element_size() for m in parts
                for t in (*m.parameters(), *m.buffers()))
    q = [m.weight_q.numel() for m in model.unet.modules() if hasattr(m, "weight_q")]
    return total + max(q, default=0) * model.dtype.itemsize       # one layer dequantised


def estimate(model, images: int, height: int, width: int, explicit: bool, rows_per_image=2,
             controlled: int = 0, grad: bool = False, free_text: bool = False) -> int:
    """Bytes at the peak of a request of `images` images at height × width (`free_text`: the
    text encoder is freed once the prompts are encoded)."""
    f, nbytes = model.vae.cfg.downscale, model.dtype.itemsize
    rows = rows_per_image * images
    unet = unet_bytes(model.unet.cfg, rows, height // f, width // f, nbytes, explicit,
                      controlled, grad)
    vae = vae_bytes(model.vae.cfg, height, width, nbytes)
    runtime = RUNTIME if model.device.type == "cpu" else 0
    return runtime + max(weights_bytes(model), weights_bytes(model, not free_text) + max(unet, vae))


def available(device: torch.device) -> tuple[int, str]:
    """(bytes this process may still use in all, where that figure comes from)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_allocated(device), f"free on {device}"
    limits = []
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        limits.append(int(info["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    try:                                                      # a container's own limit
        with open("/sys/fs/cgroup/memory.max") as f, open("/sys/fs/cgroup/memory.current") as g:
            limits.append(int(f.read()) - int(g.read()))
    except (OSError, ValueError):                             # none, or "max"
        pass
    if not limits:
        return 0, "unknown"
    return min(limits) + _rss(), "available"                  # what we hold is ours already


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _size(b: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if b < 1024 or unit == "EiB":
            return f"{b:.3g} {unit}"
        b /= 1024


def check(model, images: int, height: int, width: int, explicit: bool, rows_per_image=2,
          controlled: int = 0, grad: bool = False, free_text: bool = False) -> int:
    """Refuse, in one line, a request whose estimated peak exceeds the memory there is.
    MINIP2P_MEMORY_LIMIT (bytes) replaces the measured limit (tests, shared machines)."""
    need = estimate(model, images, height, width, explicit, rows_per_image, controlled, grad,
                    free_text)
    if os.environ.get("MINIP2P_MEMORY_LIMIT"):
        limit, what = int(float(os.environ["MINIP2P_MEMORY_LIMIT"])), "allowed"
    else:
        limit, what = available(model.device)
    if limit and need > limit:
        hints = ["a smaller {height}/{width}"]
        if images > 1:
            hints.append("fewer prompts")
        if explicit:
            hints.append("the fast path (drop {explicit})")
        if model.dtype == torch.float32:
            hints.append("{dtype} fp16 on a GPU")
        if not any(hasattr(m, "weight_q") for m in model.unet.modules()):
            hints.append("{weights} int8")
        hint = hints[0] if len(hints) == 1 else ", ".join(hints[:-1]) + " or " + hints[-1]
        raise ParameterError(None, f"{width}×{height} with {images} image{'s' * (images > 1)} "
                                   f"needs about {_size(need)} of memory (estimated peak), "
                                   f"{_size(limit)} {what}; try {hint}")
    return need
