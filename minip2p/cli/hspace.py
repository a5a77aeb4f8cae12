"""`minip2p hspace PROMPT --directions pca|prompts|pullback --out dirs.safetensors`: find
directions in the UNet's h-space (methods/hspace_directions.py), for `edit --method asyrp
--direction dirs.safetensors:K`.

    hspace "a red circle" --directions pca --samples 64 --out pca.safetensors
    hspace "a red circle" --directions prompts --target "a blue circle" --out rb.safetensors
    hspace "a red circle" --directions pullback --seed 3 --out pb.safetensors
"""
from __future__ import annotations

from ..errors import MinipError
from .common import add_model_options, check_out_file, float_arg, int_arg, load, preflight


def cmd_hspace(args):
    from ..methods import hspace_directions as hd
    out = check_out_file(args.out, suffixes=(".safetensors",))
    if args.directions == "prompts" and args.target is None:
        raise MinipError("--directions prompts needs --target, the second prompt")
    if args.directions != "prompts" and args.target is not None:
        raise MinipError("--target is the second prompt of --directions prompts; leave it out")
    if args.directions == "pca" and not 1 <= args.components < args.samples - 1:
        raise MinipError(f"--components {args.components} needs --samples ≥ "
                         f"{args.components + 2}, got {args.samples}")
    if args.directions == "pullback" and not 0 < args.edit_t <= 1:
        raise MinipError(f"--edit-t must be in (0, 1], got {args.edit_t:g}")
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
    else:
        d = hd.make_pullback(model, args.prompt, args.seed, edit_t=args.edit_t,
                             rank=args.components, **common)
    hd.save(d, out)
    print(f"wrote {out} ({d.vectors.shape[0]} {d.kind} direction"
          f"{'s' if d.vectors.shape[0] > 1 else ''})")


def add_commands(sub):
    h = sub.add_parser("hspace", help="find directions in the UNet's h-space (for edit "
                                      "--method asyrp)")
    h.add_argument("prompt", help="the prompt whose images the directions are found on")
    h.add_argument("--directions", choices=["pca", "prompts", "pullback"], default="pca",
                   help="pca: principal components of h over --samples images, per step; "
                        "prompts: mean h of --target minus that of PROMPT; pullback: top "
                        "singular vectors of ∂h/∂z_t at one z_t (--seed) (pca)")
    h.add_argument("--target", default=None, help="--directions prompts: the second prompt")
    h.add_argument("--samples", type=int_arg("--samples", 3), default=64,
                   help="images (seeds --seed, --seed + 1, …) the directions are found on (64)")
    h.add_argument("--components", type=int_arg("--components"), default=5,
                   help="how many directions to keep (pca, pullback) (5)")
    h.add_argument("--edit-t", type=float_arg("--edit-t"), default=0.6,
                   help="--directions pullback: at the timestep nearest this fraction of T (0.6)")
    h.add_argument("--chunk", type=int_arg("--chunk"), default=16,
                   help="images generated per batch (16)")
    h.add_argument("--out", default="dirs.safetensors",
                   help="the directions file to write (dirs.safetensors)")
    add_model_options(h)
    h.set_defaults(run=cmd_hspace)
