"""`minip2p explore`: the attention explorer, a local web page (server in minip2p/explore.py).

    minip2p explore                         http://127.0.0.1:7860, the toy model
    minip2p explore --model PATH --port 8000
    minip2p explore --host 0.0.0.0          reachable from other machines: only when asked
    minip2p explore --controlnet NET        the page offers a hint picture (canny or as is)
"""
from __future__ import annotations

import warnings

from .common import check_out_dir, int_arg, load, lora_arg

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def cmd_explore(args):
    from ..explore.server import make_server
    if args.host not in LOOPBACK:
        warnings.warn(f"serving on {args.host}: anyone who can reach this machine can run jobs "
                      "on it and see its images (there is no login)")
    out = check_out_dir(args.out_dir) if args.out_dir else None
    model = load(args)
    from ..load.controlnet import load_controlnet
    nets = [load_controlnet(spec, dtype=model.dtype, device=args.device, base=model)
            for spec in args.controlnet]
    server, explorer = make_server(model, args.host, args.port, out,
                                   quiet=not args.verbose, controlnets=nets)
    try:                                # Ctrl-C or SIGTERM from here on: the folder is removed
        host, port = server.server_address[:2]
        print(f"minip2p explorer on http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
        server.serve_forever()
    finally:
        server.server_close()
        explorer.close()


def add_commands(sub):
    x = sub.add_parser("explore", help="a local web page to explore attention (prompts, edits, "
                                       "token maps, x̂₀ through the steps)")
    x.add_argument("--host", default="127.0.0.1",
                   help="address to serve on (127.0.0.1: this machine only; another one is "
                        "reachable by others, with a warning)")
    x.add_argument("--port", type=int_arg("--port", 0, 65535), default=7860,
                   help="port, 0 … 65535 (0: any free one) (7860)")
    x.add_argument("--out-dir", default=None,
                   help="keep the images here (default: a temporary folder, removed on exit)")
    x.add_argument("--verbose", action="store_true", help="log every request")
    # the model options of the other commands; seed, steps, size … are chosen on the page
    x.add_argument("--model", default=None,
                   help="model folder, .safetensors single file, or Hub repo id "
                        "(default: the small model shipped in weights/toy)")
    x.add_argument("--revision", default=None, help="branch, tag or commit of a Hub repo id")
    x.add_argument("--variant", default=None, help="prefer *.VARIANT.safetensors weights")
    x.add_argument("--embedding", action="append", default=[], metavar="FILE.safetensors",
                   help="textual-inversion embedding (repeatable)")
    x.add_argument("--lora", type=lora_arg, action="append", default=[],
                   metavar="FILE.safetensors[:SCALE]",
                   help="LoRA merged into the weights at load, with SCALE (1) (repeatable)")
    x.add_argument("--controlnet", action="append", default=[], metavar="PATH_OR_REPO",
                   help="a ControlNet the page's hint picture conditions (repeatable)")
    x.add_argument("--dtype", choices=["auto", "fp32", "fp16", "bf16"], default="auto",
                   help="auto: bf16 on a CPU with native bf16 where it measured faster, else fp32")
    x.add_argument("--device", default="cpu", help="cpu, cuda, mps … (cpu)")
    x.add_argument("--strict-length", action="store_true",
                   help="refuse prompts longer than 77 tokens (default: warn, drop the rest)")
    x.add_argument("--no-autotune", action="store_true",
                   help="PyTorch's own kernels, no timing of the fast path's choices")
    x.set_defaults(run=cmd_explore)
