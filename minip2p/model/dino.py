"""DINO's Vision Transformer (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision
Transformers"): the feature extractor behind DiffuseIT's structure loss and PIE-Bench's
structure distance.

    image (B, 3, H, W) ─ patch conv (p×p, stride p) ─ [CLS] ⊕ patches + positions
        ─ L × [x += Attn(LN(x)); x += MLP(LN(x))] ─ LN ─ (unused by either user)

with Attn the usual multi-head attention, q = W_q x, k = W_k x, v = W_v x (with biases),
softmax(q kᵀ / √d) v over all N = 1 + (H/p)(W/p) tokens. What the two users read:

    keys_L   = W_k LN(x_{L−1})  of the last block, heads concatenated: (B, N, D)
    S(x)     = cos(keys_L[i], keys_L[j])  for all token pairs i, j (CLS included): (B, N, N)
    [CLS]    = x_L[:, 0], the last block's output BEFORE the final layer norm

Module names equal transformers' `ViTModel` keys (`embeddings.patch_embeddings.projection`,
`encoder.layer.i.attention.attention.key`, `layernorm_before` …), so the public
`facebook/dino-vit{s,b}{8,16}` folders (config.json + model.safetensors) load strictly. One
deliberate difference from that config: DINO's layer norms use ε = 1e-6, the transformers config
says 1e-12; we use DINO's (`LAYER_NORM_EPS`), as the official DINO code and DiffuseIT do.

Positions: the checkpoint holds (image_size/p)² + 1 of them; another grid interpolates the patch
positions bicubically to (H/p, W/p) as transformers' `interpolate_pos_encoding` (DINO's own code
passes a scale factor of (n + 0.1)/√N instead of the size; the grid is the same).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MinipError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYER_NORM_EPS = 1e-6                                 # DINO's, not transformers' 1e-12


@dataclass(frozen=True)
class DinoConfig:
    """ViT-S/8: 384 wide, 6 heads; ViT-B/8: 768 wide, 12 heads; both 12 layers, MLP ×4."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    image_size: int = 224
    patch_size: int = 8
    num_channels: int = 3
    qkv_bias: bool = True
    hidden_act: str = "gelu"

    @classmethod
    def from_dict(cls, data: dict, source: str) -> "DinoConfig":
        if data.get("model_type", "vit") != "vit":
            raise MinipError(f"{source}: model_type '{data.get('model_type')}' is not a ViT "
                             "(give a facebook/dino-vit* folder)")
        if data.get("hidden_act", "gelu") != "gelu":
            raise MinipError(f"{source}: hidden_act '{data['hidden_act']}' is not supported (gelu)")
        names = cls.__dataclass_fields__
        return cls(**{k: type(getattr(cls, k))(v) for k, v in data.items() if k in names})


class PatchEmbeddings(nn.Module):
    def __init__(self, cfg: DinoConfig):
        super().__init__()
        p = cfg.patch_size
        self.projection = nn.Conv2d(cfg.num_channels, cfg.hidden_size, p, stride=p)


class Embeddings(nn.Module):
    def __init__(self, cfg: DinoConfig):
        super().__init__()
        self.patch_size = cfg.patch_size
        n = (cfg.image_size // cfg.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.empty(1, 1, cfg.hidden_size))
        self.position_embeddings = nn.Parameter(torch.empty(1, n + 1, cfg.hidden_size))
        self.patch_embeddings = PatchEmbeddings(cfg)

    def positions(self, rows: int, cols: int) -> torch.Tensor:
        """The position embeddings for a rows × cols patch grid (1, 1 + rows·cols, D)."""
        pos = self.position_embeddings
        side = int(round((pos.shape[1] - 1) ** 0.5))
        if (rows, cols) == (side, side):
            return pos
        grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)  # (1, D, side, side)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embeddings.projection(x)                   # (B, D, H/p, W/p)
        rows, cols = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)                      # (B, N−1, D)
        cls = self.cls_token.expand(x.shape[0], -1, -1)                   # (B, 1, D)
        return torch.cat([cls, patches], dim=1) + self.positions(rows, cols)


class SelfAttention(nn.Module):
    def __init__(self, cfg: DinoConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.query = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.key = nn.Linear(d, d, bias=cfg.qkv_bias)
        self.value = nn.Linear(d, d, bias=cfg.qkv_bias)


class Output(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class Attention(nn.Module):
    def __init__(self, cfg: DinoConfig):
        super().__init__()
        self.attention = SelfAttention(cfg)
        self.output = Output(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, D) -> (attention output (B, N, D), keys k (B, N, D), heads concatenated)."""
        a = self.attention
        q, k, v = a.query(x), a.key(x), a.value(x)
        B, N, D = x.shape
        split = lambda t: t.view(B, N, a.heads, D // a.heads).transpose(1, 2)   # (B, nh, N, hd)
        M = (split(q) @ split(k).transpose(-1, -2) / (D // a.heads) ** 0.5).softmax(dim=-1)
        out = (M @ split(v)).transpose(1, 2).reshape(B, N, D)
        return self.output.dense(out), k


class Intermediate(nn.Module):
    def __init__(self, cfg: DinoConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.intermediate_size)


class Layer(nn.Module):
    def __init__(self, cfg: DinoConfig):
        super().__init__()
        d = cfg.hidden_size
        self.layernorm_before = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.attention = Attention(cfg)
        self.layernorm_after = nn.LayerNorm(d, eps=LAYER_NORM_EPS)
        self.intermediate = Intermediate(cfg)
        self.output = Output(cfg.intermediate_size, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, k = self.attention(self.layernorm_before(x))
        x = x + a
        x = x + self.output.dense(F.gelu(self.intermediate.dense(self.layernorm_after(x))))
        return x, k


class Encoder(nn.Module):
    def __init__(self, cfg: DinoConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(cfg) for _ in range(cfg.num_hidden_layers))


@dataclass
class DinoFeatures:
    """What one forward pass gives: the last block's keys (B, N, D), its output before the final
    norm (B, N, D), and every block's output (L tensors, for a reader who wants other layers)."""
    keys: torch.Tensor
    tokens: torch.Tensor
    hidden: list[torch.Tensor]

    @property
    def cls(self) -> torch.Tensor:
        """[CLS] of the last block, before the final norm: DiffuseIT's semantic feature (B, D)."""
        return self.tokens[:, 0]

    def self_similarity(self) -> torch.Tensor:
        """S = cos(k_i, k_j) over all token pairs, CLS included (B, N, N); the norms' product
        clamped at 1e-8 as the official extractor (splice's `attn_cosine_sim`) does."""
        k = self.keys
        norms = k.norm(dim=-1, keepdim=True)                              # (B, N, 1)
        return (k @ k.transpose(1, 2)) / (norms @ norms.transpose(1, 2)).clamp(min=1e-8)


class DinoViT(nn.Module):
    def __init__(self, cfg: DinoConfig, pooler: bool = False):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=LAYER_NORM_EPS)   # kept for strictness
        if pooler:                                                   # a checkpoint may carry it
            self.pooler = nn.ModuleDict({"dense": nn.Linear(cfg.hidden_size, cfg.hidden_size)})

    def forward(self, pixels: torch.Tensor) -> DinoFeatures:
        """pixels (B, 3, H, W), normalised (`preprocess`), H and W multiples of the patch."""
        p = self.cfg.patch_size
        if pixels.shape[-1] % p or pixels.shape[-2] % p:
            raise MinipError(f"DINO input {tuple(pixels.shape[-2:])}: sides must be multiples "
                             f"of the patch size {p}")
        x = self.embeddings(pixels.to(self.layernorm.weight.dtype))
        hidden, k = [], None
        for layer in self.encoder.layer:
            x, k = layer(x)
            hidden.append(x)
        return DinoFeatures(keys=k, tokens=x, hidden=hidden)


def resize_like_torchvision(images: torch.Tensor, size: int = 224, max_size: int | None = 480):
    """torchvision's `Resize(size, max_size=…)` on tensors: the shorter side to `size`, the longer
    in proportion (truncated), capped at `max_size`; bilinear with antialiasing, differentiable."""
    H, W = images.shape[-2:]
    short, long = min(H, W), max(H, W)
    new_short, new_long = size, int(size * long / short)
    if max_size is not None and new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    out = (new_short, new_long) if H <= W else (new_long, new_short)
    if out == (H, W):
        return images
    return F.interpolate(images, size=out, mode="bilinear", align_corners=False, antialias=True)


def preprocess(images: torch.Tensor, size: int = 224, max_size: int | None = 480,
               scale: float = 1.0, patch: int = 8) -> torch.Tensor:
    """images (B, 3, H, W) in [0, 1] (× `scale`: PIE-Bench passes [0, 255], a quirk kept to match
    its numbers) -> resized as `Resize(size, max_size)`, ImageNet-normalised, then cropped down
    to multiples of the patch (the patch conv would drop the remainder anyway)."""
    x = resize_like_torchvision(images.float() * scale, size, max_size)
    mean, std = (torch.tensor(v, device=x.device)[None, :, None, None]
                 for v in (IMAGENET_MEAN, IMAGENET_STD))
    x = (x - mean) / std
    H, W = x.shape[-2:]
    return x[:, :, :H - H % patch, :W - W % patch]


def load_dino(folder, device="cpu", dtype=torch.float32) -> DinoViT:
    """A transformers ViTModel folder (config.json + model.safetensors, e.g. facebook/dino-vitb8)
    -> DinoViT, strictly (a `vit.` prefix of a classifier checkpoint is accepted, its head not)."""
    from ..load.checkpoint import read_safetensors, strict_build
    from ..model.config import read_json
    path = Path(folder)
    if not path.exists() and "/" in str(folder) and not str(folder).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
            path = Path(snapshot_download(str(folder),
                                          allow_patterns=["config.json", "model.safetensors"]))
        except Exception as e:                                           # noqa: BLE001
            raise MinipError(f"DINO model '{folder}' not found locally or on the Hub "
                             f"({type(e).__name__}); give a folder") from None
    if not (path / "config.json").is_file():
        raise MinipError(f"DINO model '{folder}' not found: give a folder with config.json and "
                         "model.safetensors (e.g. facebook/dino-vitb8) or a Hub repo id")
    cfg = DinoConfig.from_dict(read_json(path / "config.json"), str(path / "config.json"))
    state = read_safetensors(path / "model.safetensors")
    state = {k.removeprefix("vit."): v for k, v in state.items()}
    pooler = any(k.startswith("pooler.") for k in state)
    return strict_build(lambda c: DinoViT(c, pooler=pooler), cfg, state, str(path), dtype, device)
