"""The shipped toy ControlNet (weights/toy-controlnet): it loads strictly, and a generation follows
a Canny hint's outline (tools/eval_controlnet.py measures it over many cases); its trainer runs
and resumes (slow)."""
import json
import subprocess
import sys

import pytest
import torch

from minip2p.load import load_model
from minip2p.load.controlnet import load_controlnet
from tools.eval_controlnet import cases, generate, hint_pictures
from tools.toy_layout import ROOT
from tools.toydata import analyse, iou
from tools.train_controlnet import hints_of

WEIGHTS = ROOT / "weights" / "toy-controlnet"
# Case 3 of eval_controlnet.cases() ("a big yellow circle", the hint's circle low on the right),
# seed 0, 20 DDIM steps: IoU with the hint's shape 0.91 with the net and 0.27 without it when
# measured; the bounds leave a margin (tools/README.md has the figures over 48 cases).
CASE, FOLLOWS, ALONE = 3, 0.7, 0.5


def test_toy_controlnet_follows_the_hint():
    torch.set_num_threads(1)
    model = load_model()
    net = load_controlnet(WEIGHTS, base=model)
    assert (WEIGHTS / "diffusion_pytorch_model.safetensors").stat().st_size < 10e6
    prompt, attrs = cases()[CASE]
    picture = hint_pictures(attrs[None])
    hint = hints_of(picture)
    assert 0.005 < hint[:, 0].mean() < 0.1                     # an outline, not a filled shape
    want = analyse((picture[0] + 1) / 2)["mask"]
    with_ = generate(model, [prompt], [0], hint, net, steps=20)[0]
    alone = generate(model, [prompt], [0], steps=20)[0]
    a = analyse(with_)
    assert iou(a["mask"], want) >= FOLLOWS, iou(a["mask"], want)
    assert iou(analyse(alone)["mask"], want) <= ALONE           # the seed alone puts it elsewhere
    assert a["color"] == prompt.split()[-2]                    # the prompt sets the colour


@pytest.mark.slow
def test_train_controlnet_quick_and_resume(tmp_path):
    out = tmp_path / "cn"
    run = [sys.executable, "-m", "tools.train_controlnet", "--quick", "--out", str(out)]
    first = subprocess.run(run + ["--stop-after", "2"], cwd=ROOT, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    assert not out.exists() and (tmp_path / "cn.state" / "state.safetensors").is_file()
    second = subprocess.run(run, cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resumed at step 2" in second.stdout
    assert json.loads((out / "training.json").read_text())["steps_done"] == 3
    load_controlnet(out, base=load_model())
