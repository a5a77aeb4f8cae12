"""DiffuseIT's losses (Kwon & Ye, ICLR 2023, "Diffusion-based Image Translation using Disentangled
Style and Content Representation"), as its official code computes them. Pictures are (B, 3, H, W)
in [0, 1]; D = a DINO ViT (model/dino.py) after Resize(224, max 480) + ImageNet normalisation;
k(x) its last layer's keys (N tokens × heads·d, CLS included), S(x) their cosine self-similarity,
e(x) its [CLS] before the final norm.

    structure      L_ssim   = Σ_b ‖S(x_b) − S(x_src,b)‖² / N²                         (λ 1000)
    contrastive    L_contra = mean_b mean_i −log softmax_j(ℓ_ij / τ)_{j=i}, τ = 0.07   (λ 200)
                   ℓ_ii = cos(k_i(x), k_i(src)) (the positive), ℓ_ij = cos(k_i(x), k_j(src)),
                   j ≠ i (the negatives); the code puts the positive first and fills the
                   diagonal of the negatives with −10 (PatchNCE of CUT, all tokens, one image)
    semantic       L_sem    = −Σ_b ‖e(x_b) − e(x_prev,b)‖² / D   while t > t_sem = 500  (λ 100)
                   (pushes each step's [CLS] away from the previous step's: "semantic divergence")
    image target   L_trg    = Σ_b ‖e(x_b) − e(y_b)‖² / D                                (λ 2000)
    CLIP           L_clip   = −mean over cuts c of E_I(aug_c(x)) · d                   (λ 2000)
                   d = normalize(E_T(target) − 0.4·E_T(source) + 0.2·E_I(x_src)), each E_T the
                   normalised mean over CLIP's prompt templates, each E_I(aug_c(x)) normalised;
                   aug: rotation ±10°, RandomResizedCrop(224, scale 0.8–1, ratio 0.9–1.1), flip
    range          L_range  = mean((x̂ − clamp(x̂, −1, 1))²) on x̂ = 2x − 1                (λ 200)

The official code sums CLIP over five CLIP models (RN50 … ViT-B/16); here one CLIP model is given.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..model.dino import preprocess
from .clip_templates import TEMPLATES

TAU = 0.07


def dino_features(dino, x: torch.Tensor):
    return dino(preprocess(x, patch=dino.cfg.patch_size))


def structure_loss(dino, x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        S_src = dino_features(dino, src).self_similarity()
    S = dino_features(dino, x).self_similarity()
    return sum(F.mse_loss(S[b], S_src[b]) for b in range(x.shape[0]))


def patch_nce(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q, k (N, D): one image's keys (output, source) -> the N per-token PatchNCE losses."""
    k = k.detach()
    qn, kn = q.norm(dim=-1, keepdim=True), k.norm(dim=-1, keepdim=True)
    positive = (q * k).sum(-1, keepdim=True) / (qn * kn)                  # (N, 1)
    negative = (q @ k.T) / (qn @ kn.T)                                    # (N, N)
    negative = negative.masked_fill(torch.eye(q.shape[0], dtype=torch.bool, device=q.device), -10.0)
    logits = torch.cat([positive, negative], dim=1) / TAU
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device),
                           reduction="none")


def contrastive_loss(dino, x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        k_src = dino_features(dino, src).keys
    k = dino_features(dino, x).keys
    return sum(patch_nce(k[b], k_src[b]).mean() for b in range(x.shape[0])) / x.shape[0]


def semantic_loss(dino, x: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        e_prev = dino_features(dino, prev).cls
    e = dino_features(dino, x).cls
    return -sum(F.mse_loss(e_prev[b], e[b]) for b in range(x.shape[0]))


def target_loss(dino, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        e_target = dino_features(dino, target).cls
    e = dino_features(dino, x).cls
    return sum(F.mse_loss(e_target[b], e[b]) for b in range(x.shape[0]))


def range_loss(x: torch.Tensor) -> torch.Tensor:
    """x in [0, 1] -> the official range loss on 2x − 1, summed over the batch."""
    x = 2 * x - 1
    return (x - x.clamp(-1, 1)).pow(2).mean(dim=(1, 2, 3)).sum()


def clip_text(clip, text: str) -> torch.Tensor:
    """normalize(mean over the templates of E_T(template(text))) (1, d), as the official code."""
    f = clip.text_features(clip.tokenizer([t.format(text) for t in TEMPLATES]))
    f = f.mean(0, keepdim=True)
    return f / f.norm(dim=-1, keepdim=True)


def clip_direction(clip, target: str, source: str, x_src: torch.Tensor) -> torch.Tensor:
    """d = normalize(E_T(target) − 0.4·E_T(source) + 0.2·E_I(x_src)) (1, d)."""
    with torch.no_grad():
        e_i = clip_image(clip, x_src, cuts=0)
        d = clip_text(clip, target) - 0.4 * clip_text(clip, source) + 0.2 * e_i
    return d / d.norm(dim=-1, keepdim=True)


def augment(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One random view of x (1, 3, H, W): rotation by θ ∈ [−10°, 10°] about the centre (zero
    fill), a crop of area fraction s ∈ [0.8, 1] and aspect r ∈ [0.9, 1.1] (log-uniform) at a
    random place, resized to size × size, mirrored with p = 0.5 — one bilinear resampling."""
    u = torch.rand(6, generator=generator).tolist()
    theta = math.radians(-10 + 20 * u[0])
    s, r = 0.8 + 0.2 * u[1], math.exp(math.log(0.9) + (math.log(1.1) - math.log(0.9)) * u[2])
    w, h = min(1.0, math.sqrt(s * r)), min(1.0, math.sqrt(s / r))   # fractions of the sides
    cx, cy = (2 * u[3] - 1) * (1 - w), (2 * u[4] - 1) * (1 - h)      # crop centre, in [−1, 1]
    flip = -1.0 if u[5] < 0.5 else 1.0
    cos, sin = math.cos(theta), math.sin(theta)
    # output (u, v) ∈ [−1, 1]² -> crop point p = (cx + flip·w·u, cy + h·v) -> rotated back
    A = torch.tensor([[flip * w, 0.0, cx], [0.0, h, cy]])
    R = torch.tensor([[cos, -sin], [sin, cos]])
    theta_m = (R @ A)[None].to(x)
    grid = F.affine_grid(theta_m, (1, 3, size, size), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def clip_image(clip, x: torch.Tensor, cuts: int, generator: torch.Generator | None = None):
    """E_I(x) (1, d): with cuts = 0 the plain view (CLIP's resize and centre crop); else the mean
    of `cuts` normalised features of random views (`augment`), not normalised again."""
    from ..data.clip_image import MEAN, STD
    S = clip.cfg.vision.image_size
    mean, std = (torch.tensor(v, device=x.device)[None, :, None, None] for v in (MEAN, STD))
    if cuts == 0:
        H, W = x.shape[-2:]
        size = (S, max(S, round(W * S / H))) if H <= W else (max(S, round(H * S / W)), S)
        v = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        top, left = (v.shape[2] - S) // 2, (v.shape[3] - S) // 2
        views = v[:, :, top:top + S, left:left + S]
    else:
        g = generator or torch.Generator().manual_seed(0)
        views = torch.cat([augment(x, S, g) for _ in range(cuts)])
    f = clip.visual_projection(clip.vision_model((views - mean) / std))
    f = f / f.norm(dim=-1, keepdim=True)
    return f.mean(0, keepdim=True)


def clip_loss(clip, x: torch.Tensor, direction: torch.Tensor, cuts: int,
              generator: torch.Generator | None = None) -> torch.Tensor:
    return -(clip_image(clip, x, cuts, generator) @ direction.T).mean()
