"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric") with the SqueezeNet 1.1 trunk, the variant PIE-Bench's background LPIPS uses.

For two images x, x' in [−1, 1] (B, 3, H, W):

    x ← (x − shift) / scale                                  (the scaling layer, lpips v0.1)
    f_l = the trunk's l-th ReLU output, l = 1 … 7            (B, C_l, H_l, W_l)
    f̂_l = f_l / (‖f_l‖₂ over channels + 1e-10)
    d(x, x') = Σ_l mean_{h,w} ( w_l · (f̂_l − f̂'_l)² )       w_l: a 1×1 conv C_l → 1, no bias

SqueezeNet 1.1's `features` (torchvision's numbering, which the weight names keep):
0 conv 3→64 3×3/2, 1 ReLU, 2 max-pool 3/2, 3–4 Fire(16; 64+64), 5 max-pool, 6–7 Fire(32; 128+128),
8 max-pool, 9–10 Fire(48; 192+192), 11–12 Fire(64; 256+256); max-pools round up (ceil_mode).
The seven taps end after modules 1, 4, 7, 9, 10, 11, 12.

Weights: one safetensors file holding the trunk as `net.features.N.*` and the heads as
`lin{l}.weight` (1, C_l, 1, 1), l = 0 … 6. `python -m tools.convert_lpips` writes it from the
official files (torchvision's squeezenet1_1 and lpips' v0.1 squeeze heads).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MinipError

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
CHANNELS = (64, 128, 256, 384, 384, 512, 512)
TAPS = (1, 4, 7, 9, 10, 11, 12)                       # features[i] after which a tap is read


class Fire(nn.Module):
    """squeeze 1×1 → ReLU → [expand 1×1, expand 3×3] → ReLU each → concatenated."""

    def __init__(self, c_in: int, squeeze: int, expand: int):
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand, 3, padding=1)

    def forward(self, x):
        s = F.relu(self.squeeze(x))
        return torch.cat([F.relu(self.expand1x1(s)), F.relu(self.expand3x3(s))], dim=1)


def squeezenet_features() -> nn.Sequential:
    pool = lambda: nn.MaxPool2d(3, 2, ceil_mode=True)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), pool(),
        Fire(64, 16, 64), Fire(128, 16, 64), pool(),
        Fire(128, 32, 128), Fire(256, 32, 128), pool(),
        Fire(256, 48, 192), Fire(384, 48, 192), Fire(384, 64, 256), Fire(512, 64, 256))


class Trunk(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = squeezenet_features()


class LPIPS(nn.Module):
    def __init__(self, _cfg=None):
        super().__init__()
        self.net = Trunk()
        for l, c in enumerate(CHANNELS):
            self.register_module(f"lin{l}", nn.Conv2d(c, 1, 1, bias=False))

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        shift, scale = (torch.tensor(v, device=x.device)[None, :, None, None] for v in (SHIFT, SCALE))
        h, out = (x - shift) / scale, []
        for i, module in enumerate(self.net.features):
            h = module(h)
            if i in TAPS:
                out.append(h)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y (B, 3, H, W) in [−1, 1] -> d(x, y) (B,)."""
        if x.shape != y.shape:
            raise MinipError(f"LPIPS: images of different shapes {tuple(x.shape)} and {tuple(y.shape)}")
        d = 0
        for l, (a, b) in enumerate(zip(self.taps(x), self.taps(y))):
            a = a / (a.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            b = b / (b.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)
            d = d + getattr(self, f"lin{l}")((a - b) ** 2).mean(dim=(2, 3))
        return d[:, 0]


def load_lpips(path, device="cpu") -> LPIPS:
    """The safetensors file described above -> LPIPS, strictly."""
    from ..load.checkpoint import read_safetensors, strict_build
    return strict_build(LPIPS, None, read_safetensors(path), str(path), torch.float32, device)
