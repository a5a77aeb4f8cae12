"""The compute precision chosen by measurement (fast/precision.py), bf16 kernels on the fast path,
weights read tensor by tensor in the compute dtype, and 8-bit weights (load/int8.py)."""
import pytest
import torch

from minip2p.errors import MinipError, ParameterError
from minip2p.fast import autotune, precision, switched
from minip2p.fast.autotune import Tuner, forced
from minip2p.load import int8, load_model
from minip2p.pipeline import decode

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def measured(monkeypatch, tmp_path):
    """measured(fp32=s, bf16=s, native=bool): a fresh tuner whose precision timings are these."""
    monkeypatch.delenv(precision.ENV, raising=False)
    old = autotune.set_tuner(Tuner(path=tmp_path / "k.json"))

    def setup(fp32=1.0, bf16=1.0, native=True):
        monkeypatch.setattr(precision, "bf16_native", lambda: native)
        monkeypatch.setattr(autotune, "best_times", lambda run: {"fp32": fp32, "bf16": bf16})
    yield setup
    autotune.set_tuner(old)


def test_bf16_is_chosen_only_where_native_and_measured_faster(measured):
    measured(fp32=2.0, bf16=1.0)
    assert precision.choose("cpu", 64) == "bf16"
    measured(fp32=1.0, bf16=2.0)
    assert precision.choose("cpu", 96) == "fp32"                    # slower: fp32
    measured(fp32=2.0, bf16=1.0, native=False)
    assert precision.choose("cpu", 128) == "fp32"                   # emulated bf16: not measured
    assert precision.choose("meta", 64) == "fp32"                   # not a CPU: unchanged


def test_no_autotune_and_the_variable_answer_without_measuring(measured, monkeypatch):
    measured(fp32=2.0, bf16=1.0)
    autotune.set_tuner(Tuner(enabled=False))
    assert precision.choose("cpu", 64) == "fp32"
    monkeypatch.setenv(precision.ENV, "bf16")
    assert precision.choose("cpu", 64) == "bf16"


def test_auto_loads_the_choice_and_a_forced_dtype_never_asks(measured, monkeypatch, sd_ckpt):
    from minip2p.cli.common import Parser, add_model_options, load
    measured(fp32=2.0, bf16=1.0)
    assert load_model(sd_ckpt[1], dtype="auto").dtype == torch.bfloat16
    monkeypatch.setattr(precision, "choose", lambda *a: pytest.fail("asked"))
    p = Parser()
    add_model_options(p, lean=True)
    args = p.parse_args(["--model", str(sd_ckpt[1]), "--dtype", "fp32"])
    assert args.dtype == "fp32" and args.free_text_encoder          # freed by default
    assert load(args).dtype == torch.float32
    assert not p.parse_args(["--keep-text-encoder"]).free_text_encoder
    assert p.parse_args([]).dtype == "auto"


def test_weights_are_read_in_the_compute_dtype_one_tensor_at_a_time(sd_ckpt, monkeypatch):
    from minip2p.load import checkpoint
    seen = []
    real = checkpoint.read_safetensors

    def spy(path, convert=None):
        assert convert is not None                                   # never read whole, in fp32
        return real(path, lambda k, t: seen.append(t.dtype) or convert(k, t))
    monkeypatch.setattr("minip2p.load.read_safetensors", spy)
    m = load_model(sd_ckpt[1], dtype="bf16")
    assert seen and all(p.dtype == torch.bfloat16 for p in m.unet.parameters())


def test_bf16_fast_path_is_close_to_the_bf16_explicit_path_for_every_candidate(sd_ckpt):
    m = load_model(sd_ckpt[1], dtype="bf16")
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 32, 32, generator=g).bfloat16()
    c = torch.randn(2, 77, m.unet.cfg.cross_attention_dim, generator=g).bfloat16()
    with switched(m, False), torch.no_grad():
        ref = m.unet(z, 10, c).float()
        image = decode(m, z[:1, :, :8, :8].float())
    old = autotune.tuner()
    try:
        for name in ("torch", "onednn"):
            layout = "channels_last" if name == "onednn" else "contiguous"
            autotune.set_tuner(forced(linear=name, geglu=name, decode=layout,
                                      attention="onednn" if name == "onednn" else "sdpa"))
            with switched(m, True), torch.no_grad():
                out = m.unet(z, 10, c).float()
            assert out.dtype == torch.float32 and torch.isfinite(out).all()
            assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
            with switched(m, True):
                assert (decode(m, z[:1, :, :8, :8].float()) - image).abs().max() <= 0.05  # bf16
    finally:
        autotune.set_tuner(old)


def test_quantize_error_is_at_most_half_a_step_per_output_channel():
    w = torch.randn(16, 8, 3, 3) * torch.logspace(-3, 1, 16)[:, None, None, None]
    q, s = int8.quantize(w, torch.float32)
    assert q.dtype == torch.int8 and s.shape == (16, 1, 1, 1) and q.abs().max() <= 127
    assert ((q.float() * s - w).abs() <= s / 2 + 1e-7).all()
    assert (q.flatten(1).abs().amax(1) == 127).all()                # each channel uses its range


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_int8_weights_load_quantised_and_stay_close(sd_ckpt, sd_model, dtype):
    m = load_model(sd_ckpt[1], dtype=dtype, weights="int8")
    assert m.dtype == torch.float32 if dtype == "fp32" else torch.bfloat16
    for part in (m.unet, m.text_encoder):
        layers = [x for x in part.modules() if isinstance(x, (torch.nn.Linear, torch.nn.Conv2d))]
        assert layers and all(isinstance(x, int8.Int8Weight) for x in layers)
        assert all(x.weight_q.dtype == torch.int8 for x in layers)
        emb = {id(e.weight) for e in part.modules() if isinstance(e, torch.nn.Embedding)}
        assert not any(p.dim() > 1 and id(p) not in emb for p in part.parameters())  # no fp W
    assert not any(isinstance(x, int8.Int8Weight) for x in m.vae.modules())
    ref = dict(sd_model.unet.named_parameters())
    for name, x in m.unet.named_modules():
        if isinstance(x, int8.Int8Weight):
            w = ref[name + ".weight"]
            sc = x.weight_scale.float()                              # bf16: s and Ŵ rounded
            bound = sc / 2 + (0 if dtype == "fp32" else 2 ** -8 * (w.abs() + 127 * sc))
            assert ((x.weight.float() - w).abs() <= bound + 1e-6).all()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 16, 16, generator=g)
    c = torch.randn(2, 77, m.unet.cfg.cross_attention_dim, generator=g)
    with torch.no_grad():
        a = sd_model.unet(z, 10, c)
        b = m.unet(z.to(m.dtype), 10, c.to(m.dtype)).float()
    assert (a - b).abs().max() <= 0.1 * a.abs().max()
    from minip2p import fast
    assert {type(x) for x in m.unet.modules()} >= {fast.FastInt8Linear, fast.FastInt8TokenConv}
    with switched(m, False), torch.no_grad():                       # the reference path too
        assert not any(type(x) in fast.PLAIN for x in m.unet.modules())
        assert (m.unet(z.to(m.dtype), 10, c.to(m.dtype)).float() - b).abs().max() \
            <= 0.05 * b.abs().max()


def test_int8_memory_and_nonsense_combinations(sd_ckpt, sd_model):
    from minip2p import memory
    m = load_model(sd_ckpt[1], weights="int8")
    full = sum(p.numel() * 4 for p in sd_model.unet.parameters())
    assert memory.weights_bytes(m) < memory.weights_bytes(sd_model)
    assert sum(t.numel() * t.element_size() for t in m.unet.buffers()) < full / 3
    assert memory.estimate(m, 2, 64, 64, False) < memory.estimate(sd_model, 2, 64, 64, False)
    assert memory.estimate(sd_model, 2, 64, 64, False, free_text=True) \
        <= memory.estimate(sd_model, 2, 64, 64, False)
    with pytest.raises(ParameterError, match="fp16"):
        load_model(sd_ckpt[1], dtype="fp16", weights="int8")
    with pytest.raises(ParameterError, match="weight format"):
        load_model(sd_ckpt[1], weights="int4")
    with pytest.raises(ParameterError, match="LoRA"):
        load_model(sd_ckpt[1], weights="int8", loras=["x.safetensors"])
    with pytest.raises(MinipError, match="unknown dtype"):
        load_model(sd_ckpt[1], dtype="fp64")
