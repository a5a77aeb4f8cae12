"""Session fixtures: tiny random SD-family checkpoints written once per test run."""
import os
import shutil
import tempfile
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")   # tests never touch the network
# one thread (torch is not imported yet; CLI subprocesses inherit it): the test models are tiny,
# and several threads spin-wait, many times slower on a busy 2-core machine
os.environ.setdefault("OMP_NUM_THREADS", "1")
# caches in one folder of this run, removed when it ends: the kernel tuner's
# (minip2p/fast/autotune.py), not the user's, and torch's inductor folder (`import diffusers`
# makes one, /tmp/torchinductor_USER, otherwise)
RUN_DIR = tempfile.mkdtemp(prefix="minip2p-tests-")
os.environ.setdefault("MINIP2P_CACHE_DIR", RUN_DIR)
# the CLI's --dtype auto answers fp32 (fast/precision.py): references do not depend on the CPU
os.environ.setdefault("MINIP2P_DTYPE", "fp32")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(RUN_DIR, "torchinductor"))
warnings.filterwarnings("ignore", module="diffusers")
warnings.filterwarnings("ignore", module="transformers")


def pytest_unconfigure(config):
    shutil.rmtree(RUN_DIR, ignore_errors=True)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`): their
    ops are all small, and one thread is many times faster than several (which spin-wait,
    badly so on a busy 2-core machine)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def toy():
    """The shipped toy model (weights/toy)."""
    from minip2p.load import load_model
    return load_model(None)


def _checkpoint(tmp_path_factory, geometry):
    from helpers import build_pipeline, save_pipeline
    pipe = build_pipeline(geometry)
    folder = save_pipeline(pipe, tmp_path_factory.mktemp(geometry))
    return pipe, folder


@pytest.fixture(scope="session")
def sd_ckpt(tmp_path_factory):
    """(diffusers pipeline, folder) with SD 1.x's exact block structure, narrow widths."""
    return _checkpoint(tmp_path_factory, "sd")


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory):
    """(diffusers pipeline, folder) of a smaller family member (2 levels, 4x VAE)."""
    return _checkpoint(tmp_path_factory, "small")


@pytest.fixture(scope="session")
def sd_model(sd_ckpt):
    from minip2p.load import load_model
    return load_model(sd_ckpt[1])


@pytest.fixture(scope="session")
def sd2_ckpt(tmp_path_factory):
    """(diffusers pipeline, folder) with SD 2.1's block structure: v-prediction, upcast, linear."""
    return _checkpoint(tmp_path_factory, "sd2")


@pytest.fixture(scope="session")
def small2_ckpt(tmp_path_factory):
    """(diffusers pipeline, folder): "small" with v-prediction, upcast attention, "!" padding."""
    return _checkpoint(tmp_path_factory, "small2")


@pytest.fixture(scope="session")
def ip2p_ckpt(tmp_path_factory):
    """(diffusers InstructPix2Pix pipeline, folder): "sd" with an 8-channel conv_in."""
    return _checkpoint(tmp_path_factory, "ip2p")


@pytest.fixture(scope="session")
def clip_ckpt(tmp_path_factory):
    """(transformers CLIPModel, folder): a tiny random CLIP, 32-px images."""
    from helpers import build_clip
    return build_clip(tmp_path_factory.mktemp("clip"))
