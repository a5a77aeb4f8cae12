"""ControlNet's hint pictures: the Canny edge map, and the official resize of a picture.

Canny (1986), as OpenCV's `cv2.Canny(image, low, high)` computes it -- which is what the official
ControlNet canny annotator calls, on the 3-channel RGB picture (no grey conversion), aperture 3,
L1 gradient, thresholds 100 / 200:

    1. smoothing + derivative: the 3×3 Sobel kernels  G_x = [1 2 1]ᵀ·[−1 0 1],  G_y = G_xᵀ
       (border replicated). The Gaussian blur of the textbook recipe is the binomial [1 2 1]
       inside each Sobel kernel; cv2.Canny applies no other blur, so neither do we.
    2. magnitude  m = |∂x| + |∂y|  per channel; a colour picture keeps, at each pixel, the channel
       with the largest m (the first of equals) and that channel's (∂x, ∂y).
    3. non-maximum suppression along the gradient direction, quantised to 4 directions by
       tan 22.5° and tan 67.5°: a pixel is a candidate when m > low and m beats its two neighbours
       across the edge (strictly the one before, ≥ the one after for the horizontal and
       vertical directions, strictly both diagonally; outside the picture m = 0).
    4. hysteresis: candidates with m > high are edges, and so is every candidate 8-connected to
       an edge through candidates.

The edge map is 0 / 255 (uint8, H×W); `hwc3` repeats it to the 3 channels of the hint, which the
ControlNet reads as RGB in [0, 1].

`resize_image(picture, resolution)` is the official annotator's resize: scale so the short side
is `resolution`, round both sides to multiples of 64, then resample -- Lanczos (a = 4) when the
picture grows, area averaging when it shrinks (with OpenCV's rule for INTER_AREA when one side
grows: linear taps with its area-style fractions). Computed in floating point and rounded once,
so a pixel may differ by one level from OpenCV's fixed-point arithmetic.
"""
from __future__ import annotations

import numpy as np

from ..errors import ParameterError

TAN_22 = np.float64(np.tan(np.pi / 8))       # √2 − 1
TAN_67 = np.float64(np.tan(3 * np.pi / 8))   # √2 + 1
# OpenCV compares in fixed point: |∂y|·2¹⁵ against |∂x|·round(tan 22.5°·2¹⁵) (and +2·2¹⁵·|∂x|
# for 67.5°); we use the same integers so that ties fall on the same side.
_SHIFT = 15
_TG22 = int(0.4142135623730950488016887242097 * (1 << _SHIFT) + 0.5)


def hwc3(image: np.ndarray) -> np.ndarray:
    """uint8 H×W, H×W×1, H×W×3 or H×W×4 → H×W×3: grey repeated, alpha composited over white."""
    if image.dtype != np.uint8:
        raise ParameterError("image", f"must be uint8, not {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ParameterError("image", f"must be H×W with 1, 3 or 4 channels, not {image.shape}")
    if image.shape[2] == 3:
        return image
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    colour = image[:, :, :3].astype(np.float32)
    alpha = image[:, :, 3:].astype(np.float32) / 255.0
    return (colour * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def sobel(channel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(∂x, ∂y) of one H×W channel with the 3×3 Sobel kernels, border replicated (int32)."""
    p = np.pad(channel.astype(np.int32), 1, mode="edge")
    smooth_y = p[:-2] + 2 * p[1:-1] + p[2:]                   # [1 2 1] down the columns
    smooth_x = p[:, :-2] + 2 * p[:, 1:-1] + p[:, 2:]          # [1 2 1] along the rows
    dx = smooth_y[:, 2:] - smooth_y[:, :-2]
    dy = smooth_x[2:] - smooth_x[:-2]
    return dx, dy


def gradient(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(m, ∂x, ∂y) with m = |∂x| + |∂y|, taken from the channel where m is largest."""
    if image.ndim == 2:
        image = image[:, :, None]
    grads = [sobel(image[:, :, c]) for c in range(image.shape[2])]
    dx = np.stack([g[0] for g in grads])                       # (C, H, W)
    dy = np.stack([g[1] for g in grads])
    m = np.abs(dx) + np.abs(dy)
    best = np.argmax(m, axis=0)[None]                          # first channel among equals
    pick = lambda a: np.take_along_axis(a, best, axis=0)[0]    # noqa: E731
    return pick(m), pick(dx), pick(dy)


def suppress(m: np.ndarray, dx: np.ndarray, dy: np.ndarray, low: int) -> np.ndarray:
    """Candidates: m > low and a local maximum of m across the edge (boolean H×W)."""
    H, W = m.shape
    p = np.pad(m, 1)                                          # m = 0 outside the picture
    at = lambda oy, ox: p[1 + oy:1 + oy + H, 1 + ox:1 + ox + W]  # noqa: E731  m at (y+oy, x+ox)
    x = np.abs(dx).astype(np.int64)
    y = np.abs(dy).astype(np.int64) << _SHIFT
    tg22x = x * _TG22
    tg67x = tg22x + (x << (_SHIFT + 1))
    horizontal = y < tg22x                                     # gradient along x: compare left/right
    vertical = ~horizontal & (y > tg67x)                       # gradient along y: compare up/down
    diagonal = ~horizontal & ~vertical
    s = np.where((dx ^ dy) < 0, -1, 1)                         # which diagonal the gradient is on
    peak_h = (m > at(0, -1)) & (m >= at(0, 1))
    peak_v = (m > at(-1, 0)) & (m >= at(1, 0))
    peak_d = np.where(s > 0, (m > at(-1, -1)) & (m > at(1, 1)),
                      (m > at(-1, 1)) & (m > at(1, -1)))
    peak = (horizontal & peak_h) | (vertical & peak_v) | (diagonal & peak_d)
    return (m > low) & peak


def hysteresis(candidate: np.ndarray, strong: np.ndarray) -> np.ndarray:
    """Every candidate 8-connected, through candidates, to a strong one (boolean H×W)."""
    H, W = candidate.shape
    W2 = W + 2
    state = np.zeros((H + 2, W2), np.uint8)                   # 0 no, 1 candidate, 2 edge
    state[1:-1, 1:-1][candidate] = 1
    state[1:-1, 1:-1][candidate & strong] = 2
    flat = bytearray(state.tobytes())
    stack = np.flatnonzero(state.ravel() == 2).tolist()
    around = (-W2 - 1, -W2, -W2 + 1, -1, 1, W2 - 1, W2, W2 + 1)
    while stack:
        i = stack.pop()
        for o in around:
            if flat[i + o] == 1:
                flat[i + o] = 2
                stack.append(i + o)
    state = np.frombuffer(bytes(flat), np.uint8).reshape(H + 2, W2)
    return state[1:-1, 1:-1] == 2


def canny(image: np.ndarray, low: float = 100, high: float = 200) -> np.ndarray:
    """The Canny edge map of a uint8 H×W×3 (or H×W) picture as cv2.Canny(image, low, high):
    uint8 H×W, 255 on edges, 0 elsewhere."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ParameterError("image", "must be a uint8 array, H×W or H×W×C")
    if not (np.isfinite(low) and np.isfinite(high)):
        raise ParameterError("canny thresholds", f"must be finite, not {low}, {high}")
    low, high = int(np.floor(min(low, high))), int(np.floor(max(low, high)))
    m, dx, dy = gradient(image)
    candidate = suppress(m, dx, dy, low)
    edges = hysteresis(candidate, m > high)
    return np.where(edges, 255, 0).astype(np.uint8)


# ---- resize_image -------------------------------------------------------------------------------

def _lanczos4_taps(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights: 8-tap Lanczos (a = 4) at the source points (i + ½)·n_in/n_out − ½."""
    scale = n_in / n_out
    f = (np.arange(n_out) + 0.5) * scale - 0.5
    s = np.floor(f).astype(np.int64)
    t = f - s
    k = np.arange(-3, 5)
    d = t[:, None] - k[None, :]                                # distance of each tap, in pixels
    w = np.sinc(d) * np.sinc(d / 4)
    w /= w.sum(axis=1, keepdims=True)
    return _scatter(s[:, None] + k[None, :], w, n_in)


def _area_taps(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights for shrinking: each output pixel averages the source it covers."""
    scale = n_in / n_out
    lo = np.arange(n_out) * scale
    hi = np.minimum(lo + scale, n_in)
    j = np.arange(n_in)
    w = np.clip(np.minimum(hi[:, None], j + 1) - np.maximum(lo[:, None], j), 0, None)
    return w / w.sum(axis=1, keepdims=True)


def _area_linear_taps(n_in: int, n_out: int) -> np.ndarray:
    """OpenCV's INTER_AREA rule off its pure-shrink path: 2 linear taps (sx, sx+1) with weight
    f = frac((x + 1) − (sx + 1)·n_out/n_in), f ≤ 0 → 0, where sx = ⌊x·n_in/n_out⌋."""
    x = np.arange(n_out)
    s = np.floor(x * n_in / n_out).astype(np.int64)
    f = (x + 1) - (s + 1) * (n_out / n_in)
    f = np.where(f <= 0, 0.0, f - np.floor(f))
    return _scatter(np.stack([s, s + 1], 1), np.stack([1 - f, f], 1), n_in)


def _scatter(index: np.ndarray, w: np.ndarray, n_in: int) -> np.ndarray:
    """Taps at source indices (clamped to the picture: border replicated) → a dense matrix."""
    out = np.zeros((index.shape[0], n_in))
    rows = np.repeat(np.arange(index.shape[0]), index.shape[1])
    np.add.at(out, (rows, np.clip(index, 0, n_in - 1).ravel()), w.ravel())
    return out


def resize(image: np.ndarray, height: int, width: int, grow: bool) -> np.ndarray:
    """Resample a uint8 H×W×C picture to height × width: Lanczos-4 if `grow`, else area."""
    H, W = image.shape[:2]
    if (H, W) == (height, width):
        return image.copy()
    if grow:
        wy, wx = _lanczos4_taps(H, height), _lanczos4_taps(W, width)
    elif height <= H and width <= W:
        wy, wx = _area_taps(H, height), _area_taps(W, width)
    else:
        wy, wx = _area_linear_taps(H, height), _area_linear_taps(W, width)
    C = image.shape[2]
    rows = (wy @ image.reshape(H, W * C).astype(np.float64)).reshape(height, W, C)
    out = np.einsum("xw,ywc->yxc", wx, rows, optimize=True)
    return np.clip(np.floor(out + 0.5 + 1e-7), 0, 255).astype(np.uint8)     # halves up


def resize_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """The official annotator's resize: short side → `resolution`, sides rounded to multiples of
    64, Lanczos-4 when the picture grows, area when it shrinks. uint8 H×W×C → uint8 H'×W'×C."""
    if not isinstance(resolution, (int, np.integer)) or resolution < 64:
        raise ParameterError("resolution", f"must be an integer ≥ 64, not {resolution!r}")
    image = image if image.ndim == 3 else image[:, :, None]
    H, W = image.shape[:2]
    k = resolution / min(H, W)
    height, width = int(np.round(H * k / 64.0)) * 64, int(np.round(W * k / 64.0)) * 64
    return resize(image, height, width, grow=k > 1)
