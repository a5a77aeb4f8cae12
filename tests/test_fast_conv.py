"""Packed convolutions (fast/kernels.py `conv`, fast/__init__.py `FastConv2d`): oneDNN's layout
of a 3×3 weight, made once, is the layer's only copy; the layer computes what nn.Conv2d
computes, and whatever reads its weight gets the plain weight back bit for bit."""
import copy

import pytest
import torch
from torch import nn

from minip2p import fast as fastpath
from minip2p.fast import autotune
from minip2p.pipeline import generate

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="this PyTorch build has no oneDNN")


@pytest.fixture
def packed():
    old = autotune.set_tuner(autotune.forced(conv="packed"))
    yield
    autotune.set_tuner(old)


def _layer(cin=32, cout=48, stride=1, dtype=torch.float32):
    torch.manual_seed(0)
    plain = nn.Conv2d(cin, cout, 3, stride=stride, padding=1).to(dtype).requires_grad_(False)
    return plain, fastpath._recast(copy.deepcopy(plain), fastpath.FastConv2d)


def _is_packed(layer) -> bool:
    return layer.packed is not None and layer._parameters["weight"].is_meta


@pytest.mark.parametrize("dtype,stride", [(torch.float32, 1), (torch.float32, 2),
                                          (torch.bfloat16, 1)])
def test_a_packed_convolution_equals_nn_conv2d_and_holds_one_copy(packed, dtype, stride):
    plain, layer = _layer(stride=stride, dtype=dtype)
    w = plain.weight.clone()
    x = torch.randn(2, 32, 16, 16).to(dtype)
    ref = torch.nn.functional.conv2d(x, w, plain.bias, stride, 1)
    with torch.no_grad():
        out = layer(x)
        assert _is_packed(layer)
        assert layer._parameters["weight"].shape == w.shape       # the name, shape, dtype kept
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert (out.float() - ref.float()).abs().max() <= tol * ref.abs().max().float()
        x4 = torch.randn(4, 32, 16, 16).to(dtype)                 # another batch: still packed
        ref4 = torch.nn.functional.conv2d(x4, w, plain.bias, stride, 1)
        assert (layer(x4).float() - ref4.float()).abs().max() <= tol * ref4.abs().max().float()
    assert torch.equal(layer.weight, w) and layer.packed is None  # reading it unpacks, exactly


def test_forced_torch_never_packs():
    old = autotune.set_tuner(autotune.forced(conv="torch"))
    try:
        _, layer = _layer()
        with torch.no_grad():
            layer(torch.randn(1, 32, 8, 8))
        assert layer.packed is None and not layer._parameters["weight"].is_meta
    finally:
        autotune.set_tuner(old)


def test_in_place_changes_cast_and_state_dict_see_the_plain_weight(packed):
    """A LoRA merge adds to `.weight` in place; `.to()` and `state_dict()` read it: each gets
    the plain weight first, and the layer packs again at its next call."""
    plain, layer = _layer()
    w, x = plain.weight.clone(), torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        layer(x)
        d = torch.randn_like(w) * 0.1
        layer.weight.add_(d)                                      # as lora.Factors.merge does
        out = layer(x)
        assert _is_packed(layer)
        ref = torch.nn.functional.conv2d(x, w + d, plain.bias, 1, 1)
        assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
        state = layer.state_dict()
        assert torch.allclose(state["weight"], w + d) and not state["weight"].is_meta
        layer(x)
        layer.to(torch.bfloat16)
        assert torch.equal(layer.weight, (w + d).to(torch.bfloat16))


def test_autograd_through_a_packed_layer_reaches_the_input(packed):
    """Gradient methods differentiate through the UNet: a packed layer computes with a
    temporary plain copy and stays packed."""
    plain, layer = _layer()
    with torch.no_grad():
        layer(torch.randn(1, 32, 8, 8))
    x = torch.randn(1, 32, 8, 8, requires_grad=True)
    layer(x).square().sum().backward()
    ref = x.detach().clone().requires_grad_()
    plain(ref).square().sum().backward()
    assert _is_packed(layer) and (x.grad - ref.grad).abs().max() <= 1e-4


def test_a_weight_that_wants_a_gradient_is_never_packed(packed):
    _, layer = _layer()
    layer.weight.requires_grad_(True)                             # training
    with torch.no_grad():
        layer(torch.randn(1, 32, 8, 8))
    assert layer.packed is None


def test_a_packed_model_generates_as_the_explicit_path_and_uninstalls_exactly(sd_ckpt, packed):
    from minip2p.load import load_model
    model = load_model(sd_ckpt[1])
    convs = [m for m in model.unet.modules() if isinstance(m, fastpath.FastConv2d)]
    assert convs and not any(isinstance(m, fastpath.FastConv2d) for m in model.vae.modules())
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    kw = dict(seed=3, steps=3, height=64, width=64, progress=False, return_latents=True)
    a = generate(model, ["a red cube"], **kw)
    assert all(_is_packed(m) for m in convs)
    fastpath.uninstall(model)
    assert not any(isinstance(m, fastpath.FastConv2d) for m in model.unet.modules())
    after = model.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    b = generate(model, ["a red cube"], **kw)
    assert (a - b).abs().max() <= 1e-4


def test_the_tuner_times_both_on_the_real_input(tmp_path):
    t = autotune.Tuner(path=tmp_path / "k.json")
    old = autotune.set_tuner(t)
    try:
        _, layer = _layer()
        with torch.no_grad():
            layer(torch.randn(2, 32, 8, 8))
        (site, times), = t.timings.items()
        assert site == "conv 2x32x8x8x48x3x1" and set(times) == {"torch", "packed"}
        assert (layer.packed is not None) == (min(times, key=times.get) == "packed")
    finally:
        autotune.set_tuner(old)


def test_freeing_the_unet_lets_a_packed_weight_go_without_unpacking_it(packed):
    class Unreadable:
        def to_dense(self, dtype):
            raise AssertionError("unpacked on the way to the meta device")

    _, layer = _layer()
    with torch.no_grad():
        layer(torch.randn(1, 32, 8, 8))
    assert _is_packed(layer)
    layer.packed = Unreadable()
    fastpath.to_meta(nn.Sequential(layer))
    assert layer.packed is None and layer.weight.is_meta and layer.bias.is_meta
