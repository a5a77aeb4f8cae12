"""Real images in: any file PIL reads -> the tensor the VAE encodes -> z_0.

    file ─ EXIF orientation ─ RGB (alpha over white, 16-bit grey scaled) ─ cut the crop margins
         ─ centre crop to the aspect H:W ─ resize (bicubic) to H×W ─ x ∈ [−1, 1]  (1, 3, H, W)
    z_0 = E(x).mean · scaling_factor                                        (1, 4, H/f, W/f)

The posterior mean (not a sample) is encoded, as the null-text inversion code does. Every failure
(missing file, not an image, truncated, empty) is one MinipError line. A picture must be usable:
at least MIN_SIDE pixels a side (a 1×1 picture would be upscaled into a made-up image), and its
centre crop to the output's aspect must keep at least 1/MAX_CUT of its width and of its height
(the aspects differ at most MAX_CUT-fold); `check_picture` says so, for files and uploads alike.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import MinipError, ParameterError

MIN_SIDE = 16      # pixels, the smallest side of a usable picture
MAX_CUT = 4        # the centre crop keeps at least 1/MAX_CUT of the picture's width and height


def check_picture(im: Image.Image, height: int | None = None, width: int | None = None):
    """Refuse a picture under MIN_SIDE a side, or (given the output size) one whose centre crop
    to height:width would keep less than 1/MAX_CUT of its width or of its height."""
    W, H = im.size
    if min(W, H) < MIN_SIDE:
        raise ParameterError("image", f"is {W}×{H} pixels; a picture needs at least {MIN_SIDE} "
                                      "on each side")
    if height and width:
        wide = W * height / (H * width)              # > 1: the crop trims the width
        if max(wide, 1 / wide) > MAX_CUT:
            side = "width" if wide > 1 else "height"
            raise ParameterError("image", f"is {W}×{H} pixels: its centre crop to the output's "
                                 f"{width}×{height} would keep less than 1/{MAX_CUT} of its "
                                 f"{side}; crop it closer to that aspect, or choose {{height}} "
                                 "and {width} closer to its own")


def parse_crop(text: str | None) -> tuple[int, int, int, int]:
    """"L,T,R,B" -> pixels cut from the left, top, right and bottom edges (default none)."""
    if not text:
        return 0, 0, 0, 0
    try:
        parts = tuple(int(p) for p in text.split(","))
        if len(parts) != 4 or min(parts) < 0:
            raise ValueError
    except ValueError:
        raise ParameterError("crop", f"{text!r}: expected LEFT,TOP,RIGHT,BOTTOM margins in pixels, "
                         "four integers ≥ 0, e.g. 0,10,0,30") from None
    return parts


def open_image(path) -> Image.Image:
    """Read a file into an RGB PIL image, upright (EXIF orientation applied)."""
    if not str(path).strip():                          # Path("") is ".", the current folder
        raise MinipError("the image path is empty; give an image file")
    path = Path(path)
    if not path.exists():
        raise MinipError(f"image file '{path}' not found")
    if path.is_dir():
        raise MinipError(f"'{path}' is a folder; give an image file")
    if path.stat().st_size == 0:
        raise MinipError(f"image file '{path}' is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            im.load()                                     # decode now: truncated files fail here
            im = ImageOps.exif_transpose(im)
    except UnidentifiedImageError:
        raise MinipError(f"'{path}' is not an image PIL can read; give a PNG, JPEG, WebP … "
                         "file") from None
    except Image.DecompressionBombError:
        raise MinipError(f"'{path}' has too many pixels to read safely; scale it down "
                         "first") from None
    except (OSError, ValueError, SyntaxError) as e:           # truncated or corrupt data
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MinipError(f"'{path}': cannot decode the image ({why}); is the file "
                         "complete?") from None
    if im.width == 0 or im.height == 0:
        raise MinipError(f"image '{path}' is empty ({im.width}×{im.height} pixels)")
    check_picture(im)
    return to_rgb(im)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparency is composited over white; 16/32-bit grey is scaled
    to 8 bits (PIL's own convert would clip it)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im).astype(np.float32)
        top = 1.0 if im.mode == "F" and a.max() <= 1 else 255.0 if a.max() <= 255 else 65535.0
        a = np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode == "P":                                        # palette, maybe with transparency
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        im = im.convert("RGBA")
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")


def cut_margins(im: Image.Image, crop: tuple[int, int, int, int] = (0, 0, 0, 0)) -> Image.Image:
    """Cut (left, top, right, bottom) pixels off the edges (at least MIN_SIDE a side left)."""
    left, top, right, bottom = crop
    W, H = im.size
    if W - left - right < MIN_SIDE or H - top - bottom < MIN_SIDE:
        kept = f"{max(0, W - left - right)}×{max(0, H - top - bottom)}"
        raise ParameterError("crop", f"{left},{top},{right},{bottom} leaves {kept} pixels of a "
                                     f"{W}×{H} image; at least {MIN_SIDE} a side are needed")
    return im.crop((left, top, W - right, H - bottom))


def fit(im: Image.Image, height: int, width: int) -> Image.Image:
    """Centre-crop to the aspect height:width, then resize (bicubic) to width×height; a picture
    too small or too far from that aspect is refused (check_picture)."""
    check_picture(im, height, width)
    W, H = im.size
    if W * height > H * width:                                # too wide: trim left and right
        w = max(1, round(H * width / height))
        x0 = (W - w) // 2
        im = im.crop((x0, 0, x0 + w, H))
    elif W * height < H * width:                              # too tall: trim top and bottom
        h = max(1, round(W * height / width))
        y0 = (H - h) // 2
        im = im.crop((0, y0, W, y0 + h))
    return im.resize((width, height), Image.BICUBIC)


def to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB image -> x (1, 3, H, W) in [−1, 1], fp32 (x = pixel/127.5 − 1)."""
    a = torch.from_numpy(np.asarray(im, dtype=np.uint8).copy())            # (H, W, 3)
    return (a.permute(2, 0, 1)[None].float() / 127.5 - 1)


def load_image(path, height: int, width: int,
               crop=(0, 0, 0, 0)) -> tuple[torch.Tensor, Image.Image]:
    """File -> (x (1, 3, H, W) in [−1, 1], the cropped and resized RGB image)."""
    im = fit(cut_margins(open_image(path), crop), height, width)
    return to_tensor(im), im


@torch.no_grad()
def encode(model, x: torch.Tensor) -> torch.Tensor:
    """x (1, 3, H, W) in [−1, 1] -> z_0 = E(x).mean · scaling_factor (1, 4, H/f, W/f), fp32."""
    mean = model.vae.encode(x.to(model.device, model.dtype))
    return mean.float() * model.vae.cfg.scaling_factor


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two images in [0, 1] (any equal shapes): 10·log10(1 / MSE)."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)
