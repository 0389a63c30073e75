"""Shared fixtures. GPU tests carry ``@pytest.mark.gpu`` and skip cleanly without CUDA.

On a machine without CUDA, Triton kernels run under the interpreter: ``TRITON_INTERPRET=1`` is
set here, before anything imports triton (its JIT reads the variable when kernels are defined).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The C++ cache-hit fast path would otherwise start building in the background the first time a
# test settles a signature, and change which path later tests take; the tests that exercise it
# load it themselves (the ``cpp_hot`` fixture).
os.environ.setdefault("R1ATTN_HOTPATH", "off")


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


@pytest.fixture(scope="session")
def _hot_module(tmp_path_factory):
    """The C++ fast path, built once per test session (~20-30 s) into a session directory."""
    from torch_r1attn import functional, hotpath

    if hotpath.find_cxx() is None:
        pytest.skip("no C++ compiler: the C++ fast path cannot be built here")
    ok = hotpath.ensure(block=True, force=True, root=tmp_path_factory.mktemp("hotpath"))
    assert ok, hotpath.status()  # a compiler is here: the build must work
    functional._set_hot(None)  # tests opt in with ``cpp_hot``
    return hotpath._module


@pytest.fixture
def cpp_hot(_hot_module):
    """The front end asks the C++ fast path first during this test (an empty table to start)."""
    from torch_r1attn import functional

    _hot_module.clear()
    functional._set_hot(_hot_module)
    yield _hot_module
    functional._set_hot(None)
    _hot_module.clear()
