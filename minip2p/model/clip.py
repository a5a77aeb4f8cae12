"""CLIP text transformer ψ(P): 77 token ids -> 77 contextual embeddings (last hidden state).

    ids ─ token + position embeddings ─ N × [x += MHA(LN(x)) (causal); x += MLP(LN(x))] ─ LN

SD 1.x uses OpenAI's ViT-L/14 text tower: 12 layers, width 768, 12 heads, quick-GELU.
Module names equal the transformers checkpoint keys (text_model.encoder.layers.0.self_attn...).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextConfig


class CLIPAttention(nn.Module):
    def __init__(self, dim, heads, causal=True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2)           # (b, h, n, d)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        # text: causal, token i sees tokens ≤ i; image patches see each other (clip_image.py).
        # Not a P2P site, so SDPA is fine
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(dim, hidden), nn.Linear(hidden, dim), act

    def forward(self, x):
        x = self.fc1(x)
        x = x * torch.sigmoid(1.702 * x) if self.act == "quick_gelu" else F.gelu(x)
        return self.fc2(x)


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, causal: bool = True):
        super().__init__()
        d = cfg.hidden_size
        self.layer_norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(d, cfg.num_attention_heads, causal)
        self.layer_norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(d, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.token_embedding(ids) + self.position_embedding(pos)[None]


class CLIPEncoder(nn.Module):
    """Holds the layers under the checkpoint's key names (`encoder.layers.N`); no forward."""

    def __init__(self, cfg: TextConfig, causal: bool = True):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(cfg, causal)
                                     for _ in range(cfg.num_hidden_layers)])


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = TextModel(cfg)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: (b, 77) int64 -> last hidden state (b, 77, width)."""
        m = self.text_model
        x = m.embeddings(ids)
        for layer in m.encoder.layers:
            x = layer(x)
        return m.final_layer_norm(x)
