"""Self-Guidance's properties of a word's cross-attention map (methods/self_guidance.py states
the definitions): the map A_k itself, its shape, size, centroid and appearance, and the affine map
T that moves and scales a shape."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..control import Controller, Site, map_shape
from ..guidance import TEXT
from .attend_excite import gaussian_kernel

__all__ = ["word_maps", "centroid", "size", "shape", "appearance", "transform", "Observe",
           "map_sites", "last_res"]


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


def last_res(unet):
    """Pick for the decoder's last ResBlock ("res" site), whose features are ψ."""
    block, layer = len(unet.up_blocks) - 1, len(unet.up_blocks[-1].resnets) - 1
    return lambda s: s.kind == "res" and s.place == "up" and s.block == block and s.layer == layer


def map_sites(s: Site) -> bool:
    """The sites whose maps Self-Guidance reads: the decoder's cross-attention at ≤ 16²."""
    return s.kind == "cross" and s.place == "up" and s.pixels <= 16 ** 2


class Observe(Controller):
    """The unguided generation's quantities at every step: shape', size', centroid',
    appearance' per word, and z'_t."""

    def __init__(self, unet, tokens: dict[str, list[int]], features: bool):
        self.tokens, self.feature_pick = tokens, (last_res(unet) if features else None)
        self.maps, self.psi, self.z = {}, {}, {}

    def wants(self, site):
        return map_sites(site) or (self.feature_pick is not None and self.feature_pick(site))

    def probs(self, M, site):
        row = site.batch_of(M.shape[0]).row(0, TEXT)
        M1 = M[row:row + 1].detach().mean(1, keepdim=True)
        self.maps.setdefault(site.step, []).append((site, M1))
        return M

    def features(self, h, site):
        row = site.batch_of(h.shape[0]).row(0, TEXT)
        self.psi[site.step] = h[row].detach().float()
        return h

    def after_step(self, z, step):
        self.z[step] = z.detach().clone()
        return z

    def reference(self, step: int) -> dict:
        A = word_maps(self.maps[step], self.tokens, latent=tuple(self.z[step].shape[-2:]))
        out = {w: dict(shape=shape(a), size=size(a), centroid=centroid(a))
               for w, a in A.items()}
        if step in self.psi:
            for w, a in A.items():
                out[w]["appearance"] = appearance(a, self.psi[step])
        return out
