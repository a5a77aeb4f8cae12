"""PIE-Bench's editing metrics (Ju et al. 2024, "PnP Inversion: Boosting Diffusion-based Editing
with 3 Lines of Code"), as its evaluation code computes them, for a source picture x, its edit y,
the edit mask m (1 = the edited region; the benchmark sets the 1-pixel border to 1 as well) and
the target prompt c. Pictures are H×W×3 in [0, 1] unless said.

    structure   ‖S(y) − S(x)‖² / N²        S = DINO ViT-B/8 last-layer key self-similarity (N×N,
                                            CLS included) of Resize(224, max 480) + ImageNet
                                            normalisation applied to [0, 255] values (their quirk)
    PSNR        10·log10(1 / MSE)           of x·(1−m) against y·(1−m) over the WHOLE picture
    MSE         mean((x − y)²·(1−m))        likewise, not divided by the unmasked area
    SSIM        Gaussian window 11, σ 1.5, k₁ .01, k₂ .03, reflect padding, mean of the map
    LPIPS       squeeze LPIPS of 2x·(1−m)−1 against 2y·(1−m)−1
    CLIP        max(100·cos(E_I(y), E_T(c)), 0), CLIP ViT-L/14; "edit" uses y·m (blacked out)

PSNR, MSE, SSIM and LPIPS are reported on the unedited part (1 − m) — "background" — and are
"nan" where that part is empty. Scales as the paper's tables: structure ×10³, LPIPS ×10³,
MSE ×10⁴, SSIM ×10². CLIP's preprocessing here is CLIP's own (PIL bicubic shorter side 224,
centre crop); the benchmark ran it through transformers' processor, which does the same.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SCALES = {"structure": 1e3, "psnr": 1.0, "lpips": 1e3, "mse": 1e4, "ssim": 1e2,
          "clip_whole": 1.0, "clip_edit": 1.0}


def mask_decode(runs: list[int], shape=(512, 512)) -> np.ndarray:
    """PIE-Bench's run-length mask [start, length, start, length, …] over a row-major H·W array
    -> (H, W) float 0/1, with the 1-pixel border set to 1 as the benchmark does."""
    H, W = shape
    flat = np.zeros(H * W)
    for start, length in zip(runs[0::2], runs[1::2]):
        flat[start:start + min(length, H * W - start)] = 1
    m = flat.reshape(H, W)
    m[0, :] = m[-1, :] = m[:, 0] = m[:, -1] = 1
    return m


def to_tensor(picture: np.ndarray) -> torch.Tensor:
    """H×W×3 array -> (1, 3, H, W) float32 tensor."""
    return torch.from_numpy(np.ascontiguousarray(picture, dtype=np.float32)).permute(2, 0, 1)[None]


def mse(x: np.ndarray, y: np.ndarray) -> float:
    return float(((to_tensor(x) - to_tensor(y)) ** 2).mean())


def psnr(x: np.ndarray, y: np.ndarray) -> float:
    e = mse(x, y)
    return math.inf if e == 0 else 10 * math.log10(1.0 / e)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    d = torch.arange((1 - size) / 2, (1 + size) / 2, 1.0)
    g = torch.exp(-(d / sigma) ** 2 / 2)
    g = g / g.sum()
    return g[:, None] * g[None, :]                                         # (size, size)


def ssim(x: np.ndarray, y: np.ndarray, k1: float = 0.01, k2: float = 0.03) -> float:
    """SSIM (Wang et al. 2004) with data range 1, as torchmetrics' StructuralSimilarityIndexMeasure:
    local statistics by a Gaussian window over reflect-padded pictures, the map's mean."""
    a, b = to_tensor(x).double(), to_tensor(y).double()
    window = _gaussian_window().double()
    pad = window.shape[0] // 2
    a, b = (F.pad(t, (pad, pad, pad, pad), mode="reflect") for t in (a, b))
    C = a.shape[1]
    stats = F.conv2d(torch.cat([a, b, a * a, b * b, a * b]), window.expand(C, 1, *window.shape),
                     groups=C)
    mu_a, mu_b, aa, bb, ab = stats.split(1)
    var_a = (aa - mu_a ** 2).clamp(min=0)
    var_b = (bb - mu_b ** 2).clamp(min=0)
    cov = ab - mu_a * mu_b
    c1, c2 = k1 ** 2, k2 ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


@torch.no_grad()
def structure_distance(dino, x: np.ndarray, y: np.ndarray) -> float:
    """MSE between the DINO key self-similarities of x and y, fed as [0, 255] (the benchmark's)."""
    from ..model.dino import preprocess
    S = [dino(preprocess(to_tensor(p), scale=255.0, patch=dino.cfg.patch_size)).self_similarity()
         for p in (x, y)]
    return float(F.mse_loss(S[1], S[0]))


@torch.no_grad()
def lpips(model, x: np.ndarray, y: np.ndarray) -> float:
    return float(model(to_tensor(x) * 2 - 1, to_tensor(y) * 2 - 1).mean())


def clip_pixels(clip, picture: np.ndarray) -> torch.Tensor:
    """CLIP's preprocessing of an H×W×3 uint8-valued picture: PIL bicubic shorter side -> S,
    centre crop S×S, /255, the CLIP mean and std."""
    from .clip_image import MEAN, STD
    S = clip.cfg.vision.image_size
    im = Image.fromarray(np.clip(np.rint(picture), 0, 255).astype(np.uint8))
    w, h = im.size
    size = (S, max(S, int(S * h / w))) if w <= h else (max(S, int(S * w / h)), S)
    im = im.resize(size, Image.BICUBIC)
    left, top = (im.size[0] - S) // 2, (im.size[1] - S) // 2
    im = im.crop((left, top, left + S, top + S))
    t = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    mean, std = (torch.tensor(v)[None, :, None, None] for v in (MEAN, STD))
    return (t - mean) / std


@torch.no_grad()
def clip_score(clip, picture_uint8: np.ndarray, text: str) -> float:
    """max(100·cos(E_I, E_T), 0) as torchmetrics' CLIPScore, for one picture (values 0–255)."""
    f_i = clip.image_features(clip_pixels(clip, picture_uint8))
    f_t = clip.text_features(clip.tokenizer([text]))
    return max(100 * float(F.cosine_similarity(f_i, f_t)), 0.0)


def scores(x: np.ndarray, y: np.ndarray, mask: np.ndarray | None, prompt: str | None,
           dino=None, lpips_model=None, clip=None) -> dict[str, float]:
    """Every metric for one pair (x, y in [0, 1], H×W×3; mask H×W, 1 = edited), in the paper's
    scales; a metric whose model is None or whose input is missing is left out."""
    keep = np.ones(x.shape[:2]) if mask is None else 1 - mask
    out: dict[str, float] = {}
    if dino is not None:
        out["structure"] = structure_distance(dino, x, y)
    if keep.sum() == 0:
        out.update({k: math.nan for k in ("psnr", "mse", "ssim")})
        if lpips_model is not None:
            out["lpips"] = math.nan
    else:
        xb, yb = x * keep[..., None], y * keep[..., None]
        out.update(psnr=psnr(xb, yb), mse=mse(xb, yb), ssim=ssim(xb, yb))
        if lpips_model is not None:
            out["lpips"] = lpips(lpips_model, xb, yb)
    if clip is not None and prompt is not None:
        y255 = y * 255
        out["clip_whole"] = clip_score(clip, y255, prompt)
        if mask is not None:
            out["clip_edit"] = (math.nan if mask.sum() == 0 else
                                clip_score(clip, np.rint(y255) * mask[..., None], prompt))
    return {k: v * SCALES[k] for k, v in out.items()}
