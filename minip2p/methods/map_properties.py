"""Self-Guidance's properties of a word's cross-attention map (methods/self_guidance.py states
the definitions): the map A_k itself, its shape, size, centroid and appearance, and the affine map
T that moves and scales a shape."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..control import map_shape
from .attend_excite import gaussian_kernel

__all__ = ["word_maps", "centroid", "size", "shape", "appearance", "transform"]


def _normalise(A: torch.Tensor) -> torch.Tensor:
    """(n, h, w) -> Gaussian-smoothed, min-max normalised to [0, 1] per map."""
    A = F.conv2d(F.pad(A[:, None], (1, 1, 1, 1), mode="replicate"), gaussian_kernel().to(A))[:, 0]
    lo = A.amin((1, 2), keepdim=True)
    hi = A.amax((1, 2), keepdim=True)
    return (A - lo) / (hi - lo).clamp(min=1e-12)


def word_maps(maps, tokens: dict[str, list[int]], row: int = 0,
              latent: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """[(site, M (rows, heads, p, 77)), …] -> {word: A_k (h, w)} at the finest layer's size;
    `latent`: the latents' (h, w), which gives each layer's shape (None: square maps)."""
    def hw(pixels):
        return map_shape(pixels, latent) if latent else (math.isqrt(pixels),) * 2
    size = hw(max(s.pixels for s, _ in maps))
    words = list(tokens)
    layers = []
    for s, M in maps:
        r = hw(s.pixels)
        m = M[row].float().mean(0).T.reshape(-1, *r)                        # (77, h, w)
        m = torch.stack([m[tokens[w]].sum(0) for w in words])[None]           # (1, k, h, w)
        if r != size:
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        layers.append(_normalise(m[0]))
    A = torch.stack(layers).mean(0)                                            # (k, h, w)
    return dict(zip(words, A))


def _grid(h: int, w: int, dtype=torch.float32):
    ys = (torch.arange(h, dtype=dtype) + 0.5) / h
    xs = (torch.arange(w, dtype=dtype) + 0.5) / w
    return xs, ys


def shape(A: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(10 * (A - 0.5))


def size(A: torch.Tensor) -> torch.Tensor:
    return shape(A).mean()


def centroid(A: torch.Tensor) -> torch.Tensor:
    """(h, w) -> (x, y) in [0, 1]², the mean of the pixel centres weighted by shape(A)."""
    S = shape(A)
    xs, ys = _grid(*A.shape, A.dtype)
    total = S.sum()
    return torch.stack([(S.sum(0) * xs).sum() / total, (S.sum(1) * ys).sum() / total])


def appearance(A: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """A: (h, w); ψ: (c, H, W) -> (c,)."""
    m = F.interpolate(shape(A)[None, None], size=psi.shape[-2:], mode="bilinear",
                      align_corners=False)[0, 0]
    return (psi * m).sum((1, 2)) / m.sum()


def transform(S: torch.Tensor, c: torch.Tensor, to: torch.Tensor, scale: float) -> torch.Tensor:
    """T(S): the map S (h, w) moved so that the point c goes to `to` and scaled by `scale`
    about it (both in [0, 1]²); outside the image reads 0. T(S)(p) = S(c + (p − to)/scale)."""
    c, to = c * 2 - 1, to * 2 - 1                                   # grid_sample's [−1, 1]
    theta = torch.tensor([[1 / scale, 0.0, 0.0], [0.0, 1 / scale, 0.0]], dtype=S.dtype)
    theta[:, 2] = c - to / scale
    grid = F.affine_grid(theta[None], [1, 1, *S.shape], align_corners=False)
    return F.grid_sample(S[None, None], grid, align_corners=False, padding_mode="zeros")[0, 0]
