"""PIE-Bench's metrics (data/edit_metrics.py, data/lpips.py, cli/eval_edit.py) against the
benchmark's own implementations: torchmetrics for PSNR / MSE / SSIM, the lpips package for LPIPS,
its evaluation code's structure distance re-implemented on transformers' ViTModel, and CLIPScore's
formula on transformers' CLIPModel."""
import json
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from helpers import cli, one_line
from minip2p.data import edit_metrics as em

torchmetrics = pytest.importorskip("torchmetrics")


def pictures(n=5, size=(48, 40), seed=0):
    """n (source, edit, mask) triples: noise, gradients, a square moved, thin lines, flat."""
    rng = np.random.default_rng(seed)
    H, W = size
    yy, xx = np.mgrid[:H, :W] / max(H, W)
    out = []
    for i in range(n):
        x = np.stack([xx, yy, (xx + yy) / 2], -1) if i % 2 else rng.random((H, W, 3))
        y = np.clip(x + rng.normal(0, 0.05 * (i + 1), x.shape), 0, 1)
        y[5:15 + i, 8:20] = rng.random(3)
        m = np.zeros((H, W))
        m[4:17 + i, 6:22] = 1
        out.append((np.round(x * 255) / 255, np.round(y * 255) / 255, m))
    return out


def official(metric, x, y, m):
    """The benchmark's calculate_* on background: both × (1 − m), then the torchmetrics metric."""
    keep = (1 - m)[..., None]
    t = lambda a: torch.tensor((a * keep).astype(np.float32)).permute(2, 0, 1).unsqueeze(0)  # noqa: E731
    if metric == "mse":
        return torchmetrics.regression.MeanSquaredError()(t(x)[0].contiguous(), t(y)[0].contiguous()).item()
    cls = dict(psnr=torchmetrics.image.PeakSignalNoiseRatio,
               ssim=torchmetrics.image.StructuralSimilarityIndexMeasure)[metric]
    return cls(data_range=1.0)(t(x), t(y)).item()


def test_psnr_mse_ssim_equal_torchmetrics():
    for x, y, m in pictures():
        got = em.scores(x, y, m, None)
        for k in ("psnr", "mse", "ssim"):
            want = official(k, x, y, m) * em.SCALES[k]
            assert abs(got[k] - want) <= 1e-4 * max(1, abs(want)), (k, got[k], want)


def test_mask_decode_is_the_benchmarks():
    m = em.mask_decode([3, 4, 20, 100], shape=(8, 8))
    flat = np.zeros(64)
    flat[3:7] = 1
    flat[20:64] = 1                                   # a run past the end is cut
    want = flat.reshape(8, 8)
    want[0, :] = want[-1, :] = want[:, 0] = want[:, -1] = 1
    assert (m == want).all()


def test_empty_background_is_nan():
    x, y, _ = pictures(1)[0]
    got = em.scores(x, y, np.ones(x.shape[:2]), None)
    assert all(np.isnan(got[k]) for k in ("psnr", "mse", "ssim"))


@pytest.fixture(scope="module")
def tiny_dino(tmp_path_factory):
    pytest.importorskip("transformers")
    from helpers import build_dino
    return build_dino(tmp_path_factory.mktemp("dino"))


def official_structure(ref, x, y):
    """calculate_global_ssim_loss: floats in [0, 255] -> Resize(224, max 480) -> Normalize ->
    last-layer keys (heads concatenated, CLS included) -> cosine self-similarity -> MSE."""
    def self_sim(a):
        t = torch.tensor(a.astype(np.float32) * 255).permute(2, 0, 1)[None]
        H, W = t.shape[-2:]
        s = 224 / min(H, W)
        t = F.interpolate(t, size=(int(H * s), int(W * s)), mode="bilinear", antialias=True)
        t = (t - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        t = t[..., :t.shape[-2] // 8 * 8, :t.shape[-1] // 8 * 8]
        keys = {}
        k_layer = ref.layers[-1].attention.k_proj if hasattr(ref, "layers") else \
            ref.encoder.layer[-1].attention.attention.key
        h = k_layer.register_forward_hook(lambda mod, i, o: keys.setdefault("k", o))
        with torch.no_grad():
            ref(pixel_values=t, interpolate_pos_encoding=True)
        h.remove()
        k = keys["k"]
        n = k.norm(dim=2, keepdim=True)
        return (k @ k.permute(0, 2, 1)) / torch.clamp(n @ n.permute(0, 2, 1), min=1e-8)
    return F.mse_loss(self_sim(y), self_sim(x)).item()


def test_structure_distance_equals_the_benchmarks(tiny_dino):
    from minip2p.model.dino import load_dino
    ref, folder = tiny_dino
    dino = load_dino(folder)
    for x, y, m in pictures(5, size=(40, 40)):
        got = em.scores(x, y, m, None, dino=dino)["structure"] / 1e3
        want = official_structure(ref, x, y)
        assert abs(got - want) <= 1e-4 * max(1e-3, want), (got, want)


def torchvision_stub():
    """torchvision's squeezenet1_1 `features`, written from its definition, for lpips to import
    (the CPU machine has no torchvision build that matches torch)."""
    from torch import nn

    class Fire(nn.Module):
        def __init__(self, c, s, e1, e3):
            super().__init__()
            self.squeeze, self.squeeze_activation = nn.Conv2d(c, s, 1), nn.ReLU(inplace=True)
            self.expand1x1, self.expand1x1_activation = nn.Conv2d(s, e1, 1), nn.ReLU(inplace=True)
            self.expand3x3, self.expand3x3_activation = nn.Conv2d(s, e3, 3, padding=1), nn.ReLU(inplace=True)

        def forward(self, x):
            x = self.squeeze_activation(self.squeeze(x))
            return torch.cat([self.expand1x1_activation(self.expand1x1(x)),
                              self.expand3x3_activation(self.expand3x3(x))], 1)

    def squeezenet1_1(pretrained=False, **kw):
        m = nn.Module()
        m.features = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), nn.MaxPool2d(3, 2, ceil_mode=True),
            Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256),
            Fire(512, 64, 256, 256))
        return m
    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(**{n: squeezenet1_1 for n in
                                         ("squeezenet1_1", "alexnet", "vgg16", "resnet18",
                                          "resnet34", "resnet50", "resnet101", "resnet152")})
    return tv


def test_lpips_equals_the_lpips_package(tmp_path, monkeypatch):
    from safetensors.torch import save_file
    from minip2p.data.lpips import load_lpips
    if "torchvision" not in sys.modules:
        monkeypatch.setitem(sys.modules, "torchvision", torchvision_stub())
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    ref = lpips.LPIPS(net="squeeze", pretrained=True, pnet_rand=True, verbose=False).eval()
    state = {}
    for name, t in ref.state_dict().items():             # our names: net.features.N.*, linL.weight
        if name.startswith("net.slice"):
            state["net.features." + name.split(".", 2)[2]] = t
        elif name[:3] == "lin" and name[3].isdigit():
            state[name.split(".")[0] + ".weight"] = t
    save_file(state, tmp_path / "lpips.safetensors")
    ours = load_lpips(tmp_path / "lpips.safetensors")
    for x, y, m in pictures(5, size=(64, 64)):
        keep = (1 - m)[..., None]
        t = lambda a: torch.tensor((a * keep).astype(np.float32)).permute(2, 0, 1)[None] * 2 - 1  # noqa: E731
        with torch.no_grad():
            want = ref(t(x), t(y)).item()
        got = em.scores(x, y, m, None, lpips_model=ours)["lpips"] / 1e3
        assert abs(got - want) <= 1e-5 * max(1, want), (got, want)


def test_clip_score_is_clipscores_formula(clip_ckpt):
    from minip2p.data.clip_image import load_clip
    ref, folder = clip_ckpt
    clip = load_clip(folder)
    rng = np.random.default_rng(1)
    for text in ("a red circle", "a cat on a mat"):
        y = rng.integers(0, 256, (32, 32, 3)).astype(np.float32)
        px = em.clip_pixels(clip, y)
        with torch.no_grad():
            fi = ref.get_image_features(pixel_values=px)
            ft = ref.get_text_features(input_ids=clip.tokenizer([text]))
        fi, ft = (f.pooler_output if hasattr(f, "pooler_output") else f for f in (fi, ft))
        want = max(100 * F.cosine_similarity(fi, ft).item(), 0)
        assert abs(em.clip_score(clip, y, text) - want) <= 1e-4
        want_px = (torch.tensor(y / 255).permute(2, 0, 1)[None].float()
                   - torch.tensor(em_mean())[:, None, None]) / torch.tensor(em_std())[:, None, None]
        assert (px - want_px).abs().max() < 1e-5                # 32 px: no resize, no crop


def em_mean():
    from minip2p.data.clip_image import MEAN
    return MEAN


def em_std():
    from minip2p.data.clip_image import STD
    return STD


def test_eval_edit_command(tmp_path, tiny_dino, capsys):
    src, edit, masks = (tmp_path / n for n in ("src", "edit", "masks"))
    for d in (src, edit, masks):
        d.mkdir()
    for i, (x, y, m) in enumerate(pictures(3, size=(40, 40))):
        Image.fromarray(np.uint8(np.rint(x * 255))).save(src / f"p{i}.png")
        panel = np.concatenate([x, y], axis=1)                  # a strip: the last panel is read
        Image.fromarray(np.uint8(np.rint(panel * 255))).save(edit / f"p{i}.png")
        Image.fromarray(np.uint8(m * 255)).save(masks / f"p{i}.png")
    (tmp_path / "prompts.json").write_text(json.dumps({"p0": "a cat", "p1": "a dog"}))
    out = tmp_path / "scores.csv"
    rc, stdout, stderr = cli(capsys, "eval-edit", src, edit, "--masks", masks, "--prompts",
                             tmp_path / "prompts.json", "--dino", tiny_dino[1], "--clip", "none",
                             "--out", out)
    assert rc == 0, stderr
    assert "LPIPS skipped" in stderr and "structure" in stdout and "psnr" in stdout
    rows = out.read_text().splitlines()
    assert rows[0] == "name,structure,psnr,mse,ssim" and len(rows) == 4
    x, y, m = pictures(3, size=(40, 40))[0]
    assert abs(float(rows[1].split(",")[2]) - em.scores(x, y, m, None)["psnr"]) < 1e-3
    # bad input: one line, exit 2, nothing written
    (edit / "p2.png").unlink()
    out.unlink()
    none = ("--dino", "none", "--clip", "none")
    one_line(capsys, ["eval-edit", src, edit, *none, "--out", out], "no edit of 'p2.png'")
    assert not out.exists()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(edit / "p2.png")
    one_line(capsys, ["eval-edit", src, edit, *none], "must be the same size")
    (tmp_path / "bad.json").write_text("{nope")
    one_line(capsys, ["eval-edit", src, edit, "--prompts", tmp_path / "bad.json", *none], "not JSON")
    one_line(capsys, ["eval-edit", src, tmp_path / "nowhere", *none], "is not a folder")
    one_line(capsys, ["eval-edit", src, src, *none, "--lpips", tmp_path / "absent.safetensors"],
             "missing weights file")
