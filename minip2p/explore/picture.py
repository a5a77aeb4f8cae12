"""A picture uploaded to the explorer: a `data:image/png;base64,…` (or image/jpeg) URL in the
request body -> an upright RGB PIL image, or one MinipError line saying what is wrong.

The bytes must start like a PNG or a JPEG (no other format reaches PIL's many decoders), the
header's size must be at most MAX_PICTURE_SIDE a side (checked before any pixel is decoded) and at
least MIN_SIDE (real/images.check_picture, as for files), and the whole file must decode (a
truncated file is refused, not padded).
"""
from __future__ import annotations

import base64
import binascii
import io
import re

from ..errors import MinipError

MAX_PICTURE_SIDE = 2048                      # pixels, either side of an uploaded picture
MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}
DATA_URL = re.compile(r"data:image/(png|jpeg|jpg);base64,", re.IGNORECASE)


def decode_picture(value):
    """The request's `image` field -> an RGB PIL image, or None where there is no picture."""
    from PIL import Image, ImageOps, UnidentifiedImageError
    from ..real.images import check_picture, to_rgb
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise MinipError(f"image must be a data:image/png;base64,… URL, got "
                         f"{type(value).__name__}")
    head = DATA_URL.match(value)
    if head is None:
        raise MinipError("image must be a data:image/png;base64,… or data:image/jpeg;base64,… "
                         "URL (a PNG or JPEG picture)")
    try:
        data = base64.b64decode(value[head.end():], validate=True)
    except (binascii.Error, ValueError):
        raise MinipError("image: the data URL is not valid base64") from None
    kind = next((k for k, magic in MAGIC.items() if data.startswith(magic)), None)
    if kind is None:
        raise MinipError("image is not a PNG or JPEG picture (its bytes do not start like one)")
    try:
        im = Image.open(io.BytesIO(data), formats=["PNG", "JPEG"])
        if max(im.size) > MAX_PICTURE_SIDE:
            raise MinipError(f"image is {im.width}×{im.height} pixels; at most "
                             f"{MAX_PICTURE_SIDE} a side")
        if min(im.size) < 1:
            raise MinipError("image has no pixels")
        check_picture(im)
        im.load()                                   # every pixel: a truncated file fails here
        im = ImageOps.exif_transpose(im)
    except MinipError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise MinipError(f"image: the {kind.upper()} cannot be read ({reason})") from None
    return to_rgb(im)
