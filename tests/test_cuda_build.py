"""CUDA candidates: nvcc + ctypes build of the shim and the seed kernel (CPU), and the seed's
numerics on the GPU."""

from __future__ import annotations

import json

import pytest
import torch

from torch_r1attn import cuda_build
from torch_r1attn import variants as V
from torch_r1attn.cuda_build import CudaBuildError, build_cuda_kernel, seed_source
from torch_r1attn.loader import KernelLoadError, LoadedKernel, load_source_file
from torch_r1attn.problem import Problem
from torch_r1attn.reference import eager_attention, reference_attention
from torch_r1attn.spec import AttentionSpec

from tests.helpers import assert_close_to_ref


@pytest.fixture
def need_nvcc():
    if cuda_build.find_nvcc() is None:
        pytest.skip("nvcc not found: CUDA candidates cannot be built on this machine")


def _problem(variant, dtype=torch.float16, D=64, Dv=None, Sq=128, Sk=128, Hq=4, Hkv=2) -> Problem:
    q = torch.empty(1, Hq, Sq, D, dtype=dtype)
    k = torch.empty(1, Hkv, Sk, D, dtype=dtype)
    v = torch.empty(1, Hkv, Sk, Dv or D, dtype=dtype)
    spec = AttentionSpec.from_call(q, k, v, variant.key)
    return Problem.from_spec(spec, variant, device="cuda", shape=(1, Hq, Hkv, Sq, Sk))


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_arch_and_command():
    if not torch.cuda.is_available():
        assert cuda_build.target_arch() == "90a"
    cmd = cuda_build.nvcc_command(arch="90a")
    assert "-gencode=arch=compute_90a,code=sm_90a" in cmd and "-shared" in cmd and "-fPIC" in cmd


def test_seed_builds_loads_and_is_reused(need_nvcc, tmp_path):
    src = _write(tmp_path, "seed.cu", seed_source())
    fwd, sup = build_cuda_kernel(src, "seed")
    assert sup["dtypes"] == ["fp16", "bf16", "fp32"] and sup["variant_tensors"] == []
    sos = list(tmp_path.glob("seed.*.so"))
    assert len(sos) == 1
    mtime = sos[0].stat().st_mtime_ns
    build_cuda_kernel(src, "seed")  # same source + toolchain: no rebuild
    assert [p.stat().st_mtime_ns for p in tmp_path.glob("seed.*.so")] == [mtime]
    src.write_text(seed_source() + "\n// changed\n")
    build_cuda_kernel(src, "seed")
    assert len(list(tmp_path.glob("seed.*.so"))) == 2  # keyed by the source hash
    assert not list(tmp_path.glob("*.tmp"))


def test_loader_contract_for_cu_files(need_nvcc, tmp_path):
    k = load_source_file(_write(tmp_path, "seed.cu", seed_source()), "cuda", "seed")
    assert isinstance(k, LoadedKernel)
    q = torch.zeros(1, 2, 8, 64, dtype=torch.float16)
    assert k.unsupported(q, q, q) == "device cpu"  # the seed declares CUDA only
    with pytest.raises(TypeError, match="variant tensors"):
        k(q, q, q, torch.empty_like(q), 0.1, p0_doc_ids=torch.zeros(8))
    with pytest.raises(ValueError, match="CUDA device"):
        k(q, q, q, torch.empty_like(q), 0.1)


@pytest.mark.parametrize("variant, kind, window, br", [
    (V.full(), 0, 0, 0), (V.causal(), 1, 0, 0), (V.causal("bottom_right"), 1, 0, 1),
    (V.sliding_window(37), 2, 37, 0), (V.sliding_window(5, align="bottom_right"), 2, 5, 1),
])
def test_seed_specialised_for_problem(variant, kind, window, br):
    src = seed_source(_problem(variant, D=128, Dv=64, Hq=8, Hkv=2))
    assert f"#define R1_MASK_KIND {kind}" in src and f"#define R1_WINDOW {window}" in src
    assert f"#define R1_BOTTOM_RIGHT {br}" in src
    line = next(x for x in src.splitlines() if x.startswith("#define R1_SUPPORTS_JSON"))
    sup = json.loads(json.loads(line.split(" ", 2)[2]))  # C string literal -> JSON text -> dict
    assert sup == {"dtypes": ["fp16"], "head_dims": [128], "head_dims_v": [64], "gqa": [4], "devices": ["cuda"],
                   "variant_tensors": []}


def test_seed_left_generic_for_other_variants():
    assert seed_source(_problem(V.softcap(30.0))) == seed_source()


@pytest.mark.parametrize("variant", [V.causal(), V.sliding_window(9, align="bottom_right")])
def test_specialised_seed_compiles(need_nvcc, tmp_path, variant):
    fwd, sup = build_cuda_kernel(_write(tmp_path, "s.cu", seed_source(_problem(variant))), "s")
    assert sup["head_dims"] == [64] and sup["gqa"] == [2]


def test_compile_error_reports_nvcc_diagnostics(need_nvcc, tmp_path):
    bad = seed_source().replace("const float m_new =", "const float m_new = undefined_symbol +")
    with pytest.raises(CudaBuildError) as ei:
        build_cuda_kernel(_write(tmp_path, "bad.cu", bad), "bad")
    msg = str(ei.value)
    assert "nvcc failed" in msg and "undefined_symbol" in msg and "bad.cu" in msg
    assert str(tmp_path) not in msg  # paths shortened: the message goes into an LLM prompt
    assert isinstance(ei.value, KernelLoadError)
    assert not list(tmp_path.glob("*.so")) and not list(tmp_path.glob("*.tmp"))


def test_missing_shim_symbols(need_nvcc, tmp_path):
    src = 'extern "C" int r1attn_forward() { return 0; }\n'
    with pytest.raises(CudaBuildError, match="missing extern"):
        build_cuda_kernel(_write(tmp_path, "noshim.cu", src), "noshim")


def test_bad_supports_json(need_nvcc, tmp_path):
    src = seed_source().replace('#define R1_SUPPORTS_JSON "{', '#define R1_SUPPORTS_JSON "{oops')
    with pytest.raises(CudaBuildError, match="not valid JSON"):
        build_cuda_kernel(_write(tmp_path, "badjson.cu", src), "badjson")


def test_nvcc_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(cuda_build, "find_nvcc", lambda: None)
    with pytest.raises(CudaBuildError, match="nvcc not found"):
        build_cuda_kernel(_write(tmp_path, "x.cu", seed_source()), "x")


# ----------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("variant, B, Hq, Hkv, Sq, Sk, D, Dv", [
    (V.full(), 2, 8, 8, 257, 257, 128, 128),
    (V.causal(), 2, 8, 2, 1025, 1025, 128, 128),
    (V.causal("bottom_right"), 1, 4, 1, 97, 300, 64, 64),
    (V.causal("bottom_right"), 1, 4, 4, 130, 65, 64, 64),  # Sq > Sk: leading rows fully masked
    (V.sliding_window(64), 1, 4, 2, 511, 511, 96, 96),
    (V.full(), 1, 2, 1, 1, 4097, 59, 111),  # awkward dims, decode-like
])
def test_seed_matches_reference_on_gpu(need_nvcc, tmp_path, dtype, variant, B, Hq, Hkv, Sq, Sk, D, Dv):
    problem = _problem(variant, dtype=dtype, D=D, Dv=Dv, Sq=Sq, Sk=Sk, Hq=Hq, Hkv=Hkv)
    kern = load_source_file(_write(tmp_path, "seed.cu", seed_source(problem)), "cuda", "seed")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, Sq, Hq, D, device="cuda", dtype=dtype, generator=g).transpose(1, 2)  # strided
    k = torch.randn(B, Hkv, Sk, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, Sk, Dv, device="cuda", dtype=dtype, generator=g) * 3
    assert kern.unsupported(q, k, v) is None
    scale = D ** -0.5
    out = torch.full((B, Hq, Sq, Dv), float("nan"), device="cuda", dtype=dtype)
    qc, kc, vc = q.clone(), k.clone(), v.clone()
    kern(q, k, v, out, scale)
    out2 = torch.full_like(out, float("nan"))
    kern(q, k, v, out2, scale)
    torch.cuda.synchronize()
    assert torch.equal(out, out2)  # deterministic
    assert torch.equal(q, qc) and torch.equal(k, kc) and torch.equal(v, vc)
    ref = reference_attention(q.double(), k.double(), v.double(), variant, scale)
    base = eager_attention(q, k, v, variant, scale, compute_dtype=dtype).to(dtype)
    assert_close_to_ref(out, ref, base)
