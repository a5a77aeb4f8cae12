"""Write the squeeze-LPIPS weights minip2p reads (`minip2p eval-edit --lpips FILE`) as one
safetensors file, from the two official files: torchvision's SqueezeNet 1.1 ImageNet weights
(squeezenet1_1-b8a52dc0.pth) and the lpips package's v0.1 heads (lpips/weights/v0.1/squeeze.pth).

    python -m tools.convert_lpips SQUEEZENET.pth LPIPS_SQUEEZE.pth lpips-squeeze.safetensors

Both are read with `torch.load(weights_only=True)` (tensors only, no code runs); minip2p itself
never reads a pickle. Keys written: net.features.N.* (the trunk) and linL.weight (the heads).
"""
from __future__ import annotations

import argparse

import torch
from safetensors.torch import save_file


def convert(trunk: dict, heads: dict) -> dict:
    state = {"net." + k: v for k, v in trunk.items() if k.startswith("features.")}
    for k, v in heads.items():                               # lin0.model.1.weight -> lin0.weight
        if k[:3] == "lin" and k[3].isdigit():
            state[k.split(".")[0] + ".weight"] = v
    return {k: v.contiguous() for k, v in state.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("squeezenet")
    p.add_argument("lpips_heads")
    p.add_argument("out")
    a = p.parse_args(argv)
    load = lambda f: torch.load(f, map_location="cpu", weights_only=True)  # noqa: E731
    state = convert(load(a.squeezenet), load(a.lpips_heads))
    from minip2p.data.lpips import LPIPS
    want = set(LPIPS().state_dict())
    if set(state) != want:
        raise SystemExit(f"unexpected keys: missing {sorted(want - set(state))[:3]}, "
                         f"extra {sorted(set(state) - want)[:3]}")
    save_file(state, a.out)
    print(f"wrote {a.out} ({len(state)} tensors)")


if __name__ == "__main__":
    main()
