"""Visii (minip2p/train/visii.py) against a re-implementation of the official training step
(thaoshibe/visii `visii.py: train`) on a tiny random InstructPix2Pix model with diffusers'
UNet, Euler scheduler and transformers' CLIP: the same loss, the same gradient of the learned rows
and the same rows after one AdamW step; a hybrid instruction as the official test_concatenate;
the CLI (learn-instruction, instruct --instruction-embedding) and its one-line refusals."""
import copy

import pytest
import torch
from PIL import Image, ImageDraw

from helpers import build_clip, maxdiff, one_line, picture
from minip2p.load import load_model
from minip2p.load.embeddings import read_instruction
from minip2p.methods import instruct
from minip2p.real import images
from minip2p.train import loop, visii

pytestmark = pytest.mark.usefixtures("one_thread")
INIT = "make it blue"


def blue(size=64):
    im = Image.new("RGB", (size, size), (240, 240, 230))
    ImageDraw.Draw(im).ellipse((8, 12, 44, 48), fill=(30, 30, 200))
    return im


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    return build_clip(tmp_path_factory.mktemp("clip"), seed=3)


def official_step(pipe, ref_clip, pixels, before, after, t, noise, lr):
    """One iteration of Visii's `train` loop, as the official code writes it (Euler's add_noise
    and scale_model_input, the [text, ∅, ∅] batch with [I, I, 0] image latents, 3-way guidance,
    4·MSE − 0.1·clamp(cos), clip_grad_value_ to the original's max, AdamW, rows restored)."""
    from diffusers import EulerAncestralDiscreteScheduler
    pipe = copy.deepcopy(pipe)
    sched = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    tok, text, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    for m in (text, unet, vae):
        m.requires_grad_(False)
    with torch.no_grad():
        ids = tok([INIT, "", ""], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
        eos = int(torch.where(ids[0] == 49407)[0][0])
        embeds = text(ids)[0]
        f = ref_clip.visual_projection(ref_clip.vision_model(pixel_values=pixels)[1])
        direction = f[1] - f[0]
        direction = direction / direction.norm(p=2, dim=-1, keepdim=True)
        cond = vae.encode(before).latent_dist.mode()
        cond = torch.cat([cond, cond, torch.zeros_like(cond)])
        target = 0.18215 * vae.encode(after).latent_dist.mode()
    embeds.requires_grad_(True)
    orig = embeds.detach().clone()
    opt = torch.optim.AdamW([embeds], lr=lr)
    timesteps = torch.tensor([float(t)])
    noisy = sched.add_noise(target, noise, timesteps)
    x = sched.scale_model_input(torch.cat([noisy] * 3), timesteps)
    pred = unet(torch.cat([x, cond], 1), timesteps, encoder_hidden_states=embeds).sample
    p_text, p_image, p_uncond = pred.chunk(3)
    guided = p_uncond + 7.5 * (p_text - p_image) + 1.5 * (p_image - p_uncond)
    mse = torch.nn.MSELoss()(guided.float(), noise.float())
    te = ref_clip.text_projection(embeds[0].mean(0, keepdim=True))
    te = te / te.norm(p=2, dim=-1, keepdim=True)
    cos = torch.nn.CosineSimilarity()(direction, te).clamp(min=-1, max=0.5)
    loss = 4 * mse - 0.1 * cos
    loss.backward()
    grad = embeds.grad[0, 1:eos].clone()
    torch.nn.utils.clip_grad_value_(embeds, orig.max())
    opt.step()
    with torch.no_grad():
        embeds[1:] = orig[1:]
        embeds[0][0] = orig[0][0]
        embeds[0][eos:] = orig[0][eos:]
    return embeds[0].detach(), grad, loss.item(), eos


def test_one_step_equals_the_official_step(ip2p_ckpt, clip_pair):
    from minip2p.data.clip_image import load_clip
    pipe, folder = ip2p_ckpt
    ref_clip, clip_folder = clip_pair
    model = load_model(folder)
    clip = load_clip(clip_folder)
    before, after = images.to_tensor(picture(64)), images.to_tensor(blue(64))
    p = visii.Params(init=INIT, steps=1, lr=1e-2, seed=2)
    learner = visii.Learner(model, p, before, after, clip)
    t = int(learner.order[0])
    noise = learner.noises[t][None]
    rows = learner.rows.clone().requires_grad_(True)
    learner.rows = rows
    loss, _ = learner.losses(t, noise)
    (grad,) = torch.autograd.grad(loss, rows)
    learner.rows = rows.detach().clone()
    out = loop.train({"rows": learner.rows}, learner.step,
                     loop.Plan(steps=1, lr=1e-2, clip_value=learner.bound, progress=False),
                     after=learner.after)
    pixels = clip.preprocess(torch.cat([(before + 1) / 2, (after + 1) / 2]))
    ref, ref_grad, ref_loss, eos = official_step(pipe, ref_clip, pixels, before, after, t, noise,
                                                 lr=1e-2)
    assert eos == learner.eos == 4
    ours = learner.instruction()[0]
    g = maxdiff(grad, ref_grad) / ref_grad.abs().max().item()
    print(f"Visii step at t={t}: loss {out.losses[0]:.6f} vs {ref_loss:.6f}, gradient rel. "
          f"max|Δ| {g:.1e}, c_T max|Δ| {maxdiff(ours, ref):.1e}")
    assert abs(out.losses[0] - ref_loss) <= 1e-5 * max(1, abs(ref_loss))
    assert g <= 1e-4 and maxdiff(ours, ref) <= 1e-5
    assert maxdiff(ours[0], learner.c0[0, 0]) == 0 and maxdiff(ours[eos:], learner.c0[0, eos:]) == 0
    assert (ours[1:eos] - learner.c0[0, 1:eos]).abs().max() > 1e-3          # the rows moved
    assert learner.best_step.item() == 1 and torch.equal(learner.best_rows, learner.rows)


def test_hybrid_instruction_is_the_official_concatenation(ip2p_ckpt):
    from minip2p.pipeline import encode_text
    model = load_model(ip2p_ckpt[1])
    learned = torch.randn(77, model.text_encoder.cfg.hidden_size)
    c = instruct.hybrid(model, learned, 4, "a husky")
    extra = encode_text(model, ["a husky"])[0]
    assert torch.equal(c[0, :6], learned[:6]) and torch.equal(c[0, 6:9], extra[:3])
    assert torch.equal(c[0, 9:], learned[9:])                      # extra's EOS not copied
    assert torch.equal(instruct.hybrid(model, learned, 4, "")[0], learned)


def test_cli_learns_resumes_and_applies(ip2p_ckpt, tmp_path, capsys):
    from helpers import cli
    folder = ip2p_ckpt[1]
    picture(64).save(tmp_path / "before.png")
    blue(64).save(tmp_path / "after.png")
    out = tmp_path / "instr.safetensors"
    args = ["learn-instruction", tmp_path / "before.png", tmp_path / "after.png", "--init", INIT,
            "--steps", "3", "--model", folder, "--quiet", "--out", out]
    rc, stdout, err = cli(capsys, *args)
    assert rc == 0, err
    c, eos, init = read_instruction(out)
    assert c.shape == (77, 32) and eos == 4 and init == INIT
    assert loop.checkpoint_for(out).exists()
    rc, _, err = cli(capsys, *args)                      # done already: the same file again
    assert rc == 0, err
    edited = tmp_path / "edited.png"
    for words in ([], ["a husky"]):
        rc, _, err = cli(capsys, "instruct", tmp_path / "before.png", *words,
                         "--instruction-embedding", out, "--model", folder, "--steps", "2",
                         "--quiet", "--out", edited)
        assert rc == 0 and edited.exists(), err


@pytest.mark.parametrize("case", ["sizes", "not-ip2p", "empty-init", "not-an-instruction"])
def test_bad_input_is_one_line_and_writes_nothing(ip2p_ckpt, sd_ckpt, tmp_path, capsys, case):
    picture(64).save(tmp_path / "before.png")
    blue(48 if case == "sizes" else 64).save(tmp_path / "after.png")
    out = tmp_path / "out"
    out.mkdir()
    model = sd_ckpt[1] if case == "not-ip2p" else ip2p_ckpt[1]
    if case == "not-an-instruction":
        (tmp_path / "x.safetensors").write_bytes(b"\0" * 32)
        argv = ["instruct", tmp_path / "before.png", "--instruction-embedding",
                tmp_path / "x.safetensors", "--model", model, "--out", out / "a.png"]
    else:
        argv = ["learn-instruction", tmp_path / "before.png", tmp_path / "after.png",
                "--steps", "2", "--model", model, "--quiet", "--out", out / "i.safetensors"]
        if case == "empty-init":
            argv += ["--init", " "]
    needle = {"sizes": "is 64×64 pixels but AFTER", "not-ip2p": "is not an InstructPix2Pix model",
              "empty-init": "--init is empty", "not-an-instruction": "not a learned instruction"}
    one_line(capsys, argv, needle[case])
    assert list(out.iterdir()) == []


def test_the_explorer_neither_shows_nor_takes_the_file_parameter(ip2p_ckpt):
    from minip2p.errors import ParameterError
    from minip2p.explore.requests import check_request, describe_methods
    shown = {p["name"] for m in describe_methods()["methods"] if m["name"] == "instruct"
             for p in m["parameters"]}
    assert "image_guidance" in shown and "instruction_embedding" not in shown
    model = load_model(ip2p_ckpt[1])
    with pytest.raises(ParameterError, match="names a file of this machine"):
        check_request(model, {"prompt": "make it blue", "method": "instruct",
                              "params": {"instruction_embedding": "/etc/passwd"}})
