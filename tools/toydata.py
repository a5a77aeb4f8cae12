"""The toy domain of the shipped model: flat shapes on flat backgrounds, drawn procedurally.

Captions come from a small grammar (every caption is enumerated once and tokenised up front):

    a [small|big] COLOR SHAPE [on the left|on the right|at the top|at the bottom|in the middle]
      [on a COLOR background]
    a COLOR SHAPE and a COLOR SHAPE [on a COLOR background]

Pictures are drawn in batches with torch: each shape is a signed distance to its outline over
a pixel grid (anti-aliased by a 1 px ramp), composited over the background. Some colour-shape
combinations are held out of training (HELD_OUT) to measure generalisation. `analyse` reads a
picture back: background from the border, object mask, dominant colour, shape from the fill ratio
(with the centroid offset and diagonal extent, which survive rounded corners).
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

COLORS = {"red": (0.90, 0.10, 0.10), "green": (0.10, 0.65, 0.15), "blue": (0.10, 0.25, 0.90),
          "yellow": (0.95, 0.90, 0.10), "purple": (0.55, 0.15, 0.75), "orange": (1.00, 0.55, 0.00),
          "white": (0.97, 0.97, 0.97), "black": (0.05, 0.05, 0.05)}
COLOR_NAMES = list(COLORS)
SHAPES = ["circle", "square", "triangle"]
SIZES = [None, "small", "big"]
POSITIONS = [None, "on the left", "on the right", "at the top", "at the bottom", "in the middle"]
HELD_OUT = {("purple", "triangle"), ("orange", "circle"), ("white", "square")}
GRAY = 0.5                      # background when the caption names none
PALETTE = torch.tensor([COLORS[c] for c in COLOR_NAMES])                # (8, 3)


def caption(color, shape, size=None, pos=None, bg=None, second=None):
    """The caption of one picture; `second` = (color, shape) of a second object."""
    words = ["a"] + ([size] if size else []) + [color, shape]
    if second:
        words += ["and", "a", second[0], second[1]]
    if pos:
        words.append(pos)
    if bg:
        words += ["on", "a", bg, "background"]
    return " ".join(words)


def all_captions():
    """Every caption of the grammar, with its attributes (indices; -1 = not given)."""
    rows = []
    C, S = range(len(COLOR_NAMES)), range(len(SHAPES))
    for z, c, s, p, b in itertools.product(range(3), C, S, range(len(POSITIONS)), [-1, *C]):
        if b != c:
            rows.append((c, s, z, p, b, -1, -1))
    for c, s, c2, s2, b in itertools.product(C, S, C, S, [-1, *C]):
        if b not in (c, c2):
            rows.append((c, s, 0, 0, b, c2, s2))
    texts = [caption(COLOR_NAMES[c], SHAPES[s], SIZES[z], POSITIONS[p],
                     COLOR_NAMES[b] if b >= 0 else None,
                     (COLOR_NAMES[c2], SHAPES[s2]) if c2 >= 0 else None)
             for c, s, z, p, b, c2, s2 in rows]
    return texts, torch.tensor(rows)


def held_out(attrs: torch.Tensor) -> torch.Tensor:
    """(n,) bool: does the caption use a held-out colour-shape pair (either object)?"""
    out = torch.zeros(len(attrs), dtype=torch.bool)
    for c, s in HELD_OUT:
        ci, si = COLOR_NAMES.index(c), SHAPES.index(s)
        out |= (attrs[:, 0] == ci) & (attrs[:, 1] == si)
        out |= (attrs[:, 5] == ci) & (attrs[:, 6] == si)
    return out


class Captions:
    """The caption table, tokenised once: `ids` (n, 77), `attrs` (n, 7), `train` (n,) bool."""

    def __init__(self, tokenizer):
        self.texts, self.attrs = all_captions()
        self.ids = tokenizer(self.texts)
        self.train = ~held_out(self.attrs)
        self.index = {tuple(a.tolist()): i for i, a in enumerate(self.attrs)}

    def sample(self, n: int, gen: torch.Generator, two_objects=0.15) -> torch.Tensor:
        """n caption indices from the training part: attributes drawn independently
        (size 40/30/30 %, position 40 % none, background 60 % none), resampled if held out."""
        def pick(probs, k):
            return torch.multinomial(torch.tensor(probs, dtype=torch.float), k, True, generator=gen)
        C = len(COLOR_NAMES)
        a = torch.full((n, 7), -1, dtype=torch.long)
        a[:, 0] = torch.randint(C, (n,), generator=gen)
        a[:, 1] = torch.randint(3, (n,), generator=gen)
        a[:, 2] = pick([0.4, 0.3, 0.3], n)
        a[:, 3] = pick([0.4] + [0.12] * 5, n)
        two = torch.rand(n, generator=gen) < two_objects
        a[two, 2] = a[two, 3] = 0
        a[two, 5] = torch.randint(C, (int(two.sum()),), generator=gen)
        a[two, 6] = torch.randint(3, (int(two.sum()),), generator=gen)
        a[:, 4] = torch.where(torch.rand(n, generator=gen) < 0.6, -1,
                              torch.randint(C, (n,), generator=gen))
        while True:                              # redraw clashes and held-out pairs
            bad = held_out(a) | (a[:, 4] == a[:, 0]) | ((a[:, 5] >= 0) & (a[:, 4] == a[:, 5]))
            if not bad.any():
                break
            k = int(bad.sum())
            a[bad, 0] = torch.randint(C, (k,), generator=gen)
            a[bad & two, 5] = torch.randint(C, (int((bad & two).sum()),), generator=gen)
            a[bad, 4] = torch.where(torch.rand(k, generator=gen) < 0.6, -1,
                                    torch.randint(C, (k,), generator=gen))
        return torch.tensor([self.index[tuple(r)] for r in a.tolist()])

    def find(self, text: str) -> int:
        return self.texts.index(text)


def _sdf(shape, cx, cy, r, yy, xx):
    """Signed distance (pixels, > 0 inside) of each sample's shape: (b, H, W)."""
    dx, dy = xx - cx[:, None, None], yy - cy[:, None, None]
    r = r[:, None, None]
    circle = r - (dx ** 2 + dy ** 2).sqrt()
    square = 0.88 * r - torch.maximum(dx.abs(), dy.abs())
    # isosceles triangle, apex up, filling the box [-R, R]²: base y = R, sides |dx| = (dy + R)/2
    R = 1.1 * r
    triangle = torch.minimum(R - dy, (dy + R - 2 * dx.abs()) / 5 ** 0.5)
    sdf = torch.stack([circle, square, triangle], 1)                         # (b, 3, H, W)
    return sdf.gather(1, shape[:, None, None, None].expand(-1, 1, *sdf.shape[2:]))[:, 0]


def _jitter(rgb, gen, amount=0.04):
    return (rgb + (torch.rand(rgb.shape, generator=gen) * 2 - 1) * amount).clamp(0, 1)


def draw(attrs: torch.Tensor, gen: torch.Generator, size: int = 64) -> torch.Tensor:
    """Pictures for caption attributes (n, 7) -> (n, 3, size, size) in [-1, 1]."""
    n = len(attrs)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=gen)      # noqa: E731
    c, s, z, p, b, c2, s2 = attrs.T
    two = c2 >= 0
    r = torch.where(z == 1, u(0.09, 0.12), torch.where(z == 2, u(0.20, 0.25), u(0.13, 0.19)))
    cx, cy = u(0.28, 0.72), u(0.28, 0.72)
    side, mid = u(0.22, 0.30), u(0.38, 0.62)
    cx = torch.where(p == 1, side, torch.where(p == 2, 1 - side, cx))
    cy = torch.where(p == 3, side, torch.where(p == 4, 1 - side, cy))
    cx = torch.where((p == 3) | (p == 4), mid, cx)
    cy = torch.where((p == 1) | (p == 2), mid, cy)
    cx = torch.where(p == 5, u(0.45, 0.55), cx)
    cy = torch.where(p == 5, u(0.45, 0.55), cy)
    r = torch.where(two, u(0.11, 0.16), r)                 # two objects: one left, one right
    cx = torch.where(two, u(0.22, 0.30), cx)
    cx2, cy2 = u(0.70, 0.78), u(0.35, 0.65)
    cy = torch.where(two, u(0.35, 0.65), cy)
    r, r2 = r * size, u(0.11, 0.16) * size
    lo, hi = r * 1.1 + 2, size - 2 - r * 1.1               # keep the border free
    cx, cy = torch.maximum(torch.minimum(cx * size, hi), lo), torch.maximum(torch.minimum(cy * size, hi), lo)
    cx2, cy2 = cx2 * size, cy2 * size
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    bg = torch.where((b >= 0)[:, None], PALETTE[b.clamp(min=0)], torch.full((n, 3), GRAY))
    img = _jitter(bg, gen, 0.03)[:, :, None, None].expand(n, 3, size, size)
    a1 = (_sdf(s, cx, cy, r, yy, xx) + 0.5).clamp(0, 1)[:, None]
    img = img * (1 - a1) + _jitter(PALETTE[c], gen)[:, :, None, None] * a1
    a2 = (_sdf(s2.clamp(min=0), cx2, cy2, r2, yy, xx) + 0.5).clamp(0, 1)[:, None] * two[:, None, None, None]
    img = img * (1 - a2) + _jitter(PALETTE[c2.clamp(min=0)], gen)[:, :, None, None] * a2
    return img * 2 - 1


# ---- reading a picture back ------------------------------------------------------------------

def nearest_color(rgb) -> str:
    d = ((PALETTE - torch.as_tensor(rgb, dtype=torch.float)) ** 2).sum(1)
    return COLOR_NAMES[int(d.argmin())]


def largest_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected blob of a boolean mask: every pixel starts with its own label,
    labels spread by 3×3 max-pooling inside the mask until nothing changes."""
    m = torch.from_numpy(np.asarray(mask, dtype=bool))
    if not m.any():
        return m.numpy()
    ids = torch.arange(1, m.numel() + 1, dtype=torch.float).reshape(m.shape) * m
    while True:
        grown = torch.nn.functional.max_pool2d(ids[None, None], 3, 1, 1)[0, 0] * m
        if torch.equal(grown, ids):
            break
        ids = grown
    labels, counts = ids[m].unique(return_counts=True)
    return (ids == labels[counts.argmax()]).numpy()


# Shape prototypes: (fill ratio, centroid offset, diagonal ratio) of the ideal drawn shapes, and
# how far apart each feature's prototypes lie (its scale in the nearest-prototype distance).
#   fill = area / bounding box                        circle π/4, square 1, triangle 1/2
#   offset = (centroid y − box centre y) / box height   0, 0, 1/6 (apex up: the mass sits low)
#   diagonal = extent along the diagonals / extent along the axes   1, √2, (√2 + 1/√2)/2
PROTOTYPES = {"circle": (np.pi / 4, 0.0, 1.0), "square": (1.0, 0.0, 2 ** 0.5),
              "triangle": (0.5, 1 / 6, 1.5 / 2 ** 0.5)}
SCALES = (0.5, 1 / 6, 2 ** 0.5 - 1)


def shape_features(mask: np.ndarray) -> tuple[float, float, float]:
    """(fill, offset, diagonal) of a non-empty boolean mask (see PROTOTYPES)."""
    ys, xs = np.nonzero(mask)
    w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    fill = len(xs) / (w * h)
    offset = (ys.mean() - (ys.min() + ys.max()) / 2) / h
    u, v = xs + ys, xs - ys                               # diagonal coordinates (× √2)
    diagonal = (max(u.max() - u.min(), v.max() - v.min()) / 2 ** 0.5 + 1) / max(w, h)
    return float(fill), float(offset), float(diagonal)


def classify_shape(features) -> str:
    """Nearest prototype, each feature divided by its scale."""
    def dist(proto):
        return sum(((f - p) / s) ** 2 for f, p, s in zip(features, proto, SCALES))
    return min(PROTOTYPES, key=lambda name: dist(PROTOTYPES[name]))


def analyse(image, threshold: float | None = None) -> dict:
    """One picture (3, H, W) in [0, 1] (tensor or array) -> what it shows.

    background = median of the 2-pixel border; mask = pixels farther than `threshold` from it
    (largest connected blob; default: half way to the object, i.e. half the 99.5th percentile
    of the distances, at least 0.12, so a blurred edge is cut at its middle whatever the contrast); colour = nearest palette colour to the mask's median; shape = the
    nearest prototype in (fill ratio, centroid offset, diagonal ratio): the fill ratio area /
    bounding box (square 1, circle π/4, triangle ½) alone takes a square or triangle whose
    corners are slightly rounded (as any decoder draws them) for a circle; the triangle's low
    centroid and the square's long diagonals survive the rounding."""
    x = torch.as_tensor(np.asarray(image), dtype=torch.float)
    H, W = x.shape[1:]
    border = torch.cat([x[:, :2].reshape(3, -1), x[:, -2:].reshape(3, -1),
                        x[:, :, :2].reshape(3, -1), x[:, :, -2:].reshape(3, -1)], 1)
    bg = border.median(1).values
    dist = ((x - bg[:, None, None]) ** 2).sum(0).sqrt()
    if threshold is None:
        threshold = max(0.12, 0.5 * torch.quantile(dist.flatten(), 0.995).item())
    mask = largest_blob(dist.numpy() > threshold)
    out = dict(background=nearest_color(bg), mask=mask, area=int(mask.sum()))
    if out["area"] < 4:
        return dict(out, color=None, shape=None, fill=0.0, center=(W / 2, H / 2), box=(0, 0))
    ys, xs = np.nonzero(mask)
    box = (xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
    features = shape_features(mask)
    color = nearest_color(x[:, torch.from_numpy(mask)].median(1).values)
    return dict(out, color=color, shape=classify_shape(features), fill=features[0],
                features=features, box=box, center=(float(xs.mean()), float(ys.mean())))


def iou(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0
