"""`minip2p hspace PROMPT --directions pca|prompts|pullback --out dirs.safetensors`: find
directions in the UNet's h-space (methods/hspace_directions.py), for `edit --method asyrp
--direction dirs.safetensors:K`.

    hspace "a red circle" --directions pca --samples 64 --out pca.safetensors
    hspace "a red circle" --directions prompts --target "a blue circle" --out rb.safetensors
    hspace "a red circle" --directions pullback --seed 3 --out pb.safetensors
    hspace "a red circle" --directions train --target "a blue circle" --clip CLIP --out ft.safetensors
"""
from __future__ import annotations

from ..errors import MinipError
from .common import add_model_options, check_out_file, float_arg, int_arg, load, preflight


def cmd_hspace(args):
    from ..methods import hspace_directions as hd
    out = check_out_file(args.out, suffixes=(".safetensors",))
    if args.directions in ("prompts", "train") and args.target is None:
        raise MinipError(f"--directions {args.directions} needs --target, the second prompt")
    if args.directions not in ("prompts", "train") and args.target is not None:
        raise MinipError("--target is the second prompt of --directions prompts or train; "
                         "leave it out")
    if args.directions == "pca" and not 1 <= args.components < args.samples - 1:
        raise MinipError(f"--components {args.components} needs --samples ≥ "
                         f"{args.components + 2}, got {args.samples}")
    if args.directions == "train" and not args.clip:
        raise MinipError("--directions train needs --clip FOLDER (a CLIP model: its image and "
                         "text towers score the edit)")
    if args.clip and args.directions != "train":
        raise MinipError("--clip scores the training of --directions train; leave it out")
    t_edit = args.t_edit if args.t_edit is not None else \
        600 if args.directions == "pullback" else 500
    if args.sampler != "ddim":
        raise MinipError(f"--sampler {args.sampler}: h-space directions follow DDIM; drop "
                         "--sampler")
    model = load(args)
    preflight(args, model, images=min(args.chunk, args.samples))
    progress = not args.quiet
    common = dict(steps=args.steps, guidance=args.guidance, progress=progress)
    if args.directions == "pca":
        d = hd.make_pca(model, args.prompt, args.samples, args.components, seed=args.seed,
                        chunk=args.chunk, **common)
    elif args.directions == "prompts":
        d = hd.make_prompts(model, args.prompt, args.target, args.samples, seed=args.seed,
                            chunk=args.chunk, **common)
    elif args.directions == "pullback":
        d = hd.make_pullback(model, args.prompt, args.seed, t_edit=t_edit,
                             rank=args.components, **common)
    else:
        return train(args, model, out, t_edit)
    hd.save(d, out)
    print(f"wrote {out} ({d.vectors.shape[0]} {d.kind} direction"
          f"{'s' if d.vectors.shape[0] > 1 else ''})")


def train(args, model, out, t_edit: int):
    """--directions train: f_t on --samples generated pictures of PROMPT (DDIM-inverted)."""
    from ..data.clip_image import load_clip
    from ..methods import asyrp_train
    from ..pipeline import generate
    clip = load_clip(args.clip)
    pictures = [generate(model, [args.prompt], seed, args.steps, args.guidance,
                         progress=False) * 2 - 1 for seed in range(args.seed,
                                                                   args.seed + args.samples)]
    f = asyrp_train.train(model, clip, pictures, args.prompt, args.target, t_edit, args.steps,
                          args.epochs, args.lr, guidance=args.guidance, seed=args.seed,
                          progress=not args.quiet)
    asyrp_train.save(f, out, prompt=args.prompt, target=args.target, steps=args.steps,
                     t_edit=t_edit, samples=args.samples, epochs=args.epochs, lr=args.lr)
    print(f"wrote {out} (f_t, final loss {f.losses[-1]:.4f})")


def add_commands(sub):
    h = sub.add_parser("hspace", help="find directions in the UNet's h-space (for edit "
                                      "--method asyrp)")
    h.add_argument("prompt", help="the prompt whose images the directions are found on")
    h.add_argument("--directions", choices=["pca", "prompts", "pullback", "train"],
                   default="pca",
                   help="pca: principal components of h over --samples images, per step; "
                        "prompts: mean h of --target minus that of PROMPT; pullback: top "
                        "singular vectors of ∂h/∂z_t at one z_t (--seed); train: Asyrp's f_t "
                        "by CLIP's directional loss, PROMPT -> --target (pca)")
    h.add_argument("--target", default=None, help="--directions prompts: the second prompt")
    h.add_argument("--samples", type=int_arg("--samples", 3), default=64,
                   help="images (seeds --seed, --seed + 1, …) the directions are found on (64)")
    h.add_argument("--components", type=int_arg("--components"), default=5,
                   help="how many directions to keep (pca, pullback) (5)")
    h.add_argument("--t-edit", type=int_arg("--t-edit", 0, 1000), default=None,
                   help="pullback: at the timestep nearest this (600); train: f_t learns "
                        "at t ≥ this (500)")
    h.add_argument("--clip", metavar="FOLDER", default=None,
                   help="--directions train: a CLIP model folder (config.json + "
                        "model.safetensors), e.g. openai/clip-vit-base-patch16")
    h.add_argument("--epochs", type=int_arg("--epochs"), default=5,
                   help="--directions train: passes over the pictures (5)")
    h.add_argument("--lr", type=float_arg("--lr"), default=0.5,
                   help="--directions train: SGD learning rate (0.5, the official scripts)")
    h.add_argument("--chunk", type=int_arg("--chunk"), default=16,
                   help="images generated per batch (16)")
    h.add_argument("--out", default="dirs.safetensors",
                   help="the directions file to write (dirs.safetensors)")
    add_model_options(h)
    h.set_defaults(run=cmd_hspace)
