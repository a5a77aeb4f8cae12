"""`minip2p pairs CAPTIONS.jsonl --out-dir DIR`: the InstructPix2Pix data recipe (pairs.py).

    minip2p pairs captions.jsonl --out-dir data --samples 100 --keep 4 --clip openai/clip-vit-large-patch14
    minip2p pairs captions.jsonl --out-dir data --partition 3/8        # the 4th of 8 chunks
    torchrun --nnodes M --nproc-per-node G -m minip2p pairs captions.jsonl --out-dir data
    minip2p pairs captions.jsonl --check data                          # done / missing / broken
    minip2p pairs captions.jsonl --out-dir data --batch 32             # 32 tries per UNet batch

Run the same command again after any interruption: done items are skipped, the rest redone.
`--out DIR`, the flag's old name, is still taken, with a warning: everywhere else --out is a file.
"""
from __future__ import annotations

import argparse
import time
import warnings

from ..errors import MinipError
from .common import add_model_options, float_arg, int_arg, load


def _settings(args):
    from ..data.pairs import Settings
    if not 0 <= args.min_p2p <= args.max_p2p <= 1:
        raise MinipError(f"need 0 ≤ --min-p2p ≤ --max-p2p ≤ 1, got {args.min_p2p:g} and "
                         f"{args.max_p2p:g}")
    if args.steps < 2:
        raise MinipError("--steps must be ≥ 2 for the self-attention copy schedule")
    return Settings(samples=args.samples, min_p2p=args.min_p2p, max_p2p=args.max_p2p,
                    clip=args.clip, clip_threshold=args.clip_threshold,
                    clip_dir_threshold=args.clip_dir_threshold,
                    clip_img_threshold=args.clip_img_threshold, keep=args.keep, seed=args.seed,
                    steps=args.steps, sampler=args.sampler, model=args.model,
                    height=args.height, width=args.width)


def cmd_pairs(args):
    from pathlib import Path

    from ..data import pairs
    if args.out is not None:                            # the old name of --out-dir
        if args.out_dir not in (None, args.out):
            raise MinipError("--out is the old name of --out-dir; give --out-dir only")
        warnings.warn("pairs --out DIR is now --out-dir DIR (--out names a file elsewhere); "
                      "--out will go away")
        args.out_dir = args.out
    if (args.out_dir is None) == (args.check is None):
        raise MinipError("give --out-dir DIR (make pairs) or --check DIR (report on them), one "
                         "of them")
    items, digest = pairs.read_captions(args.captions)
    if args.check is not None:
        if not Path(args.check).is_dir():
            raise MinipError(f"--check '{args.check}': no such folder")
        rep = pairs.check(Path(args.check), items)
        show = lambda v: ", ".join(str(i) for i in v[:20]) + (" …" if len(v) > 20 else "")  # noqa: E731
        print(f"{len(items)} items: {len(rep['done'])} done, {len(rep['missing'])} missing"
              + (f" ({show(rep['missing'])})" if rep["missing"] else "")
              + f", {len(rep['broken'])} broken"
              + (f" ({show(rep['broken'])}; rerun to redo them after deleting their "
                 "metadata.jsonl)" if rep["broken"] else ""))
        return 0 if not rep["missing"] and not rep["broken"] else 1
    settings = _settings(args)
    k, parts = pairs.parse_partition(args.partition)
    out = Path(args.out_dir)
    pairs.check_dir(out, digest, settings, len(items))                    # before any work
    mine = pairs.partition(len(items), k, parts)
    model = load(args)
    clip = None
    if args.clip:
        from ..data.clip_image import load_clip
        clip = load_clip(args.clip, device=args.device)
    elif k == 0:
        warnings.warn("no --clip: CLIP filtering is off; the first --keep tries of each item are kept")
    from .common import preflight
    height, width = preflight(args, model, images=2 * args.batch, controlled=16 ** 2)
    out.mkdir(exist_ok=True)
    pairs.write_record(out, k, parts, digest, settings, len(items))
    todo = [i for i in mine if not pairs.is_done(out, i)]
    run_items(model, clip, items, todo, out, settings, height, width, k, parts,
              len(mine) - len(todo), not args.quiet, args.batch)
    print(f"partition {k}/{parts}: items {mine.start}–{mine.stop - 1} done in '{out}'")
    return 0


def run_items(model, clip, items, todo, out, s, height, width, k, parts, skipped, progress,
              batch=1):
    """Every try of every item in `todo`, `batch` tries per UNet batch (pairs.py: batching);
    an item is written as soon as its last try is done."""
    import torch
    from tqdm.auto import tqdm

    from ..data import pairs
    from ..data.pairs import GroupSampler, SelfCopy
    from ..pipeline import decode, denoise, encode_text, seeded_sampler, to_pil
    uncond = encode_text(model, [""])
    bar = tqdm(total=len(todo) + skipped, initial=skipped, disable=not progress,
               desc=f"pairs {k}/{parts}", position=k, unit="item")
    tries = []                              # (item, seed, threshold, guidance), distinct seeds
    for i in todo:
        seen = set()
        for j in range(s.samples):
            seed, threshold, guidance = pairs.sample_params(s, i, j)
            if seed not in seen and (clip is not None or len(seen) < s.keep):
                seen.add(seed)
                tries.append((i, seed, threshold, guidance))
    left = {i: sum(1 for x in tries if x[0] == i) for i in todo}
    results, pictures = {i: [] for i in todo}, {i: {} for i in todo}
    kept_total, done, t0 = 0, 0, time.time()
    for at in range(0, len(tries), batch):
        chunk = tries[at:at + batch]
        cond = encode_text(model, [c for i, *_ in chunk
                                   for c in (items[i]["caption"], items[i]["output"])])
        made = [seeded_sampler(model, s.sampler, seed, height, width) for _, seed, _, _ in chunk]
        z = torch.cat([zq for _, zq in made]).repeat_interleave(2, 0)     # one z_T per pair
        guidance = torch.tensor([g for *_, g in chunk]).repeat_interleave(2)[:, None, None, None]
        z = denoise(model, cond, uncond, z, s.steps, guidance,
                    SelfCopy([thr for _, _, thr, _ in chunk], s.steps, group=2), progress=False,
                    sampler=GroupSampler([smp for smp, _ in made], 2))
        x = decode(model, z)                                   # (2 × tries, 3, H, W) in [0, 1]
        for q, (i, seed, threshold, g) in enumerate(chunk):
            xq = x[2 * q:2 * q + 2]
            rec = dict(seed=seed, p2p_threshold=threshold, cfg_scale=g,
                       clip_sim_0=None, clip_sim_1=None, clip_sim_dir=None, clip_sim_image=None)
            if clip is not None:
                with torch.no_grad():
                    sims = clip.similarities(xq[:1], xq[1:], [items[i]["caption"]],
                                             [items[i]["output"]])
                rec.update({key: float(v[0]) for key, v in sims.items()})
            pictures[i][seed] = to_pil(xq)
            results[i].append(rec)
            left[i] -= 1
            if left[i]:
                continue
            kept = pairs.select(results[i], s, clip is not None)
            pairs.write_item(pairs.clean_item(out, i), items[i], kept, pictures.pop(i))
            kept_total, done = kept_total + len(kept), done + 1
            bar.update()
            bar.set_postfix(kept=kept_total,
                            per_hour=f"{done / max(time.time() - t0, 1e-9) * 3600:.0f}")
    bar.close()


def add_commands(sub):
    p = sub.add_parser("pairs", help="InstructPix2Pix data: P2P before/after pairs from captions, "
                                     "CLIP-filtered; resumable, sharded (torchrun)")
    p.add_argument("captions", help='CAPTIONS.jsonl: one {"caption", "edit", "output"} per line')
    p.add_argument("--out-dir", default=None, metavar="DIR",
                   help="output folder (made if absent; a rerun resumes it)")
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)    # --out-dir's old name
    p.add_argument("--check", default=None, metavar="DIR",
                   help="report done, missing and broken items of DIR (exit 1 if any is not done)")
    p.add_argument("--samples", type=int_arg("--samples"), default=100,
                   help="tries per caption pair, each with its own seed (100)")
    p.add_argument("--min-p2p", type=float_arg("--min-p2p"), default=0.1,
                   help="self-attention copy threshold ~ U(min, max) (0.1)")
    p.add_argument("--max-p2p", type=float_arg("--max-p2p"), default=0.9, help="(0.9)")
    p.add_argument("--clip", default=None, metavar="MODEL",
                   help="CLIP weights (transformers layout folder or Hub id, e.g. "
                        "openai/clip-vit-large-patch14); without: no filtering")
    p.add_argument("--clip-threshold", type=float_arg("--clip-threshold"), default=0.2,
                   help="text–image similarity of each image ≥ (0.2)")
    p.add_argument("--clip-dir-threshold", type=float_arg("--clip-dir-threshold"), default=0.2,
                   help="directional similarity ≥ (0.2)")
    p.add_argument("--clip-img-threshold", type=float_arg("--clip-img-threshold"), default=0.7,
                   help="image–image similarity ≥ (0.7)")
    p.add_argument("--keep", type=int_arg("--keep"), default=4,
                   help="kept pairs per item, the best by directional similarity (4)")
    p.add_argument("--batch", type=int_arg("--batch"), default=1,
                   help="tries run together in one UNet batch (the same pairs; whether it is "
                        "faster depends on the machine) (1)")
    p.add_argument("--partition", default=None, metavar="K/N",
                   help="the K-th of N contiguous chunks (default: RANK/WORLD_SIZE under "
                        "torchrun, else 0/1)")
    add_model_options(p)
    p.set_defaults(run=cmd_pairs, sampler="euler-a", steps=100, flags={"out": "--out-dir"})
