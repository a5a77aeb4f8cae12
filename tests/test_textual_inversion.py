"""Textual inversion (minip2p/train/textual_inversion.py) against diffusers'
`examples/textual_inversion/textual_inversion.py`, re-implemented here on a tiny random model:
one optimisation step from the same batch, noise and timesteps moves the new rows the same; the
saved file loads in diffusers (`load_textual_inversion`) and gives our image; bad input is one
line and writes nothing."""
import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import generate_vs_diffusers, one_line, picture
from minip2p.load import load_model
from minip2p.train import loop, textual_inversion as ti

pytestmark = pytest.mark.usefixtures("one_thread")
LR = 0.05


def official_step(pipe, token, n, init, prompts, z0, noise, t):
    """diffusers' script, one step: placeholder tokens added and set to the init token's
    embedding; AdamW over the whole token table; every other row restored after the step."""
    from diffusers import DDPMScheduler
    pipe = copy.deepcopy(pipe)
    tok, text, unet = pipe.tokenizer, pipe.text_encoder, pipe.unet
    names = [token] + [f"{token}_{i}" for i in range(1, n)]
    assert tok.add_tokens(names) == n
    init_id = tok.encode(init, add_special_tokens=False)
    assert len(init_id) == 1
    ids = tok.convert_tokens_to_ids(names)
    text.resize_token_embeddings(len(tok))
    E = text.get_input_embeddings().weight
    with torch.no_grad():
        E[ids] = E[init_id[0]].clone()
    unet.requires_grad_(False)
    text.requires_grad_(False)
    text.get_input_embeddings().requires_grad_(True)
    opt = torch.optim.AdamW(text.get_input_embeddings().parameters(), lr=LR, betas=(0.9, 0.999),
                            weight_decay=1e-2, eps=1e-8)
    orig = E.detach().clone()
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    input_ids = tok([p.replace(token, " ".join(names)) for p in prompts], padding="max_length",
                    truncation=True, max_length=77, return_tensors="pt").input_ids
    noisy = sched.add_noise(z0, noise, t)
    pred = unet(noisy, t, text(input_ids)[0]).sample
    target = noise if sched.config.prediction_type == "epsilon" else \
        sched.get_velocity(z0, noise, t)
    loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
    loss.backward()
    opt.step()
    keep = torch.ones(len(tok), dtype=torch.bool)
    keep[min(ids):max(ids) + 1] = False
    with torch.no_grad():
        E[keep] = orig[keep]
    return E[ids].detach(), loss.item()


@pytest.mark.parametrize("geometry", ["small", "small2"])          # ε- and v-prediction
def test_one_step_equals_the_official_step(geometry, request):
    pipe, folder = request.getfixturevalue(f"{geometry}_ckpt")
    model = load_model(folder)
    p = ti.Params(token="<my-thing>", init="dog", vectors=2, batch=3, steps=1, lr=LR)
    from minip2p.real import images
    pics = [images.to_tensor(picture(32)), images.to_tensor(picture(32).rotate(90))]
    learner = ti.Learner(model, p, pics)
    start = learner.rows.clone()
    batch = learner.draw(torch.Generator().manual_seed(5))
    prompts, z0, noise, t = batch
    assert all("<my-thing>" in s for s in prompts) and z0.shape == (3, 4, 8, 8)
    out = loop.train({"rows": learner.rows}, lambda k, g: learner.loss(*batch),
                     loop.Plan(steps=1, lr=LR, progress=False))
    ref, ref_loss = official_step(pipe, "<my-thing>", 2, "dog", prompts, z0, noise, t)
    d = (learner.rows - ref).abs().max().item()
    moved = (learner.rows - start).abs().max().item()
    print(f"textual inversion step: loss {out.losses[0]:.6f} vs {ref_loss:.6f}, "
          f"rows max|Δ| = {d:.1e} (moved {moved:.1e})")
    assert abs(out.losses[0] - ref_loss) <= 1e-6 and d <= 1e-5 and moved > 1e-3


def test_saved_file_gives_diffusers_our_image(small_ckpt, tmp_path):
    pipe, folder = small_ckpt
    pics = tmp_path / "pics"
    pics.mkdir()
    for i in range(2):
        picture(32).rotate(90 * i).save(pics / f"{i}.png")
    out = tmp_path / "learned_embeds.safetensors"
    model = load_model(folder)
    p = ti.Params(token="<my-thing>", init="red dog", vectors=2, batch=2, steps=3, lr=LR,
                  templates=["a {}", "a photo of a {}"])
    rows = ti.learn(model, p, pics, out, progress=False)
    assert out.exists() and loop.checkpoint_for(out).exists()
    ours = load_model(folder, embeddings=[out])
    ref = copy.deepcopy(pipe)
    ref.load_textual_inversion(str(out))
    ref.set_progress_bar_config(disable=True)
    prompts = ["a <my-thing> on a table"]
    dz, dx = generate_vs_diffusers(ref, ours, prompts, seed=1, steps=4, height=32, width=32)
    print(f"learned embedding in diffusers: latents max|Δ| = {dz:.1e}, image {dx * 255:.3f}/255")
    assert dx <= 2 / 255
    E = model.text_encoder.text_model.embeddings.token_embedding.weight   # the learner's model
    assert torch.equal(E[-2:], rows) and model.tokenizer.knows("<my-thing>_1")


@pytest.mark.parametrize("case", ["empty", "not-a-picture", "token-exists", "init-too-long",
                                  "no-folder", "bad-template"])
def test_bad_input_is_one_line_and_writes_nothing(small_ckpt, tmp_path, capsys, case):
    _, folder = small_ckpt
    pics = tmp_path / "pics"
    pics.mkdir()
    if case != "empty":
        picture(32).save(pics / "a.png")
    if case == "not-a-picture":
        (pics / "notes.txt").write_text("hello")
    token = "dog" if case == "token-exists" else "<new>"
    init = "a big red dog" if case == "init-too-long" else "dog"
    out = tmp_path / "out"
    out.mkdir()
    argv = ["learn-word", tmp_path / "nowhere" if case == "no-folder" else pics, "--token", token,
            "--init", init, "--vectors", "2", "--steps", "2", "--model", folder, "--quiet",
            "--out", out / "e.safetensors"]
    if case == "bad-template":
        argv += ["--template", "a photo"]
    needle = {"empty": "holds no pictures", "not-a-picture": "notes.txt' is not a picture",
              "token-exists": "--token 'dog' is already a word",
              "init-too-long": "--init 'a big red dog' is 4 tokens but the new word has 2 "
                               "vectors; give a shorter phrase or set --vectors to at least 4",
              "no-folder": "is not a folder", "bad-template": "--template 'a photo' must hold"}
    one_line(capsys, argv, needle[case])
    assert list(out.iterdir()) == []
