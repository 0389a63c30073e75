"""Build and load CUDA C++ kernel candidates: plain ``nvcc`` + ``ctypes``.

A CUDA candidate is one ``.cu`` file that includes ``r1attn_shim.h`` (``csrc/``) and
exports a C ABI (see the header)::

    extern "C" const char* r1attn_supports();   // SUPPORTS as JSON (+ "variant_tensors": [names])
    extern "C" int r1attn_forward(const r1attn_tensor* q, k, v, out, float scale,
                                  const r1attn_tensor* extras, int n_extras, cudaStream_t stream);

where ``r1attn_tensor`` is ``{device pointer, dtype code, ndim, sizes[4], strides[4]}`` (sizes
and strides in elements). :func:`build_cuda_kernel` compiles it with::

    nvcc -O3 -shared -Xcompiler -fPIC -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I csrc

(the arch of the current device, ``sm_90a`` when there is none), next to the source, keyed by a
hash of (source, shim header, nvcc version, flags), loads the ``.so`` with ``ctypes`` and wraps
it in a Python ``forward(q, k, v, out, scale, **variant_tensors)`` that checks the tensors and
passes their pointers and ``torch.cuda.current_stream()``.

**Why nvcc + ctypes and not** ``torch.utils.cpp_extension``: it compiles with plain ``nvcc`` on a
machine whose torch is a CPU build (no torch CUDA headers are needed, so CI can at least compile
every candidate), a build takes about 2 s instead of the ~40 s of a torch extension (which
compiles torch's headers), and the ``.so`` has no ABI coupling to torch: nvcc links the CUDA
runtime statically, so the library depends only on the driver and cannot break when torch or
its compiler flags change. The runtime it links shares the device's primary context with
torch's, so torch's device pointers and streams are valid in it.

Exceptions: :class:`CudaBuildError` (a :class:`~torch_r1attn.loader.KernelLoadError`) when nvcc
is missing, the build fails (the message ends with nvcc's diagnostics, which is what the LLM
proposer feeds back), or the library breaks the ABI. The returned ``forward`` raises
``TypeError``/``ValueError`` for tensors it cannot take and ``RuntimeError`` when the kernel
reports a failure.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .loader import KernelLoadError

log = logging.getLogger(__name__)

def _csrc_dir() -> Path:
    """``csrc/`` holds the shim and the seed kernel: inside the package in an installed wheel
    (setup.py copies it there), at the repository's top level in a source / editable checkout."""
    here = Path(__file__).resolve().parent
    for cand in (here / "csrc", here.parent / "csrc"):
        if (cand / "r1attn_shim.h").is_file():
            return cand
    return here / "csrc"


CSRC_DIR = _csrc_dir()
SHIM_HEADER = CSRC_DIR / "r1attn_shim.h"
SEED_SOURCE = CSRC_DIR / "seed_attention.cu"
ABI_VERSION = 1
BUILD_TIMEOUT_S = 300.0
DEFAULT_ARCH = "90a"  # the H200 target when no device is visible (CPU-only CI)

DTYPE_CODES = {
    torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3,
    torch.int32: 4, torch.int64: 5, torch.bool: 6, torch.int8: 7, torch.uint8: 8, torch.int16: 9,
}


class CudaBuildError(KernelLoadError):
    """nvcc missing, compilation failed, or the built library breaks the ABI."""


class R1Tensor(ctypes.Structure):
    """Mirror of ``r1attn_tensor`` in ``r1attn_shim.h``."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int32),
        ("ndim", ctypes.c_int32),
        ("sizes", ctypes.c_int64 * 4),
        ("strides", ctypes.c_int64 * 4),
    ]


# ------------------------------------------------------------------------------------ toolchain
@functools.lru_cache(maxsize=None)
def find_nvcc() -> str | None:
    """``$CUDA_HOME/bin/nvcc``, else ``nvcc`` on PATH, else ``/usr/local/cuda/bin/nvcc``; None if none."""
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = "/usr/local/cuda/bin/nvcc"
    return fallback if os.access(fallback, os.X_OK) else None


@functools.lru_cache(maxsize=None)
def nvcc_version() -> str | None:
    """e.g. ``"13.0.88"``; None when nvcc is not found."""
    nvcc = find_nvcc()
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"V(\d+\.\d+\.\d+)", out) or re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else out.strip().splitlines()[-1] if out.strip() else None


def target_arch() -> str:
    """``"90a"`` for an H100/H200: the arch-specific ('a') target that enables wgmma/TMA on
    sm_90+; the current CUDA device's capability, or :data:`DEFAULT_ARCH` without one."""
    if not torch.cuda.is_available():
        return DEFAULT_ARCH
    major, minor = torch.cuda.get_device_capability()
    return f"{major}{minor}{'a' if major >= 9 else ''}"


def nvcc_flags(arch: str | None = None) -> list[str]:
    arch = arch or target_arch()
    return ["-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17",
            f"-gencode=arch=compute_{arch},code=sm_{arch}", f"-I{CSRC_DIR}"]


def nvcc_command(src: str = "kernel.cu", out: str = "kernel.so", arch: str | None = None) -> str:
    """The build command as text (for prompts and error messages)."""
    flags = [f for f in nvcc_flags(arch) if not f.startswith("-I")]
    return " ".join(["nvcc", *flags, "-I<csrc>", "-o", out, src])


# ---------------------------------------------------------------------------------------- seed
def shim_header_text() -> str:
    return SHIM_HEADER.read_text()


def seed_source(problem: Any = None) -> str:
    """The seed kernel, its constants set for ``problem`` (a :class:`~torch_r1attn.problem.Problem`)
    when its variant is full / causal / sliding window (any alignment); otherwise the file as
    shipped (full attention), which the model must extend with the variant."""
    src = SEED_SOURCE.read_text()
    if problem is None:
        return src
    from . import variants as V

    parts = problem.variant.canonical_parts
    kind, window = 0, 0
    if len(parts) == 1 and isinstance(parts[0], V.Causal):
        kind = 1
    elif len(parts) == 1 and isinstance(parts[0], V.SlidingWindow):
        kind, window = 2, parts[0].size
    elif parts:
        return src
    spec = problem.spec
    supports = {"dtypes": [spec.dtype], "head_dims": [spec.head_dim], "head_dims_v": [spec.head_dim_v],
                "gqa": [spec.gqa], "devices": ["cuda"], "variant_tensors": []}
    br = int(problem.variant.align == "bottom_right")
    js = json.dumps(supports).replace('"', '\\"')
    for name, val in (("R1_MASK_KIND", str(kind)), ("R1_WINDOW", str(window)),
                      ("R1_BOTTOM_RIGHT", str(br)), ("R1_SUPPORTS_JSON", f'"{js}"')):
        src = re.sub(rf"^#define {name} .*?(\s*//.*)?$", lambda m, n=name, v=val: f"#define {n} {v}{m.group(1) or ''}",
                     src, count=1, flags=re.M)
    return src


# --------------------------------------------------------------------------------------- build
def _build_key(source: str, arch: str) -> str:
    h = hashlib.sha256()
    for part in (source, shim_header_text(), nvcc_version() or "?", " ".join(nvcc_flags(arch)), str(ABI_VERSION)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def compile_cuda(path: Path, arch: str | None = None, timeout_s: float = BUILD_TIMEOUT_S) -> Path:
    """Compile ``path`` to a shared library next to it (reused when the key matches); return it.

    The build runs under a file lock and writes through a temporary file + rename, so processes
    that build the same candidate at once never load a half-written library.
    """
    from filelock import FileLock, Timeout

    path = Path(path)
    nvcc = find_nvcc()
    if nvcc is None:
        raise CudaBuildError("nvcc not found (set CUDA_HOME or put nvcc on PATH); cannot build CUDA candidates")
    arch = arch or target_arch()
    try:
        source = path.read_text()
    except OSError as e:
        raise CudaBuildError(f"cannot read {path}: {e}") from e
    so = path.with_name(f"{path.stem}.{_build_key(source, arch)}.sm{arch}.so")
    try:
        with FileLock(str(so) + ".lock", timeout=timeout_s + 60):
            if so.exists():
                return so
            fd, tmp = tempfile.mkstemp(prefix=so.name + ".", suffix=".tmp", dir=so.parent)
            os.close(fd)
            cmd = [nvcc, *nvcc_flags(arch), "-o", tmp, str(path)]
            log.debug("building %s: %s", path.name, " ".join(cmd))
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            except subprocess.TimeoutExpired as e:
                os.unlink(tmp)
                raise CudaBuildError(f"nvcc timed out after {timeout_s:.0f} s building {path.name}") from e
            if proc.returncode != 0:
                os.unlink(tmp)
                diag = "\n".join((proc.stderr + proc.stdout).strip().splitlines()[-40:])
                diag = diag.replace(str(path), path.name)
                raise CudaBuildError(f"nvcc failed (exit {proc.returncode}) building {path.name}:\n{diag}")
            os.replace(tmp, so)
            return so
    except Timeout as e:
        raise CudaBuildError(f"timed out waiting for another build of {so.name}") from e
    except OSError as e:
        raise CudaBuildError(f"cannot build {path.name} in {path.parent}: {e}") from e


def _load_library(so: Path) -> tuple[ctypes.CDLL, dict[str, Any]]:
    try:
        lib = ctypes.CDLL(str(so))
    except OSError as e:
        raise CudaBuildError(f"cannot load {so.name}: {e}") from e
    for sym in ("r1attn_forward", "r1attn_supports", "r1attn_abi_version", "r1attn_last_error"):
        if not hasattr(lib, sym):
            raise CudaBuildError(f'{so.name}: missing extern "C" symbol {sym} (include r1attn_shim.h)')
    lib.r1attn_abi_version.restype = ctypes.c_int
    if lib.r1attn_abi_version() != ABI_VERSION:
        raise CudaBuildError(f"{so.name}: shim ABI version {lib.r1attn_abi_version()} != {ABI_VERSION}")
    lib.r1attn_supports.restype = ctypes.c_char_p
    lib.r1attn_last_error.restype = ctypes.c_char_p
    ptr = ctypes.POINTER(R1Tensor)
    lib.r1attn_forward.argtypes = [ptr, ptr, ptr, ptr, ctypes.c_float, ptr, ctypes.c_int, ctypes.c_void_p]
    lib.r1attn_forward.restype = ctypes.c_int
    raw = lib.r1attn_supports()
    try:
        supports = json.loads((raw or b"").decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CudaBuildError(f"{so.name}: r1attn_supports() is not valid JSON ({e}): {raw[:200]!r}") from e
    if not isinstance(supports, dict):
        raise CudaBuildError(f"{so.name}: r1attn_supports() must return a JSON object")
    names = supports.get("variant_tensors", [])
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise CudaBuildError(f"{so.name}: SUPPORTS['variant_tensors'] must be a list of tensor names")
    return lib, supports


def _describe(t: torch.Tensor, name: str) -> R1Tensor:
    code = DTYPE_CODES.get(t.dtype)
    if code is None:
        raise TypeError(f"{name}: dtype {t.dtype} cannot be passed to a CUDA kernel")
    if t.dim() > 4:
        raise ValueError(f"{name}: at most 4 dims, got shape {tuple(t.shape)}")
    d = R1Tensor()
    d.data = t.data_ptr()
    d.dtype = code
    d.ndim = t.dim()
    for i in range(4):
        d.sizes[i] = t.shape[i] if i < t.dim() else 1
        d.strides[i] = t.stride(i) if i < t.dim() else 0
    return d


def _make_forward(lib: ctypes.CDLL, supports: dict[str, Any], name: str) -> Callable:
    names: list[str] = list(supports.get("variant_tensors", []))
    fn = lib.r1attn_forward
    want = set(names)

    def forward(q, k, v, out, scale, **variant_tensors) -> None:
        got = set(variant_tensors)
        if got != want:
            raise TypeError(f"{name}: variant tensors {sorted(got)} do not match the kernel's "
                            f"SUPPORTS['variant_tensors'] {sorted(want)}")
        for tn, t in (("q", q), ("k", k), ("v", v), ("out", out)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: {tn} must be a tensor, got {type(t).__name__}")
            if t.device.type != "cuda" or t.device != q.device:
                raise ValueError(f"{name}: {tn} must be on q's CUDA device, got {t.device}")
            if t.dim() != 4:
                raise ValueError(f"{name}: {tn} must be 4-D, got shape {tuple(t.shape)}")
            if t.dtype != q.dtype:
                raise TypeError(f"{name}: {tn} has dtype {t.dtype}, q has {q.dtype}")
            if t.shape[-1] > 1 and t.stride(-1) != 1:
                raise ValueError(f"{name}: {tn} must have a contiguous last dimension, strides {t.stride()}")
        extras = (R1Tensor * max(1, len(names)))()
        for i, n in enumerate(names):
            t = variant_tensors[n]
            if not isinstance(t, torch.Tensor) or t.device != q.device:
                raise ValueError(f"{name}: variant tensor {n} must be a tensor on {q.device}")
            extras[i] = _describe(t, n)
        dq, dk, dv, do = (_describe(t, tn) for t, tn in ((q, "q"), (k, "k"), (v, "v"), (out, "out")))
        with torch.cuda.device(q.device):
            stream = torch.cuda.current_stream(q.device).cuda_stream
            rc = fn(ctypes.byref(dq), ctypes.byref(dk), ctypes.byref(dv), ctypes.byref(do),
                    ctypes.c_float(float(scale)), extras, len(names), ctypes.c_void_p(stream))
        if rc != 0:
            msg = (lib.r1attn_last_error() or b"").decode(errors="replace")
            raise RuntimeError(f"{name}: r1attn_forward failed (code {rc}): {msg}")

    forward.__name__ = f"forward_{re.sub(r'[^A-Za-z0-9_]', '_', name)}"
    return forward


def build_cuda_kernel(path: Path, name_hint: str = "kernel") -> tuple[Callable, dict[str, Any]]:
    """Compile (or reuse) and load a ``.cu`` candidate: ``(forward, SUPPORTS)``.

    Raises :class:`CudaBuildError` when nvcc is missing, the build fails or the library breaks
    the ABI (missing symbols, wrong ABI version, SUPPORTS not a JSON object).
    """
    so = compile_cuda(Path(path))
    lib, supports = _load_library(so)
    return _make_forward(lib, supports, name_hint), dict(supports)
