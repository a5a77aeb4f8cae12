"""The decoder in tiles (model/vae.py `decode_tiled`, pipeline.decode, memory.decode_tile): close
to the whole decode on a random VAE, the same where one tile covers the picture, chosen when the
pre-flight finds the memory short, forced or refused by --decode-tile; and the allocator
settings (memory.lean_heap, release) are harmless calls."""
import dataclasses

import pytest
import torch

from helpers import one_line
from minip2p import memory
from minip2p.model.config import VAEConfig
from minip2p.model.vae import AutoencoderKL, _ramp, _starts

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    v = AutoencoderKL(VAEConfig(block_out_channels=(16, 32), layers_per_block=1,
                                norm_num_groups=8, sample_size=32)).eval()
    with torch.no_grad():
        for name, p in v.named_parameters():                     # norms and biases random too
            if "norm" in name and name.endswith("weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return v


def test_tiles_cover_and_blend_to_one():
    assert _starts(10, 16, 4) == [0] and _starts(40, 16, 4) == [0, 12, 24]
    for n, tile, overlap in ((40, 16, 4), (37, 12, 3), (64, 32, 8)):
        total = torch.zeros(n)
        for s in _starts(n, tile, overlap):
            total[s:s + tile] += _ramp(min(tile, n - s), overlap, s > 0, s + tile < n)
        assert total.min() > 0                                   # every pixel weighted
    total = torch.zeros(40)                                       # exact stride: weights sum to 1
    for s in (0, 12, 24):
        total[s:s + 16] += _ramp(16, 4, s > 0, s + 16 < 40)
    assert torch.allclose(total, torch.ones(40))


@torch.no_grad()
def test_tiled_decode_is_close_to_the_whole_decode(vae):
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(1))
    whole = vae.decode(z).float()
    assert torch.equal(vae.decode_tiled(z, 48), whole)            # one tile: the same decode
    tiled = vae.decode_tiled(z, 24, 6)
    assert tiled.shape == whole.shape
    diff = (tiled - whole).abs()
    # GroupNorm's statistics and the bottleneck attention see one tile. On this random VAE
    # and i.i.d. latents (its worst case: nothing local about it) mean |Δ| is 0.15 of mean |x̂|;
    # the stated tolerance is 0.2, and the blend must beat tiles cut without overlap
    print(f"tiled vs whole: mean |Δ| {diff.mean():.4f}, max {diff.max():.4f}, "
          f"mean |x̂| {whole.abs().mean():.3f}")
    assert diff.mean() < 0.2 * whole.abs().mean()
    hard = vae.decode_tiled(z, 24, 0)                             # no overlap: visible seams
    assert (hard - whole).abs().mean() > 1.5 * diff.mean()
    with pytest.raises(ValueError):
        vae.decode_tiled(z, 8, 8)


def test_preflight_falls_back_to_tiles(toy, monkeypatch):
    monkeypatch.setattr(memory, "unet_bytes", lambda *a, **k: 0)     # the decode sets the peak
    model = dataclasses.replace(toy, decode_tile=None)
    assert memory.decode_tile(model, 64, 64) == 0                  # small: whole
    assert memory.decode_tile(model, 1024, 1024) > 0               # over DECODE_BUDGET: tiles
    need = memory.estimate(model, 1, 256, 256, explicit=False)     # under it: whole ...
    model.decode_tile = 16
    tiled = memory.estimate(model, 1, 256, 256, explicit=False)
    assert tiled < need
    model.decode_tile = None
    monkeypatch.setenv("MINIP2P_MEMORY_LIMIT", str((tiled + need) // 2))
    memory.check(model, 1, 256, 256, explicit=False)               # ... unless memory is short
    assert model.decode_tile in memory.TILES
    monkeypatch.setenv("MINIP2P_MEMORY_LIMIT", str(tiled // 4))    # not even tiles fit
    model.decode_tile = None
    with pytest.raises(memory.ParameterError):
        memory.check(model, 1, 256, 256, explicit=False)
    assert model.decode_tile is None


def test_decode_tile_flag(capsys, tmp_path):
    from minip2p.cli import main
    err = one_line(capsys, ["generate", "a red circle", "--decode-tile", "6", "--steps", "1",
                            "--quiet", "--out", str(tmp_path / "a.png")])
    assert "--decode-tile 6" in err and "multiple" in err and not list(tmp_path.iterdir())
    assert main(["generate", "a red circle", "--decode-tile", "32", "--steps", "1", "--quiet",
                 "--out", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").is_file()


def test_allocator_calls_are_harmless():
    memory.lean_heap()
    memory.release()
    assert torch.ones(1 << 20).sum() == 1 << 20
