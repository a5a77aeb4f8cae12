"""Small frozen dataclasses for each component, read from the checkpoint's own config.json files.

The field names are the ones diffusers / transformers write, so a config file maps onto a
dataclass with no renaming. Only the fields that change the architecture are kept; fields we
do not implement (SD 2 depth/upscaler models, SDXL add-embeddings, ...) are refused with a clear error
instead of being silently ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path

from ..errors import MinipError


def read_json(path: Path) -> dict:
    """Read a JSON file; a missing or broken file is a one-line MinipError."""
    path = Path(path)
    if not path.is_file():
        raise MinipError(f"missing config file {path}; is this a diffusers-style model folder?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MinipError(f"broken config file {path}: {e}; re-download or fix it") from None
    if not isinstance(data, dict):
        raise MinipError(f"broken config file {path}: expected a JSON object")
    return data


def _build(cls, data: dict, source: str, refuse: dict):
    """Make `cls` from a config dict: keep known fields, refuse features we do not implement."""
    for key, ok in refuse.items():
        if key in data and data[key] not in ok:
            raise MinipError(f"{source}: {key}={data[key]!r} is not supported by minip2p "
                             f"(supported: {ok})")
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in names and v is not None}
    for k, v in kwargs.items():          # JSON lists -> tuples, so the dataclass stays hashable
        if isinstance(v, list):
            kwargs[k] = tuple(v)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise MinipError(f"{source}: {e}") from None


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    attention_head_dim: int | tuple = 8     # SD 1.x: really the number of heads (diffusers' naming)
    num_attention_heads: int | tuple | None = None
    cross_attention_dim: int = 768
    transformer_layers_per_block: int = 1
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    use_linear_projection: bool = False     # SD 2.x: proj_in/out are Linear, not 1×1 convs
    upcast_attention: bool = False          # SD 2.x: QKᵀ and softmax in fp32 under fp16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    sample_size: int = 64

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError("block_out_channels, down_block_types and up_block_types differ in length")
        for t in self.down_block_types + self.up_block_types:
            if t not in ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"):
                raise ValueError(f"block type {t!r} is not supported")
        for level, c in enumerate(self.block_out_channels):
            h = self.heads(level)
            if not isinstance(h, int) or h < 1 or c % h:
                raise ValueError(f"level {level}: {c} channels do not split into {h} heads")

    def heads(self, level: int) -> int:
        """Number of attention heads at a level (diffusers reads `attention_head_dim` as heads)."""
        h = self.num_attention_heads if self.num_attention_heads is not None else self.attention_head_dim
        return h[level] if isinstance(h, tuple) else h

    @classmethod
    def from_dict(cls, data: dict, source: str = "unet config") -> "UNetConfig":
        refuse = {"class_embed_type": [None], "addition_embed_type": [None],
                  "time_cond_proj_dim": [None], "encoder_hid_dim": [None],
                  "dual_cross_attention": [False], "only_cross_attention": [False],
                  "resnet_time_scale_shift": ["default"],
                  "mid_block_type": ["UNetMidBlock2DCrossAttn"], "act_fn": ["silu"],
                  "center_input_sample": [False], "time_embedding_type": ["positional"],
                  "mid_block_scale_factor": [1, 1.0], "downsample_padding": [1],
                  "conv_in_kernel": [3], "conv_out_kernel": [3]}
        return _build(cls, data, source, refuse)


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    sample_size: int = 512

    @property
    def downscale(self) -> int:
        """Pixels per latent along one side: 2^(levels-1), 8 for SD 1.x."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, data: dict, source: str = "vae config") -> "VAEConfig":
        refuse = {"act_fn": ["silu"], "mid_block_add_attention": [True],
                  "use_quant_conv": [True], "use_post_quant_conv": [True],
                  "shift_factor": [None, 0, 0.0]}
        for t in data.get("down_block_types", []) + data.get("up_block_types", []):
            if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D"):
                raise MinipError(f"{source}: block type {t!r} is not supported")
        return _build(cls, data, source, refuse)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (quick_gelu, gelu)")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size is not a multiple of num_attention_heads")

    @classmethod
    def from_dict(cls, data: dict, source: str = "text_encoder config") -> "TextConfig":
        return _build(cls, data, source, {})


@dataclass(frozen=True)
class SchedulerConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"
    set_alpha_to_one: bool = False
    steps_offset: int = 1
    prediction_type: str = "epsilon"

    def __post_init__(self):
        if self.beta_schedule not in ("scaled_linear", "linear"):
            raise ValueError(f"beta_schedule {self.beta_schedule!r} is not supported")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {self.prediction_type!r} is not supported")

    @classmethod
    def from_dict(cls, data: dict, source: str = "scheduler config") -> "SchedulerConfig":
        return _build(cls, data, source, {})
