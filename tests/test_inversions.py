"""Direct Inversion, EDICT and ReNoise (real/direct.py, edict.py, renoise.py) against
re-implementations of their official code on diffusers' UNet, on a tiny random SD model, at a
non-square size (64×96) where it matters; and generation at 64×96 against diffusers."""
import copy

import pytest
import torch
from PIL import Image, ImageDraw

from helpers import generate_vs_diffusers
from oracles import p2p_oracle as O
from minip2p.fast import switched
from minip2p.methods import p2p
from minip2p.load import load_model
from minip2p.pipeline import encode_text
from minip2p.real import edict, images, invert, renoise

pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: tiny models, one thread

SRC, TGT = "a painting of a squirrel eating a burger", "a painting of a lion eating a burger"
H, W = 64, 96


def drawn(h=H, w=W):
    im = Image.new("RGB", (w, h), (128, 128, 128))
    ImageDraw.Draw(im).ellipse([w / 2 - 14, 18, w / 2 + 14, 46], fill=(230, 26, 26))
    return im


def _alphas(pipe, steps):
    a_all, a_final = pipe.scheduler.alphas_cumprod, pipe.scheduler.final_alpha_cumprod
    return (lambda t: a_all[t] if t >= 0 else a_final), 1000 // steps


def _move(e, z, a_from, a_to):
    """DDIM from ᾱ_from to ᾱ_to with ε (the official next_step / prev_step)."""
    return a_to ** 0.5 * (z - (1 - a_from) ** 0.5 * e) / a_from ** 0.5 + (1 - a_to) ** 0.5 * e


def _encode(pipe, texts):
    ids = pipe.tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                         return_tensors="pt").input_ids
    return pipe.text_encoder(ids)[0]


class Untouched:
    """The official code's controller None: attention through its own (explicit) forward."""
    def __call__(self, probs, is_cross, place):
        return probs


@torch.no_grad()
def official_direct_p2p(pipe, z0, prompts, controller, steps, g):
    """cure-lab/PnPInversion as written: DirectInversion.ddim_loop (source prompt, no CFG),
    offset_calculate (batch [∅ × B, c × B] from z*_t, w = g), then
    direct_inversion_p2p_guidance_forward: scheduler.step, row 0 += offset, step_callback."""
    from diffusers import DDIMScheduler
    a, ratio = _alphas(pipe, steps)
    unet = lambda z, t, c: pipe.unet(z, t, encoder_hidden_states=c).sample       # noqa: E731
    B = len(prompts)
    context = torch.cat([_encode(pipe, [""] * B), _encode(pipe, prompts)])
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps]
    lat, z = [z0], z0
    for i in range(steps):                                                    # ddim_loop
        t = ts[steps - i - 1]
        z = _move(unet(z, t, context[B:B + 1]), z, a(min(t - ratio, 999)), a(t))
        lat.append(z)
    offsets, cur = [], torch.cat([lat[-1]] * B)
    with O.controlled(pipe.unet, Untouched()):        # register_attention_control(model, None)
        for i, t in enumerate(ts):                                            # offset_calculate
            eu, ec = unet(torch.cat([cur] * 2), t, context).chunk(2)
            rec = _move(eu + g * (ec - eu), cur, a(t), a(t - ratio))
            loss = torch.cat([lat[steps - i - 1]] * B) - rec
            offsets.append(loss)
            cur = rec + loss
    latents = lat[-1].expand(B, -1, -1, -1)
    with O.controlled(pipe.unet, controller):
        for i, t in enumerate(ts):
            eu, ec = unet(torch.cat([latents] * 2), t, context).chunk(2)
            latents = sched.step(eu + g * (ec - eu), t, latents).prev_sample
            latents = torch.cat([latents[:1] + offsets[i][:1], latents[1:]])
            latents = controller.step_callback(latents)
    return lat, latents


def test_direct_inversion_p2p_equals_the_official_code_at_64x96(sd_ckpt, sd_model):
    """On the reference path (explicit attention in the offsets and the edit alike, as the
    official code). The source row follows z*_t only as closely as the offsets' UNet call and
    the edit's agree, and a difference grows by the guided step's Jacobian at every step: on a
    random model at guidance 7.5 that turns float rounding (the official offsets use their own
    DDIM formula, the edit diffusers' step; the fast path rounds differently again) into 1e-3,
    so the comparison runs at guidance 3."""
    pipe, m, steps, g = sd_ckpt[0], sd_model, 6, 3.0
    x = images.to_tensor(images.fit(drawn(), H, W))
    with switched(m, False):
        inv = invert.invert(m, x, SRC, "direct", steps, g, progress=False)
    rc = O.resolution_constants(H // 8, W // 8)
    words = ["squirrel", "lion"]
    oracle = O.AttentionReplace(pipe.tokenizer, [SRC, TGT], steps, 0.8, 0.4,
                                local_blend=O.LocalBlend(pipe.tokenizer, [SRC, TGT], words, steps,
                                                         map_hw=rc["blend_map"], threshold=0.3),
                                store_max_pixels=rc["store_max_pixels"],
                                self_max_pixels=rc["self_max_pixels"])
    lat, z_ref = official_direct_p2p(pipe, images.encode(m, x), [SRC, TGT], oracle, steps, g)
    for ours, ref in zip(inv.latents, lat):
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    control, _ = p2p.build(m.tokenizer, [SRC, TGT], steps, "replace", 0.8, 0.4, blend=words,
                           blend_threshold=0.3, self_max_pixels=rc["self_max_pixels"])
    with switched(m, False):
        z = invert.run(m, inv, [SRC, TGT], control, progress=False, return_latents=True)
    assert (z - z_ref).abs().max() <= 1e-4
    assert (z[0] - inv.latents[0][0]).abs().max() <= 1e-4           # the source on z*_0
    assert (z[1] - z[0]).abs().max() > 1e-2                          # and the edit is not


def _model64(sd_ckpt):
    m = load_model(sd_ckpt[1])
    m.unet.double()
    return m


def community_edict(unet, config, z0, cond, empty, steps, g, p=0.93):
    """diffusers' community EDICTPipeline (prepare_latents, __call__) at strength 1, float64,
    leapfrog order by the loop's i % 2: -> (x_T, y_T), and the reconstruction's x_0."""
    from diffusers import DDIMScheduler
    sched = DDIMScheduler.from_config(config)
    sched.set_timesteps(steps)
    ts, ctx = sched.timesteps, torch.cat([empty, cond]).double()

    def ab(t):
        al = lambda s: sched.alphas_cumprod[int(s)] if int(s) >= 0 else sched.final_alpha_cumprod  # noqa: E731,E501
        a_t, a_p = al(t).double(), al(t - 1000 / steps).double()
        at = (a_p / a_t) ** 0.5
        return at, -at * (1 - a_t) ** 0.5 + (1 - a_p) ** 0.5

    def eps(z, t):
        eu, ec = unet(torch.cat([z] * 2), t, encoder_hidden_states=ctx).sample.chunk(2)
        return eu + g * (ec - eu)
    c = [z0.clone(), z0.clone()]
    for i, t in enumerate(ts.flip(0)):
        c[1] = (c[1] - (1 - p) * c[0]) / p
        c[0] = (c[0] - (1 - p) * c[1]) / p
        for j in range(2):
            k = j ^ 1
            if i % 2 == 0:
                k, j = j, k
            a, b = ab(t)
            c[k] = (c[k] - b * eps(c[j], t)) / a
    pair = [c[0].clone(), c[1].clone()]
    for i, t in enumerate(ts):
        for k in range(2):
            j = k ^ 1
            if i % 2 == 1:
                k, j = j, k
            a, b = ab(t)
            c[k] = a * c[k] + b * eps(c[j], t)
        c[0] = p * c[0] + (1 - p) * c[1]
        c[1] = p * c[1] + (1 - p) * c[0]
    return pair, c[0]


@torch.no_grad()
def test_edict_is_exact_in_float64_and_equals_the_community_pipeline(sd_ckpt):
    m = _model64(sd_ckpt)
    unet = copy.deepcopy(sd_ckpt[0].unet).double()
    z0 = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond, empty = encode_text(m, [SRC]).double(), encode_text(m, [""]).double()
    for steps in (4, 5):
        x_T, y_T = edict.invert(m, z0, cond, empty, steps, 3.0, progress=False)
        assert x_T.dtype == torch.float64 and (x_T - z0).abs().max() > 0.1
        rec = edict.generate(m, x_T, y_T, cond, empty, steps, 3.0, progress=False).double()
        assert (rec - z0).abs().max() <= 1e-4, steps                # EDICT's exactness claim
        (cx, cy), c_rec = community_edict(unet, sd_ckpt[0].scheduler.config, z0, cond, empty,
                                          steps, 3.0)
        if steps % 2 == 0:                                            # its leapfrog order: even N
            assert max((x_T - cx).abs().max(), (y_T - cy).abs().max()) <= 1e-6
            assert (c_rec - z0).abs().max() <= 1e-4
        else:                                                         # odd N: it is not exact
            assert (c_rec - z0).abs().max() > 100 * (rec - z0).abs().max()


def test_edict_p2p_keeps_the_source_and_edits(sd_ckpt, sd_model):
    m, steps = sd_model, 4
    x = images.to_tensor(images.fit(drawn(), H, W))
    inv = invert.invert(m, x, SRC, "edict", steps, 3.0, progress=False)
    assert inv.y_T is not None and inv.latents is None and inv.z_T.dtype == torch.float64
    control, _ = p2p.build(m.tokenizer, [SRC, TGT], steps, "replace", 0.8, 0.4)
    z = invert.run(m, inv, [SRC, TGT], control, progress=False, return_latents=True)
    z0 = images.encode(m, x)
    assert (z[0] - z0[0]).abs().max() <= 1e-3 < (z[1] - z0[0]).abs().max()


def official_renoise(pipe, z0, cond, steps, K, reg, seed):
    """garibida/ReNoise-Inversion `inversion_step` (+ `noise_regularization`) as written, on the
    diffusers UNet, no CFG, average_latent_estimations on, no noise correction (the SD example)."""
    import torch.nn.functional as F
    a, ratio = _alphas(pipe, steps)
    unet = lambda z, t: pipe.unet(z, t, encoder_hidden_states=cond).sample       # noqa: E731
    ts = [i * ratio + 1 for i in range(steps)]

    def inv_step(e, t, z):
        at, ap = a(t), a(t - ratio)
        return (at ** .5 * z) / ap ** .5 + (ap ** .5 * (1 - at) ** .5 * e) / ap ** .5 - \
            (at ** .5 * (1 - ap) ** .5 * e) / ap ** .5

    def kl(x0, x1):
        def patches(x):
            return x.unfold(1, 4, 4).unfold(2, 4, 4).unfold(3, 4, 4).contiguous() \
                .view(-1, 4, 4, 4).view(-1, 4, 16)
        p0, p1 = patches(x0), patches(x1)
        m0, m1, v0, v1 = p0.mean(-1), p1.mean(-1), p0.var(-1), p1.var(-1)
        return (torch.log((v1 + 1e-6) / (v0 + 1e-6)) + (v0 + (m0 - m1) ** 2) / (v1 + 1e-6)
                - 1).abs().sum(-1).sum()

    def ac(x, gen):
        loss = 0.0
        for c in range(x.shape[1]):
            n = x[0, c][None, None]
            while True:
                r = torch.randint(0, n.shape[2] // 2, (1,), generator=gen).item()
                loss = loss + (n * torch.roll(n, r, 2)).mean() ** 2 + \
                    (n * torch.roll(n, r, 3)).mean() ** 2
                if n.shape[2] <= 8:
                    break
                n = F.avg_pool2d(n, 2)
        return loss

    def regularise(e, e_opt, gen):
        for _ in range(4):
            v = e.detach().clone().requires_grad_(True)
            kl(v, e_opt).backward()
            e = e - 0.065 * torch.clip(v.grad.detach(), -100, 100)
            for _ in range(5):
                v = e.detach().clone().requires_grad_(True)
                ac(v, gen).backward()
                e = e - 20.0 * v.grad.detach() / 5
            e = e.detach()
        return e
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(z0.shape, generator=gen) if reg else None
    z, out = z0, []
    for t in ts:
        rng = (0, 5) if t < 250 else (8, 10)
        k_max = min(5, K) if t < 250 else K
        with torch.no_grad():
            e_opt = unet(pipe.scheduler.add_noise(z0, noise, torch.tensor([t])), t) if reg else None
        avg, zk, its = None, z.clone(), []
        for i in range(k_max + 1):
            with torch.no_grad():
                e = unet(zk, t)
                if rng[0] <= i < rng[1]:
                    j = i - rng[0]
                    avg = e.clone() if avg is None else j * avg / (j + 1) + e / (j + 1)
            if reg and i >= rng[0]:
                e = regularise(e, e_opt, gen)
            zk = inv_step(e, t, z).detach()
            its.append(zk)
        if avg is not None:
            zk = inv_step(regularise(avg, e_opt, gen) if reg else avg, t, z).detach()
        out.append((its, zk))
        z = zk
    return out


@pytest.mark.parametrize("reg", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_renoise_iterates_equal_the_official_step(sd_ckpt, sd_model, reg):
    pipe, m, steps, K = sd_ckpt[0], sd_model, 3, 9                  # t = 1, 334, 667
    z0 = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(1))
    cond = encode_text(m, [SRC])
    trace = []
    latents = renoise.invert(m, z0, cond, steps, K, reg, seed=3, progress=False, trace=trace)
    ref = official_renoise(pipe, z0, cond, steps, K, reg, seed=3)
    assert [len(its) for its, _ in trace] == [6, 10, 10]
    for (its, z), (ref_its, ref_z) in zip(trace, ref):
        for a_, b_ in zip(its, ref_its):
            torch.testing.assert_close(a_, b_, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(z, ref_z, atol=1e-4, rtol=1e-4)
    assert torch.equal(latents[-1], trace[-1][1])


def test_generation_at_64x96_equals_diffusers(sd_ckpt, sd_model):
    dz, di = generate_vs_diffusers(sd_ckpt[0], sd_model, [SRC, TGT], 0, 4, H, W)
    assert dz < 1e-4 and di < 1e-4


@pytest.mark.slow
def test_commands_files_and_refusals(tmp_path, capsys, sd_ckpt):
    """--inversion-method on invert (alias of --method), reconstruct and edit; the file keeps
    Direct Inversion's offsets and EDICT's float64 pair; what does not apply is one line."""
    from helpers import cli
    model = ["--model", str(sd_ckpt[1]), "--quiet", "--steps", "2", "--height", "64",
             "--width", "96"]
    img = tmp_path / "i.png"
    drawn().save(img)
    for method in ("direct", "edict", "renoise"):
        inv = tmp_path / f"{method}.safetensors"
        assert cli(capsys, "invert", img, SRC, "--inversion-method", method, "--out", inv,
                   *model)[0] == 0
        got = invert.load(inv)
        assert got.method == method and (got.width, got.height) == (W, H)
        assert (got.offsets is not None) == (method == "direct")
        assert (got.y_T is not None) == (method == "edict")
        if method == "edict":
            assert got.z_T.dtype == got.y_T.dtype == torch.float64
        rc, out, _ = cli(capsys, "reconstruct", "--inversion", inv, "--out", tmp_path / "r.png",
                         *model)
        assert rc == 0 and method in out
        assert cli(capsys, "edit", "--inversion", inv, TGT, "--out-dir", tmp_path / method,
                   *model)[0] == 0
    rc, out, _ = cli(capsys, "reconstruct", img, SRC, "--method", "renoise", "--renoise-steps",
                     "2", "--regularise", "--out", tmp_path / "r2.png", *model)
    assert rc == 0 and "PSNR" in out
    assert cli(capsys, "edit", SRC, TGT, "--image", img, "--inversion-method", "direct",
               "--method", "masactrl", "--out-dir", tmp_path / "m", *model)[0] == 0
    for argv, why in ((["invert", img, SRC, "--renoise-steps", "2"], "add --inversion-method "
                       "renoise"),
                      (["invert", img, SRC, "--inversion-method", "edict", "--regularise"],
                       "EDICT's is exact"),
                      (["invert", img, SRC, "--inversion-method", "renoise", "--regularise",
                        "--lambda-kl", "3"], "ReNoise's has its own constants"),
                      (["edit", SRC, TGT, "--image", img, "--renoise-steps", "3"],
                       "--renoise-steps sets ReNoise's iterations"),
                      (["edit", SRC, TGT, "--image", img, "--method", "pix2pix-zero",
                        "--inversion-method", "edict"], "--inversion-method edict")):
        rc, _, err = cli(capsys, *argv, "--out", tmp_path / "bad.safetensors", *model) \
            if argv[0] == "invert" else cli(capsys, *argv, "--out-dir", tmp_path / "bad", *model)
        assert rc == 2 and why in err and err.count("\n") == 1, err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.safetensors").exists()


def test_toy_methods_at_64x96(toy):
    """The methods whose maps, masks or energies need a map's shape, at a non-square size on
    the toy model (4× VAE: latents 16×24), from noise and from a Direct Inversion."""
    from minip2p import methods
    from minip2p.errors import MinipError
    im = drawn()
    kw = dict(steps=4, height=H, width=W)
    runs = [("p2p", ["a red circle", "a blue circle"],
             dict(image=im, inversion="direct", blend=["circle", "circle"], maps=True)),
            ("masactrl", ["a red circle", "a big red circle"],
             dict(image=im, inversion="edict", mask_words=["circle", "circle"])),
            ("attend-excite", ["a red circle and a blue square"], dict(words=["circle", "square"])),
            ("self-guidance", ["a red circle"], dict(move={"circle": (0.3, 0.5)}))]
    for name, prompts, extra in runs:
        r = methods.run(toy, name, prompts, **kw, **extra)
        assert all(i.size == (W, H) for i in r.images), name
    with pytest.raises(MinipError, match="height must be a positive multiple of 4, got 62"):
        methods.run(toy, "p2p", ["a red circle", "a blue circle"], steps=2, height=62, width=W)
