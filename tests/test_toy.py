"""The toy model: its data and analyser, its training recipe (a few steps), and the shipped files."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import numpy as np
import torch

from tools import toydata
from minip2p.load import DEFAULT_MODEL, load_model
from minip2p.pipeline import generate
from minip2p.model.tokenizer import ClipTokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def captions():
    return toydata.Captions(ClipTokenizer.from_dir(ROOT / "weights" / "clip-tokenizer"))


def test_grammar_accepts_the_required_forms(captions):
    texts = set(captions.texts)
    for t in ["a red circle", "a small blue square", "a big green triangle on the left",
              "a yellow circle at the top on a black background", "a white square in the middle",
              "a purple circle on a orange background", "a red circle and a blue square",
              "a black triangle on the right", "a big orange square at the bottom"]:
        assert t in texts, t
    assert captions.ids.shape == (len(texts), 77)


def test_sampling_is_seeded_and_never_draws_held_out_pairs(captions):
    a = captions.sample(512, torch.Generator().manual_seed(3))
    b = captions.sample(512, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert captions.train[a].all() and not toydata.held_out(captions.attrs[a]).any()
    assert (~captions.train).sum() > 0                       # some captions are held out


def test_analyser_reads_drawn_pictures(captions):
    gen = torch.Generator().manual_seed(0)
    single = torch.nonzero(captions.attrs[:, 5] < 0)[:, 0]
    idx = single[torch.randperm(len(single), generator=gen)[:64]]
    images = (toydata.draw(captions.attrs[idx], gen) + 1) / 2
    assert images.shape == (64, 3, 64, 64)
    for i, im in zip(idx, images):
        c, s = captions.attrs[i, :2].tolist()
        a = toydata.analyse(im)
        assert (a["color"], a["shape"]) == (toydata.COLOR_NAMES[c], toydata.SHAPES[s]), \
            captions.texts[i]


def test_analyser_reads_blurred_pictures_and_pins_the_prototypes(captions):
    """Rounded corners (a binomial blur, σ ≈ 1 px, as a decoder draws edges) keep their shape."""
    gen = torch.Generator().manual_seed(1)
    single = torch.nonzero(captions.attrs[:, 5] < 0)[:, 0]
    idx = single[torch.randperm(len(single), generator=gen)[:96]]
    images = (toydata.draw(captions.attrs[idx], gen) + 1) / 2
    k = torch.tensor([1.0, 4, 6, 4, 1])
    k = (k[:, None] * k[None]) / 256
    blurred = torch.nn.functional.conv2d(
        torch.nn.functional.pad(images, (2, 2, 2, 2), mode="replicate"), k.expand(3, 1, 5, 5), groups=3)
    for i, im in zip(idx, blurred):
        c, s = captions.attrs[i, :2].tolist()
        a = toydata.analyse(im)
        assert (a["color"], a["shape"]) == (toydata.COLOR_NAMES[c], toydata.SHAPES[s]), \
            captions.texts[i]
    # a big drawn shape's features lie near its prototype
    for s, shape in enumerate(toydata.SHAPES):
        attrs = torch.tensor([[0, s, 2, 5, -1, -1, -1]])
        a = toydata.analyse((toydata.draw(attrs, gen) + 1)[0] / 2)
        assert np.allclose(a["features"], toydata.PROTOTYPES[shape], atol=0.06), (shape, a["features"])
    assert toydata.classify_shape((0.8, 0.0, 1.05)) == "circle"          # a blob is a circle


@pytest.mark.slow
def test_training_recipe_runs_and_its_output_loads(tmp_path):
    out = tmp_path / "toy"
    subprocess.run([sys.executable, "-m", "tools.train_toy", "--quick", "--out", str(out),
                    "--threads", "1"], check=True, capture_output=True, timeout=300, cwd=ROOT)
    for rel in ["model_index.json", "scheduler/scheduler_config.json", "tokenizer/vocab.json",
                "tokenizer/merges.txt", "unet/config.json", "vae/config.json",
                "text_encoder/config.json", "unet/diffusion_pytorch_model.safetensors",
                "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]:
        assert (out / rel).is_file(), rel
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp folder left
    model = load_model(out)
    image = generate(model, ["a red circle"], steps=2, progress=False)
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


@pytest.mark.skipif(not (DEFAULT_MODEL / "model_index.json").is_file(),
                    reason="weights/toy is absent: train it with python -m tools.train_toy")
def test_shipped_model_loads_and_draws_what_it_is_told():
    size = sum(p.stat().st_size for p in DEFAULT_MODEL.rglob("*") if p.is_file()
               and "figures" not in p.parts)
    assert size <= 25 * 2 ** 20
    assert json.loads((DEFAULT_MODEL / "scheduler" / "scheduler_config.json").read_text())[
        "beta_schedule"] == "scaled_linear"
    model = load_model()                                       # the default model
    image = generate(model, ["a big red circle"], seed=0, steps=20, progress=False)
    assert image.shape == (1, 3, 64, 64)
    a = toydata.analyse(image[0])
    assert a["area"] > 50 and a["color"] == "red"
