"""ControlNet: parity with diffusers' ControlNetModel + StableDiffusionControlNetPipeline on tiny
random-weight models (DDIM, the same z_T): one net, two nets (MultiControlNet), guess mode, a
window; the original single-file layout loads to the same net; strict, one-line refusals; and the
nets compose with the editing methods (P2P, MasaCtrl) on the toy and an SD-1.5-shaped model."""
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import _jitter, maxdiff
from minip2p import MinipError, methods
from minip2p.conditioning import Control, conditioned, guess_scales
from minip2p.load.controlnet import load_controlnet, save_controlnet
from minip2p.model.controlnet import ControlNet
from minip2p.pipeline import decode, generate, initial_noise

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, SIZE, PROMPT = 3, 64, "a red circle"


def hint_image(seed: int, size: int = SIZE) -> Image.Image:
    """A hint with structure (blocky random colours: survives resizing) as a PIL image."""
    rng = np.random.default_rng(seed)
    small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    return Image.fromarray(small).resize((size, size), Image.NEAREST)


@pytest.fixture(scope="module")
def nets(sd_ckpt, tmp_path_factory):
    """Two random diffusers ControlNets for the "sd" geometry, saved in the diffusers layout."""
    from diffusers import ControlNetModel
    pipe, _ = sd_ckpt
    out = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        cn = ControlNetModel.from_unet(pipe.unet)
        _jitter(cn, 10 + seed)
        folder = tmp_path_factory.mktemp(f"cn{seed}")
        cn.save_pretrained(str(folder), safe_serialization=True)
        out.append((cn, folder))
    return out


@pytest.fixture(scope="module")
def reference(sd_ckpt, nets):
    from diffusers import MultiControlNetModel, StableDiffusionControlNetPipeline
    pipe, _ = sd_ckpt
    parts = {k: v for k, v in pipe.components.items() if k != "image_encoder"}

    def run(which, z, **kw):
        cn = nets[which[0]][0] if len(which) == 1 else \
            MultiControlNetModel([nets[i][0] for i in which])
        ref = StableDiffusionControlNetPipeline(**parts, controlnet=cn)
        ref.set_progress_bar_config(disable=True)
        lat = ref(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=7.5,
                  latents=z.clone(), output_type="latent", **kw).images
        img = (pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        return lat, img
    return run


def ours(model, controls):
    z = generate(conditioned(model, controls), [PROMPT], seed=0, steps=STEPS, guidance=7.5,
                 height=SIZE, width=SIZE, progress=False, return_latents=True)
    return z, decode(model, z)


@pytest.mark.parametrize("case", ["one", "two", "window"])
def test_parity_with_diffusers(sd_model, nets, reference, case):
    h1, h2 = hint_image(0), hint_image(1)
    net = [load_controlnet(f, base=sd_model) for _, f in nets]
    z = initial_noise(sd_model, 0, SIZE, SIZE)
    with torch.no_grad():
        if case == "one":
            ref = reference([0], z, image=h1, controlnet_conditioning_scale=0.8)
            mine = ours(sd_model, [Control(net[0], h1, 0.8)])
        elif case == "two":
            ref = reference([0, 1], z, image=[h1, h2], controlnet_conditioning_scale=[0.8, 0.5],
                            control_guidance_start=[0.0, 0.25], control_guidance_end=[1.0, 0.75])
            mine = ours(sd_model, [Control(net[0], h1, 0.8), Control(net[1], h2, 0.5,
                                                                    window=(0.25, 0.75))])
        else:
            ref = reference([1], z, image=h2, control_guidance_start=0.3)
            mine = ours(sd_model, [Control(net[1], h2, window=(0.3, 1.0))])
        plain = ours(sd_model, [])
    assert maxdiff(mine[0], ref[0]) <= 1e-4
    assert maxdiff(mine[1], ref[1]) <= 2 / 255
    assert maxdiff(plain[0], ref[0]) > 1e-3                    # the nets do change the result


def test_guess_mode_official_scales_vs_diffusers_logspace(sd_model, nets, reference,
                                                           monkeypatch):
    """Guess mode: control on the conditional rows only. Our scales are the official
    0.825^(12−i); diffusers' logspace(−1, 0, 13) = 10^(−(12−i)/12) ≈ 0.8254^(12−i): at most
    0.6 % apart, so the latents differ a little; with diffusers' scales made ours, they agree."""
    ours13 = torch.tensor(guess_scales(13, 1.0))
    theirs = torch.logspace(-1, 0, 13)
    assert ((ours13 / theirs - 1).abs().max() <= 0.006).item()
    h1 = hint_image(0)
    net = load_controlnet(nets[0][1], base=sd_model)
    z = initial_noise(sd_model, 0, SIZE, SIZE)
    with torch.no_grad():
        mine = ours(sd_model, [Control(net, h1, 0.9, guess=True)])
        ref = reference([0], z, image=h1, controlnet_conditioning_scale=0.9, guess_mode=True)
        assert 1e-4 < maxdiff(mine[0], ref[0]) <= 2e-3 * ref[0].abs().max()
        logspace = torch.logspace
        monkeypatch.setattr(torch, "logspace", lambda a, b, n, **kw: torch.tensor(
            guess_scales(n, 1.0), device=kw.get("device")) if (a, b) == (-1, 0)
            else logspace(a, b, n, **kw))
        same = reference([0], z, image=h1, controlnet_conditioning_scale=0.9, guess_mode=True)
    assert maxdiff(mine[0], same[0]) <= 1e-4 and maxdiff(mine[1], same[1]) <= 2 / 255


RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def to_original(state: dict, L: int = 2, prefix: str = "control_model.") -> dict:
    """diffusers ControlNet keys -> the original (cldm) keys: the converter's inverse, written
    here independently of minip2p's table."""
    out = {}
    for k, v in state.items():
        m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(\w+)(\..+)", k)
        d = re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(\w+)", k)
        r = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(\w+)(\..+)", k)
        h = re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)\.(\w+)", k)
        z = re.fullmatch(r"controlnet_down_blocks\.(\d+)\.(\w+)", k)
        if m:
            b, kind, j, first, rest = m.groups()
            i = 1 + int(b) * (L + 1) + int(j)
            key = f"input_blocks.{i}.0.{RESNET[first]}{rest}" if kind == "resnets" else \
                f"input_blocks.{i}.1.{first}{rest}"
        elif d:
            key = f"input_blocks.{1 + int(d.group(1)) * (L + 1) + L}.0.op.{d.group(2)}"
        elif r:
            kind, j, first, rest = r.groups()
            key = f"middle_block.{2 * int(j)}.{RESNET[first]}{rest}" if kind == "resnets" else \
                f"middle_block.1.{first}{rest}"
        elif h:
            key = f"input_hint_block.{2 * int(h.group(1)) + 2}.{h.group(2)}"
        elif z:
            key = f"zero_convs.{z.group(1)}.0.{z.group(2)}"
        else:
            key = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2":
                   "time_embed.2", "conv_in": "input_blocks.0.0",
                   "controlnet_cond_embedding.conv_in": "input_hint_block.0",
                   "controlnet_cond_embedding.conv_out": "input_hint_block.14",
                   "controlnet_mid_block": "middle_block_out.0"}[k.rsplit(".", 1)[0]] + \
                "." + k.rsplit(".", 1)[1]
        out[prefix + key] = v.contiguous()
    return out


def test_original_layout_loads_to_the_same_net(sd_model, nets, tmp_path):
    cn, folder = nets[0]
    mine = load_controlnet(folder, base=sd_model)
    state = cn.state_dict()
    for prefix in ("control_model.", ""):
        orig = to_original(state, prefix=prefix)
        assert "control_model.zero_convs.0.0.weight" in orig or "zero_convs.0.0.weight" in orig
        if prefix:                                   # v1.0 files bundle the whole SD model
            orig["model.diffusion_model.out.2.bias"] = torch.zeros(4)
        path = tmp_path / f"control{prefix or '-bare'}.safetensors"
        save_file(orig, str(path))
        other = load_controlnet(path, base=sd_model)
        assert other.cfg.conditioning_embedding_out_channels == (16, 32, 96, 256)
        a, b = mine.state_dict(), other.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    h = hint_image(3)
    with torch.no_grad():
        assert torch.equal(ours(sd_model, [Control(mine, h)])[0],
                           ours(sd_model, [Control(other, h)])[0])


def test_strict_loading_and_refusals(sd_model, small_ckpt, nets, tmp_path):
    cn, folder = nets[0]
    state = to_original(cn.state_dict())
    broken = dict(state)
    broken.pop("control_model.zero_convs.3.0.weight")
    save_file(broken, str(tmp_path / "missing.safetensors"))
    extra = {**state, "control_model.zero_convs.99.0.weight": torch.zeros(1)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    wrong = {**state, "control_model.middle_block_out.0.bias": torch.zeros(5)}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    (tmp_path / "net.pth").write_bytes(b"pickle")
    for name, needle in (("missing", "missing tensors: controlnet_down_blocks.3.weight"),
                         ("extra", "unexpected tensors"), ("wrong", "wrong shape")):
        with pytest.raises(MinipError, match=needle):
            load_controlnet(tmp_path / f"{name}.safetensors", base=sd_model)
    with pytest.raises(MinipError, match="pickle checkpoints are refused"):
        load_controlnet(tmp_path / "net.pth")
    from minip2p.load import load_model
    small = load_model(small_ckpt[1])
    with pytest.raises(MinipError, match="another base model"):
        load_controlnet(folder, base=small)
    net = load_controlnet(folder)
    with pytest.raises(MinipError, match="another base model"):
        conditioned(small, [Control(net, hint_image(0))])
    for bad, needle in ((dict(scale=float("nan")), "finite"), (dict(window=(0.5, 0.5)), "window"),
                        (dict(hint="no/such.png"), "not found"), (dict(hint=3), "an image"),
                        (dict(hint=torch.rand(1, 4, 8, 8)), "channels")):
        with pytest.raises(MinipError, match=needle):
            conditioned(sd_model, [dict(dict(net=net, hint=hint_image(0)), **bad)])


def toy_net(toy, seed: int = 0) -> ControlNet:
    """A ControlNet for the toy model, its zero convs made non-zero (so it acts)."""
    torch.manual_seed(seed)
    net = ControlNet.from_unet(toy.unet, conditioning_embedding_out_channels=(8, 16, 32)).eval()
    _jitter(net, seed)
    with torch.no_grad():                                  # residuals that show in a few steps
        for zero in [*net.controlnet_down_blocks, net.controlnet_mid_block,
                     net.controlnet_cond_embedding.conv_out]:
            zero.weight.mul_(10)
        for conv in [net.controlnet_cond_embedding.conv_in, *net.controlnet_cond_embedding.blocks]:
            torch.nn.init.kaiming_normal_(conv.weight)      # so that the hint reaches conv_out
    return net.requires_grad_(False)


@pytest.mark.parametrize("which", ["toy", pytest.param("sd", marks=pytest.mark.slow)])
def test_edits_compose_with_controlnets(toy, sd_model, nets, which):
    """P2P and MasaCtrl with a hint per image (P2P also with one shared hint): the source row is
    the image `generate` makes with the same net and its hint; the net changes the edit."""
    model = toy if which == "toy" else sd_model
    net = toy_net(toy) if which == "toy" else load_controlnet(nets[0][1], base=sd_model)
    h1, h2 = hint_image(5), hint_image(6)
    kw = dict(steps=2, seed=0, height=SIZE, width=SIZE)
    for name, prompts in (("p2p", ["a big red square", "a big blue square"]),
                          ("masactrl", ["a big red square", "a big red circle"])):
        plain = methods.run(model, name, prompts, **kw).images
        rows = methods.run(model, name, prompts, controls=[Control(net, [h2, h1])], **kw).images
        src = generate(conditioned(model, [Control(net, h2)]), [prompts[0]], progress=False,
                       **kw)
        assert np.abs(np.asarray(rows[0]).astype(int) - _pil(src)).max() <= 1   # saw hint 0
        assert not np.array_equal(np.asarray(rows[1]), np.asarray(plain[1]))
        if name == "p2p":                   # one hint for both rows: the edit sees another
            shared = methods.run(model, name, prompts, controls=[Control(net, h2)], **kw).images
            assert np.abs(np.asarray(shared[0]).astype(int) - np.asarray(rows[0])).max() <= 1
            assert not np.array_equal(np.asarray(shared[1]), np.asarray(rows[1]))


def _pil(images):
    from minip2p.pipeline import to_pil
    return np.asarray(to_pil(images)[0]).astype(int)


CASES = {
    "p2p": (["a big red square", "a big blue square"], {}),
    "masactrl": (["a big red square", "a big red circle"], {}),
    "pnp": (["", "a big blue square"], dict(image="picture")),
    "sdedit": (["a big blue square"], dict(image="picture", strength=0.7)),
    "attend-excite": (["a red square and a blue circle"], dict(words=["square", "circle"])),
    "pix2pix-zero": (["a big red square", "a big blue square"], dict(xa_guidance=0.05)),
    "self-guidance": (["a big red square"], dict(move={"square": (0.8, 0.5)})),
    "p2p-null-text": (["a big red square", "a big blue square"],
                      dict(image="picture", inversion="null-text", inner_steps=2)),
    "p2p-negative-prompt": (["a big red square", "a big blue square"],
                            dict(image="picture", inversion="negative-prompt")),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_every_method_runs_with_two_controlnets(toy, case):
    """Two nets at once (one in guess mode, one in a window): every method runs, and the nets
    change its images."""
    from helpers import picture
    name = case.split("-null")[0].split("-negative")[0]
    prompts, kw = CASES[case]
    kw = {k: (picture() if v == "picture" else v) for k, v in kw.items()}
    controls = [Control(toy_net(toy, 1), hint_image(7), 0.7, guess=True),
                Control(toy_net(toy, 2), hint_image(8), 1.2, window=(0.0, 0.5))]
    with_nets = methods.run(toy, name, prompts, steps=3, seed=0, controls=controls, **kw)
    plain = methods.run(toy, name, prompts, steps=3, seed=0, **kw)
    assert len(with_nets.images) == len(plain.images)
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(with_nets.images, plain.images))


@pytest.mark.slow
def test_instruct_with_controlnets(ip2p_ckpt, sd_ckpt, nets):
    """InstructPix2Pix with a ControlNet of its 8-channel UNet and with one of the base model's
    (4 channels: it sees z_t alone)."""
    from diffusers import ControlNetModel
    from helpers import picture
    from minip2p.load import load_model
    model = load_model(ip2p_ckpt[1])
    torch.manual_seed(3)
    own = ControlNet.from_unet(model.unet)
    _jitter(own, 3)
    base = load_controlnet(nets[0][1], base=model)
    kw = dict(image=picture(), steps=2, height=32, width=32, seed=0)
    plain = np.asarray(methods.run(model, "instruct", ["make it blue"], **kw).images[0])
    for net in (own, base):
        r = methods.run(model, "instruct", ["make it blue"], controls=[Control(net, hint_image(
            9, 32))], **kw)
        assert not np.array_equal(np.asarray(r.images[0]), plain)
    assert ControlNetModel is not None


@pytest.fixture(scope="module")
def toy_files(toy, tmp_path_factory):
    """A toy ControlNet in the diffusers layout, a photo and a ready hint, on disk."""
    from helpers import picture
    folder = save_controlnet(toy_net(toy, 4), tmp_path_factory.mktemp("toycn"))
    photo = tmp_path_factory.mktemp("pics") / "photo.png"
    picture(80).save(photo)
    hint = photo.parent / "depth.png"
    hint_image(11).save(hint)
    return folder, photo, hint


def test_cli_generate_and_edit_with_controlnets(toy_files, tmp_path, capsys):
    from helpers import cli
    net, photo, hint = toy_files
    base = ["--steps", "1", "--quiet"]
    rc, _, err = cli(capsys, "generate", "a red circle", *base, "--out", tmp_path / "plain.png")
    assert rc == 0, err
    rc, _, err = cli(capsys, "generate", "a red circle", *base, "--controlnet", net, "--control",
                     f"canny:{photo}", "--control-scale", "1.5", "--out", tmp_path / "cn.png")
    assert rc == 0, err
    a, b = (np.asarray(Image.open(tmp_path / f)) for f in ("plain.png", "cn.png"))
    assert not np.array_equal(a, b)
    rc, _, err = cli(capsys, "edit", "a red circle", "a blue circle", *base, "--controlnet", net,
                     "--controlnet", net, "--control", f"canny:{photo}", "--control",
                     f"hint:{hint}", "--guess-mode", "--control-window", "0,0.5",
                     "--control-window", "0.5,1", "--out-dir", tmp_path / "edit")
    assert rc == 0, err and (tmp_path / "edit" / "1.png").is_file()


def test_cli_bad_control_input_is_one_line_and_writes_nothing(toy_files, sd_ckpt, tmp_path,
                                                               capsys):
    from helpers import one_line
    net, photo, hint = toy_files
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "net.pth").write_bytes(b"pickle")
    nets = tmp_path.parent                                     # any other folder: not a net
    cases = [
        (["--control", f"hint:{hint}"], "add --controlnet"),
        (["--controlnet", net], "0 --control for 1 --controlnet"),
        (["--controlnet", net, "--control", f"hint:{hint}", "--control", f"canny:{photo}"],
         "more hints than nets"),
        (["--controlnet", net, "--control", f"hint:{tmp_path / 'notes.png'}"], "not an image"),
        (["--controlnet", net, "--control", f"edges:{photo}"], "canny:PHOTO or hint:IMAGE"),
        (["--controlnet", net, "--control", f"hint:{hint}", "--control-scale", "inf"], "finite"),
        (["--controlnet", net, "--control", f"hint:{hint}", "--control-window", "0.6,0.2"],
         "START < END"),
        (["--controlnet", tmp_path / "net.pth", "--control", f"hint:{hint}"], "pickle"),
        (["--controlnet", nets, "--control", f"hint:{hint}"], "config"),
        (["--model", sd_ckpt[1], "--controlnet", net, "--control", f"hint:{hint}"],
         "another base model"),
    ]
    for extra, needle in cases:
        one_line(capsys, ["generate", "a red circle", "--steps", "2", "--quiet", "--out",
                          tmp_path / "out.png", *extra], needle)
        assert not (tmp_path / "out.png").exists()
    one_line(capsys, ["explore", "--port", "0", "--controlnet", tmp_path / "net.pth"], "pickle")


def test_explorer_hint_upload(toy, tmp_path):
    """The explorer with a ControlNet: the page is told so, a run with a hint picture shows the
    canny hint the net saw; a hint without a net, or not a picture, is a one-line 400."""
    import base64
    import io
    import json
    import threading

    from explore_client import PNG, data_url, request, submit, wait
    from minip2p.explore.server import make_server
    srv, ex = make_server(toy, "127.0.0.1", 0, tmp_path / "out", controlnets=[toy_net(toy, 4)])
    plain_srv, plain_ex = make_server(toy, "127.0.0.1", 0, tmp_path / "out2")
    for s in (srv, plain_srv):
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        server, plain = srv.server_address[:2], plain_srv.server_address[:2]
        assert request(server, "GET", "/api/methods")[1]["controlnets"] == 1
        body = dict(method="p2p", prompt="a big red circle", edits=["a big blue circle"], steps=1)
        status, job, _ = submit(server, **body, hint=PNG, hint_kind="canny", control_scale=1.5)
        assert status == 202, job
        result = wait(server, job["id"])["result"]
        assert len(result["inputs"]) == 1 and len(result["images"]) == 2   # the canny preview
        edges = np.asarray(Image.open(ex.file(result["inputs"][0][len("/out/"):])))
        assert set(np.unique(edges)) <= {0, 255} and edges.max() == 255
        status, answer, _ = request(server, "POST", "/api/hint", json.dumps(dict(
            hint=PNG, hint_kind="canny")).encode(), {"Content-Type": "application/json"})
        assert status == 200 and answer["hint"].startswith("data:image/png;base64,")
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["hint"].split(",")[1]))))
        assert np.array_equal(shown, edges)                   # the preview is what the nets saw
        for srv_, extra, needle in ((plain, dict(hint=PNG), "no ControlNet"),
                                    (server, dict(hint=data_url(b"GIF89a")), "hint: image"),
                                    (server, dict(hint=PNG, hint_kind="depth"), "canny")):
            status, answer, _ = submit(srv_, **body, **extra)
            assert status == 400 and needle in answer["error"], answer
    finally:
        for s, e in ((srv, ex), (plain_srv, plain_ex)):
            s.shutdown()
            s.server_close()
            e.close()


def test_hub_id_through_the_cache_offline(toy, toy_files, tmp_path, monkeypatch):
    """A Hub id resolves in huggingface_hub's cache (refs/main -> snapshots/<commit>) with no
    network; offline and not cached: one line naming the fetch command."""
    import shutil

    import huggingface_hub.constants
    folder = toy_files[0]
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--toy-canny"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    net = load_controlnet("someone/toy-canny", base=toy)
    same = load_controlnet(folder, base=toy)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(),
                                                 same.state_dict().values()))
    with pytest.raises(MinipError, match="hf download someone/other config.json"):
        load_controlnet("someone/other")
