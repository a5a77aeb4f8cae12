"""diffusers StableDiffusionPipeline -> an original CompVis single-file state dict (test-only).

Written from the CompVis / ldm module layout (openaimodel.UNetModel, autoencoder Encoder/Decoder,
FrozenCLIPEmbedder), independently of minip2p.load.single_file: the direction is the opposite one
(diffusers name -> CompVis name) and the block indices are computed by walking the UNet the way
ldm builds it, not read from a table. Validated against diffusers' own single-file loader in
test_single_file.py.

    model.diffusion_model.*             UNet: time_embed, input_blocks, middle_block,
                                        output_blocks, out; ResBlocks in_layers/emb_layers/...
    first_stage_model.*                 VAE: encoder.down.i.block.j, decoder.up.(n-1-i)...,
                                        mid.attn_1 with 1x1-conv q/k/v/proj_out
    cond_stage_model.transformer.*      CLIP text model, as transformers names it
plus the non-weight tensors real files carry (DDPM schedule, EMA counters, position_ids).
"""
from __future__ import annotations

from pathlib import Path

import torch

RESBLOCK = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
            "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESBLOCK = {"conv_shortcut": "nin_shortcut"}          # other names are the same in ldm
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _sub(rest: str, names: dict) -> str:
    """'conv1.weight' -> 'in_layers.2.weight' (names keyed by the part before .weight/.bias)."""
    head, leaf = rest.rsplit(".", 1)
    return f"{names.get(head, head)}.{leaf}"


def unet_block_map(cfg) -> dict[str, str]:
    """diffusers block prefix -> ldm block prefix, built by walking the UNet in ldm's order."""
    L, n = cfg.layers_per_block, len(cfg.block_out_channels)
    m = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
         "time_embedding.linear_2": "time_embed.2", "conv_norm_out": "out.0", "conv_out": "out.2",
         "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
         "mid_block.resnets.1": "middle_block.2"}
    idx = 1                                                # input_blocks[0] is conv_in
    for i, kind in enumerate(cfg.down_block_types):
        for j in range(L):
            m[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{idx}.0"
            if kind.startswith("CrossAttn"):
                m[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{idx}.1"
            idx += 1
        if i < n - 1:                                      # Downsample: its own TimestepEmbedSequential
            m[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{idx}.0.op"
            idx += 1
    idx = 0
    for i, kind in enumerate(cfg.up_block_types):
        attn = kind.startswith("CrossAttn")
        for j in range(L + 1):
            m[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{idx}.0"
            if attn:
                m[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{idx}.1"
            if j == L and i < n - 1:                       # Upsample shares the last block
                m[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{idx}.{2 if attn else 1}.conv"
            idx += 1
    return m


def vae_block_map(cfg) -> dict[str, str]:
    L, n = cfg.layers_per_block, len(cfg.block_out_channels)
    m = {"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"}
    for part in ("encoder", "decoder"):
        m[f"{part}.mid_block.resnets.0"] = f"{part}.mid.block_1"
        m[f"{part}.mid_block.attentions.0"] = f"{part}.mid.attn_1"
        m[f"{part}.mid_block.resnets.1"] = f"{part}.mid.block_2"
    for i in range(n):
        for j in range(L):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = f"encoder.down.{i}.block.{j}"
        for j in range(L + 1):                             # ldm numbers decoder levels bottom-up
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = f"decoder.up.{n - 1 - i}.block.{j}"
        if i < n - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"
    return m


def _convert(state: dict, blocks: dict[str, str], inner) -> dict:
    out = {}
    for key, v in state.items():
        block = max((b for b in blocks if key.startswith(b + ".")), key=len, default=None)
        if block is None:                                  # conv_in, quant_conv ...: same name
            out[key] = v
            continue
        new, v = inner(block, key[len(block) + 1:], v)
        out[f"{blocks[block]}.{new}"] = v
    return out


def _unet_inner(block, rest, v):
    if ".resnets." in block:
        return _sub(rest, RESBLOCK), v
    return rest, v                                        # transformers / convs: same names


def _vae_inner(block, rest, v):
    if ".attentions." in block:
        rest = _sub(rest, VAE_ATTN)
        if rest.endswith("weight") and v.ndim == 2:       # ldm: 1x1 convolutions
            v = v[:, :, None, None]
        return rest, v
    if ".resnets." in block:
        return _sub(rest, VAE_RESBLOCK), v
    return rest, v


def extra_tensors(n_train: int = 1000) -> dict[str, torch.Tensor]:
    """Non-weight tensors of a real SD 1.x file: the DDPM schedule and EMA bookkeeping."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n_train, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return {"betas": betas.float(), "alphas_cumprod": alphas_cumprod.float(),
            "alphas_cumprod_prev": prev.float(),
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt().float(),
            "posterior_variance": (betas * (1 - prev) / (1 - alphas_cumprod)).float(),
            "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(0, dtype=torch.int32),
            "model_ema.diffusion_modelout2bias": torch.zeros(4),   # an EMA copy, names flattened
            "cond_stage_model.transformer.text_model.embeddings.position_ids":
                torch.arange(77, dtype=torch.int64)[None]}


def to_compvis(pipe) -> dict[str, torch.Tensor]:
    """A StableDiffusionPipeline's weights under CompVis single-file names (fp32, contiguous)."""
    out = {}
    for k, v in _convert(pipe.unet.state_dict(), unet_block_map(pipe.unet.config), _unet_inner).items():
        out["model.diffusion_model." + k] = v
    for k, v in _convert(pipe.vae.state_dict(), vae_block_map(pipe.vae.config), _vae_inner).items():
        out["first_stage_model." + k] = v
    for k, v in pipe.text_encoder.state_dict().items():
        if k.endswith("position_ids"):
            continue
        k = k if k.startswith("text_model.") else "text_model." + k   # transformers 5 drops it
        out["cond_stage_model.transformer." + k] = v
    out.update(extra_tensors())
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
            for k, v in out.items()}


def save_single_file(pipe, path: Path) -> Path:
    from safetensors.torch import save_file
    save_file(to_compvis(pipe), str(path))
    return Path(path)


def to_openclip(text_encoder, extra_layer_seed: int = 0) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModel (SD 2.x's, as diffusers stores it) under OpenCLIP's names
    (`cond_stage_model.model.*`), as in `v2-1_768-ema-pruned.safetensors`: q/k/v stacked into
    attn.in_proj_weight, plus the parts SD 2.x never runs -- one more (random) last resblock,
    since it reads the penultimate layer, text_projection and logit_scale."""
    c = text_encoder.config
    sd = {k if k.startswith("text_model.") else "text_model." + k: v
          for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"]}
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(c.num_hidden_layers):
        p = f"text_model.encoder.layers.{i}."
        for leaf in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = torch.cat(
                [sd[f"{p}self_attn.{q}_proj.{leaf}"] for q in "qkv"])
            for ours, theirs in names.items():
                out[f"transformer.resblocks.{i}.{theirs}.{leaf}"] = sd[f"{p}{ours}.{leaf}"]
    g = torch.Generator().manual_seed(extra_layer_seed)      # the unused last block: random
    last = c.num_hidden_layers
    for k in [k for k in out if k.startswith("transformer.resblocks.0.")]:
        out[k.replace(".0.", f".{last}.", 1)] = torch.randn(out[k].shape, generator=g)
    d = c.hidden_size
    out["text_projection"] = torch.randn(d, d, generator=g)
    out["logit_scale"] = torch.tensor(4.6052)
    return {"cond_stage_model.model." + k: v for k, v in out.items()}


def save_sd2_single_file(pipe, path: Path) -> Path:
    """An SD 2.x single file: CompVis UNet/VAE names, OpenCLIP text encoder."""
    from safetensors.torch import save_file
    state = {k: v for k, v in to_compvis(pipe).items() if not k.startswith("cond_stage_model.")}
    state.update(to_openclip(pipe.text_encoder))
    save_file({k: v.detach().float().contiguous() for k, v in state.items()}, str(path))
    return Path(path)
