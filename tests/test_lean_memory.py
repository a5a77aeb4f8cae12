"""What a one-shot command does not keep: the VAE encoder left unread until a picture is encoded
(load_folder, model/vae.py), and the UNet's weights dropped at the decode (`Model.free_unet`,
pipeline.decode, set by the CLI's edit and generate) -- the same outputs either way."""
import pytest
import torch

from minip2p.load import load_model
from minip2p.pipeline import decode, generate

pytestmark = pytest.mark.usefixtures("one_thread")


def test_encoder_not_read_until_first_encode(sd_ckpt):
    pipe, folder = sd_ckpt
    model = load_model(folder, fast=False)
    assert model.vae.quant_conv.weight.is_meta and all(
        p.is_meta for p in model.vae.encoder.parameters())          # a generation never reads it
    assert not any(p.is_meta for p in model.vae.decoder.parameters())
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ours = model.vae.encode(x)                                      # read now
    assert not any(p.is_meta for p in model.vae.parameters())
    assert not any(p.requires_grad for p in model.vae.parameters())
    with torch.no_grad():
        ref = pipe.vae.encode(x).latent_dist.mean
    assert (ours - ref).abs().max() < 1e-4
    assert torch.equal(model.vae.encode(x), ours)                   # read once, then kept


def test_encoder_read_in_the_decoders_dtype(sd_ckpt):
    model = load_model(sd_ckpt[1], dtype="bf16", fast=False)
    model.vae.encode(torch.zeros(1, 3, 64, 64, dtype=torch.bfloat16))
    assert {p.dtype for p in model.vae.parameters()} == {torch.bfloat16}


def test_free_unet_drops_the_weights_at_the_decode_same_pictures():
    model = load_model(None, fast=False)                            # the toy model, untuned
    kw = dict(seed=3, steps=2, progress=False)
    z = generate(model, ["a red circle"], return_latents=True, **kw)
    kept = decode(model, z)
    assert not model.unet.conv_in.bias.is_meta                      # not asked: kept
    model.free_unet = True
    freed = decode(model, z)
    assert all(t.is_meta for t in (*model.unet.parameters(), *model.unet.buffers()))
    assert model.device.type == "cpu"                               # now the VAE's
    assert torch.equal(freed, kept)
    assert torch.equal(decode(model, z), kept)                      # a second decode still works
