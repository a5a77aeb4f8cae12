"""Seeing a ruined picture: background purity, object solidity and stray blobs.

`toydata.analyse` reads what a picture shows (colour, shape, position) but not whether a person
would keep it: blotches of other colours over a flat background, holes punched into the object
and noise all pass it. `artifacts(image, n_objects)` measures them on the toy domain's pictures
(flat shapes on a flat background):

- background purity: the share of background pixels (outside the named objects, dilated by a
  few pixels for the decoder's soft edges) within a small RGB distance of the background colour
  (the border's median, as `analyse` takes it);
- solidity: the share of each named object's convex hull filled with the object's colour (hull
  of the largest blob of that colour), the smallest over the objects;
- stray blobs: 8-connected components of non-background pixels of at least a minimum area that
  touch no named object (the n_objects largest components of the picture's 3×3 median, which
  noise cannot join into one);
- clean: all three within the thresholds below, chosen by `python -m tools.artifacts
  --calibrate` (drawn pictures and their VAE round trips against the same pictures with injected
  blotches, holes and noise; figures in tools/README.md).

Connected components and the convex hull are written here in numpy (no scipy, no opencv).
The constants are in pixels of the toy model's 64 px pictures.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from tools.toydata import COLOR_NAMES, PALETTE, nearest_color

FOREGROUND = 0.2     # RGB distance from the background above which a pixel is not background
PURE = 0.1           # RGB distance from the background within which a pixel is pure background
DILATE = 3           # pixels added around the named objects before measuring the background
MIN_AREA = 6         # smallest stray blob counted, pixels
MIN_PURITY = 0.99    # clean: background purity at least this
MIN_SOLIDITY = 0.89  # clean: every named object's solidity at least this
MAX_STRAYS = 0       # clean: at most this many stray blobs


def _shifts(a: np.ndarray, fill) -> list[np.ndarray]:
    """The nine 3×3-neighbourhood shifts of a 2-D array (outside filled with `fill`)."""
    H, W = a.shape
    p = np.pad(a, 1, constant_values=fill)
    return [p[dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3)]


def dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    m = np.asarray(mask, bool)
    for _ in range(steps):
        m = np.any(_shifts(m, False), axis=0)
    return m


def components(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """8-connected components of a boolean mask -> (labels (H, W): 0 outside, 1 the largest,
    2 the next...; areas (k,) largest first). Every pixel starts with its own id; ids spread
    to the 3×3 maximum inside the mask until nothing changes."""
    m = np.asarray(mask, bool)
    ids = np.where(m, np.arange(1, m.size + 1).reshape(m.shape), 0)
    while True:
        grown = np.max(_shifts(ids, 0), axis=0) * m
        if np.array_equal(grown, ids):
            break
        ids = grown
    uniq, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    counts = np.where(uniq == 0, -1, counts)                 # 0 (outside) sorts last
    order = np.argsort(-counts, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(1, len(order) + 1)
    labels = np.where(m, rank[inverse.reshape(m.shape)], 0)
    return labels, counts[order][counts[order] > 0]


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain: (n, 2) points -> hull vertices counter-clockwise (y down)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return np.array(pts, dtype=float)

    def half(seq):
        out = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]
    return np.array(half(pts) + half(pts[::-1]), dtype=float)


def fill_polygon(vertices: np.ndarray, shape) -> np.ndarray:
    """Pixels whose centre lies inside or on a convex polygon (vertices as from convex_hull)."""
    ys, xs = np.mgrid[:shape[0], :shape[1]]
    inside = np.ones(shape, bool)
    for (x0, y0), (x1, y1) in zip(vertices, np.roll(vertices, -1, 0)):
        inside &= (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0) >= -1e-6
    return inside


def solidity(colored: np.ndarray) -> float:
    """Share of the convex hull of the largest blob of `colored` that is `colored`. The hull is
    that of each row's leftmost and rightmost pixel centre, which is the blob's hull."""
    labels, _ = components(colored)
    blob = labels == 1
    if not blob.any():
        return 0.0
    rows = np.nonzero(blob.any(1))[0]
    left = blob[rows].argmax(1)
    right = blob.shape[1] - 1 - blob[rows, ::-1].argmax(1)
    hull = convex_hull(np.concatenate([np.stack([left, rows], 1), np.stack([right, rows], 1)]))
    if len(hull) < 3:                                         # a line: nothing to fill
        return 1.0
    inside = fill_polygon(hull, blob.shape) | blob
    return float((colored & inside).sum() / inside.sum())


def artifacts(image, n_objects: int = 1) -> dict:
    """One picture (3, H, W) in [0, 1] (tensor or array) -> {"background_purity", "solidity",
    "stray_blobs", "clean", "background"}. Solidity is 0 where no object is found at all: an
    empty picture is no keeper either."""
    x = np.asarray(torch.as_tensor(np.asarray(image), dtype=torch.float).clamp(0, 1))
    border = np.concatenate([x[:, :2].reshape(3, -1), x[:, -2:].reshape(3, -1),
                             x[:, :, :2].reshape(3, -1), x[:, :, -2:].reshape(3, -1)], 1)
    bg = np.median(border, 1)
    dist = np.sqrt(((x - bg[:, None, None]) ** 2).sum(0))
    pad = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")      # 3×3 median: noise-proof objects
    H, W = dist.shape
    med = np.median([pad[:, dy:dy + H, dx:dx + W] for dy in range(3) for dx in range(3)], axis=0)
    labels, areas = components(np.sqrt(((med - bg[:, None, None]) ** 2).sum(0)) > FOREGROUND)
    named = min(n_objects, len(areas))
    raw, raw_areas = components(dist > FOREGROUND)
    touched = np.unique(raw[(labels >= 1) & (labels <= named)])
    strays = int(sum(a >= MIN_AREA for k, a in enumerate(raw_areas, 1) if k not in touched))
    solid = []
    for k in range(1, named + 1):
        obj = labels == k
        color = np.median(x[:, obj], 1)
        to_obj = np.sqrt(((x - color[:, None, None]) ** 2).sum(0))
        solid.append(solidity(dilate(obj, 1) & (to_obj < dist)))   # nearer the object than bg
    objects = dilate((labels >= 1) & (labels <= named), DILATE)
    background = ~objects
    purity = float((dist[background] < PURE).mean()) if background.any() else 0.0
    low = min(solid) if solid else 0.0
    clean = purity >= MIN_PURITY and low >= MIN_SOLIDITY and strays <= MAX_STRAYS
    return dict(background_purity=purity, solidity=low, stray_blobs=strays, clean=bool(clean),
                background=nearest_color(torch.from_numpy(bg)))


# ---- injected defects (calibration and tests) -------------------------------------------------

def _disc(shape, cx, cy, ax, ay=None, angle=0.0) -> np.ndarray:
    ys, xs = np.mgrid[:shape[0], :shape[1]] + 0.5
    dx, dy = xs - cx, ys - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    return (u / ax) ** 2 + (v / (ay or ax)) ** 2 <= 1


def inject(image, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A copy of one clean picture (3, H, W) in [0, 1] with a defect of `kind`:
    "blotches" 1–3 ellipses (semi-axes 2–6 px) of palette colours other than the picture's,
    on the background at least 2 px from the objects; "holes" 1–2 background-coloured discs
    (radius 0.4–0.55 of the object's equivalent radius) punched near an object's centre;
    "noise" Gaussian noise σ = 0.15; "salt-and-pepper" 10 % of the pixels black or white."""
    x = np.array(np.asarray(image), dtype=np.float32)
    H, W = x.shape[1:]
    bg = np.median(np.concatenate([x[:, :2].reshape(3, -1), x[:, -2:].reshape(3, -1)], 1), 1)
    fg = np.sqrt(((x - bg[:, None, None]) ** 2).sum(0)) > FOREGROUND
    if kind == "noise":
        return np.clip(x + rng.normal(0, 0.15, x.shape), 0, 1).astype(np.float32)
    if kind == "salt-and-pepper":
        hit = rng.random((H, W)) < 0.1
        x[:, hit] = (rng.random(hit.sum()) < 0.5).astype(np.float32)
        return x
    labels, areas = components(fg)
    if kind == "holes":
        k = int(rng.integers(1, min(2, len(areas)) + 1))                 # which object
        obj = labels == k
        ys, xs = np.nonzero(obj)
        R = np.sqrt(areas[k - 1] / np.pi)
        for _ in range(int(rng.integers(1, 3))):
            near = (xs - xs.mean()) ** 2 + (ys - ys.mean()) ** 2 <= (0.3 * R) ** 2
            i = rng.choice(np.nonzero(near)[0])
            x[:, _disc((H, W), xs[i] + 0.5, ys[i] + 0.5, rng.uniform(0.4, 0.55) * R)] = bg[:, None]
        return x
    if kind == "blotches":
        used = {nearest_color(torch.from_numpy(bg))} | {
            nearest_color(torch.from_numpy(np.median(x[:, labels == k], 1)))
            for k in range(1, len(areas) + 1) if areas[k - 1] >= MIN_AREA}
        others = [i for i, c in enumerate(COLOR_NAMES) if c not in used]
        keep_out = dilate(fg, 2)
        for _ in range(int(rng.integers(1, 4))):
            for _try in range(100):
                ax, ay = rng.uniform(2, 6, 2)
                m = _disc((H, W), rng.uniform(4, W - 4), rng.uniform(4, H - 4), ax, ay,
                          rng.uniform(0, np.pi))
                if not (m & keep_out).any():
                    break
            else:
                continue                                   # no room left on the background
            x[:, m] = PALETTE[rng.choice(others)].numpy()[:, None]
            keep_out |= dilate(m, 2)
        return x
    raise ValueError(f"unknown defect {kind!r}")


KINDS = ["blotches", "holes", "noise", "salt-and-pepper"]


def pictures(n: int, seed: int = 0, two_objects: float = 0.3):
    """(drawn, round trips, objects): n drawn toy pictures (3, 64, 64) in [0, 1] over varied
    training captions, their VAE round trips (the toy model's VAE, encode then decode, fp32)
    and how many objects each caption names."""
    from minip2p import load_model
    from tools.toydata import Captions, draw
    model = load_model()
    caps = Captions(model.tokenizer)
    gen = torch.Generator().manual_seed(seed)
    attrs = caps.attrs[caps.sample(n, gen, two_objects=two_objects)]
    x = draw(attrs, gen)
    with torch.no_grad():
        rec = model.vae.decode(model.vae.encode(x.to(model.device, torch.float32))).float().cpu()
    counts = [1 + int(a[5] >= 0) for a in attrs]
    return (x + 1) / 2, (rec.clamp(-1, 1) + 1) / 2, counts


def calibrate(n: int = 48, seed: int = 0) -> dict[str, list[dict]]:
    """Every measure on n pictures of each kind: drawn, VAE round trips, and the drawn pictures
    with each injected defect (KINDS)."""
    drawn, rec, counts = pictures(n, seed)
    rng = np.random.default_rng(seed)
    out = {"drawn": [artifacts(im, k) for im, k in zip(drawn, counts)],
           "VAE round trip": [artifacts(im, k) for im, k in zip(rec, counts)]}
    for kind in KINDS:
        out[kind] = [artifacts(inject(im, kind, rng), k) for im, k in zip(drawn, counts)]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calibrate", action="store_true", help="print the calibration table")
    ap.add_argument("--n", type=int, default=48, help="pictures per kind")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.calibrate:
        ap.error("nothing to do: pass --calibrate")
    torch.set_num_threads(1)
    res = calibrate(args.n, args.seed)
    print(f"thresholds: purity >= {MIN_PURITY}, solidity >= {MIN_SOLIDITY}, stray blobs <= "
          f"{MAX_STRAYS} (area >= {MIN_AREA} px); foreground {FOREGROUND}, pure {PURE}")
    print("| kind | clean | purity min / median / max | solidity min / median / max | "
          "stray blobs min / median / max |")
    print("|---|---:|---|---|---|")
    for kind, rows in res.items():
        def stats(key, fmt):
            v = np.array([r[key] for r in rows], dtype=float)
            return " / ".join(format(f, fmt) for f in (v.min(), np.median(v), v.max()))
        clean = sum(r["clean"] for r in rows)
        print(f"| {kind} | {100 * clean / len(rows):.1f} % ({clean}/{len(rows)}) | "
              f"{stats('background_purity', '.3f')} | {stats('solidity', '.3f')} | "
              f"{stats('stray_blobs', '.0f')} |")


if __name__ == "__main__":
    main()
