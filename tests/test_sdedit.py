"""SDEdit (methods/sdedit.py) against diffusers' StableDiffusionImg2ImgPipeline with DDIM on the
same random SD-1.x-structured checkpoint, the same image latents and the same noise; and the CLI.

diffusers takes a 4-channel `image` as the scaled latents z_0 itself, and draws its noise with
`randn_tensor(shape, generator)`, which for one CPU generator is `torch.randn(shape, generator)`:
the noise minip2p's `initial_noise` draws for the same seed.
"""
import pytest
import torch
from PIL import Image

from helpers import maxdiff, picture
from minip2p.real import images
from minip2p.cli import main
from minip2p.errors import MinipError
from minip2p.fast import switched
from minip2p.methods import p2p, sdedit
from minip2p.pipeline import initial_noise

PROMPT = "a painting of a squirrel eating a burger"


@pytest.mark.parametrize("strength,steps", [(0.6, 10), (1.0, 6), (0.25, 8)])
def test_sdedit_equals_diffusers_img2img(sd_ckpt, sd_model, strength, steps):
    from diffusers import StableDiffusionImg2ImgPipeline
    pipe, _ = sd_ckpt
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    x = images.to_tensor(picture())                                     # (1, 3, 64, 64)
    z0 = images.encode(sd_model, x)                                     # (1, 4, 8, 8)
    seed = 7
    ours = sdedit.generate(sd_model, z0, [PROMPT], strength=strength, seed=seed, steps=steps,
                           progress=False, return_latents=True)
    ref = i2i(PROMPT, image=z0.clone(), strength=strength, num_inference_steps=steps,
              guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(seed),
              output_type="latent").images
    d = maxdiff(ours, ref)
    print(f"SDEdit strength {strength}, {steps} steps vs diffusers img2img: latents max|Δ| = {d:.2e}")
    assert d <= 1e-4


def test_noise_is_the_seeds_initial_noise_and_the_start_follows_strength(sd_model):
    assert sdedit.start_index(50, 0.6) == 20 and sdedit.start_index(50, 1.0) == 0
    z0 = torch.zeros(1, 4, 8, 8)
    z, start = sdedit.noised(sd_model, z0, 10, 1.0, initial_noise(sd_model, 3, 64, 64))
    a = sd_model.scheduler.alpha(sd_model.scheduler.timesteps(10)[0])
    assert start == 0 and maxdiff(z, (1 - a) ** 0.5 * initial_noise(sd_model, 3, 64, 64)) == 0


def test_p2p_under_sdedit_keeps_the_source_as_sdedit_alone(sd_model):
    """P2P from a noised picture: the source row is exactly SDEdit of the source prompt (edits
    never touch it), and windows count the steps that run."""
    z0 = images.encode(sd_model, images.to_tensor(picture()))
    prompts = [PROMPT, "a painting of a lion eating a burger"]
    steps, strength = 10, 0.5
    ctrl, _ = p2p.build(sd_model.tokenizer, prompts, steps - sdedit.start_index(steps, strength),
                        "replace")
    kw = dict(strength=strength, seed=1, steps=steps, progress=False, return_latents=True)
    with switched(sd_model, False):
        both = sdedit.generate(sd_model, z0, prompts, control=ctrl, **kw)
        alone = sdedit.generate(sd_model, z0, prompts[:1], **kw)
    assert maxdiff(both[0], alone[0]) <= 1e-5
    assert maxdiff(both[1], both[0]) > 1e-3


@pytest.mark.parametrize("bad", ["0", "-0.5", "1.5", "nan"])
def test_strength_out_of_range_is_one_line(capsys, tmp_path, sd_ckpt, bad):
    path = tmp_path / "p.png"
    picture().save(path)
    out = tmp_path / "o.png"
    rc = main(["generate", PROMPT, "--model", str(sd_ckpt[1]), "--image", str(path), "--strength",
               bad, "--steps", "2", "--quiet", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--strength" in err[0] and not out.exists(), err


def test_strength_without_image_and_no_step_are_refused(capsys, tmp_path, sd_ckpt):
    out = tmp_path / "o.png"
    rc = main(["generate", PROMPT, "--model", str(sd_ckpt[1]), "--strength", "0.5", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--image" in err[0] and not out.exists()
    with pytest.raises(MinipError, match="runs no step"):
        sdedit.start_index(4, 0.2)


def test_cli_generate_and_edit_from_a_picture(capsys, tmp_path, sd_ckpt):
    path = tmp_path / "p.png"
    picture().save(path)
    common = ["--model", str(sd_ckpt[1]), "--steps", "4", "--quiet", "--image", str(path),
              "--strength", "0.5"]
    out = tmp_path / "g.png"
    assert main(["generate", PROMPT, *common, "--out", str(out)]) == 0, capsys.readouterr().err
    with Image.open(out) as im:
        assert im.size == (64, 64)
    edit_dir = tmp_path / "edit"
    rc = main(["edit", PROMPT, "a painting of a lion eating a burger", *common,
               "--out-dir", str(edit_dir)])
    assert rc == 0, capsys.readouterr().err
    assert {p.name for p in edit_dir.iterdir()} >= {"0.png", "1.png", "strip.png"}
