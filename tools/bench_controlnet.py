"""The cost of a ControlNet step: one UNet call with and without a ControlNet, minip2p against
diffusers (ControlNetModel + UNet2DConditionModel with the residuals, SDPA) on the same weights,
interleaved round by round in one process (so a noisy machine slows all rows alike).

Batch 2 = one prompt with classifier-free guidance, the hint at full resolution. The ControlNet is
made from the folder's UNet (`ControlNet.from_unet`, its zero convs given random weights so the
residuals are not zero), written in the diffusers layout and loaded by both libraries.

    python -m tools.bench_controlnet --model SD15_FOLDER --threads 1 --rounds 2
    python -m tools.bench_controlnet --model weights/toy --size 64 --rounds 10
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from minip2p.conditioning import Control, conditioned, eps
from minip2p.guidance import GuidanceBatch
from minip2p.load import load_model
from minip2p.load.controlnet import load_controlnet, save_controlnet
from minip2p.model.controlnet import ControlNet
from minip2p.pipeline import encode_text
from tools.harness import cpu_model, interleave, report, set_threads

PROMPT = "a painting of a squirrel eating a burger"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="diffusers-layout folder")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels (512)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-diffusers", action="store_true", help="skip the diffusers rows")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    model = load_model(args.model)
    f = model.vae.cfg.downscale
    torch.manual_seed(0)
    net = ControlNet.from_unet(model.unet, downscale=f)
    with torch.no_grad():
        for zero in [*net.controlnet_down_blocks, net.controlnet_mid_block,
                     net.controlnet_cond_embedding.conv_out]:
            zero.weight.normal_(0, 0.02)
    folder = Path(tempfile.mkdtemp(prefix="bench-controlnet-"))
    save_controlnet(net, folder)
    del net
    side = args.size // f
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, side, side, generator=g)
    hint = (torch.rand(1, 3, args.size, args.size, generator=g) > 0.9).float()
    context = torch.cat([encode_text(model, [""]), encode_text(model, [PROMPT])])
    t = int(model.scheduler.timesteps(50)[0])
    batch = GuidanceBatch.cfg_layout(1)
    ours = conditioned(model, [Control(load_controlnet(folder, base=model), hint)])
    rows = {"minip2p, ControlNet + UNet": lambda: eps(ours, z, t, context, batch=batch),
            "minip2p, UNet alone": lambda: model.unet(z, t, context, batch=batch)}
    if not args.no_diffusers:
        from diffusers import ControlNetModel, UNet2DConditionModel
        ref_unet = UNet2DConditionModel.from_pretrained(str(args.model / "unet")).eval()
        ref_net = ControlNetModel.from_pretrained(str(folder)).eval()
        hint2 = hint.expand(2, -1, -1, -1)

        def diffusers_step():
            down, mid = ref_net(z, t, context, hint2, return_dict=False)
            return ref_unet(z, t, context, down_block_additional_residuals=down,
                            mid_block_additional_residual=mid).sample
        rows["diffusers, ControlNet + UNet (SDPA)"] = diffusers_step
        rows["diffusers, UNet alone (SDPA)"] = lambda: ref_unet(z, t, context).sample
    outs, times, _ = interleave(rows, args.rounds)
    print(f"\n{args.model}, batch 2 (CFG) at {args.size}x{args.size}, t = {t}, {args.threads} "
          f"threads, {args.rounds} interleaved rounds after a warm-up; {cpu_model()}\n")
    report("UNet call", outs, times, "median")


if __name__ == "__main__":
    main()
