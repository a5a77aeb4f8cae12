"""Looking at attention: per-token cross-attention maps and self-attention components, drawn
over the generated image with captions, plus a captioned side-by-side strip of images.

Cross-attention view (P2P reference "aggregate_attention"): the stored maps of the up and down
layers at one resolution (16² at 512 px; default: the coarsest stored down/up resolution;
`pick_pixels` selects another by its row count),
averaged over layers, heads and steps -> one res×res map per token, divided by its max.
Self-attention view: the top right-singular vectors of the centred (pixels × pixels) average
self-attention map, each shown as a res×res image.
Through time (`over_time`): one step's maps of a word (AttentionStore(step_pixels=…)) beside the
x̂₀ of that step, one frame per step, written as a GIF (`save_gif`).
Word heat map (`word_heat`, DAAM's aggregation, Tang et al., ACL 2023): every stored cross map,
all layers and resolutions, upsampled (bicubic) to one size, clamped ≥ 0 and summed; a word's
sub-word tokens averaged.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .errors import ParameterError
from .control import AttentionStore, map_shape

TILE = 128


def _coarsest(store: AttentionStore, kind: str) -> int:
    pixels = store.coarsest(kind)
    if pixels is None:
        raise ValueError(f"no {kind}-attention maps were stored")
    return pixels


def pick_pixels(store: AttentionStore, kind: str, rows: int | None, image: Image.Image):
    """The stored resolution whose maps have `rows` rows over this image (None: the default)."""
    if rows is None:
        return None
    stored = store.resolutions(kind)
    for pixels in stored:
        if _shape(pixels, image)[0] == rows:
            return pixels
    have = ", ".join("x".join(map(str, _shape(p, image))) for p in stored) or "none"
    raise ParameterError("map_res", f"{rows}: no {kind}-attention maps with {rows} rows were "
                                      f"stored (stored: {have}); pick one of those")


def _shape(pixels: int, image: Image.Image) -> tuple[int, int]:
    """(rows, cols) of a map with `pixels` entries over this image (control.map_shape)."""
    return _shape_of(pixels, (image.height, image.width))


def cross_maps(store: AttentionStore, prompt_index: int, pixels: int | None = None):
    """(tokens=77, rows·cols) averaged cross-attention of one prompt, and the pixel count."""
    pixels = pixels or _coarsest(store, "cross")
    return store.average("cross", pixels)[prompt_index].T, pixels


def self_components(store: AttentionStore, prompt_index: int, n: int = 6, pixels=None):
    """Top-n right-singular vectors of the centred mean self-attention map: (n, pixels)."""
    pixels = pixels or _coarsest(store, "self")
    m = store.average("self", pixels)[prompt_index].double()
    _, _, vh = torch.linalg.svd(m - m.mean(dim=1, keepdim=True))
    return vh[:n].float(), pixels


def _heat(values: np.ndarray, shape, image: Image.Image) -> Image.Image:
    """A map (values ≥ 0, max 1) as a red-yellow heat image blended over the picture."""
    v = np.clip(values.reshape(shape), 0, 1)
    heat = np.stack([np.ones_like(v), v, np.zeros_like(v)], -1) * 255 * v[..., None] ** 0.5
    heat = Image.fromarray(heat.astype(np.uint8)).resize((TILE, TILE), Image.NEAREST)
    base = image.convert("L").convert("RGB").resize((TILE, TILE), Image.BILINEAR)
    return Image.blend(base, heat, 0.7)


def caption_grid(tiles: list[Image.Image], captions: list[str], per_row: int = 8,
                 title: str | None = None) -> Image.Image:
    """Tiles in rows, each with its caption underneath (and an optional title on top)."""
    font = ImageFont.load_default()
    w, h = tiles[0].size
    cap, top = 18, (22 if title else 0)
    cols = min(per_row, len(tiles))
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * w, top + rows * (h + cap)), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((4, 4), title, fill="black", font=font)
    for i, (tile, text) in enumerate(zip(tiles, captions)):
        x, y = (i % cols) * w, top + (i // cols) * (h + cap)
        sheet.paste(tile, (x, y))
        while len(text) > 3 and draw.textlength(text, font=font) > w - 4:
            text = text[:-4] + "…"
        draw.text((x + (w - draw.textlength(text, font=font)) / 2, y + h + 3), text,
                  fill="black", font=font)
    return sheet


def cross_attention_image(store, tok, prompt: str, prompt_index: int, image: Image.Image,
                          pixels=None) -> Image.Image:
    """One captioned tile per token of the prompt (start and end tokens included)."""
    maps, pixels = cross_maps(store, prompt_index, pixels)
    names = tok.token_strings(prompt)
    n = min(len(tok.tokenize(prompt)) + 2, len(names))
    shape = _shape(pixels, image)
    tiles = [_heat((maps[i] / maps[i].max().clamp_min(1e-12)).cpu().numpy(), shape, image)
             for i in range(n)]
    return caption_grid(tiles, names[:n], title=f"cross-attention, {shape[0]}x{shape[1]}: {prompt}")


def self_attention_image(store, prompt: str, prompt_index: int, image: Image.Image, n=6,
                         pixels=None) -> Image.Image:
    comps, pixels = self_components(store, prompt_index, n, pixels)
    shape = _shape(pixels, image)
    tiles = []
    for c in comps:
        c = c - c.min()
        tiles.append(_heat((c / c.max().clamp_min(1e-12)).cpu().numpy(), shape, image))
    return caption_grid(tiles, [f"component {i}" for i in range(len(tiles))],
                        title=f"self-attention SVD, {shape[0]}x{shape[1]}: {prompt}")


def strip(images: list[Image.Image], prompts: list[str]) -> Image.Image:
    """Images side by side with their prompts written under them."""
    size = max(TILE * 2, images[0].width)
    tiles = [im.resize((size, round(size * im.height / im.width))) for im in images]
    return caption_grid(tiles, prompts, per_row=len(tiles))


def word_tokens(tok, prompt: str) -> list[tuple[str, list[int]]]:
    """(word, its token positions) for each word of the prompt (split on single spaces, as
    Prompt-to-Prompt's word lookup), empty words left out."""
    return [(w, tok.word_positions(prompt, i)) for i, w in enumerate(prompt.split(" ")) if w]


def word_heat(store: AttentionStore, tok, prompt: str, prompt_index: int,
              size: tuple[int, int]) -> list[tuple[str, torch.Tensor]]:
    """DAAM's word heat maps: [(word, (rows, cols) map, max 1)] for each word of the prompt.
    Each stored cross-attention layer's per-token maps (heads averaged, steps summed) upsampled
    bicubically to `size`, clamped ≥ 0, summed over layers and resolutions; the word's tokens
    averaged."""
    total = torch.zeros(77, *size)
    for (place, *_, kind, pixels), maps in store.sums.items():
        if kind != "cross":
            continue
        r, c = _shape_of(pixels, size)
        m = maps[prompt_index].T.reshape(1, -1, r, c)                     # (1, 77, r, c)
        total += F.interpolate(m, size=size, mode="bicubic", align_corners=False)[0].clamp_min(0)
    out = []
    for word, positions in word_tokens(tok, prompt):
        m = total[positions].mean(0) if positions else torch.zeros(size)
        out.append((word, m / m.max().clamp_min(1e-12)))
    return out


def _shape_of(pixels: int, size: tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of a map with `pixels` entries over an image of size (height, width): the
    sides halved, rounding up, as the VAE (a multiple of its factor) and the UNet do."""
    return map_shape(pixels, size)


def step_maps(store: AttentionStore, prompt_index: int, positions: list[int], pixels=None):
    """[(rows·cols,) map per step]: the tokens' summed cross-attention of each kept step, max 1."""
    out = []
    for step in sorted(store.per_step):
        m = store.at_step(step, pixels)[prompt_index][:, positions].sum(-1)
        out.append(m / m.max().clamp_min(1e-12))
    return out


def prompts_with(prompts: list[str], word: str) -> list[int]:
    """Indices of the prompts that hold `word` (split on spaces); none is a MinipError."""
    rows = [b for b, p in enumerate(prompts) if word in p.split(" ")]
    if not rows:
        raise ParameterError("over_time", f"{word!r} is not a word of "
                             f"{' / '.join(repr(p) for p in prompts)} (words are split on spaces)")
    return rows


def coarse_pixels(model, height: int, width: int) -> int:
    """Pixels of the coarsest down/up cross-attention resolution at this image size (16² at
    512 px for SD 1.x, 8² at 64 px for the toy model): the maps kept per step by default."""
    f = model.vae.cfg.downscale
    level = max(i for i, blk in enumerate(model.unet.down_blocks) if blk.attentions is not None)
    h, w = height // f, width // f
    for _ in range(level):                            # each down block but the last halves
        h, w = -(-h // 2), -(-w // 2)
    return h * w


def over_time(store: AttentionStore, tok, prompts: list[str], word: str,
              x0_images: list[list[Image.Image]], pixels=None) -> list[Image.Image]:
    """One frame per step: for each prompt holding `word`, x̂₀ of that step and the word's map of
    that step over it. x0_images[step][prompt]. A word in no prompt is a MinipError."""
    rows = prompts_with(prompts, word)
    maps = {b: step_maps(store, b, tok.word_positions(prompts[b], word), pixels) for b in rows}
    steps = len(x0_images)
    frames = []
    for i, x0 in enumerate(x0_images):
        tiles, captions = [], []
        for b in rows:
            shape = _shape(maps[b][i].numel(), x0[b])
            tiles += [x0[b].resize((TILE, TILE), Image.BICUBIC),
                      _heat(maps[b][i].cpu().numpy(), shape, x0[b])]
            captions += [f"x0, prompt {b}", f"'{word}', prompt {b}"]
        frames.append(caption_grid(tiles, captions, per_row=2,
                                   title=f"step {i + 1}/{steps}: '{word}' and x0"))
    return frames


def save_gif(frames: list[Image.Image], path: str, ms: int = 250, hold: int = 1500):
    """An animated GIF that loops, the last frame held `hold` ms."""
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                   duration=[ms] * (len(frames) - 1) + [hold])
