"""fp16-variant checkpoint files (`*.fp16.safetensors`, as on the Hub) and reduced precision."""
import copy

import torch

from minip2p.load import load_model
from minip2p.pipeline import generate


def test_fp16_variant_folder_loads_and_matches(small_ckpt, tmp_path):
    pipe, _ = small_ckpt
    half = copy.deepcopy(pipe).to(torch.float16)
    half.save_pretrained(str(tmp_path), safe_serialization=True, variant="fp16")
    from helpers import TOKENIZER
    import shutil
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(TOKENIZER / name, tmp_path / "tokenizer" / name)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").exists()

    model = load_model(tmp_path)                      # only fp16 files: found, upcast to fp32
    assert model.dtype == torch.float32
    ref = half.to(torch.float32)                      # the same rounded weights, in fp32
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, 48, generator=g)
    with torch.no_grad():
        d = (model.unet(z, 500, ctx) - ref.unet(z, 500, ctx).sample).abs().max().item()
    assert d <= 1e-4

    explicit = load_model(tmp_path, variant="fp16", dtype="fp16")
    assert explicit.dtype == torch.float16


def test_reduced_precision_generation_is_close_to_fp32(sd_ckpt):
    _, folder = sd_ckpt
    kw = dict(seed=0, steps=4, height=64, width=64, progress=False)
    ref = generate(load_model(folder), ["a red circle"], **kw)
    for dtype in ("fp16", "bf16"):
        img = generate(load_model(folder, dtype=dtype), ["a red circle"], **kw)
        assert img.dtype == torch.float32 and img.shape == ref.shape
        assert (img - ref).abs().mean().item() < 0.05, dtype


def test_p2p_edit_runs_in_half_precision(sd_ckpt):
    """Every controller path in fp16 and bf16 (on the CPU here; the same code runs on GPUs)."""
    from minip2p.methods import p2p
    _, folder = sd_ckpt
    prompts = ["a painting of a squirrel eating a burger", "a painting of a lion eating a burger"]
    kw = dict(seed=0, steps=4, height=64, width=128, progress=False)
    results = {}
    for dtype in ("fp32", "fp16", "bf16"):
        model = load_model(folder, dtype=dtype)
        control, store = p2p.build(model.tokenizer, prompts, 4, blend=["squirrel", "lion"],
                                   reweight={"burger": 2.0})
        results[dtype] = generate(model, prompts, control=control, **kw)
        assert torch.isfinite(results[dtype]).all()
        assert all(v.dtype == torch.float32 for v in store.sums.values())
    for dtype in ("fp16", "bf16"):
        assert (results[dtype] - results["fp32"]).abs().mean().item() < 0.05, dtype
