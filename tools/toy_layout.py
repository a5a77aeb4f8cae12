"""The toy model's folder, as diffusers and transformers write theirs (so either library, and
minip2p, reads it): the configs of tools/train_toy.py's networks and `export`, which writes
the folder atomically in fp16 and keeps an existing model card and figures."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "weights" / "clip-tokenizer"
DIFFUSERS_VERSION = "0.30.0"

# Configs exactly as diffusers / transformers write them, so either library can read the folder.
UNET = {"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu", "attention_head_dim": [4, 4, 4], "block_out_channels": [48, 96, 192],
        "center_input_sample": False, "cross_attention_dim": 64,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 1, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
        "norm_num_groups": 16, "out_channels": 4, "sample_size": 16,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
VAE = {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "act_fn": "silu",
       "block_out_channels": [16, 32, 64], "down_block_types": ["DownEncoderBlock2D"] * 3,
       "in_channels": 3, "latent_channels": 4, "layers_per_block": 1, "norm_num_groups": 1,
       "out_channels": 3, "sample_size": 64, "scaling_factor": 1.0,
       "up_block_types": ["UpDecoderBlock2D"] * 3}
TEXT = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "attention_dropout": 0.0, "bos_token_id": 49406, "eos_token_id": 49407,
        "pad_token_id": 49407, "hidden_act": "quick_gelu", "hidden_size": 64,
        "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 256,
        "layer_norm_eps": 1e-05, "max_position_embeddings": 77, "num_attention_heads": 4,
        "num_hidden_layers": 3, "projection_dim": 64, "torch_dtype": "float16",
        "vocab_size": 49408}
SCHEDULER = {"_class_name": "DDIMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
             "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon",
             "set_alpha_to_one": False, "steps_offset": 1, "trained_betas": None}
MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
               "feature_extractor": [None, None], "requires_safety_checker": False,
               "safety_checker": [None, None], "scheduler": ["diffusers", "DDIMScheduler"],
               "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"],
               "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"]}
TOKENIZER_CONFIG = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                    "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                    "do_lower_case": True, "clean_up_tokenization_spaces": True}


def fp16(module):
    return {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in module.state_dict().items()}


def export(out: Path, unet, vae, text, sf, info: dict):
    """Write the diffusers-layout folder into a temporary sibling, then rename it into place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        def dump(rel, data):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(json.dumps(data, indent=2) + "\n")
        dump("model_index.json", MODEL_INDEX)
        dump("scheduler/scheduler_config.json", SCHEDULER)
        dump("unet/config.json", UNET)
        dump("vae/config.json", dict(VAE, scaling_factor=round(sf, 5)))
        dump("text_encoder/config.json", TEXT)
        dump("tokenizer/tokenizer_config.json", TOKENIZER_CONFIG)
        for name in ("vocab.json", "merges.txt"):
            shutil.copy(TOKENIZER / name, tmp / "tokenizer" / name)
        save_file(fp16(unet), str(tmp / "unet" / "diffusion_pytorch_model.safetensors"))
        save_file(fp16(vae), str(tmp / "vae" / "diffusion_pytorch_model.safetensors"))
        save_file(fp16(text), str(tmp / "text_encoder" / "model.safetensors"))
        dump("training.json", info)
        for f in tmp.rglob("*"):                 # save_file leaves its files private (0600)
            f.chmod(0o755 if f.is_dir() else 0o644)
        old = out.with_name(f".{out.name}-old")
        card = out / "README.md"
        if card.is_file():                       # keep an existing model card (results, figures)
            shutil.copy(card, tmp / "README.md")
        if (out / "figures").is_dir():
            shutil.copytree(out / "figures", tmp / "figures")
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
