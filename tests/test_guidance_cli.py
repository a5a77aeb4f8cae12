"""Gradients through attention (methods/gradient.py) and the CLI of the guidance methods:
`generate --excite`, `guide`, `edit --method pix2pix-zero`, end to end on the toy model, and
each bad input one line, exit 2, nothing written."""
import pytest
import torch

from minip2p.cli import main
from minip2p.methods import self_guidance as sg
from minip2p.methods.gradient import MapRecorder, cond_rows, forward_with_grad
from minip2p.pipeline import encode_text, generate, initial_noise


def test_maps_stay_in_the_graph_and_the_forward_stops_early(toy):
    z = initial_noise(toy, 0, 64, 64)
    cond = encode_text(toy, ["a red circle"])
    t = toy.scheduler.timesteps(10)[0]
    rec = MapRecorder(lambda s: s.kind == "cross" and s.pixels <= 8 ** 2)
    leaf, eps = forward_with_grad(toy, z, t, cond, rec, cond_rows(1))
    assert eps is not None and all(M.requires_grad for _, M in rec.maps)
    last = max(s.index for s, _ in rec.maps)
    (g,) = torch.autograd.grad(sum(M[..., 3].sum() for _, M in rec.maps), [leaf])
    assert g.abs().sum() > 0
    stopped = MapRecorder(rec.pick, stop_after=last)
    leaf2, eps2 = forward_with_grad(toy, z, t, cond, stopped, cond_rows(1))
    assert eps2 is None and len(stopped.maps) == len(rec.maps)
    (g2,) = torch.autograd.grad(sum(M[..., 3].sum() for _, M in stopped.maps), [leaf2])
    assert (g - g2).abs().max() < 1e-6                   # the same gradient, less of the UNet


def test_self_guidance_quantities():
    A = torch.zeros(8, 8)
    A[2:4, 6:8] = 1.0                   # a normalised map: the word on 4 cells, 0 elsewhere
    S = sg.shape(A)
    assert S[2, 6] > 0.99 and S[0, 0] < 0.01
    # the soft threshold leaves 60 cells at σ(−5) ≈ 0.0067: centroid and size within that
    assert torch.allclose(sg.centroid(A), torch.tensor([7 / 8, 3 / 8]), atol=0.04)
    assert sg.size(A).item() == pytest.approx(4 / 64, abs=0.01)
    # T: moving the centroid by 4 cells moves the block by exactly 4 cells
    moved = sg.transform(A, torch.tensor([7 / 8, 3 / 8]), torch.tensor([3 / 8, 3 / 8]), 1.0)
    want = torch.zeros(8, 8)
    want[2:4, 2:4] = 1.0
    assert (moved - want).abs().max() < 1e-5
    # scaling by √2 about the centre doubles the area (bilinear edges: within 15 %)
    B = torch.zeros(16, 16)
    B[6:10, 6:10] = 1.0
    c = torch.tensor([0.5, 0.5])
    assert sg.transform(B, c, c, 2 ** 0.5).sum().item() == pytest.approx(2 * 16, rel=0.15)


def test_the_step_vanishes_at_the_energy_minimum_and_is_capped_at_v(toy):
    """Polyak step d = E·∇E/‖∇E‖², rms(d) ≤ v: resizing by 1 from the unguided latents (E ≈ 0)
    leaves z_t (a step of fixed size v would move it by v, and grew objects ×1.3); a move far
    from the object is capped at exactly v, a resize late in the schedule at v·σ_t; the default
    gradient steps: 2 a step for moves, the same number over the schedule at 20 and 50 steps
    for resizes."""
    prompt, tokens = "a red circle", {"circle": [3]}
    obs = sg.Observe(toy.unet, tokens, True)
    generate(toy, [prompt], seed=0, steps=4, control=obs, progress=False)
    cond, z = encode_text(toy, [prompt]), initial_noise(toy, 0, 64, 64)
    rms = lambda d: d.pow(2).mean().sqrt().item()                       # noqa: E731
    same = sg.SelfGuidance(toy, cond, tokens, 4, obs, resizes={"circle": 1.0},
                           keep_appearance=True)
    assert rms(same.before_step(z, 0) - z) < 1e-3 * same.weight
    far = sg.SelfGuidance(toy, cond, tokens, 4, obs, moves={"circle": (0.95, 0.05)},
                          iterations=1, weight=0.02, guide_steps=1.0, keep_background=False)
    assert rms(far.before_step(z, 2) - z) == pytest.approx(0.02, rel=1e-4)
    # in a resize's window the cap decays as σ_t = √(1 − ᾱ_t): small steps where z_t is nearly
    # the picture
    grow = sg.SelfGuidance(toy, cond, tokens, 4, obs, resizes={"circle": 3.0}, iterations=1,
                           weight=0.001, keep_background=False)
    sigma = (1 - toy.scheduler.alphas_cumprod[grow.timesteps[3]]).sqrt().item()
    assert sigma < 0.5 and rms(grow.before_step(z, 3) - z) == pytest.approx(0.001 * sigma, rel=1e-4)
    move = sg.SelfGuidance(toy, cond, tokens, 4, obs, moves={"circle": (0.9, 0.5)})
    assert [move.iterations_at(i) for i in range(2)] == [2, 2]
    # resizes: the same number of gradient steps over the schedule at 20 and at 50 steps
    for n, per_step in ((20, {6}), (50, {2, 3})):
        size = sg.SelfGuidance(toy, cond, tokens, n, obs, resizes={"circle": 0.5})
        its = [size.iterations_at(i) for i in range(n)]
        assert sum(its) == sg.RESIZE_GRADIENT_STEPS and set(its) == per_step


def test_moves_and_resizes_have_their_own_windows(toy):
    """Moves are guided in the first guide_steps, resizes in the first resize_steps: after the
    move's window only the size terms remain in E."""
    tokens, obs = {"circle": [3]}, None
    cond = encode_text(toy, ["a red circle"])
    kw = dict(keep_appearance=False, guide_steps=0.3, resize_steps=0.8)
    move = sg.SelfGuidance(toy, cond, tokens, 10, obs, moves={"circle": (0.8, 0.5)}, **kw)
    both = sg.SelfGuidance(toy, cond, tokens, 10, obs, moves={"circle": (0.8, 0.5)},
                           resizes={"circle": 1.5}, **kw)
    assert [i for i in range(10) if move.active(i)] == [0, 1, 2]
    assert [i for i in range(10) if both.active(i)] == list(range(8))
    A = torch.zeros(8, 8)
    A[2:4, 1:3] = 1.0
    ref = {"circle": dict(shape=sg.shape(A), size=sg.size(A), centroid=sg.centroid(A))}
    size_only = sg.SelfGuidance(toy, cond, tokens, 10, obs, resizes={"circle": 1.5}, **kw)
    E = lambda g, i: float(g.energy({"circle": A}, None, ref, i))         # noqa: E731
    assert E(both, 2) > E(both, 3) > 0 and E(both, 3) == pytest.approx(E(size_only, 3))
    assert E(both, 8) == 0.0


def test_heal_redoes_the_last_steps_with_the_guided_runs_steps():
    """The healing pass starts part-way (its steps count from 0): step i is the schedule's
    start + i for the gradient steps and the blend."""
    calls = []

    class Guided:
        def before_step(self, z, step):
            calls.append(("guide", step))
            return z

        def after_step(self, z, step):
            calls.append(("blend", step))
            return z

    heal = sg.Heal(Guided(), 16)
    heal.before_step(None, 0)
    heal.after_step(None, 3)
    assert calls == [("guide", 16), ("blend", 19)]



def test_a_resize_heals_by_default_and_not_when_off(toy):
    from minip2p import methods
    kw = dict(resize={"circle": 1.5}, steps=5, guide_iterations=1, progress=False)
    healed = methods.run(toy, "self-guidance", ["a red circle"], **kw).images
    plain = methods.run(toy, "self-guidance", ["a red circle"], heal=0.0, **kw).images
    a, b, c = (torch.tensor(list(im.getdata()), dtype=torch.float) for im in (*healed, plain[1]))
    assert torch.equal(a, torch.tensor(list(plain[0].getdata()), dtype=torch.float))
    assert (b - c).abs().mean() > 0.1           # the last step noised again and redone


def test_word_maps_are_normalised_per_layer():
    from minip2p.control import Site
    M = torch.rand(1, 2, 16, 77)
    sites = [(Site("up", 1, i, 0, "cross", 16), M * (i + 1) + i) for i in range(2)]
    A = sg.word_maps(sites, {"w": [3]})["w"]
    assert A.shape == (4, 4) and A.min().item() == pytest.approx(0.0, abs=1e-6)
    assert A.max().item() == pytest.approx(1.0, abs=1e-6)
    # a layer's scale and offset do not count: both layers normalise to the same map
    assert torch.allclose(A, sg.word_maps(sites[:1], {"w": [3]})["w"], atol=1e-6)


def run(tmp_path, *args):
    return main([*args, "--steps", "2", "--quiet", "--height", "32", "--width", "32"])


def test_cli_end_to_end(tmp_path, capsys):
    assert run(tmp_path, "generate", "a red circle and a blue square", "--excite", "circle",
               "square", "--out", str(tmp_path / "ae.png")) == 0
    assert run(tmp_path, "guide", "a red circle", "--move", "circle=0.8,0.5", "--resize",
               "circle=1.5", "--keep-appearance", "--out-dir", str(tmp_path / "g")) == 0
    assert run(tmp_path, "edit", "a red circle", "a blue circle", "--method", "pix2pix-zero",
               "--out-dir", str(tmp_path / "pz")) == 0
    assert (tmp_path / "ae.png").exists()
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == [".minip2p-run", "0.png", "1.png",
                                                                 "strip.png"]
    assert sorted(p.name for p in (tmp_path / "pz").iterdir()) == [".minip2p-run", "0.png",
                                                                  "1.png", "strip.png"]


BAD = [
    (["generate", "a red circle", "--excite", "dog"], "not in the prompt"),
    (["generate", "a red circle", "--excite-steps", "5"], "add --excite"),
    (["guide", "a red circle", "--move", "dog=0.2,0.5"], "not in the prompt"),
    (["guide", "a red circle", "--move", "circle=1.5,0.5"], "[0, 1]"),
    (["guide", "a red circle", "--move", "circle=0.5,-0.1"], "[0, 1]"),
    (["guide", "a red circle", "--move", "circle=0.5"], "expected WORD=X,Y"),
    (["guide", "a red circle", "--resize", "circle=0"], "> 0"),
    (["guide", "a red circle", "--resize", "circle=-2"], "> 0"),
    (["guide", "a red circle"], "needs an energy"),
    (["guide", "a red circle", "--resize", "circle=0.5", "--heal", "1"], "[0, 1)"),
    (["guide", "a red circle", "--move", "circle=0.8,0.5", "--guidance-weight", "-1"], "≥ 0"),
    (["guide", "a red circle", "--move", "circle=0.8,0.5", "--guide-iterations", "0"], "≥ 1"),
    (["guide", "a red circle", "--keep-appearance"], "needs an energy"),
    (["edit", "a red circle", "a blue circle", "--method", "pix2pix-zero",
      "--source-sentences", "EMPTY", "--target-sentences", "EMPTY"], "holds no sentence"),
    (["edit", "a red circle", "a blue circle", "--method", "pix2pix-zero",
      "--source-sentences", "MISSING", "--target-sentences", "EMPTY"], "cannot be read"),
    (["edit", "a red circle", "a blue circle", "--method", "pix2pix-zero",
      "--source-sentences", "EMPTY"], "together"),
    (["edit", "a red circle", "a blue circle", "--xa-guidance", "0.2"], "another method"),
    (["edit", "a red circle", "a blue circle", "--method", "masactrl",
      "--source-sentences", "EMPTY", "--target-sentences", "EMPTY"], "another method"),
    (["edit", "a red circle", "a blue circle", "--method", "pix2pix-zero", "--masa-step", "2"],
     "another method"),
    (["edit", "a red circle", "a blue circle", "--method", "pix2pix-zero", "--mode", "replace"],
     "another method"),
]


@pytest.mark.parametrize("args,says", BAD, ids=[" ".join(a[:1] + a[2:4]) for a, _ in BAD])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, args, says):
    (tmp_path / "empty.txt").write_text("\n  \n")
    args = [a.replace("EMPTY", str(tmp_path / "empty.txt"))
            .replace("MISSING", str(tmp_path / "missing.txt")) for a in args]
    out = tmp_path / "out"
    extra = ["--out", str(out / "x.png")] if args[0] == "generate" else ["--out-dir", str(out)]
    if args[0] == "generate":
        out.mkdir()
    rc = main(args + extra + ["--steps", "2", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and says in err and len(err.splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())
