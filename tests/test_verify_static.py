"""The static checker: each cheat is refused with a reason that names it; real kernels pass."""

from pathlib import Path

import pytest

from tests.kernels import kernel_source
from torch_r1attn.verify.static import check_source

KERNELS = Path(__file__).parent / "kernels"

HEADER = "import torch\nimport triton\nimport triton.language as tl\n"


def reasons(body: str, header: str = HEADER) -> list[str]:
    return check_source(header + body, "triton")


@pytest.mark.parametrize("body, needle", [
    ("import torch.nn.functional as F\ndef forward(q,k,v,out,scale):\n"
     "    out.copy_(F.scaled_dot_product_attention(q,k,v))\n", "scaled_dot_product_attention"),
    ("def forward(q,k,v,out,scale):\n    p = torch.matmul(q, k)\n", "torch.matmul"),
    ("def forward(q,k,v,out,scale):\n    p = torch.einsum('bhqd,bhkd->bhqk', q, k)\n", "torch.einsum"),
    ("def forward(q,k,v,out,scale):\n    p = torch.bmm(q, k)\n", "torch.bmm"),
    ("def forward(q,k,v,out,scale):\n    p = torch.softmax(q, -1)\n", "torch.softmax"),
    ("def forward(q,k,v,out,scale):\n    p = (q * scale).softmax(-1)\n", ".softmax()"),
    ("def forward(q,k,v,out,scale):\n    p = q @ k\n", "@ operator"),
    ("from torch.nn.attention.flex_attention import flex_attention\n", "torch.nn.attention"),
    ("def forward(q,k,v,out,scale):\n    torch.nn.functional.gelu(q)\n", "torch.nn"),
    ("def forward(q,k,v,out,scale):\n    try:\n        pass\n    except Exception:\n        pass\n", "try/except"),
    ("def forward(q,k,v,out,scale):\n    s = torch.cuda.Stream()\n", "side streams"),
    ("def forward(q,k,v,out,scale):\n    with torch.cuda.stream(None):\n        pass\n", "side streams"),
    ("import threading\n", "threads"),
    ("import multiprocessing\n", "processes"),
    ("import subprocess\n", "processes"),
    ("from concurrent.futures import ThreadPoolExecutor\n", "concurrent"),
    ("def forward(q,k,v,out,scale):\n    exec('1')\n", "exec"),
    ("def forward(q,k,v,out,scale):\n    eval('1')\n", "eval"),
    ("def forward(q,k,v,out,scale):\n    compile('1', 'x', 'exec')\n", "compile"),
    ("def forward(q,k,v,out,scale):\n    __import__('os')\n", "__import__"),
    ("import importlib\n", "importlib"),
    ("def forward(q,k,v,out,scale):\n    open('/etc/passwd')\n", "file access"),
    ("import os\n", "OS access"),
    ("import sys\n", "interpreter access"),
    ("import socket\n", "network"),
    ("import pathlib\n", "file access"),
    ("import shutil\n", "file access"),
    ("import ctypes\n", "raw memory"),
    ("_CACHE = {}\n", "module-level mutable container _CACHE"),
    ("_CACHE = dict()\n", "module-level mutable container _CACHE"),
    ("_SEEN = []\n", "module-level mutable container _SEEN"),
    ("_T = {'a': 1}\ndef forward(q,k,v,out,scale):\n    _T['b'] = out\n", "writes into module-level container _T"),
    ("_T = [1]\ndef forward(q,k,v,out,scale):\n    _T.append(out)\n", "mutates module-level container _T"),
    ("n = 0\ndef forward(q,k,v,out,scale):\n    global n\n    n += 1\n", "global statement"),
    ("def forward(q,k,v,out,scale, _memo={}):\n    pass\n", "mutable default argument"),
    ("def forward(q,k,v,out,scale):\n    forward.last = out\n", "sets an attribute on module-level object forward"),
    ("import functools\n@functools.lru_cache\ndef forward(q,k,v,out,scale):\n    pass\n", "lru_cache"),
    ("def forward(q,k,v,out,scale):\n    key = q.data_ptr()\n", "data_ptr"),
    ("def forward(q,k,v,out,scale):\n    key = id(q)\n", "id()"),
    ("def forward(q,k,v,out,scale):\n    getattr(torch, 'mat' + 'mul')(q, k)\n", "getattr(torch"),
    ("def forward(q,k,v,out,scale):\n    x = q.__class__.__mro__\n", "dunder attribute"),
    ("def forward(q,k,v,out,scale):\n    out.copy_(q)\n", ".copy_()"),
    ("def forward(q,k,v,out,scale):\n    out.zero_()\n", ".zero_()"),
    ("import numpy as np\n", "numpy"),
    ("def forward(q,k,v,out,scale):\n    x = torch.cuda.synchronize()\n", "synchronization"),
])
def test_rejects_with_reason(body, needle):
    rs = reasons(body)
    assert rs, f"not rejected:\n{body}"
    assert any(needle in r for r in rs), f"no reason mentions {needle!r}: {rs}"


def test_reasons_carry_line_numbers():
    rs = reasons("def forward(q,k,v,out,scale):\n    p = torch.matmul(q, k)\n")
    assert rs[0].startswith("line 5:"), rs


def test_syntax_error_is_a_reason():
    rs = check_source("def forward(:\n", "triton")
    assert len(rs) == 1 and "syntax error" in rs[0]


@pytest.mark.parametrize("body", [
    # scratch allocation, shapes, dtypes, device queries: the launcher's legitimate torch use
    "def forward(q,k,v,out,scale, **vt):\n"
    "    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)\n"
    "    cap = torch.cuda.get_device_capability() if q.is_cuda else (0, 0)\n"
    "    stream = torch.cuda.current_stream() if q.is_cuda else None\n"
    "    n = q.shape[0] * q.stride(0)\n",
    # a constant module-level config table, only read
    "CONFIGS = {'fp16': (64, 64), 'fp32': (32, 32)}\n"
    "def forward(q,k,v,out,scale):\n    bm, bn = CONFIGS['fp16']\n",
    # triton.language compute inside the kernel (tl.exp, tl.sum, x.to(...))
    "@triton.jit\ndef _k(X, N: tl.constexpr):\n"
    "    x = tl.load(X + tl.arange(0, N))\n    y = tl.sum(tl.exp(x), 0)\n    z = x.to(tl.float32)\n",
    "import math\nfrom triton.language.extra import libdevice\nSCALE = 1 / math.sqrt(2)\n",
])
def test_allows_legitimate_sources(body):
    assert reasons(body) == []


def test_repository_kernels():
    assert check_source((KERNELS / "good_attention.py").read_text(), "triton") == []
    for name, needle in [("bad_sdpa_cheat.py", "scaled_dot_product_attention"), ("bad_try_except.py", "try/except"),
                         ("bad_segfault.py", "ctypes"), ("bad_os_exit.py", "os"), ("bad_side_stream.py", "Stream"),
                         ("bad_nondeterministic.py", "_STATE"), ("bad_drifts.py", "_STATE")]:
        rs = check_source(kernel_source(name), "triton")
        assert any(needle in r for r in rs), (name, rs)
    # these cheat at run time only; the dynamic checks must catch them (tests/test_verify.py)
    for name in ("bad_wrong_math.py", "bad_partial_write.py", "bad_mutates_input.py", "bad_clamps_inputs.py",
                 "bad_block_multiple_only.py", "bad_hangs.py", "bad_illegal_memory.py"):
        assert check_source(kernel_source(name), "triton") == [], name


CUDA_OK = r"""
#include <torch/extension.h>
// torch::matmul would be a cheat, but this is a comment
__global__ void attn(const half* q, half* o, int n) { /* "softmax" in a comment */ }
void forward(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor out, double scale) {
    auto stream = at::cuda::getCurrentCUDAStream();
    attn<<<1, 128, 0, stream>>>(nullptr, nullptr, 0);
}
"""


def test_cuda_clean_source_passes():
    assert check_source(CUDA_OK, "cuda") == []


@pytest.mark.parametrize("snippet, needle", [
    ("out.copy_(torch::matmul(q, k));", "torch/ATen compute"),
    ("auto p = at::softmax(s, -1);", "torch/ATen compute"),
    ("auto y = q.matmul(k);", "tensor compute method"),
    ("try { f(); } catch (...) { g(); }", "try/catch"),
    ("cudaStream_t s; cudaStreamCreate(&s);", "side stream"),
    ("std::thread t(f);", "threads"),
    ("system(\"rm -rf /\");", "process"),
    ("FILE* f = fopen(\"x\", \"r\");", "file access"),
    ("static std::unordered_map<int64_t, torch::Tensor> cache;", "static mutable container"),
    ("cublasGemmEx(h);", "library GEMM"),
])
def test_cuda_rejects(snippet, needle):
    rs = check_source(CUDA_OK + "\nvoid g() { " + snippet + " }\n", "cuda")
    assert any(needle in r for r in rs), rs


def test_bad_arguments():
    with pytest.raises(TypeError):
        check_source(b"x", "triton")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown kernel language"):
        check_source("x = 1", "rust")
