"""Textual-inversion embeddings (Gal et al. 2022, arXiv 2208.01618): new words for the prompt.

An embedding file holds, for one new token, n ≥ 1 learned vectors v_1 … v_n of the text
encoder's width d. Loading one adds the token to the tokenizer (n ids: "<tok>", "<tok>_1", …,
as diffusers' `load_textual_inversion` names them) and appends the vectors as new rows of the
text encoder's token embedding E (V × d -> (V + n) × d); the rest of ψ is unchanged. The token
then works in any prompt and in P2P word lookups (`--blend "<cat-toy>" dog`).

Accepted layouts, all safetensors (pickled .pt/.bin files are refused: unpickling runs code):
  diffusers `learned_embeds.safetensors`   {"<cat-toy>": (d,) or (n, d)}
  A1111 / kohya multi-vector files        {"string_to_param.*": (n, d)} or {"emb_params": (n, d)};
                                           the token is the file name without its suffix
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .checkpoint import PICKLE_SUFFIXES
from ..errors import MinipError

MULTI_KEYS = ("string_to_param.*", "string_to_param", "emb_params")


def _learned_file(path: Path, noun: str, plural: str) -> None:
    """A learned file must be a .safetensors file that exists (one line otherwise)."""
    if path.suffix in PICKLE_SUFFIXES:
        raise MinipError(f"{path.name}: pickled {plural} are refused (unpickling runs code); "
                         f"use a .safetensors {noun}")
    if not path.is_file():
        raise MinipError(f"{noun} file '{path}' not found")


def _first_line(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:120]


def read_embedding(path) -> tuple[str, torch.Tensor]:
    """(token, vectors (n, d) fp32) of one embedding file; anything unreadable is one line."""
    from safetensors import safe_open
    path = Path(path)
    _learned_file(path, "embedding", "embeddings")
    try:
        with safe_open(str(path), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:                    # safetensors raises several types on bad files
        raise MinipError(f"'{path}' is not a readable safetensors embedding "
                         f"({_first_line(e)})") from None
    multi = [k for k in MULTI_KEYS if k in state]
    if multi:
        token, vectors = path.stem, state[multi[0]]
    elif len(state) == 1:
        token, vectors = next(iter(state.items()))
    else:
        keys = ", ".join(sorted(state)[:4]) or "none"
        raise MinipError(f"'{path}' is not a textual-inversion embedding (tensors: {keys}); "
                         "expected one {token: vector} entry, string_to_param or emb_params")
    if not vectors.is_floating_point() or vectors.dim() not in (1, 2) or vectors.numel() == 0:
        raise MinipError(f"'{path}': the embedding of {token!r} has shape {tuple(vectors.shape)}; "
                         "expected (width,) or (vectors, width)")
    return token, vectors.reshape(-1, vectors.shape[-1]).float()


def add_embeddings(model, paths) -> dict[str, list[int]]:
    """Add the tokens of `paths` to `model`'s tokenizer and text encoder; returns their ids."""
    added = {}
    for path in paths:
        token, vectors = read_embedding(path)
        if token in added:
            raise MinipError(f"token {token!r} comes twice ('{path}'); pass each embedding once")
        added[token] = add_token(model, token, vectors, source=f"'{path}'")
    return added


def add_token(model, token: str, vectors: torch.Tensor, source: str = "the embedding") -> list[int]:
    """Add one token standing for `vectors` (n, d) to the tokenizer (ids "<tok>", "<tok>_1", …)
    and as new rows of the token table E; returns their ids (also textual inversion's start)."""
    if model.text_encoder is None:
        raise MinipError("the text encoder was freed; add embeddings before encoding prompts")
    emb = model.text_encoder.text_model.embeddings.token_embedding
    d = emb.weight.shape[1]
    if vectors.shape[1] != d:
        raise MinipError(f"{source}: the embedding of {token!r} is {vectors.shape[1]} wide but "
                         f"this model's text encoder is {d} wide; it was trained for another "
                         "model (SD 1.x: 768, SD 2.x: 1024)")
    ids = model.tokenizer.add_tokens(token, len(vectors))
    # E: (V, d) -> (V', d), the new rows at the tokenizer's new ids
    weight = emb.weight.new_zeros(max(max(ids) + 1, emb.weight.shape[0]), d)
    weight[:emb.weight.shape[0]] = emb.weight
    weight[ids] = vectors.to(weight)
    emb.weight = torch.nn.Parameter(weight, requires_grad=False)
    emb.num_embeddings = weight.shape[0]
    cfg = model.text_encoder.cfg
    model.text_encoder.cfg = replace(cfg, vocab_size=weight.shape[0])
    return ids


def read_instruction(path) -> tuple[torch.Tensor, int, str]:
    """A learned instruction (Visii, train/visii.py): (c_T (77, d), eos, init phrase)."""
    from safetensors import safe_open
    path = Path(path)
    _learned_file(path, "instruction", "files")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
        c, eos = state["instruction"], int(meta["eos"])
    except Exception as e:                    # safetensors, KeyError, ValueError alike
        raise MinipError(f"'{path}' is not a learned instruction of `minip2p learn-instruction` "
                         f"({_first_line(e)})") from None
    if c.dim() != 2 or c.shape[0] != 77 or not 1 <= eos < 77:
        raise MinipError(f"'{path}': the instruction has shape {tuple(c.shape)} and end {eos}; "
                         "expected (77, width) and an end in 1 … 76")
    return c.float(), eos, meta.get("init", "")
