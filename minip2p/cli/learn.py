"""`minip2p learn-word IMAGES_DIR --token "<my-thing>" --init WORD`: textual inversion (a new
word learned from pictures; train/textual_inversion.py), and `minip2p learn-instruction BEFORE
AFTER`: Visii (an instruction learned from one before/after pair; train/visii.py).

Both write a safetensors file and keep a checkpoint beside it (OUT.ckpt.safetensors + .json):
the same command run again after a kill or Ctrl-C continues where it stopped.

    learn-word pics/ --token "<my-thing>" --init triangle --out my-thing.safetensors
    generate "a <my-thing> on the left" --embedding my-thing.safetensors
"""
from __future__ import annotations

from .common import check_out_file, float_arg, int_arg, load

WORD_FLAGS = {"token": "--token", "init": "--init", "vectors": "--vectors", "steps": "--steps",
              "lr": "--lr", "batch": "--batch", "what": "--what", "templates": "--template",
              "seed": "--seed", "save_every": "--save-every"}


def cmd_learn_word(args):
    from ..train import loop, textual_inversion as ti
    from ..pipeline import check_size
    p = ti.Params(token=args.token, init=args.init, vectors=args.vectors, steps=args.steps,
                  lr=args.lr, batch=args.batch, what=args.what, templates=args.template,
                  seed=args.seed, save_every=args.save_every)
    p.check()
    loop.Plan(steps=p.steps, lr=p.lr).check()
    out = check_out_file(args.out, suffixes=(".safetensors",))
    model = load(args)                                       # (--embedding: words known already)
    ti.read_pictures(args.images, *check_size(model, None, None))      # refused before any work
    ti.learn(model, p, args.images, out, progress=not args.quiet)
    print(f"wrote {out} (use it with --embedding {out}: \"a {p.token} …\")")


INSTR_FLAGS = {"init": "--init", "steps": "--steps", "lr": "--lr", "seed": "--seed",
               "save_every": "--save-every", "guidance": "--guidance",
               "image_guidance": "--image-guidance", "before": "BEFORE", "after": "AFTER"}


def cmd_learn_instruction(args):
    from ..train import loop, visii
    from ..methods import instruct
    p = visii.Params(init=args.init, steps=args.steps, lr=args.lr, guidance=args.guidance,
                     image_guidance=args.image_guidance, seed=args.seed,
                     save_every=args.save_every)
    p.check()
    loop.Plan(steps=p.steps, lr=p.lr).check()
    out = check_out_file(args.out, suffixes=(".safetensors",))
    visii.read_pair(args.before, args.after)                           # before the model loads
    clip = None
    if args.clip:
        from ..data.clip_image import load_clip
        clip = load_clip(args.clip, device=args.device)
    model = load(args)
    instruct.check_model(model)
    visii.learn(model, p, args.before, args.after, out, clip=clip, progress=not args.quiet)
    print(f"wrote {out} (use it with instruct IMAGE --instruction-embedding {out})")


def add_model_args(p):
    """The model options that learning uses (no sampling options: nothing is sampled)."""
    p.add_argument("--model", default=None,
                   help="model folder, .safetensors single file, or Hub repo id "
                        "(default: the small model shipped in weights/toy)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo id")
    p.add_argument("--variant", default=None, help="prefer *.VARIANT.safetensors weights")
    p.add_argument("--embedding", action="append", default=[], metavar="FILE.safetensors",
                   help="textual-inversion embedding to load first (repeatable)")
    p.add_argument("--seed", type=int_arg("--seed", 0, 2 ** 63 - 1), default=0,
                   help="seed of every random draw of the training (0)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="the frozen model's weights (fp32; the learned tensors stay fp32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps ... (cpu)")
    p.add_argument("--save-every", type=int_arg("--save-every"), default=100,
                   help="checkpoint every N steps (100)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_commands(sub):
    p = sub.add_parser("learn-word", help="textual inversion: learn a new word from pictures")
    p.add_argument("images", help="a folder holding only the pictures of the thing (or style)")
    p.add_argument("--token", required=True, help='the new word, e.g. "<my-thing>"')
    p.add_argument("--init", required=True,
                   help="the word its vectors start from (at most --vectors tokens)")
    p.add_argument("--vectors", type=int_arg("--vectors"), default=1,
                   help="vectors the new word stands for (1)")
    p.add_argument("--steps", type=int_arg("--steps"), default=3000, help="training steps (3000)")
    p.add_argument("--lr", type=float_arg("--lr"), default=2e-3,
                   help="AdamW learning rate (2e-3 = diffusers' README recipe 5e-4 × 4)")
    p.add_argument("--batch", type=int_arg("--batch"), default=4, help="pictures per step (4)")
    p.add_argument("--what", choices=["object", "style"], default="object",
                   help="the official template set: object (\"a photo of a {}\") or style "
                        "(\"a painting in the style of {}\") (object)")
    p.add_argument("--template", action="append", default=[], metavar="TEXT",
                   help='your own template instead, {} where the word goes, e.g. "a {}" '
                        "(repeatable)")
    p.add_argument("--out", default="learned_embeds.safetensors",
                   help="the learned word, diffusers' layout (learned_embeds.safetensors)")
    add_model_args(p)
    p.set_defaults(run=cmd_learn_word, flags=WORD_FLAGS | {"images": "IMAGES_DIR"},
                   explicit=False)

    p = sub.add_parser("learn-instruction",
                       help="Visii: learn an instruction from one before/after pair "
                            "(an InstructPix2Pix model)")
    p.add_argument("before", help="the picture before the edit")
    p.add_argument("after", help="the same picture after the edit (the same size)")
    p.add_argument("--init", default="make it look like this",
                   help="the phrase the instruction starts from; its tokens are the rows that "
                        "learn (\"make it look like this\")")
    p.add_argument("--steps", type=int_arg("--steps"), default=1000,
                   help="training steps: each timestep 0 … 999 once, shuffled (1000)")
    p.add_argument("--lr", type=float_arg("--lr"), default=1e-3, help="AdamW learning rate (1e-3)")
    p.add_argument("--guidance", type=float_arg("--guidance"), default=7.5,
                   help="s_T of the guided prediction the loss is on (7.5)")
    p.add_argument("--image-guidance", type=float_arg("--image-guidance"), default=1.5,
                   help="s_I of the guided prediction (1.5)")
    p.add_argument("--clip", default=None, metavar="MODEL",
                   help="the CLIP (transformers folder or Hub id) of the text encoder, for the "
                        "official CLIP direction term, e.g. openai/clip-vit-large-patch14 for "
                        "SD 1.x (default: none, the term left out)")
    p.add_argument("--out", default="instruction.safetensors",
                   help="the learned instruction (instruction.safetensors)")
    add_model_args(p)
    p.set_defaults(run=cmd_learn_instruction, flags=INSTR_FLAGS, explicit=False)
