"""The CLIP judge (clip_image.py) against transformers' CLIPModel on a tiny random CLIP: image
and text features, the recipe's four similarities; CLIP's preprocessing; strict loading."""
import pytest
import torch
import torch.nn.functional as F

from minip2p.data.clip_image import load_clip
from minip2p.errors import MinipError


def feats(out):
    """transformers 5 returns an output object from get_*_features; 4 a tensor."""
    return out.pooler_output if hasattr(out, "pooler_output") else out


def test_clip_equals_transformers(clip_ckpt):
    ref, folder = clip_ckpt
    ours = load_clip(folder)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.rand(2, 3, 48, 48, generator=g), torch.rand(2, 3, 48, 48, generator=g)
    t0, t1 = ["a red circle", "a cat on a mat"], ["a blue circle", "a dog on a mat"]
    px = ours.preprocess(x0)
    assert px.shape == (2, 3, 32, 32)
    with torch.no_grad():
        fi = feats(ref.get_image_features(pixel_values=px))
        ids = ours.tokenizer(t0)
        ft = feats(ref.get_text_features(input_ids=ids))
    d_img = (ours.image_features(px) - fi).abs().max().item()
    d_txt = (ours.text_features(ids) - ft).abs().max().item()
    with torch.no_grad():
        n = lambda f: f / f.norm(dim=1, keepdim=True)                   # noqa: E731
        r0, r1 = (n(feats(ref.get_image_features(pixel_values=ours.preprocess(x)))) for x in (x0, x1))
        s0, s1 = (n(feats(ref.get_text_features(input_ids=ours.tokenizer(t)))) for t in (t0, t1))
    want = dict(clip_sim_0=F.cosine_similarity(r0, s0), clip_sim_1=F.cosine_similarity(r1, s1),
                clip_sim_dir=F.cosine_similarity(r1 - r0, s1 - s0),
                clip_sim_image=F.cosine_similarity(r0, r1))
    got = ours.similarities(x0, x1, t0, t1)
    d_sim = max((got[k] - want[k]).abs().max().item() for k in want)
    print(f"CLIP vs transformers: image features {d_img:.2e}, text features {d_txt:.2e}, "
          f"similarities {d_sim:.2e}")
    assert max(d_img, d_txt, d_sim) <= 1e-4


def test_preprocessing_is_clips():
    """Square input: the recipe's bicubic resize + mean/std; wide input: centre crop."""
    from minip2p.data.clip_image import MEAN, STD, CLIPModel
    m = CLIPModel.__new__(CLIPModel)
    m.cfg = type("C", (), {"vision": type("V", (), {"image_size": 8})})()
    x = torch.rand(1, 3, 16, 16)
    want = (F.interpolate(x, size=8, mode="bicubic", align_corners=False)
            - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    assert (m.preprocess(x) - want).abs().max() < 1e-6
    wide = torch.cat([torch.zeros(1, 3, 16, 8), x, torch.zeros(1, 3, 16, 8)], dim=3)   # 16×32
    assert (m.preprocess(wide) - want)[..., 1:-1].abs().max() < 1e-5      # edges see the pad


def test_clip_loading_is_strict(clip_ckpt, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file
    _, folder = clip_ckpt
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    state = load_file(str(bad / "model.safetensors"))
    state.pop("visual_projection.weight")
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(MinipError, match="visual_projection"):
        load_clip(bad)
    with pytest.raises(MinipError):
        load_clip(tmp_path / "nothing")
