"""The toy InstructPix2Pix's training data: instruction captions for the toy domain, Prompt-to-
Prompt pairs made from them by `minip2p pairs` on the toy model (the InstructPix2Pix data
recipe, pairs.py), and the toy analyser as the filter in place of CLIP.

    python -m tools.make_instruct_pairs captions            # tools/out/instruct/captions.jsonl
    python -m tools.make_instruct_pairs run                 # minip2p pairs on them (resumable)
    python -m tools.make_instruct_pairs filter              # tools/out/instruct/kept.jsonl
    python -m tools.make_instruct_pairs filter --align      # also the pairs whose object moved
    python -m tools.make_instruct_pairs captions --mix hard --set 2 --seed 1   # another set,
    python -m tools.make_instruct_pairs run --set 2 --seed 1   # weighted to the hard cases

Captions. Each instruction maps a source caption of the toy grammar (tools/toydata.py: one
object, an optional size, position and background) to the caption with one attribute changed:

    make it COLOR            (8)   "a big red circle" -> "a big blue circle"
    turn it into a SHAPE     (3)   "a red circle"     -> "a red square"
    make it big / small      (2)   "a red circle"     -> "a big red circle"

Position instructions ("move it to the left") are not made: the toy model takes an object's
place from the noise, not from the caption (weights/toy/README.md), so Prompt-to-Prompt cannot
move it. Colour-shape pairs held out of the toy model's training (toydata.HELD_OUT) are left
out of both captions. Items go round the instructions in turn, so a run stopped early is
balanced.

Filter. The official recipe keeps a pair when CLIP finds both captions in their images, the two
images alike and the change along the captions' direction. The toy analyser reads the same
directly: image 0 shows the source's colour and shape, image 1 the edited caption's, the
background is kept, the object stays in place (centre within MAX_SHIFT px) and its size is kept
(area ratio within KEEP_AREA) or, for a size instruction, changes by at least SIZE_AREA.
The filter prints why pairs fail. Most fail because the object MOVED: the toy model reads the
place from the noise and the self-attention copy does not hold it. With --align such a pair,
right in every other way, is kept with image 1 moved back by whole pixels onto image 0's place
(the flat background's edge replicated; not in the official recipe, whose objects do not move).
Every kept pair is also used backwards, with the instruction that undoes the edit ("make it
blue" on red -> blue gives "make it red" on blue -> red; big <-> small by the same area
ratio): not in the official recipe, which had captions to spare; here each pair costs seconds.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np

from tools import toydata

OUT = Path(__file__).parent / "out" / "instruct"
COLORS, SHAPES = toydata.COLOR_NAMES, toydata.SHAPES
MAX_SHIFT = 6.0            # px: object centre kept
KEEP_AREA = (0.7, 1.45)    # area ratio after / before when the size is kept
SIZE_AREA = 1.6            # "make it big": ratio ≥ this; "make it small": ≤ 1 / this
GREY_TOL = 0.12            # a background within this RGB distance of grey reads "grey"


def instructions() -> list[tuple[str, str, str]]:
    """(instruction, attribute, value): the 13 instructions of the toy domain."""
    out = [(f"make it {c}", "color", c) for c in COLORS]
    out += [(f"turn it into a {s}", "shape", s) for s in SHAPES]
    out += [("make it big", "size", "big"), ("make it small", "size", "small")]
    return out


# The caption mixes: per instruction kind, how many turns in a round of the 13 instructions,
# the chances of the source's size (none / small / big) and of a coloured background. "even":
# the first run; "hard": weighted to where the trained model failed to keep the rest (small
# objects, shape and size instructions, coloured backgrounds).
MIXES = {"even": dict(turns=dict(color=1, shape=1, size=1), sizes=(0.4, 0.3, 0.3), bg=0.4),
         "hard": dict(turns=dict(color=1, shape=2, size=3), sizes=(0.25, 0.55, 0.2), bg=0.6)}


def source_for(attr: str, value: str, rng: random.Random, mix: str = "even") -> dict:
    """A random single-object source whose `attr` differs from `value` (held-out pairs avoided
    before and after the edit)."""
    m = MIXES[mix]
    while True:
        a = dict(color=rng.choice(COLORS), shape=rng.choice(SHAPES),
                 size=rng.choices([None, "small", "big"], m["sizes"])[0],
                 pos=rng.choice(toydata.POSITIONS[1:]) if rng.random() < 0.4 else None,
                 bg=rng.choice(COLORS) if rng.random() < m["bg"] else None)
        if attr == "size" and value == "big" and a["size"] == "big":
            continue
        if attr == "size" and value == "small" and a["size"] == "small":
            continue
        if attr != "size" and a[attr] == value:
            continue
        b = dict(a, **{attr: value})
        if any((x["color"], x["shape"]) in toydata.HELD_OUT for x in (a, b)):
            continue
        if a["bg"] in (a["color"], b["color"]):
            continue
        return a


def caption_of(a: dict) -> str:
    return toydata.caption(a["color"], a["shape"], a["size"], a["pos"], a["bg"])


def make_captions(n: int, seed: int, mix: str = "even") -> list[dict]:
    rng = random.Random(seed)
    items = []
    ins = [i for i in instructions() for _ in range(MIXES[mix]["turns"][i[1]])]
    for k in range(n):
        text, attr, value = ins[k % len(ins)]
        a = source_for(attr, value, rng, mix)
        b = dict(a, **{attr: value})
        items.append(dict(caption=caption_of(a), edit=text, output=caption_of(b)))
    return items


def parse_caption(text: str) -> dict:
    """A single-object caption of the grammar -> its attributes (None where not named)."""
    words = text.split()
    a = dict(size=None, pos=None, bg=None)
    i = 1
    if words[i] in ("small", "big"):
        a["size"], i = words[i], i + 1
    a["color"], a["shape"] = words[i], words[i + 1]
    rest = " ".join(words[i + 2:])
    if rest.endswith("background"):
        a["bg"] = rest.split()[-2]
        rest = " ".join(rest.split()[:-4])
    a["pos"] = rest or None
    return a


def read(image) -> dict:
    """The analyser's reading of a picture (3, H, W) in [0, 1], with a grey background named."""
    x = np.asarray(image, dtype=np.float32)
    r = toydata.analyse(x)
    border = np.concatenate([x[:, :2].reshape(3, -1), x[:, -2:].reshape(3, -1),
                             x[:, :, :2].reshape(3, -1), x[:, :, -2:].reshape(3, -1)], 1)
    bg = np.median(border, 1)
    if np.sqrt(((bg - toydata.GRAY) ** 2).sum()) < GREY_TOL:
        r["background"] = "grey"
    return r


def judge_pair(r0: dict, r1: dict, attr: str, value: str, max_shift: float = MAX_SHIFT,
               keep_area: tuple[float, float] = KEEP_AREA) -> dict:
    """{"done": the instruction carried out, "kept": everything else kept} for two readings."""
    if r0["color"] is None or r1["color"] is None:
        return dict(done=False, kept=False)
    ratio = r1["area"] / max(r0["area"], 1)
    shift = float(np.hypot(r1["center"][0] - r0["center"][0], r1["center"][1] - r0["center"][1]))
    if attr == "size":
        done = ratio >= SIZE_AREA if value == "big" else ratio <= 1 / SIZE_AREA
    else:
        done = r1[attr] == value
    kept = shift <= max_shift and r1["background"] == r0["background"]
    kept &= attr == "size" or keep_area[0] <= ratio <= keep_area[1]
    for other in ("color", "shape"):
        if other != attr:
            kept &= r1[other] == r0[other]
    return dict(done=bool(done), kept=bool(kept), shift=round(shift, 2), ratio=round(ratio, 3))


def why_not(r0: dict, r1: dict, src: dict, attr: str, value: str, align: bool = False,
            keep_area: tuple[float, float] = KEEP_AREA) -> str | None:
    """The first reason a pair fails the filter (None: kept), for the filter's tally; with
    `align`, a pair whose object only moved passes (it is moved back, see filter_pairs)."""
    if r0["color"] is None or r1["color"] is None:
        return "no object"
    if r0["color"] != src["color"] or r0["shape"] != src["shape"]:
        return "source not drawn"
    v = judge_pair(r0, r1, attr, value, float("inf") if align else MAX_SHIFT, keep_area)
    if not v["done"]:
        return "edit not made"
    if v["kept"]:
        return None
    if not align and v["shift"] > MAX_SHIFT:
        return "moved"
    if r1["background"] != r0["background"]:
        return "background changed"
    return "size changed" if attr != "size" and not keep_area[0] <= v["ratio"] <= keep_area[1] \
        else "another attribute changed"


def reverse(attr: str, value: str, src: dict) -> str:
    """The instruction that takes the edited picture back to the source."""
    if attr == "color":
        return f"make it {src['color']}"
    if attr == "shape":
        return f"turn it into a {src['shape']}"
    return "make it small" if value == "big" else "make it big"


def filter_pairs(folders: list[Path], out: Path, align: bool = False,
                 keep_area: tuple[float, float] = KEEP_AREA) -> None:
    """Every done item of the pairs folders -> kept.jsonl: one line per pair passing the filter.
    With `align`, a pair that passes but for its object's place is kept too, image 1 to be
    moved by the whole pixels (dy, dx) that put its object's centre on image 0's (recorded as
    "after_shift", or "before_shift" in the reversed line; train_instruct.load_pairs applies it,
    the flat background's edge replicated)."""
    from PIL import Image
    ins = {t: (attr, value) for t, attr, value in instructions()}
    lines, seen, counts, reasons = [], 0, {}, {}
    for d in sorted(x for f in folders for x in f.glob("[0-9]" * 7)):
        if not (d / "metadata.jsonl").is_file():
            continue
        prompt = json.loads((d / "prompt.json").read_text())
        src = parse_caption(prompt["caption"])
        attr, value = ins[prompt["edit"]]
        for rec in map(json.loads, (d / "metadata.jsonl").read_text().splitlines()):
            seen += 1
            r0, r1 = (read(np.asarray(Image.open(d / f"{rec['seed']}_{s}.jpg").convert("RGB"),
                                      np.float32).transpose(2, 0, 1) / 255) for s in (0, 1))
            reason = why_not(r0, r1, src, attr, value, align, keep_area)
            c = counts.setdefault(prompt["edit"], [0, 0])
            c[1] += 1
            reasons[reason] = reasons.get(reason, 0) + 1
            if reason is None:
                c[0] += 1
                pair = dict(before=str(d / f"{rec['seed']}_0.jpg"),
                            after=str(d / f"{rec['seed']}_1.jpg"), **rec)
                dy = round(r0["center"][1] - r1["center"][1])
                dx = round(r0["center"][0] - r1["center"][0])
                moved = dict(after_shift=[dy, dx]) if (dy or dx) and align else {}
                lines.append(dict(pair, instruction=prompt["edit"], **moved))
                back = reverse(attr, value, src)
                lines.append(dict(pair, before=pair["after"], after=pair["before"],
                                  instruction=back, reversed=True,
                                  **({"before_shift": moved["after_shift"]} if moved else {})))
                if np.hypot(dy, dx) > MAX_SHIFT:             # kept only by `align`
                    reasons[None] -= 1
                    reasons["kept, moved back"] = reasons.get("kept, moved back", 0) + 1
    out.write_text("".join(json.dumps(x) + "\n" for x in lines))
    for k, (a, b) in counts.items():
        print(f"{k:24s} kept {a:4d} of {b:4d}")
    for k, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"{k or 'kept':24s} {n:5d}")
    print(f"{len(lines) // 2} of {seen} pairs kept, {len(lines)} with their reverses -> {out}")


RUN = ["--samples", "2", "--keep", "2", "--steps", "20", "--sampler", "euler-a",
       "--no-autotune"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["captions", "run", "filter"])
    p.add_argument("--dir", default=str(OUT), help="working folder (tools/out/instruct)")
    p.add_argument("--items", type=int, default=2600, help="caption pairs written (2600)")
    p.add_argument("--seed", type=int, default=0, help="captions' and pairs' seed (0)")
    p.add_argument("--mix", choices=sorted(MIXES), default="even",
                   help="captions: the instruction and source mix (even; see MIXES)")
    p.add_argument("--set", default="", metavar="NAME",
                   help="captions/run on captionsNAME.jsonl and pairsNAME ('': the first set); "
                        "filter reads every pairs* folder")
    p.add_argument("--batch", type=int, default=32, help="tries per UNet batch for `run` (32)")
    p.add_argument("--align", action="store_true",
                   help="filter: keep pairs whose object only moved, moving it back (see "
                        "filter_pairs)")
    p.add_argument("--keep-area", type=float, nargs=2, default=KEEP_AREA, metavar=("LO", "HI"),
                   help="filter: the area ratio band of a kept size (%(default)s)")
    args = p.parse_args(argv)
    d = Path(args.dir)
    d.mkdir(parents=True, exist_ok=True)
    if args.what == "captions":
        items = make_captions(args.items, args.seed, args.mix)
        (d / f"captions{args.set}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
        print(f"{len(items)} caption pairs, {len(instructions())} instructions -> "
              f"{d / f'captions{args.set}.jsonl'}")
    elif args.what == "run":
        from minip2p.cli import main as cli
        sys.exit(cli(["pairs", str(d / f"captions{args.set}.jsonl"), "--out-dir",
                     str(d / f"pairs{args.set}"), *RUN, "--seed", str(args.seed),
                     "--batch", str(args.batch)]))
    else:
        filter_pairs([x for x in sorted(d.glob("pairs*")) if x.is_dir()], d / "kept.jsonl",
                     args.align, tuple(args.keep_area))


if __name__ == "__main__":
    main()
