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
                bottleneck's single-head self-attention map, always formed (n² at latent size);
                in tiles (`decode_tile`), one tile's.

The decoder is tiled (model/vae.py, `decode_tile`) when decoding one picture whole would take
more than DECODE_BUDGET of activations, or when the pre-flight finds the memory short and a
tile makes the request fit: then the largest tile of TILES that does.

The process's own allocator matters as much as the tensors: glibc raises its mmap threshold
as large blocks are freed (up to 32 MiB) and keeps freed blocks below it in its heap, where
the varied sizes of a UNet call fragment it, so resident memory grows call after call above
what is alive. `lean_heap` fixes the threshold (every block of ≥ 1 MiB gets its own mapping,
returned when freed); `release` hands freed heap pages back (after the load, after freeing the
text encoder). The CLI calls `lean_heap` at start; a library user may too.

The multipliers are counts of live tensors, checked against measured peak RSS on the toy model
and a random SD-1.x-structured one (tests/test_memory.py: within ±35 %).
"""
from __future__ import annotations

import ctypes
import os

from .errors import ParameterError

GiB = 1024 ** 3
RUNTIME = int(0.37 * GiB)         # python + torch + oneDNN + tokenizer, before any tensor
TOKENS = 77
SLICE = 4 * (1 << 22)             # ops.sdpa's query slice: 4M fp32 entries
DECODE_BUDGET = GiB               # one picture's decoder activations above this: tiles
TILES = (64, 48, 32, 24, 16)      # latent tile sides the pre-flight may fall back to
M_MMAP_THRESHOLD = -3             # glibc's mallopt parameter


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:                                           # not glibc (macOS, musl): no-op
        return None


def lean_heap(threshold: int = 1 << 20) -> bool:
    """Allocations of `threshold` bytes or more get their own mapping, given back when freed
    (glibc; elsewhere nothing is done). Returns whether it was set."""
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "mallopt")
                and libc.mallopt(M_MMAP_THRESHOLD, int(threshold)))


def release():
    """Give the heap's free pages back to the system (glibc's malloc_trim; elsewhere a no-op)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def decode_tile(model, height: int, width: int) -> int:
    """The latent tile side the decoder uses for one height × width picture, 0 for whole:
    `model.decode_tile` when set (0: never tiled), else tiles of the VAE's native size when
    a whole decode would take more than DECODE_BUDGET."""
    if model.decode_tile is not None:
        return model.decode_tile
    f = model.vae.cfg.downscale
    if vae_bytes(model.vae.cfg, height, width, model.dtype.itemsize) <= DECODE_BUDGET:
        return 0
    native = model.vae.cfg.sample_size // f
    return native if max(height, width) // f > native else max(TILES[-1], native // 2)


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


def vae_bytes(cfg, height: int, width: int, nbytes: int, tile: int = 0) -> int:
    """Peak activations of encoding or decoding one image (`tile`: in tiles of that many
    latents a side, plus the fp32 picture they are blended into)."""
    f = cfg.downscale
    if tile:
        whole = 2 * 4 * cfg.out_channels * height * width                # picture and weights
        return whole + vae_bytes(cfg, min(height, f * tile), min(width, f * tile), nbytes)
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
    vae = vae_bytes(model.vae.cfg, height, width, nbytes, decode_tile(model, height, width))
    runtime = RUNTIME if model.device.type == "cpu" else 0
    return runtime + max(weights_bytes(model), weights_bytes(model, not free_text) + max(unet, vae))


def available(device: torch.device) -> tuple[int, str]:
    """(bytes this process may still use in all, where that figure comes from)."""
    if device.type == "cuda":
        import torch
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
    args = (model, images, height, width, explicit, rows_per_image, controlled, grad, free_text)
    need = estimate(*args)
    if os.environ.get("MINIP2P_MEMORY_LIMIT"):
        limit, what = int(float(os.environ["MINIP2P_MEMORY_LIMIT"])), "allowed"
    else:
        limit, what = available(model.device)
    f = model.vae.cfg.downscale
    for tile in TILES if limit and need > limit and model.decode_tile is None else ():
        if tile >= max(height, width) // f:
            continue
        model.decode_tile = tile                     # the decoder in tiles, if that fits
        need = estimate(*args)
        if need <= limit:
            return need
        model.decode_tile = None
        need = estimate(*args)
    if limit and need > limit:
        hints = ["a smaller {height}/{width}"]
        if images > 1:
            hints.append("fewer prompts")
        if explicit:
            hints.append("the fast path (drop {explicit})")
        if model.dtype.is_floating_point and model.dtype.itemsize == 4:
            hints.append("{dtype} fp16 on a GPU")
        if not any(hasattr(m, "weight_q") for m in model.unet.modules()):
            hints.append("{weights} int8")
        hint = hints[0] if len(hints) == 1 else ", ".join(hints[:-1]) + " or " + hints[-1]
        raise ParameterError(None, f"{width}×{height} with {images} image{'s' * (images > 1)} "
                                   f"needs about {_size(need)} of memory (estimated peak), "
                                   f"{_size(limit)} {what}; try {hint}")
    return need
