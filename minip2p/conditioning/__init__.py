"""Conditioning from outside the prompt: ControlNets, one more participant in each UNet call.

An edit acts on attention (control.py), a ControlNet on the UNet's skip connections: they compose.
A `Control` is one ControlNet in use (its hint, scale, window, guess mode); `ControlNets` holds
zero, one or several and, once per UNet call, returns the residuals the UNet adds (model/unet.py,
`residuals=`), summed over the nets:

    for each net k active at this step:   (c_{k,0}, …, c_{k,n}) = ControlNet_k(z_t, t, c, hint_k)
    skip_i += Σ_k s_{k,i} · c_{k,i}            mid += Σ_k s_{k,n} · c_{k,n}

    s_{k,i} = scale_k                           (default)
    s_{k,i} = scale_k · 0.825^(n−i)             guess mode, as the official code (`ddim_hacked.py`,
                                                0.825^(12−i) at SD 1.x's 13 outputs); diffusers
                                                uses logspace(−1, 0, n+1) = 0.8254^(n−i) at n = 12,
                                                within 0.6 % (tests bound it)

Rows. Every row of the batch (guidance.GuidanceBatch) sees the hint of its image: the source's
and each edit's, unconditional rows too (as diffusers without guess mode). In guess mode the net
runs on the conditional ("text") rows only and adds nothing to the others, so CFG pushes towards
the hint (the official code runs the unconditional branch with no control at all). One hint is
shared by every image (e.g. the source's edges: the edit keeps the source's structure, attention
control changes what fills it); a list gives one per image.

Window (diffusers' control_guidance_start/end): net k acts at step i of N when
i/N ≥ start_k and (i+1)/N ≤ end_k, i counted over the whole schedule of the run's steps (so
SDEdit, which starts part-way, and the inversions, which run it backwards, see the net at the
same timesteps as sampling does). `eps` is the one place where a UNet call gets its residuals;
the model bundle carries its ControlNets (`conditioned(model, controls)`, load.Model.conditioning)
so that every method's UNet calls are conditioned alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import MinipError, ParameterError
from ..guidance import TEXT, GuidanceBatch
from ..load.controlnet import check_fits

GUESS = 0.825                  # the official guess-mode decay per output


def guess_scales(n: int, scale: float) -> list[float]:
    """Guess mode's scale of each of the n outputs (the mid block's last): scale·0.825^(n−1−i)."""
    return [scale * GUESS ** (n - 1 - i) for i in range(n)]


def hint_tensor(hint, name: str = "controls") -> torch.Tensor:
    """A hint -> (n, 3, H, W) float in [0, 1]: a PIL image, an image path, a uint8 array
    (H, W) or (H, W, 3), a float tensor (3, H, W) or (n, 3, H, W) in [0, 1], or a list of these
    of one size (one per image). A grey map (1 channel) is replicated to 3."""
    if isinstance(hint, (list, tuple)):
        parts = [hint_tensor(h, name) for h in hint]
        if not parts or len({p.shape[-2:] for p in parts}) > 1:
            raise ParameterError(name, "hints of one run must be one or more images of one size")
        return torch.cat(parts)
    if isinstance(hint, (str, Path)):
        from ..real.images import open_image
        hint = open_image(str(hint))
    if hasattr(hint, "convert"):                                       # PIL
        hint = np.asarray(hint.convert("RGB"))
    if isinstance(hint, np.ndarray):
        if hint.dtype != np.uint8:
            raise ParameterError(name, f"a hint array must be uint8 (H, W[, 3]), got {hint.dtype}")
        hint = torch.from_numpy(hint.copy()).float() / 255
        hint = hint[None] if hint.ndim == 2 else hint.permute(2, 0, 1) if hint.ndim == 3 else hint
    if not isinstance(hint, torch.Tensor):
        raise ParameterError(name, f"a hint must be an image, got {type(hint).__name__}")
    hint = hint.float()
    hint = hint[None] if hint.ndim == 3 else hint
    if hint.ndim != 4 or hint.shape[1] not in (1, 3):
        raise ParameterError(name, f"a hint must have 1 or 3 channels, got shape "
                                   f"{tuple(hint.shape)}")
    if not torch.isfinite(hint).all() or hint.min() < 0 or hint.max() > 1:
        raise ParameterError(name, "a hint's values must lie in [0, 1]")
    return hint.expand(-1, 3, -1, -1) if hint.shape[1] == 1 else hint


def make_hint(kind: str, image, height: int, width: int) -> np.ndarray:
    """A picture -> the hint at the image size, uint8 H×W×3: "canny", its Canny edges
    (thresholds 100/200, real/canny.py) after resampling it to height × width as the official
    annotator resamples (Lanczos up, area down); "hint", a ready hint (depth, pose, scribble)
    resampled the same way."""
    from ..real.canny import canny, hwc3, resize
    if kind not in ("canny", "hint"):
        raise ParameterError("controls", f"a hint is made by canny or given as is (hint), "
                                         f"not {kind!r}")
    pic = np.asarray(image.convert("RGB"))
    pic = resize(pic, height, width, grow=height * width > pic.shape[0] * pic.shape[1])
    return hwc3(canny(pic, 100, 200)) if kind == "canny" else pic


@dataclass
class Control:
    """One ControlNet in a run.

    net:    a model.controlnet.ControlNet (load.controlnet.load_controlnet)
    hint:   the condition image(s), see `hint_tensor`; resized to the image size if another size
    scale:  conditioning_scale, its residuals' weight (1.0)
    guess:  guess mode: decaying scales, control on the conditional rows only (False)
    window: (start, end) fractions of the steps where the net acts ((0, 1): all)
    """
    net: Any
    hint: Any
    scale: float = 1.0
    guess: bool = False
    window: tuple = (0.0, 1.0)

    def check(self) -> "Control":
        v = self.scale
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
            raise ParameterError("controls", f"a ControlNet's scale must be a finite number, "
                                             f"got {v!r}")
        w = tuple(self.window) if isinstance(self.window, (list, tuple)) else ()
        if len(w) != 2 or not all(isinstance(v, (int, float)) and v == v for v in w) or \
                not 0 <= w[0] < w[1] <= 1:
            raise ParameterError("controls", f"a window is (start, end) with 0 ≤ start < end ≤ 1, "
                                             f"got {self.window!r}")
        if not hasattr(self.net, "controlnet_down_blocks"):
            raise ParameterError("controls", f"net must be a ControlNet, got "
                                             f"{type(self.net).__name__}")
        self.hint = hint_tensor(self.hint)
        self.window = (float(w[0]), float(w[1]))
        return self

    def keep(self, step: int, steps: int) -> bool:
        """Does the net act at `step` of `steps` (diffusers' controlnet_keep)?"""
        return not (step / steps < self.window[0] or (step + 1) / steps > self.window[1])

    def residuals(self, z, t, context, rows) -> list[torch.Tensor]:
        """This net's n + 1 residuals (rows, c_i, h_i, w_i), scales applied; zeros on the rows it
        leaves alone (guess mode: every row but the conditional ones)."""
        net, images = self.net, 1 + max(b for b, _ in rows)
        if self.hint.shape[0] not in (1, images):
            raise MinipError(f"a ControlNet has {self.hint.shape[0]} hints for {images} images; "
                             "give one hint, or one per image")
        active = [r for r, (_, cond) in enumerate(rows) if cond == TEXT or not self.guess]
        p, f = net.conv_in.weight, net.cfg.downscale
        hint = self.hint.to(p.device, p.dtype)
        size = (z.shape[-2] * f, z.shape[-1] * f)                       # the image's size
        if tuple(hint.shape[-2:]) != size:
            hint = F.interpolate(hint, size=size, mode="bilinear", antialias=True,
                                 align_corners=False).clamp(0, 1)
        pick = [rows[r][0] if hint.shape[0] > 1 else 0 for r in active]  # each row's image's
        t = t[active] if isinstance(t, torch.Tensor) and t.numel() > 1 else t
        scales = guess_scales(net.outputs, self.scale) if self.guess else self.scale
        down, mid = net(z[active, :net.cfg.unet.in_channels].to(p.dtype), t,
                        context[active].to(p.dtype), hint[pick], scales)
        out = [r.to(z.dtype) for r in (*down, mid)]
        if len(active) == z.shape[0]:
            return out
        full = [r.new_zeros((z.shape[0], *r.shape[1:])) for r in out]
        for a, r in zip(full, out):
            a[active] = r
        return full


class ControlNets:
    """The ControlNets of a run: `residuals` for one UNet call, summed over the nets."""

    def __init__(self, controls: list[Control], model=None):
        self.controls = [c if isinstance(c, Control) else Control(**c) for c in controls]
        for c in self.controls:
            c.check()
            if model is not None:
                check_fits(c.net, model.unet.cfg, model.vae.cfg.latent_channels, "controls")

    def __len__(self):
        return len(self.controls)

    def residuals(self, z, t, context, batch: GuidanceBatch | None = None,
                  at: tuple[int, int] | None = None):
        """z: the UNet's input (rows, c, h, w); context (rows, 77, d); `batch`: what each row
        holds (None: each row a conditional row of its own image); `at`: (step, steps), the
        place in the schedule (None: every net acts) -> (down, mid) or None (no net acts)."""
        rows = batch.rows if batch is not None else tuple((r, TEXT) for r in range(z.shape[0]))
        total = None
        for c in self.controls:
            if at is None or c.keep(*at):
                out = c.residuals(z, t, context, rows)
                total = out if total is None else [a + b for a, b in zip(total, out)]
        return None if total is None else (total[:-1], total[-1])


def conditioned(model, controls) -> Any:
    """The model bundle with these ControlNets (a list of `Control` or of their keywords) taking
    part in every UNet call, after those it has already; the same modules, nothing copied. No
    controls: `model` itself."""
    if not controls:
        return model
    before = model.conditioning.controls if model.conditioning is not None else []
    return dataclasses.replace(model, conditioning=ControlNets([*before, *controls], model))


def eps(model, z, t, context, control=None, step: int | None = None, batch=None,
        at: tuple[int, int] | None = None):
    """ε_θ(z_t, t, c) by the model's UNet, with its ControlNets' residuals (if it has any).
    `control`: an attention controller (control.py), which sees the UNet's sites with `step`;
    `at`: (step, steps), the place in the whole schedule (the nets' windows; None: no window)."""
    nets = getattr(model, "conditioning", None)
    res = nets.residuals(z, t, context, batch, at) if nets is not None else None
    return model.unet(z, t, context, control=control, step=step, batch=batch, residuals=res)
