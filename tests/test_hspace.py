"""h-space (methods/hspace.py, hspace_directions.py, asyrp.py): differential tests against
independent re-implementations of the official codes on diffusers' UNet
(tests/oracles/hspace_oracle.py: Asyrp's denoising_step, semantic-diffusion's h injection and
PCA, Diffusion-Pullback's subspace iteration and x-space guidance), on the random checkpoint with
SD 1.x's exact block structure; then the method, the file and the refusals on the toy model.
"""
import pytest
import torch

from helpers import one_line
from oracles import hspace_oracle as O
from oracles.pnp_oracle import text_embeds
from minip2p import MinipError, methods
from minip2p.fast import switched
from minip2p.methods import asyrp, hspace_directions as hd
from minip2p.methods.hspace import HShift, sample
from minip2p.pipeline import encode_text, initial_noise

pytestmark = pytest.mark.usefixtures("one_thread")
PROMPT, TOL = "a photo of a red circle", 1e-4


def _noise(seed, shape=(1, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("t_edit, t_boost, asym", [(0, 0, True), (500, 300, True),
                                                   (0, 0, False)])
def test_asymmetric_process_matches_asyrp(sd_ckpt, sd_model, t_edit, t_boost, asym):
    """Every step z_{t−1} = √ᾱ_{t−1}·P_t(ε̃) + √(1−ᾱ_{t−1})·ε (t ≥ t_edit), DDIM between, η = 1 with
    the same noises below t_boost: the final latents equal the oracle's (and Haas et al.'s
    symmetric form, ε̃ in both terms)."""
    pipe, model, steps = sd_ckpt[0], sd_model, 6
    delta = 0.5 * _noise(7, (steps, *model.unet.cfg.block_out_channels[-1:], 1, 1))
    z = initial_noise(model, 3, 64, 64)
    shift = HShift(lambda h, step: delta[step], [1.0], asymmetric=asym)
    ours = sample(model, encode_text(model, [PROMPT]), encode_text(model, [""]), z, steps, 7.5,
                  shift, t_edit, t_boost, seed=5)
    with torch.no_grad():
        c, u = text_embeds(pipe, [PROMPT]), text_embeds(pipe, [""])
    ref, _ = O.asyrp_loop(pipe, z.clone(), c, u, steps, 7.5, delta, t_edit, t_boost,
                          torch.Generator().manual_seed(6), asym)
    plain, _ = O.asyrp_loop(pipe, z.clone(), c, u, steps, 7.5)
    d = (ours - ref).abs().max().item()
    print(f"\nasyrp t_edit {t_edit} t_boost {t_boost} asymmetric {asym}: max|Δ| {d:.1e} (the "
          f"edit moves z_0 by "
          f"{(ref - plain).abs().max():.2f})")
    assert d <= TOL * max(1, ref.abs().max().item())
    assert (ref - plain).abs().max() > 0.05                           # the edit did something


def test_pca_directions_match_semantic_diffusion(sd_ckpt, sd_model):
    """h of the ∅ call over N samples, PCA per step through the kernel matrix, signs fixed:
    Δh = s/√(N−1)·U and the scaled singular values equal the oracle's."""
    pipe, model, steps, N, k = sd_ckpt[0], sd_model, 4, 6, 3
    d = hd.make_pca(model, PROMPT, N, k, steps, chunk=4, progress=False)
    with torch.no_grad():
        c, u = text_embeds(pipe, [PROMPT]), text_embeds(pipe, [""])
        hhs = torch.stack([O.asyrp_loop(pipe, initial_noise(model, s, 64, 64), c, u, steps,
                                        7.5)[1] for s in range(N)])
    PCs, ss = O.pca_indv(hhs, k)
    dv = (d.vectors - PCs).abs().max().item() / PCs.abs().max().item()
    ds = (d.values - ss.float()).abs().max().item() / ss.abs().max().item()
    print(f"\npca: relative max|Δ| directions {dv:.1e}, singular values {ds:.1e}")
    assert d.vectors.shape == (k, steps, *hhs.shape[2:]) and d.timesteps == [751, 501, 251, 1]
    assert dv <= TOL and ds <= TOL


@pytest.mark.slow
def test_pullback_matches_diffusion_pullback(sd_ckpt, sd_model):
    """Subspace iteration for the top right singular vectors of ∂h/∂z_t (same initial V, same
    number of iterations): v_k (sign-fixed) and σ_k as the oracle's; then the x-space guidance
    z ← z + (ε(z + v) − ε(z)) gives the same Δz."""
    from diffusers.models.attention_processor import AttnProcessor
    pipe, model, t, rank, iters = sd_ckpt[0], sd_model, 601, 2, 4
    z = _noise(11)
    cond = encode_text(model, [PROMPT])
    with switched(model, False):
        u, s, v = hd.pullback(lambda x: model.unet.encode(x, t, cond)[0], z, rank, iters,
                              min_iter=iters, tol=0.0, seed=4)
    before = pipe.unet.attn_processors
    pipe.unet.set_attn_processor(AttnProcessor())                      # forward-mode AD
    try:
        with torch.no_grad():
            ctx = text_embeds(pipe, [PROMPT])
        u_ref, s_ref, v_ref = O.pullback(pipe.unet, z, t, ctx, rank, iters,
                                         torch.Generator().manual_seed(4))
    finally:
        pipe.unet.set_attn_processor(before)
    sign = torch.sign((v * v_ref).flatten(1).sum(1))[:, None, None, None]
    dv, ds = (v * sign - v_ref).abs().max().item(), (s - s_ref).abs().max().item()
    with torch.no_grad():
        dz = asyrp.guided(model, z, t, cond, v_ref[:1] * 2, 3)
        dz_ref = O.x_space_guidance(pipe.unet, z, t, ctx, v_ref[:1] * 2, 3)
    dd = (dz - dz_ref).abs().max().item()
    print(f"\npullback: max|Δ| v {dv:.1e}, σ {ds:.1e} (σ = {s_ref.tolist()}), Δz {dd:.1e}")
    assert dv <= 1e-3 and ds <= 1e-3 * s_ref.max().item() and dd <= TOL
    assert (dz - z).abs().max() > 1e-3


@pytest.fixture(scope="module")
def pca_file(toy, tmp_path_factory):
    path = tmp_path_factory.mktemp("hs") / "pca.safetensors"
    hd.save(hd.make_pca(toy, "a red circle", 4, 2, steps=3, progress=False), path)
    return path


def test_asyrp_method_and_file(toy, pca_file):
    d = hd.load(pca_file)
    assert d.kind == "pca" and d.vectors.shape[:2] == (2, 3) and d.meta["samples"] == "4"
    r = methods.run(toy, "asyrp", ["a red circle"], direction=f"{pca_file}:1", strength=3.0,
                    t_edit=0, steps=3)
    assert len(r.images) == 2 and r.images[0].tobytes() != r.images[1].tobytes()
    r0 = methods.run(toy, "asyrp", ["a red circle"], direction=str(pca_file), strength=0.0,
                     t_boost=0, steps=3)
    assert r0.images[0].tobytes() == r0.images[1].tobytes()           # Δh = 0: no edit
    from helpers import picture
    r = methods.run(toy, "asyrp", ["a red circle"], direction=f"{pca_file}:0", strength=3.0,
                    t_edit=0, steps=3, image=picture())                   # DDIM-inverted first
    assert len(r.images) == 2 and len(r.inputs) == 1


def test_refusals(toy, pca_file, tmp_path, capsys):
    bad = tmp_path / "x.pth"
    bad.write_bytes(b"0")
    for kw, needle in [(dict(direction=""), "is needed"), (dict(direction=str(bad)), ".safetensors"),
                       (dict(direction=f"{pca_file}:7"), "holds 2 directions"),
                       (dict(direction=str(pca_file), t_edit=-1), "t_edit"),
                       (dict(direction=str(pca_file), strength=float("nan")), "strength")]:
        with pytest.raises(MinipError, match=needle):
            methods.prepare("asyrp", ["a red circle"], **kw)
    with pytest.raises(MinipError, match="one prompt"):
        methods.prepare("asyrp", ["a", "b"], direction=str(pca_file))
    out = tmp_path / "d.safetensors"
    one_line(capsys, ["hspace", "a red circle", "--directions", "prompts", "--out", out],
             "needs --target")
    one_line(capsys, ["hspace", "a red circle", "--target", "x", "--out", out], "leave it out")
    one_line(capsys, ["hspace", "a red circle", "--samples", "4", "--out", out], "--components")
    one_line(capsys, ["hspace", "a red circle", "--out", tmp_path / "d.png"], ".safetensors")
    one_line(capsys, ["hspace", "a red circle", "--directions", "train", "--target", "x",
                      "--out", out], "needs --clip")
    one_line(capsys, ["hspace", "a red circle", "--clip", "c", "--out", out], "leave it out")
    one_line(capsys, ["edit", "a red circle", "--direction", str(pca_file)], "another method")
    one_line(capsys, ["edit", "a red circle", "--method", "asyrp", "--direction",
                      f"{pca_file}:5", "--out-dir", tmp_path / "e"], "--direction")
    assert not out.exists()


def test_directional_loss_matches_the_official_formula(clip_ckpt):
    """L_dir = 1 − cos(normalize(Ê_I(x₁) − Ê_I(x₀)), normalize(mean_templates(Ê_T(trg) − Ê_T(src))))
    with Ê the normalised features: ours against transformers' CLIPModel on the same pictures."""
    import torch.nn.functional as F

    from minip2p.data.clip_image import load_clip
    from minip2p.methods import asyrp_train as at
    ref, folder = clip_ckpt
    clip = load_clip(folder)
    x0, x1 = (torch.rand(2, 3, 40, 48, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    dT, cos = at.text_direction(clip, "a red circle", "a blue circle")
    ours = at.directional_loss(clip, x0[None], x1[None], dT)
    with torch.no_grad():
        def image(x):                                 # CLIP's preprocessing, then the tower
            f = ref.get_image_features(pixel_values=clip.preprocess((x[None] + 1) / 2))
            f = getattr(f, "pooler_output", f)
            return f / f.norm(dim=-1, keepdim=True)

        def text(words):
            ids = clip.tokenizer([t.format(words) for t in at.TEMPLATES])
            f = ref.get_text_features(input_ids=ids)
            f = getattr(f, "pooler_output", f)
            return f / f.norm(dim=-1, keepdim=True)
        d_text = (text("a blue circle") - text("a red circle")).mean(0, keepdim=True)
        d_text = d_text / d_text.norm(dim=-1, keepdim=True)
        d_img = image(x1) - image(x0)
        expected = 1 - F.cosine_similarity(d_img / d_img.norm(dim=-1, keepdim=True), d_text)
    print(f"\nL_dir {ours.item():.6f} vs {expected.item():.6f}")
    assert (ours - expected).abs().max() <= 1e-5


@pytest.mark.slow
def test_trained_direction_runs_saves_and_edits(toy, clip_ckpt, tmp_path):
    """f_t (the official DeltaBlock's layers) learns a step per timestep t ≥ t_edit, saves to
    safetensors, loads strictly, and edits through the method."""
    from minip2p.data.clip_image import load_clip
    from minip2p.methods import asyrp_train as at
    from minip2p.pipeline import generate
    clip = load_clip(clip_ckpt[1])
    pictures = [generate(toy, ["a red circle"], seed=s, steps=3, progress=False) * 2 - 1
                for s in (0,)]
    before = at.new_block(toy.unet)
    f = at.train(toy, clip, pictures, "a red circle", "a blue circle", t_edit=300, steps=3,
                 epochs=1, progress=False)
    assert len(f.losses) == 2 and all(l == l for l in f.losses)            # t = 667, 334
    assert [n for n, _ in f.named_parameters()] == [n for n, _ in before.named_parameters()]
    path = at.save(f, tmp_path / "ft.safetensors", steps=3)
    g, meta = at.load(path)
    assert all(torch.equal(a, b) for a, b in zip(f.state_dict().values(),
                                                 g.state_dict().values()))
    r = methods.run(toy, "asyrp", ["a red circle"], direction=str(path), strength=50.0,
                    t_edit=300, steps=3)
    assert r.images[0].tobytes() != r.images[1].tobytes()
    other = hd.save(hd.Directions("pca", torch.zeros(1, 1, 2, 1, 1), [1]), tmp_path / "x.safetensors")
    with pytest.raises(MinipError, match="not a trained f_t"):
        at.load(other)
