"""What a LoRA costs at load: `load_model` of a folder without and with one LoRA file, and
merging, removing and merging it again on the loaded model (minip2p/load/lora.py), rounds
alternated so a noisy machine slows all alike. The LoRA is random, written as kohya's sd-scripts
writes a plain LoRA for SD 1.x (fp16 factors, rank `--rank`, α = rank/2) over the layers it
targets by default: the UNet's spatial transformers (proj_in/out, attention, feed-forward) and
the text encoder's attention and MLP; `--conv` adds LoCon's factors on the resnets' convs too.

    python -m tools.bench_lora --model SD15_FOLDER --rank 16 --rounds 3
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from minip2p.load import load_model
from minip2p.load.lora import add_lora, layers, remove_lora
from tools.harness import cpu_model, set_threads

OUT = Path(__file__).resolve().parent / "out"


def kohya_targets(part: str, name: str, conv: bool) -> bool:
    if part == "text_encoder":
        return ".self_attn." in name or ".mlp." in name
    return ".attentions." in name or (conv and ".resnets." in name)


def write_lora(model, path: Path, rank: int, conv: bool) -> int:
    """A random kohya-layout LoRA for `model`; returns the number of layers it changes."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for (part, name), m in layers(model).items():
        if not kohya_targets(part, name, conv):
            continue
        w = m.weight
        stem = ("lora_unet_" if part == "unet" else "lora_te_") + name.replace(".", "_")
        up_shape = (w.shape[0], rank) + ((1, 1) if w.dim() == 4 else ())
        state[stem + ".lora_down.weight"] = (torch.randn(rank, *w.shape[1:], generator=g)
                                             * 0.01).half()
        state[stem + ".lora_up.weight"] = (torch.randn(up_shape, generator=g) * 0.01).half()
        state[stem + ".alpha"] = torch.tensor(rank / 2)
    save_file(state, str(path))
    return len(state) // 3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="diffusers-layout folder")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--conv", action="store_true", help="LoCon: the resnets' 3×3 convs too")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    threads = set_threads(args.threads)
    OUT.mkdir(exist_ok=True)
    lora = OUT / f"bench_lora_r{args.rank}{'_conv' if args.conv else ''}.safetensors"
    model = load_model(args.model, fast=False)
    n = write_lora(model, lora, args.rank, args.conv)
    times = {"load": [], "load + LoRA": [], "add_lora": [], "remove_lora": [],
             "add_lora again": []}
    for _ in range(args.rounds):
        del model
        gc.collect()
        t0 = time.perf_counter()
        model = load_model(args.model)
        times["load"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        add_lora(model, lora)
        times["add_lora"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        remove_lora(model, lora)
        times["remove_lora"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()                  # the weights were written once already
        add_lora(model, lora)
        times["add_lora again"].append(time.perf_counter() - t0)
        del model
        gc.collect()
        t0 = time.perf_counter()
        model = load_model(args.model, loras=[(lora, 1.0)])
        times["load + LoRA"].append(time.perf_counter() - t0)
    print(f"{cpu_model()}, torch {torch.__version__}, {threads} threads; LoRA rank {args.rank}, "
          f"{n} layers, {lora.stat().st_size / 2**20:.1f} MiB; {args.rounds} rounds")
    print("| step | best s | median s |\n|---|---:|---:|")
    for name, ts in times.items():
        ts = sorted(ts)
        print(f"| {name} | {ts[0]:.2f} | {ts[len(ts) // 2]:.2f} |")


if __name__ == "__main__":
    main()
