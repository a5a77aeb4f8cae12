"""DINO ViT (minip2p/model/dino.py) against transformers' ViTModel on the same random weights."""
import json

import pytest
import torch

from minip2p.errors import MinipError
from minip2p.model.dino import DinoViT, load_dino, preprocess, resize_like_torchvision

transformers = pytest.importorskip("transformers")


def tiny_vit(tmp_path, pooler=True, eps=1e-6):
    from helpers import build_dino
    return build_dino(tmp_path, pooler=pooler, eps=eps)[0]


def reference(ref, x, interpolate=False):
    keys = {}
    # transformers 5 renamed the modules (layers.i.attention.k_proj) but writes the public keys
    last = (ref.layers[-1].attention.k_proj if hasattr(ref, "layers")
            else ref.encoder.layer[-1].attention.attention.key)
    h = last.register_forward_hook(lambda m, i, o: keys.setdefault("k", o))
    with torch.no_grad():
        out = ref(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=interpolate)
    h.remove()
    return keys["k"], out.hidden_states


@pytest.mark.parametrize("size", [(32, 32), (24, 40)])
def test_dino_equals_transformers_vit(tmp_path, size):
    ref = tiny_vit(tmp_path)
    ours = load_dino(tmp_path)
    x = torch.randn(2, 3, *size)
    k, hidden = reference(ref, x, interpolate=size != (32, 32))
    f = ours(x)
    assert (f.keys - k).abs().max() < 1e-5
    assert (f.tokens - hidden[-1]).abs().max() < 1e-5          # CLS before the final norm
    for a, b in zip(f.hidden, hidden[1:]):
        assert (a - b).abs().max() < 1e-5
    S = f.self_similarity()
    n = 1 + (size[0] // 8) * (size[1] // 8)
    assert S.shape == (2, n, n) and torch.allclose(S.diagonal(dim1=1, dim2=2), torch.ones(2, n))


def test_dino_keeps_its_own_layer_norm_eps(tmp_path):
    """The transformers config says 1e-12; DINO's 1e-6 is used whatever the config says."""
    tiny_vit(tmp_path, eps=1e-12)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["layer_norm_eps"] == 1e-12
    ours = load_dino(tmp_path)
    assert all(m.eps == 1e-6 for m in ours.modules() if isinstance(m, torch.nn.LayerNorm))


def test_dino_loading_is_strict(tmp_path):
    from safetensors.torch import load_file, save_file
    tiny_vit(tmp_path, pooler=False)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("encoder.layer.1.attention.attention.key.bias")
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(MinipError, match="missing tensors: encoder.layer.1.attention.attention.key.bias"):
        load_dino(tmp_path)
    with pytest.raises(MinipError, match="not found"):
        load_dino(tmp_path / "nowhere")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "clip"}))
    with pytest.raises(MinipError, match="not a ViT"):
        load_dino(tmp_path)


def test_dino_refuses_sides_off_the_patch_grid(tmp_path):
    tiny_vit(tmp_path)
    with pytest.raises(MinipError, match="multiples of the patch size 8"):
        load_dino(tmp_path)(torch.randn(1, 3, 30, 32))


def test_preprocess_sizes_as_torchvision_resize():
    x = torch.rand(1, 3, 512, 512)
    assert resize_like_torchvision(x).shape[-2:] == (224, 224)
    assert resize_like_torchvision(torch.rand(1, 3, 300, 900)).shape[-2:] == (160, 480)  # capped
    assert resize_like_torchvision(torch.rand(1, 3, 400, 300)).shape[-2:] == (298, 224)
    p = preprocess(torch.full((1, 3, 64, 64), 0.5))
    assert p.shape[-2:] == (224, 224)
    assert torch.allclose(p[0, :, 0, 0], torch.tensor([(0.5 - 0.485) / 0.229,
                                                       (0.5 - 0.456) / 0.224,
                                                       (0.5 - 0.406) / 0.225]), atol=1e-5)
