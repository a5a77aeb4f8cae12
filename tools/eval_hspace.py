"""What each h-space direction changes on the toy model, read by the toy analyser.

For the top PCA directions of "a red circle" (Haas et al., per step) and the prompt-pair
direction "a red circle" -> "a blue circle" (mean h difference over seeds), each applied by
Asyrp's asymmetric process (methods/hspace.py) at ±strength to images of "a red circle" on
seeds the directions were not found on, `toydata.analyse` reads the unedited and each edited
picture: colour, shape, centre, area, background; a change is

    colour / shape / background   a different name
    position                      the centre moved more than POS px (of 64)
    size                          the area changed by more than SIZE (relative)

and `artifacts.artifacts` says whether the edited picture is clean. One batch per seed holds
the unedited image and every edit (weights per image), so all share z_T and the boost noise.

    python -m tools.eval_hspace --seeds 24 --samples 16 --steps 20
    python -m tools.eval_hspace --cost /work/sd15 --steps 2      # s per step at SD 1.5's shape
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from tools.artifacts import artifacts
from tools.toydata import analyse

POS, SIZE = 4.0, 0.25
SOURCE, TARGET = "a red circle", "a blue circle"


def read(image: torch.Tensor) -> dict:
    a = analyse(image)
    return dict(color=a["color"], shape=a["shape"], center=a["center"], area=a["area"],
                background=a["background"])


def changes(before: dict, after: dict) -> dict:
    dx = ((before["center"][0] - after["center"][0]) ** 2 +
          (before["center"][1] - after["center"][1]) ** 2) ** 0.5
    return dict(color=before["color"] != after["color"], shape=before["shape"] != after["shape"],
                position=dx > POS, size=abs(after["area"] / max(before["area"], 1) - 1) > SIZE,
                background=before["background"] != after["background"])


def cost(folder: str | None, steps: int, size: int | None) -> dict:
    """Seconds per step at a model's shape: plain DDIM of two images (the unedited and an edit,
    guided: 4 UNet rows) against Asyrp's asymmetric step (the same 4 rows, the decoder on 8)."""
    from minip2p.load import load_model
    from minip2p.methods.asyrp import Params, edit
    from minip2p.methods.base import Settings
    from minip2p.methods.hspace import sample
    from minip2p.pipeline import encode_text, initial_noise
    model = load_model(folder)
    size = size or model.unet.cfg.sample_size * model.vae.cfg.downscale
    z = initial_noise(model, 0, size, size)
    c = encode_text(model, [SOURCE]).expand(2, -1, -1)

    def shape(hh, step, t):
        return torch.ones_like(hh[0])
    out = {}
    for name, run in (("plain", lambda: sample(model, c, encode_text(model, [""]), z, steps,
                                               7.5)),
                      ("asyrp", lambda: edit(model, SOURCE, z, shape, Params(t_edit=0),
                                             Settings(steps=steps)))):
        t0 = time.perf_counter()
        run()
        out[name] = round((time.perf_counter() - t0) / steps, 3)
    return dict(model=folder or "toy", size=size, seconds_per_step=out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=24)
    ap.add_argument("--first-seed", type=int, default=1000, help="the edited seeds start here")
    ap.add_argument("--samples", type=int, default=32, help="images the directions are found on")
    ap.add_argument("--components", type=int, default=5)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--pca-strength", type=float, default=3.0)
    ap.add_argument("--pair-strength", type=float, default=1.0)
    ap.add_argument("--t-edit", type=int, default=0)
    ap.add_argument("--t-boost", type=int, default=0)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--dirs", default=None, help="cache folder for the directions files")
    ap.add_argument("--out", default=None, help="write the table as JSON here")
    ap.add_argument("--sheet", default=None, help="write a contact sheet PNG here")
    ap.add_argument("--cost", metavar="MODEL", default=None,
                    help="only time a step (plain vs Asyrp) on this model folder ('toy')")
    ap.add_argument("--size", type=int, default=None, help="--cost: picture size")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.cost:
        print(json.dumps(cost(None if args.cost == "toy" else args.cost, args.steps, args.size)))
        return

    from pathlib import Path

    from minip2p.load import load_model
    from minip2p.methods import hspace_directions as hd
    from minip2p.methods.base import Settings
    from minip2p.methods.asyrp import Params, edit
    from minip2p.pipeline import decode, initial_noise
    model = load_model(None)
    cache = Path(args.dirs) if args.dirs else None
    t0 = time.perf_counter()
    made = {}
    for name, make in (("pca", lambda: hd.make_pca(model, SOURCE, args.samples, args.components,
                                                   args.steps, progress=False)),
                       ("pair", lambda: hd.make_prompts(model, SOURCE, TARGET, args.samples,
                                                        args.steps, progress=False))):
        path = cache / f"{name}-{args.samples}-{args.steps}.safetensors" if cache else None
        if path is not None and path.exists():
            made[name] = hd.load(path)
        else:
            made[name] = make()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                hd.save(made[name], path)
    t_dirs = time.perf_counter() - t0
    pca, pair = made["pca"], made["pair"]

    # the edits of one batch: (label, direction file, index, strength)
    K = args.components
    edits = [(f"pc{k}{'+' if s > 0 else '-'}", pca, k, s * args.pca_strength)
             for k in range(K) for s in (1, -1)] + [("pair", pair, 0, args.pair_strength)]
    B = 1 + len(edits)
    p = Params(t_edit=args.t_edit, t_boost=args.t_boost, asymmetric=not args.symmetric)

    def delta(h, step, t):
        per_image = torch.stack([torch.zeros_like(pca.vectors[0, 0])] +
                                [d.delta(k, t, args.steps) * w for _, d, k, w in edits])
        return per_image[[r % B for r in range(h.shape[0])]]        # rows [∅ × B, c × B]

    counts = {label: {c: 0 for c in ("color", "shape", "position", "size", "background",
                                     "clean", "to_blue", "kept")} for label, *_ in edits}
    sheet, n, t_edit_total = [], 0, 0.0
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        z_T = initial_noise(model, seed, 64, 64)
        t1 = time.perf_counter()
        z = edit(model, SOURCE, z_T, delta, p, Settings(steps=args.steps, seed=seed),
                 weights=[1.0] * B)
        t_edit_total += time.perf_counter() - t1
        images = decode(model, z)
        before = read(images[0])
        if before["color"] != "red" or before["shape"] != "circle":
            continue                                     # the model missed the prompt: skip
        n += 1
        for (label, *_), im in zip(edits, images[1:]):
            after = read(im)
            ch = changes(before, after)
            for c, v in ch.items():
                counts[label][c] += v
            counts[label]["clean"] += artifacts(im.numpy())["clean"]
            counts[label]["to_blue"] += after["color"] == "blue"
            counts[label]["kept"] += not ch["shape"] and not ch["position"]
        if len(sheet) < 6:
            sheet.append(images)
    table = {label: {c: round(v / max(n, 1), 3) for c, v in row.items()}
             for label, row in counts.items()}
    result = dict(args=vars(args), images=n, table=table,
                  seconds_directions=round(t_dirs, 1),
                  seconds_per_batch=round(t_edit_total / args.seeds, 2), edits_per_batch=B - 1)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.sheet and sheet:
        from minip2p.pipeline import to_pil
        from minip2p.views import strip
        rows = [strip(to_pil(ims), ["source"] + [e[0] for e in edits]) for ims in sheet]
        from PIL import Image
        W, H = rows[0].size
        out = Image.new("RGB", (W, H * len(rows)), "white")
        for i, r in enumerate(rows):
            out.paste(r, (0, H * i))
        out.save(args.sheet)


if __name__ == "__main__":
    main()
