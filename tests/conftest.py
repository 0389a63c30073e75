"""Shared fixtures. GPU tests carry ``@pytest.mark.gpu`` and skip cleanly without CUDA.

On a machine without CUDA, Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` is
set here, before anything imports triton (its JIT reads the variable when kernels are defined).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on the H200)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """An isolated, private kernel cache for one test (and a clean dispatch table)."""
    from torch_r1attn import config, dispatch

    d = tmp_path / "cache"
    d.mkdir(mode=0o700)
    monkeypatch.setenv("R1ATTN_CACHE_DIR", str(d))
    config.set_settings(None)
    dispatch.reset()
    try:
        from torch_r1attn import cache

        cache.reset_default_cache()
    except (ImportError, AttributeError):
        pass
    yield d
    config.set_settings(None)
    dispatch.reset()


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0
