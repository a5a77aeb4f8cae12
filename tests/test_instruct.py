"""InstructPix2Pix (instruct.py) against diffusers' StableDiffusionInstructPix2PixPipeline on the
same random SD-1.x-structured checkpoint with an 8-channel conv_in, the same picture and seed
(z_T and the step noise from one CPU generator), Euler ancestral and DDIM; the CLI."""
import json

import pytest
import torch
from PIL import Image

from helpers import maxdiff, picture, reldiff
from minip2p.methods import instruct
from minip2p.cli import main
from minip2p.errors import MinipError
from minip2p.guidance import IMAGE, TEXT, UNCOND, GuidanceBatch, cfg, cfg_image

INSTRUCTION = "make the circle blue"


@pytest.fixture(scope="module")
def ip2p_model(ip2p_ckpt):
    from minip2p.load import load_model
    return load_model(ip2p_ckpt[1])


@pytest.mark.parametrize("sampler,steps", [("euler-a", 6), ("ddim", 5)])
def test_instruct_equals_diffusers(ip2p_ckpt, ip2p_model, sampler, steps):
    from diffusers import DDIMScheduler, StableDiffusionInstructPix2PixPipeline
    pipe = ip2p_ckpt[0]
    comp = dict(pipe.components)
    if sampler == "ddim":
        comp["scheduler"] = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False,
                                                      set_alpha_to_one=False)
    ref = StableDiffusionInstructPix2PixPipeline(**comp)
    ref.set_progress_bar_config(disable=True)
    im = picture()
    ours = instruct.edit(ip2p_model, im, INSTRUCTION, seed=4, steps=steps, sampler=sampler,
                         guidance=7.5, image_guidance=1.5, progress=False, return_latents=True)
    z = ref(INSTRUCTION, image=im, num_inference_steps=steps, guidance_scale=7.5,
            image_guidance_scale=1.5, generator=torch.Generator("cpu").manual_seed(4),
            output_type="latent").images
    d = maxdiff(ours, z)
    rel = reldiff(ours, z)
    print(f"InstructPix2Pix ({sampler}, {steps} steps) vs diffusers: latents max|Δ| = {d:.2e}, "
          f"relative to max|z| = {rel:.2e}")
    assert rel <= 1e-4


def test_three_way_guidance_batch():
    b = GuidanceBatch.instruct_layout(2)
    assert b.rows == ((0, TEXT), (1, TEXT), (0, IMAGE), (1, IMAGE), (0, UNCOND), (1, UNCOND))
    eps = torch.randn(6, 4, 2, 2)
    out = b.guide(eps, 7.5, 1.5)
    want = eps[4:] + 1.5 * (eps[2:4] - eps[4:]) + 7.5 * (eps[:2] - eps[2:4])
    assert maxdiff(out, want) <= 1e-5
    # s_I = 1: plain CFG between the image-only and the full condition
    assert maxdiff(cfg_image(eps[4:], eps[2:4], eps[:2], 7.5, 1.0), cfg(eps[2:4], eps[:2], 7.5)) <= 1e-5
    lat = torch.ones(1, 4, 2, 2)
    assert b.image_cond(lat)[:, 0, 0, 0].tolist() == [1, 1, 1, 1, 0, 0]
    # cfg's layout is unchanged
    assert GuidanceBatch.cfg_layout(1).guide(eps[:2], 2.0).shape == (1, 4, 2, 2)


def test_instruct_cli_and_maps(ip2p_ckpt, tmp_path, capsys):
    src = tmp_path / "in.png"
    picture(80).save(src)
    out = tmp_path / "out.png"
    assert main(["instruct", str(src), INSTRUCTION, "--model", str(ip2p_ckpt[1]), "--steps", "3",
                 "--quiet", "--maps", "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64) and (tmp_path / "out-maps.png").is_file()


def test_instruct_refuses(ip2p_ckpt, sd_ckpt, tmp_path, capsys):
    src = tmp_path / "in.png"
    picture().save(src)
    cases = [[str(tmp_path / "nope.png"), "x"],
             [str(src), "x", "--image-guidance", "nan"],
             [str(src), "x", "--out", str(tmp_path / "a.txt")],
             [str(src), "x", "--model", str(sd_ckpt[1])]]            # a 4-channel model
    for args in cases:
        if "--model" not in args:
            args += ["--model", str(ip2p_ckpt[1])]
        assert main(["instruct", *args, "--steps", "2", "--quiet"]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("minip2p: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_plain_generation_refuses_an_instruct_model(ip2p_model):
    from minip2p.pipeline import generate
    with pytest.raises(MinipError, match="instruct"):
        generate(ip2p_model, ["a cat"], steps=2, progress=False)
