"""Single-file original checkpoints (CompVis / `v1-5-pruned-emaonly.safetensors` key names).

SD 1.x files hold OpenAI's CLIP under `cond_stage_model.transformer.` (transformers' names); SD 2.x
files (`v2-1_768-ema-pruned.safetensors`) hold OpenCLIP ViT-H under `cond_stage_model.model.`
with OpenCLIP's names (resblocks.N.attn.in_proj_weight = [W_q; W_k; W_v] stacked, ln_1, mlp.c_fc,
positional_embedding, ln_final). SD 2.x reads the *penultimate* layer's output, so its last
resblock is dropped, then ln_final is applied: a 24-block ViT-H becomes diffusers' 23-layer
CLIPTextModel (GELU), exactly as diffusers' from_single_file converts it.

One explicit, templated table maps every CompVis name onto our (= diffusers) module names.
With L ResBlocks per level, level i of the down path lives at input_blocks[1 + i·(L+1) + j]
(j < L: ResBlock j and its transformer; j = L: the downsampler) and level i of the up path
(counted from the bottom) at output_blocks[i·(L+1) + j].

A single file has no config.json, so the architecture is read off the tensor shapes. Some
numbers cannot be: attention heads (SD 1.x: 8 in the UNet, width/64 in CLIP; SD 2.x: 64 channels
per head everywhere) and GroupNorm groups (32); nor, for SD 2.x, the training objective. Like
diffusers, an SD 2.x file is taken to be SD 2.1 768-v (v-prediction, fp32 softmax, 768 px); pass
`config=` a diffusers-style folder (e.g. 2-1-base's) to take the configs from there instead.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ..model.config import SchedulerConfig, TextConfig, UNetConfig, VAEConfig, read_json
from ..samplers.ddim import DDIM
from ..errors import MinipError
from .checkpoint import CLIP_TOKENIZER, Model, read_safetensors, strict_build
from ..model.clip import CLIPTextModel
from ..model.tokenizer import ClipTokenizer
from ..model.unet import UNet2DConditionModel
from ..model.vae import AutoencoderKL

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
OPENCLIP = "cond_stage_model.model."                  # SD 2.x's text encoder
# Constants of the training run stored next to the weights (DDPM schedule, EMA counters).
IGNORED = re.compile(r"^(betas|alphas_cumprod(_prev)?|sqrt_.*|log_one_minus_.*|posterior_.*|"
                     r"logvar|model_ema\..*|cond_stage_model\.transformer\.(text_model\.)?"
                     r"embeddings\.position_ids|"
                     r"cond_stage_model\.model\.(text_projection|logit_scale|attn_mask))$")

# Inside a block: CompVis name -> our name.
RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
          "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut",
          "nin_shortcut": "conv_shortcut"}
VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def unet_table(n: int, L: int) -> dict[str, str]:
    """CompVis block prefix -> our block prefix for a UNet of n levels, L ResBlocks per level."""
    t = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
         "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
         "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
         "middle_block.2": "mid_block.resnets.1"}
    for i in range(n):
        for j in range(L):
            t[f"input_blocks.{1 + i * (L + 1) + j}.0"] = f"down_blocks.{i}.resnets.{j}"
            t[f"input_blocks.{1 + i * (L + 1) + j}.1"] = f"down_blocks.{i}.attentions.{j}"
        t[f"input_blocks.{1 + i * (L + 1) + L}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
        for j in range(L + 1):
            t[f"output_blocks.{i * (L + 1) + j}.0"] = f"up_blocks.{i}.resnets.{j}"
            t[f"output_blocks.{i * (L + 1) + j}.1"] = f"up_blocks.{i}.attentions.{j}"
        for k in (1, 2):  # the upsampler follows the ResBlock, or the ResBlock + transformer
            t[f"output_blocks.{i * (L + 1) + L}.{k}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    return t


def vae_table(n: int, L: int) -> dict[str, str]:
    t = {"encoder.norm_out": "encoder.conv_norm_out", "decoder.norm_out": "decoder.conv_norm_out"}
    for part in ("encoder", "decoder"):
        t[f"{part}.mid.block_1"] = f"{part}.mid_block.resnets.0"
        t[f"{part}.mid.attn_1"] = f"{part}.mid_block.attentions.0"
        t[f"{part}.mid.block_2"] = f"{part}.mid_block.resnets.1"
    for i in range(n):
        for j in range(L + 1):
            t[f"encoder.down.{i}.block.{j}"] = f"encoder.down_blocks.{i}.resnets.{j}"
            # the decoder's levels are stored bottom-up in CompVis, top-down in ours
            t[f"decoder.up.{n - 1 - i}.block.{j}"] = f"decoder.up_blocks.{i}.resnets.{j}"
        t[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        t[f"decoder.up.{n - 1 - i}.upsample.conv"] = f"decoder.up_blocks.{i}.upsamplers.0.conv"
    return t


def rename(state: dict, prefix: str, table: dict[str, str], inner: dict[str, str]) -> dict:
    """Map `prefix`+CompVis names through `table` (longest block prefix wins), then `inner`."""
    out = {}
    for key, v in state.items():
        name = key[len(prefix):]
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            head, tail = ".".join(parts[:cut]), ".".join(parts[cut:])
            if head in table:
                sub = tail.rsplit(".", 1)
                if len(sub) == 2 and sub[0] in inner:
                    tail = f"{inner[sub[0]]}.{sub[1]}"
                name = f"{table[head]}.{tail}"
                break
        out[name] = v
    return out


def _count(state, pattern):
    return len({m.group(1) for k in state for m in [re.match(pattern, k)] if m})


def infer_unet(s: dict, sd2: bool = False) -> UNetConfig:
    """SD 1.x: 8 heads; SD 2.x (`sd2`): 64 channels per head, v-prediction's 768 px, fp32 softmax."""
    n = _count(s, r"input_blocks\.(\d+)\.0\.op") + 1            # levels = downsamplers + 1
    L = _count(s, r"input_blocks\.(\d+)\.0\.in_layers") // n      # ResBlocks per level
    ch = tuple(s[f"input_blocks.{1 + i * (L + 1)}.0.out_layers.3.weight"].shape[0] for i in range(n))
    down = tuple("CrossAttnDownBlock2D" if f"input_blocks.{1 + i * (L + 1)}.1.proj_in.weight" in s
                 else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if f"output_blocks.{i * (L + 1)}.1.proj_in.weight" in s
               else "UpBlock2D" for i in range(n))
    k = next(v for key, v in s.items() if key.endswith("attn2.to_k.weight"))
    sd2_kw = dict(attention_head_dim=tuple(max(c // 64, 1) for c in ch), upcast_attention=True,
                  sample_size=96) if sd2 else {}
    return UNetConfig(**sd2_kw, in_channels=s["input_blocks.0.0.weight"].shape[1],
                      out_channels=s["out.2.weight"].shape[0], block_out_channels=ch,
                      down_block_types=down, up_block_types=up, layers_per_block=L,
                      cross_attention_dim=k.shape[1],
                      transformer_layers_per_block=_count(s, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
                      use_linear_projection=s["middle_block.1.proj_in.weight"].ndim == 2)


def infer_vae(s: dict) -> VAEConfig:
    n = _count(s, r"encoder\.down\.(\d+)\.")
    ch = tuple(s[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(n))
    return VAEConfig(block_out_channels=ch, layers_per_block=_count(s, r"encoder\.down\.0\.block\.(\d+)\."),
                     latent_channels=s["post_quant_conv.weight"].shape[0],
                     in_channels=s["encoder.conv_in.weight"].shape[1],
                     out_channels=s["decoder.conv_out.weight"].shape[0])


def infer_text(s: dict, sd2: bool = False) -> TextConfig:
    vocab, width = s["text_model.embeddings.token_embedding.weight"].shape
    return TextConfig(vocab_size=vocab, hidden_size=width, num_attention_heads=max(width // 64, 1),
                      hidden_act="gelu" if sd2 else "quick_gelu",
                      intermediate_size=s["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                      num_hidden_layers=_count(s, r"text_model\.encoder\.layers\.(\d+)\."),
                      max_position_embeddings=s["text_model.embeddings.position_embedding.weight"].shape[0])


def openclip_text(s: dict) -> dict:
    """OpenCLIP text tower (SD 2.x) -> transformers' CLIPTextModel names, last block dropped."""
    n = _count(s, r"transformer\.resblocks\.(\d+)\.") - 1         # the penultimate layer's output
    out = {"text_model.embeddings.token_embedding.weight": s["token_embedding.weight"],
           "text_model.embeddings.position_embedding.weight": s["positional_embedding"],
           "text_model.final_layer_norm.weight": s["ln_final.weight"],
           "text_model.final_layer_norm.bias": s["ln_final.bias"]}
    inner = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for key, v in s.items():
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)[._](weight|bias)", key)
        if m is None or key in out or int(m.group(1)) >= n:
            if m is None and not key.startswith(("token_embedding", "positional_embedding",
                                                 "ln_final")):
                out[key] = v                               # unknown: strict_build names it
            continue
        layer, name, leaf = f"text_model.encoder.layers.{m.group(1)}", m.group(2), m.group(3)
        if name == "attn.in_proj":                         # [W_q; W_k; W_v]: (3d, d) -> 3 × (d, d)
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3)):
                out[f"{layer}.self_attn.{proj}.{leaf}"] = part
        else:
            out[f"{layer}.{inner.get(name, name)}.{leaf}"] = v
    return out


def split(state: dict, path) -> tuple[dict, dict, dict]:
    """Split a single-file state dict into its UNet, VAE and text-encoder parts (CompVis names;
    the text part in transformers' names)."""
    openclip = any(k.startswith(OPENCLIP) for k in state)
    parts = {UNET: {}, VAE: {}, OPENCLIP if openclip else TEXT: {}}
    unknown = []
    for k, v in state.items():
        prefix = next((p for p in parts if k.startswith(p)), None)
        if prefix is not None and not IGNORED.match(k):
            parts[prefix][k[len(prefix):]] = v
        elif prefix is None and not IGNORED.match(k):
            unknown.append(k)
    if unknown:
        raise MinipError(f"{path}: {len(unknown)} unexpected tensors, e.g. {unknown[0]}; "
                         "not an SD 1.x / 2.x single-file checkpoint")
    for p, d in parts.items():
        if not d:
            raise MinipError(f"{path}: no '{p}*' tensors; not an SD 1.x / 2.x single-file checkpoint")
    if openclip:
        try:
            return parts[UNET], parts[VAE], openclip_text(parts[OPENCLIP])
        except KeyError as e:
            raise MinipError(f"{path}: OpenCLIP text encoder without {OPENCLIP}{e.args[0]}; "
                             "not an SD 2.x single-file checkpoint") from None
    text = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in parts[TEXT].items()}
    return parts[UNET], parts[VAE], text


def load_single_file(path, dtype=torch.float32, device="cpu", config=None) -> Model:
    """`v1-5-pruned-emaonly.safetensors`-style file -> Model. `config`: optional diffusers folder."""
    path = Path(path)
    state = read_safetensors(path)
    sd2 = any(k.startswith(OPENCLIP) for k in state)
    unet_s, vae_s, text_s = split(state, path)
    try:
        if config is not None:
            c = Path(config)
            ucfg = UNetConfig.from_dict(read_json(c / "unet" / "config.json"))
            vcfg = VAEConfig.from_dict(read_json(c / "vae" / "config.json"))
            tcfg = TextConfig.from_dict(read_json(c / "text_encoder" / "config.json"))
        else:
            ucfg, vcfg, tcfg = infer_unet(unet_s, sd2), infer_vae(vae_s), infer_text(text_s, sd2)
    except (KeyError, StopIteration, ValueError, IndexError) as e:
        raise MinipError(f"{path}: cannot read the architecture off the tensors ({e}); "
                         "not an SD 1.x / 2.x single-file checkpoint") from None
    n, L = len(ucfg.block_out_channels), ucfg.layers_per_block
    unet_s = rename(unet_s, "", unet_table(n, L), RESNET)
    vae_s = rename(vae_s, "", vae_table(len(vcfg.block_out_channels), vcfg.layers_per_block),
                   {**RESNET, **VAE_ATTN})
    # CompVis stores the VAE's attention projections as 1×1 convolutions: (c, c, 1, 1) -> (c, c)
    vae_s = {k: v[:, :, 0, 0] if ".attentions.0.to_" in k and v.ndim == 4 else v
             for k, v in vae_s.items()}
    src, how = str(path), "" if config is not None else ", architecture read off the shapes"
    unet = strict_build(UNet2DConditionModel, ucfg, unet_s, f"{src} (unet{how})", dtype, device)
    vae = strict_build(AutoencoderKL, vcfg, vae_s, f"{src} (vae{how})", dtype, device)
    text = strict_build(CLIPTextModel, tcfg, text_s, f"{src} (text encoder{how})", dtype, device)
    if config is not None:
        tokenizer = ClipTokenizer.from_dir(Path(config) / "tokenizer")
    else:     # SD 2.x's tokenizer is CLIP's with "!" as the pad token
        tokenizer = ClipTokenizer(CLIP_TOKENIZER / "vocab.json", CLIP_TOKENIZER / "merges.txt",
                                  pad="!" if sd2 else "<|endoftext|>")
    sched = SchedulerConfig(prediction_type="v_prediction") if sd2 else SchedulerConfig()
    if config is not None and (Path(config) / "scheduler" / "scheduler_config.json").is_file():
        sched = SchedulerConfig.from_dict(read_json(Path(config) / "scheduler" / "scheduler_config.json"))
    return Model(tokenizer, text, unet, vae, DDIM(sched), path.stem)
