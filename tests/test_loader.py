"""The JIT loader: cache entries imported from verified bytes, CUDA entries built once, memo.

``TRITON_KERNEL`` (a minimal full-attention kernel following the kernel contract) is shared
with test_cache.py and test_cache_cli.py.
"""

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_close_to_ref
from torch_r1attn import cache as cache_mod
from tests.kernels import kernel_source
from torch_r1attn import loader
from torch_r1attn.cache import KernelCache, make_check_case
from torch_r1attn.loader import KernelIntegrityError, KernelLoadError
from torch_r1attn.spec import AttentionSpec
from torch_r1attn.variants import Variant

REPO = Path(__file__).resolve().parent.parent

# the verifier's known-good kernel (full attention): a real Triton kernel that follows the contract
TRITON_KERNEL = kernel_source("good_attention.py")

# Imported by a tampered source: if this file appears, tampered code ran.
TAMPER_BODY = '''
import pathlib as _p
_p.Path({mark!r}).write_text("tampered code ran")
'''


def make_problem(dtype=torch.float16, B=1, H=2, Sq=20, Sk=24, D=16, device="cpu", seed=0, Hkv=None):
    """(spec, (q, k, v), scale, check set) for a full-attention call."""
    g = torch.Generator().manual_seed(seed)
    Hkv = Hkv or H
    q = torch.randn(B, H, Sq, D, generator=g).to(dtype).to(device)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype).to(device)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype).to(device)
    scale = D ** -0.5
    spec = AttentionSpec.from_call(q, k, v, "full")
    return spec, (q, k, v), scale, make_check_case(q, k, v, Variant(), scale)


def store_kernel(cache, spec, checks, source=TRITON_KERNEL, meta=None):
    meta = meta if meta is not None else {"config": {"BM": 16, "BN": 16}, "measurements": {"time_ms": 1.0},
                                          "provenance": {"proposer": "test"}}
    return cache.store(spec, source, "triton", meta, checks)


def tampered(mark: Path) -> str:
    return TAMPER_BODY.format(mark=str(mark)) + TRITON_KERNEL


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture
def kc(cache_dir):
    loader.forget_loaded()
    yield KernelCache(cache_dir)
    loader.forget_loaded()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("Sq,Sk,D,gqa", [(1, 1, 16, 1), (17, 33, 32, 1), (20, 24, 16, 2)])
def test_load_entry_runs_kernel(kc, dtype, Sq, Sk, D, gqa):
    spec, (q, k, v), scale, checks = make_problem(dtype, H=2 * gqa, Hkv=2, Sq=Sq, Sk=Sk, D=D)
    store_kernel(kc, spec, checks)
    entry = kc.lookup(spec)
    kern = loader.load(entry)
    assert kern.unsupported(q, k, v) is None
    out = torch.full(q.shape, float("nan"), dtype=dtype)
    kern(q, k, v, out, scale)
    assert_close_to_ref(out, checks["c0.ref"], checks["c0.baseline"])


def test_wrapper_returns_out_or_the_checked_returned_tensor():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    out = torch.empty(1, 2, 5, 8)
    fresh = torch.ones(1, 2, 5, 8)
    sup = {"dtypes": ["fp32"], "head_dims": [8], "devices": ["cpu"]}
    assert loader.LoadedKernel(lambda *a, **t: None, sup)(q, k, v, out, 1.0) is out
    assert loader.LoadedKernel(lambda *a, **t: fresh, sup)(q, k, v, out, 1.0) is fresh
    assert loader.LoadedKernel(lambda *a, **t: a[3], sup)(q, k, v, out, 1.0) is out
    for bad, needle in ((lambda *a, **t: a[0], "shares memory with an input"),
                        (lambda *a, **t: a[1].view(1, 2, 5, 8), "shares memory with an input"),  # a view of k
                        (lambda *a, **t: t["vt"], "shares memory with an input"),
                        (lambda *a, **t: fresh.half(), "float16"),
                        (lambda *a, **t: fresh[:, :1], "shape"),
                        (lambda *a, **t: 3, "returned int")):
        with pytest.raises(loader.KernelLoadError, match=needle):
            loader.LoadedKernel(bad, sup, "k")(q, k, v, out, 1.0, vt=torch.randn(1, 2, 5, 8))


def test_load_is_memoised_per_path_and_hash(kc):
    spec, _, _, checks = make_problem()
    e1 = store_kernel(kc, spec, checks)
    k1 = loader.load(e1)
    assert loader.load(e1) is k1
    assert loader.load(kc.lookup(spec)) is k1
    e2 = store_kernel(kc, spec, checks, source=TRITON_KERNEL + "\n# v2\n")
    k2 = loader.load(e2)
    assert k2 is not k1 and e2.source_sha256 != e1.source_sha256
    assert sys.modules[k2.fn.__module__] is not sys.modules[k1.fn.__module__]


def test_triton_compiles_the_verified_bytes_even_if_the_file_is_swapped(kc, tmp_path, monkeypatch):
    """Check/use race: the file is replaced right after the hash check. The module, inspect
    and triton.jit must all see the verified text, and the swapped-in code must never run."""
    spec, (q, k, v), scale, checks = make_problem()
    entry = store_kernel(kc, spec, checks)
    mark = tmp_path / "ran"
    real = loader.read_verified

    def read_then_swap(path, sha):
        data = real(path, sha)
        Path(path).write_text(tampered(mark))
        return data

    monkeypatch.setattr(loader, "read_verified", read_then_swap)
    kern = loader.load(entry)
    mod = sys.modules[kern.fn.__module__]
    assert mod.__file__ == str(entry.source_path)
    assert inspect.getsource(mod) == TRITON_KERNEL
    jit = mod._attn_fwd
    if not hasattr(jit, "src"):  # the interpreter wraps instead of parsing; parse as the GPU path does
        from triton.runtime.jit import JITFunction

        jit = JITFunction(jit.fn)
    assert "def _attn_fwd" in jit.src and "tampered" not in jit.src
    out = torch.empty_like(q)
    kern(q, k, v, out, scale)
    assert_close_to_ref(out, checks["c0.ref"], checks["c0.baseline"])
    assert not mark.exists()


def test_tampered_source_is_never_imported(kc, tmp_path, caplog):
    spec, _, _, checks = make_problem()
    entry = store_kernel(kc, spec, checks)
    mark = tmp_path / "ran"
    entry.source_path.write_text(tampered(mark))
    with pytest.raises(KernelIntegrityError, match="does not match"):
        loader.load(entry)
    assert not mark.exists()
    caplog.set_level("WARNING", logger="torch_r1attn")
    assert kc.lookup(spec) is None
    assert "does not match its sha256" in caplog.text
    assert not mark.exists()


def test_loader_refuses_symlinked_source(kc, tmp_path):
    spec, _, _, checks = make_problem()
    entry = store_kernel(kc, spec, checks)
    mark = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text(tampered(mark))
    entry.source_path.unlink()
    entry.source_path.symlink_to(evil)
    with pytest.raises(KernelIntegrityError, match="cannot be opened safely"):
        loader.load(entry)
    assert not mark.exists()


def test_negative_entry_has_nothing_to_load(kc):
    spec, _, _, _ = make_problem()
    entry = kc.store_negative(spec, {"measurements": {"best_baseline": "sdpa"}})
    with pytest.raises(ValueError, match="negative"):
        loader.load(entry)


@pytest.mark.parametrize("source,match", [
    ("SUPPORTS = {'dtypes': ['fp16'], 'head_dims': [16]}\n", "defines no forward"),
    ("def forward(q, k, v, out, scale):\n    pass\n", "defines no SUPPORTS"),
    ("raise RuntimeError('boom at import')\n", "boom at import"),
    ("SUPPORTS = {'head_dims': [16]}\ndef forward(*a):\n    pass\n", "malformed SUPPORTS"),
])
def test_contract_violations_raise_kernel_load_error(kc, source, match):
    spec, _, _, checks = make_problem()
    entry = store_kernel(kc, spec, checks, source=source)
    with pytest.raises(KernelLoadError, match=match):
        loader.load(entry)


def test_cuda_entry_is_built_once_from_a_verified_private_copy(kc, monkeypatch):
    import types

    spec, _, _, checks = make_problem()
    cu_src = "// r1attn test kernel\nextern \"C\" void forward() {}\n"
    entry = kc.store(spec, cu_src, "cuda", {"config": {}}, checks)
    assert entry.source_path.name == "kernel.cu"
    calls = []

    def build_cuda_kernel(path, name_hint):
        # The entry's write lock is held while building: nobody else can take it now.
        other = cache_mod._file_lock(entry.lock_path, timeout=0)
        with pytest.raises(Exception):
            other.acquire(timeout=0)
        calls.append((Path(path), Path(path).read_text(), name_hint))
        return (lambda q, k, v, out, scale, **vt: None), {"dtypes": ["fp16"], "head_dims": [16]}

    monkeypatch.setitem(sys.modules, "torch_r1attn.cuda_build",
                        types.SimpleNamespace(build_cuda_kernel=build_cuda_kernel))
    k1 = loader.load(entry)
    k2 = loader.load(kc.lookup(spec))
    assert k1 is k2 and len(calls) == 1
    path, text, name = calls[0]
    assert text == cu_src and path.parent.parent == entry.path.parent / ".build"
    assert name.isidentifier() and spec.hash in name
    assert kc.try_search_lock(spec) is not None  # the write lock was released too


FRESH_PROCESS = textwrap.dedent('''
    import json, sys, torch
    from tests.helpers import assert_close_to_ref
    from torch_r1attn import loader
    from torch_r1attn.cache import KernelCache, split_check_set
    from torch_r1attn.spec import AttentionSpec
    root, spec_json, device = sys.argv[1:4]
    cache = KernelCache(root)
    entry = cache.lookup(AttentionSpec.from_dict(json.loads(spec_json)))
    assert entry is not None and not entry.negative, entry
    kern = loader.load(entry)
    n = 0
    for c in split_check_set(cache.load_check_set(entry)):
        q, k, v = (t.to(device) for t in (c.q, c.k, c.v))
        assert kern.unsupported(q, k, v) is None, kern.unsupported(q, k, v)
        out = torch.full(q.shape[:-1] + (v.shape[-1],), float("nan"), dtype=q.dtype, device=device)
        kern(q, k, v, out, c.scale, **{n: t.to(device) for n, t in c.variant_tensors.items()})
        assert_close_to_ref(out.cpu(), c.ref, c.baseline)
        n += 1
    print("FRESH-OK", n, kern.fn.__module__)
''')


def _fresh_process_roundtrip(kc, dtype, device, shape):
    B, H, S, D = shape
    spec, _, _, checks = make_problem(dtype, B=B, H=H, Sq=S, Sk=S, D=D, device=device)
    _, _, _, checks2 = make_problem(dtype, B=1, H=H, Sq=S - 1, Sk=S // 2 + 1, D=D, device=device, seed=1)
    checks.update({n.replace("c0.", "c1.", 1): t for n, t in checks2.items()})
    store_kernel(kc, spec, checks)
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(kc.root), json.dumps(spec.to_dict()), device],
                          capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FRESH-OK 2 torch_r1attn._kernels." in proc.stdout


def test_real_triton_kernel_loads_and_runs_in_a_fresh_process(kc):
    _fresh_process_roundtrip(kc, torch.float16, "cpu", (1, 2, 32, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_real_triton_kernel_loads_and_runs_in_a_fresh_process_gpu(kc, dtype):
    _fresh_process_roundtrip(kc, dtype, "cuda", (2, 8, 1024, 64))


def _hot_path_roundtrip(kc, dtype, device, shape, monkeypatch, native=None):
    """A cached real Triton kernel through the public API: the first call resolves and loads it
    (dispatch.forward), every repeat takes the front end's hot runner (``native``: the C++ fast
    path's module, which then takes the repeats after the first); each output against the
    reference, explicit scales included, and the HF (B, S, H, D)-output call too."""
    import torch_r1attn as r1
    from torch_r1attn import dispatch, functional

    B, H, S, D = shape
    monkeypatch.setenv("R1ATTN_BOUND_LAUNCH", "1")  # bound launches (torch_r1attn.launch, the default) on the hot path
    spec, (q, k, v), scale, checks = make_problem(dtype, B=B, H=H, Sq=S, Sk=S, D=D, device=device)
    store_kernel(kc, spec, checks)
    ref = checks["c0.ref"]
    out = r1.attention(q, k, v, on_miss="off")
    assert dispatch.status()[0]["kernel"], dispatch.status()
    assert_close_to_ref(out.cpu(), ref, checks["c0.baseline"])
    forwards = []
    real = dispatch.forward
    monkeypatch.setattr(dispatch, "forward", lambda *a, **kw: forwards.append(1) or real(*a, **kw))
    for _ in range(3):
        again = r1.attention(q, k, v)
        assert again.data_ptr() != out.data_ptr()
        assert_close_to_ref(again.cpu(), ref, checks["c0.baseline"])
    assert forwards == []  # every repeat took the hot runner
    if native is not None:
        assert native.size() == 1  # registered by the first repeat; the other two ran from C++
        slow = []
        real_attention = functional._attention
        monkeypatch.setattr(functional, "_attention", lambda *a, **kw: slow.append(1) or real_attention(*a, **kw))
        assert_close_to_ref(r1.attention(q, k, v).cpu(), ref, checks["c0.baseline"])
        assert slow == []
        monkeypatch.setattr(functional, "_attention", real_attention)
    from torch_r1attn.launch import BoundLauncher

    kern_fn = next(iter(dispatch._table.values())).kernel.fn
    bound = sum(o.bound_launches for o in kern_fn.__globals__.values() if isinstance(o, BoundLauncher))
    assert bound >= (3 + (native is not None) if device == "cuda" else 0)  # on the GPU the repeats are bound launches (interpreter: none)
    half = r1.attention(q, k, v, scale=scale / 2)  # a different scale reaches the kernel
    from torch_r1attn.reference import reference_attention
    from torch_r1attn.variants import Variant

    ref_half = reference_attention(q.cpu(), k.cpu(), v.cpu(), Variant(), scale / 2)
    assert_close_to_ref(half.cpu(), ref_half)
    hf_out = functional._attention(q, k, v, scale=scale, bshd_out=True)  # the transformers integration's call
    assert_close_to_ref(hf_out.cpu(), ref, checks["c0.baseline"])
    assert forwards == [1]  # the first (B, S, H, D)-output call resolves its own runner
    functional._attention(q, k, v, scale=scale, bshd_out=True)
    assert forwards == [1]


@pytest.mark.parametrize("native", [False, True], ids=["python", "cpp"])
def test_cached_kernel_repeat_calls_take_the_hot_runner(kc, monkeypatch, request, native):
    from torch_r1attn import dispatch

    if not dispatch.kernels_usable(torch.device("cpu")):  # a CUDA machine: the _gpu twin below
        pytest.skip("CPU tensors run generated kernels only under TRITON_INTERPRET=1")
    mod = request.getfixturevalue("cpp_hot") if native else None
    _hot_path_roundtrip(kc, torch.float16, "cpu", (1, 2, 32, 16), monkeypatch, mod)


@pytest.mark.gpu
@pytest.mark.parametrize("native", [False, True], ids=["python", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cached_kernel_repeat_calls_take_the_hot_runner_gpu(kc, dtype, monkeypatch, request, native):
    mod = request.getfixturevalue("cpp_hot") if native else None
    _hot_path_roundtrip(kc, dtype, "cuda", (2, 8, 1024, 64), monkeypatch, mod)
