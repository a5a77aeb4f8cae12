"""Gradients through attention (methods/gradient.py) and the CLI of the guidance methods:
`generate --excite`, `guide`, `edit --method pix2pix-zero`, end to end on the toy model, and
each bad input one line, exit 2, nothing written."""
import pytest
import torch

from minip2p.cli import main
from minip2p.loading import load_model
from minip2p.methods import self_guidance as sg
from minip2p.methods.gradient import MapRecorder, cond_rows, forward_with_grad
from minip2p.pipeline import encode_text, initial_noise


@pytest.fixture(scope="module")
def toy():
    return load_model(None)


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
    A[2:4, 6:8] = 1.0
    c = sg.centroid(A)
    assert torch.allclose(c, torch.tensor([7 / 8, 3 / 8]))
    assert sg.size(A).item() == pytest.approx(4 / 64)
    assert sg.shape(A)[2, 6] > 0.99 and sg.shape(A)[0, 0] < 0.01


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
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["0.png", "1.png", "strip.png"]
    assert sorted(p.name for p in (tmp_path / "pz").iterdir()) == ["0.png", "1.png", "strip.png"]


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
