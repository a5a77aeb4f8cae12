"""CLIP as a judge (Radford et al. 2021): the image tower, both projections, and the four
similarities the InstructPix2Pix data recipe filters with (its metrics/clip_similarity.py).

    image (B, 3, 224, 224) ─ patch conv (p×p, stride p) ─ [CLS] ⊕ patches + positions ─ LN (pre)
        ─ N × [x += MHA(LN(x)); x += MLP(LN(x))] ─ LN (post) of [CLS] ─ W_visual ─ f_I
    text ids ─ the text tower (clip.py) ─ hidden state at the first end-of-text token ─ W_text ─ f_T

Both features are L2-normalised; with images x_0, x_1 and captions c_0, c_1 (before/after):

    sim_0   = cos(f_I(x_0), f_T(c_0))           text–image, before   (≥ 0.2 kept)
    sim_1   = cos(f_I(x_1), f_T(c_1))           text–image, after    (≥ 0.2)
    sim_dir = cos(f_I(x_1) − f_I(x_0), f_T(c_1) − f_T(c_0))   directional (≥ 0.2, ranks)
    sim_img = cos(f_I(x_0), f_I(x_1))           image–image          (≥ 0.7)

Module names equal transformers' `CLIPModel` keys (note its `pre_layrnorm` spelling), so a folder
with its config.json and model.safetensors (e.g. openai/clip-vit-large-patch14) loads strictly.
Preprocessing is CLIP's: bicubic resize of the shorter side to the tower's size (224), centre
crop, the mean/std of CLIP's training set.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..load.checkpoint import CLIP_TOKENIZER, read_safetensors, strict_build
from ..model.clip import CLIPEncoder, TextModel
from ..model.config import TextConfig, _build, read_json
from ..errors import MinipError

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class CLIPConfig:
    text: TextConfig
    vision: VisionConfig
    projection_dim: int = 768
    eos_token_id: int = 49407

    @classmethod
    def from_dict(cls, data: dict, source: str) -> "CLIPConfig":
        if "text_config" not in data or "vision_config" not in data:
            raise MinipError(f"{source}: not a CLIPModel config (no text_config/vision_config)")
        text = TextConfig.from_dict(data["text_config"], f"{source} text_config")
        vision = _build(VisionConfig, data["vision_config"], f"{source} vision_config", {})
        eos = data["text_config"].get("eos_token_id", 49407)
        if eos == 2:
            raise MinipError(f"{source}: eos_token_id 2 (an old config): not supported")
        return cls(text, vision, int(data.get("projection_dim", 512)), int(eos))


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.empty(d))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, p, stride=p, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // p) ** 2 + 1, d)

    def forward(self, x):
        patches = self.patch_embedding(x).flatten(2).transpose(1, 2)       # (b, n, d)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)              # (b, 1, d)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight[None]


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = CLIPEncoder(cfg, causal=False)      # patches attend to all patches
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        """x (b, 3, S, S), normalised -> the post-LN class token (b, d)."""
        h = self.pre_layrnorm(self.embeddings(x))
        for layer in self.encoder.layers:
            h = layer(h)
        return self.post_layernorm(h[:, 0])


class CLIPModel(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = TextModel(cfg.text)
        self.vision_model = VisionModel(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.text_projection = nn.Linear(cfg.text.hidden_size, cfg.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.empty(()))    # unused here, kept for strictness
        self.tokenizer = None

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> CLIP's input (B, 3, S, S): shorter side resized to S
        (bicubic), centre crop, (x − mean) / std."""
        S = self.cfg.vision.image_size
        H, W = images.shape[-2:]
        size = (S, max(S, round(W * S / H))) if H <= W else (max(S, round(H * S / W)), S)
        x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False)
        top, left = (x.shape[2] - S) // 2, (x.shape[3] - S) // 2
        x = x[:, :, top:top + S, left:left + S]
        mean, std = (torch.tensor(v, device=x.device)[None, :, None, None] for v in (MEAN, STD))
        return (x - mean) / std

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels (B, 3, S, S) -> projected features (B, projection_dim)."""
        return self.visual_projection(self.vision_model(pixels.to(self.visual_projection.weight)))

    @torch.no_grad()
    def text_features(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, 77) -> projected features at the first end-of-text token."""
        m = self.text_model
        x = m.embeddings(ids.to(self.text_projection.weight.device))
        for layer in m.encoder.layers:
            x = layer(x)
        x = m.final_layer_norm(x)
        eos = (ids == self.cfg.eos_token_id).int().argmax(dim=1)          # first EOS position
        return self.text_projection(x[torch.arange(x.shape[0]), eos])

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        f = self.image_features(self.preprocess(images))
        return f / f.norm(dim=1, keepdim=True)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        f = self.text_features(self.tokenizer(texts))
        return f / f.norm(dim=1, keepdim=True)

    def similarities(self, image_0, image_1, text_0: list[str], text_1: list[str]) -> dict:
        """The recipe's four scores (each (B,)): sim_0, sim_1, sim_dir, sim_img; images in [0, 1]."""
        i0, i1 = self.encode_images(image_0), self.encode_images(image_1)
        t0, t1 = self.encode_texts(text_0), self.encode_texts(text_1)
        return dict(clip_sim_0=F.cosine_similarity(i0, t0), clip_sim_1=F.cosine_similarity(i1, t1),
                    clip_sim_dir=F.cosine_similarity(i1 - i0, t1 - t0),
                    clip_sim_image=F.cosine_similarity(i0, i1))


def load_clip(folder, device="cpu") -> CLIPModel:
    """A transformers CLIPModel folder (config.json, model.safetensors) -> CLIPModel, strictly;
    a Hub repo id (owner/name) is resolved in huggingface_hub's cache first."""
    from ..model.tokenizer import ClipTokenizer
    path = Path(folder)
    if not path.exists() and "/" in str(folder) and not str(folder).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
            path = Path(snapshot_download(str(folder), allow_patterns=[
                "config.json", "model.safetensors", "vocab.json", "merges.txt"]))
        except Exception as e:                                           # noqa: BLE001
            raise MinipError(f"CLIP model '{folder}' not found locally or on the Hub "
                             f"({type(e).__name__}); give a folder") from None
    if not path.is_dir():
        raise MinipError(f"CLIP model '{folder}' not found: give a transformers CLIPModel folder "
                         "(config.json + model.safetensors) or a Hub repo id")
    cfg = CLIPConfig.from_dict(read_json(path / "config.json"), str(path / "config.json"))
    state = {k: v for k, v in read_safetensors(path / "model.safetensors").items()
             if not k.endswith("position_ids")}
    model = strict_build(CLIPModel, cfg, state, str(path), torch.float32, device)
    tok_dir = path if (path / "vocab.json").is_file() and (path / "merges.txt").is_file() \
        else CLIP_TOKENIZER
    model.tokenizer = ClipTokenizer.from_dir(tok_dir)
    return model
