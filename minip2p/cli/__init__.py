"""Command line: `minip2p generate|edit|attention|invert|reconstruct|instruct|pairs|guide|hspace|
explore|learn-word|learn-instruction|eval-edit`
(and `python -m minip2p`).

Every user mistake ends as one line on stderr, `minip2p: <what was wrong; what to do>`, exit
status 2, no traceback, and no output file (images are written to a temporary file in the target
folder and renamed into place only when complete). Ctrl-C ends as `minip2p: interrupted`, exit
status 130, and SIGTERM the same way (`minip2p: terminated`, 143): both unwind through the same
clean-up, so neither leaves a temporary file or folder behind.

    common.py    the parser, shared options, loading, output files
    generate.py  generate (text -> image; SDEdit with --image --strength)
    edit.py      edit (Prompt-to-Prompt, MasaCtrl, plug-and-play, Pix2Pix-Zero)
    attention.py attention (maps, SVD components, attention through time)
    invert.py    invert, reconstruct, and the real-image options of edit
    instruct.py  instruct (InstructPix2Pix)
    pairs.py     pairs (the InstructPix2Pix data recipe: resumable, sharded)
    guide.py     guide (Self-Guidance: move, resize)
    hspace.py    hspace (directions in the UNet's h-space, for edit --method asyrp)
    explore.py   explore (the attention explorer, a local web page)
    learn.py     learn-word (textual inversion), learn-instruction (Visii)
    eval_edit.py eval-edit (PIE-Bench's editing metrics)
"""
from __future__ import annotations

import argparse
import signal
import sys
import warnings

from ..errors import MinipError, ParameterError
from .. import memory
from . import (attention, edit, eval_edit, explore, generate, guide, hspace, instruct, invert,
               learn, pairs)
from .common import Parser, flag_of


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="minip2p", description="Minimal Stable Diffusion with attention control: "
                                           "Prompt-to-Prompt, MasaCtrl, plug-and-play, SDEdit, "
                                           "Attend-and-Excite, Pix2Pix-Zero, Self-Guidance.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    generate.add_commands(sub)
    edit.add_commands(sub)
    attention.add_commands(sub)
    invert.add_commands(sub)
    instruct.add_commands(sub)
    pairs.add_commands(sub)
    guide.add_commands(sub)
    explore.add_commands(sub)
    hspace.add_commands(sub)
    learn.add_commands(sub)
    eval_edit.add_commands(sub)
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, like Ctrl-C's KeyboardInterrupt: every `finally`
    and `except BaseException` that removes temporary files runs for it too."""


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)      # a second one must not cut the clean-up
    raise Terminated


def main(argv=None) -> int:
    try:
        before = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:                                 # not the main thread: leave it as it is
        return _main(argv)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, before)


def _main(argv) -> int:
    def one_line_warning(message, category, filename, lineno, file=None, line=None):
        print(f"minip2p: warning: {message}", file=sys.stderr)
    warnings.showwarning = one_line_warning
    if hasattr(signal, "SIGXFSZ"):      # past a file-size limit: an error to report, not a kill
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    args = None
    memory.lean_heap()                  # freed tensors go back to the system (memory.py)
    try:
        args = build_parser().parse_args(argv)
        rc = args.run(args)
    except ParameterError as e:          # the library names the parameter; the user typed a flag
        flags = getattr(args, "flags", None)
        problem = e.said(lambda name: flag_of(name, flags))
        said = problem if e.name in (None, "prompts") else f"{flag_of(e.name, flags)} {problem}"
        print(f"minip2p: {said}", file=sys.stderr)
        return 2
    except MinipError as e:
        print(f"minip2p: {e}", file=sys.stderr)
        return 2
    except Terminated:
        print("minip2p: terminated", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("minip2p: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("minip2p: out of memory; try a smaller --height/--width or --dtype fp16 on a GPU",
              file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
