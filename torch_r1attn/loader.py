"""Turn a kernel source file into a callable, behind the cache's lock.

**Kernel module contract** (template-made or LLM-written)::

    SUPPORTS = {
        "dtypes": ["fp16", "bf16"],        # spec dtype names
        "head_dims": [128],                # D (qk) values accepted
        "head_dims_v": [128],              # Dv values accepted
        "gqa": [1, 4],                     # Hq // Hkv ratios accepted, or "any"
        "max_seqlen_q": 8192,              # optional caps
        "max_seqlen_k": 8192,
        "devices": ["cuda"],               # "cpu" only for interpreter-run kernels
    }

    def forward(q, k, v, out, scale, **variant_tensors) -> None:
        # q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), out (B, Hq, Sq, Dv) preallocated.
        # Writes every element of out; allocates no output; mutates no input.
        # variant_tensors are named as Variant.tensors() names them ("p0_doc_ids", ...).

Triton candidates are Python files imported as uniquely named modules (never ``exec`` in the
caller's process: the file on disk *is* what was verified, checked by hash before import).
CUDA candidates are ``.cu`` files with the same ``forward`` entry point, built by
:mod:`torch_r1attn.cuda_build` (see there for why ``torch.utils.cpp_extension``).
"""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from .spec import DTYPE_NAMES

_counter = itertools.count()


class KernelLoadError(RuntimeError):
    """A kernel source could not be imported/built or breaks the contract."""


def import_kernel_file(path: str | Path, name_hint: str = "kernel") -> ModuleType:
    """Import a Triton kernel file as a fresh, uniquely named module."""
    path = Path(path)
    safe = "".join(c if c.isalnum() else "_" for c in name_hint)[:60]
    modname = f"torch_r1attn._kernels.{safe}_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(modname, str(path))
    if spec is None or spec.loader is None:
        raise KernelLoadError(f"cannot import kernel file {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[modname] = mod  # triton.jit needs the module importable while compiling
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        sys.modules.pop(modname, None)
        raise KernelLoadError(f"importing {path.name} failed: {type(e).__name__}: {e}") from e
    return mod


class LoadedKernel:
    """A kernel's ``forward`` plus its declared ``SUPPORTS``, checked before every launch."""

    __slots__ = ("fn", "supports", "name", "_dtypes", "_d", "_dv", "_gqa", "_mq", "_mk", "_devs")

    def __init__(self, fn: Callable, supports: dict[str, Any], name: str = "kernel"):
        if not callable(fn):
            raise KernelLoadError(f"{name}: forward is not callable")
        if not isinstance(supports, dict):
            raise KernelLoadError(f"{name}: SUPPORTS must be a dict, got {type(supports).__name__}")
        self.fn, self.supports, self.name = fn, supports, name
        try:
            self._dtypes = frozenset(supports["dtypes"])
            self._d = frozenset(int(x) for x in supports["head_dims"])
            self._dv = frozenset(int(x) for x in supports.get("head_dims_v", supports["head_dims"]))
            g = supports.get("gqa", "any")
            self._gqa = None if g == "any" else frozenset(int(x) for x in g)
            self._mq = int(supports.get("max_seqlen_q", 1 << 62))
            self._mk = int(supports.get("max_seqlen_k", 1 << 62))
            self._devs = frozenset(supports.get("devices", ["cuda"]))
        except (KeyError, TypeError, ValueError) as e:
            raise KernelLoadError(f"{name}: malformed SUPPORTS ({type(e).__name__}: {e})") from e

    def unsupported(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
        """None when the kernel declares support for this call, else the reason."""
        if DTYPE_NAMES.get(q.dtype) not in self._dtypes:
            return f"dtype {q.dtype}"
        if q.shape[3] not in self._d or v.shape[3] not in self._dv:
            return f"head dims {q.shape[3]}/{v.shape[3]}"
        if self._gqa is not None and q.shape[1] // k.shape[1] not in self._gqa:
            return f"gqa {q.shape[1] // k.shape[1]}"
        if q.shape[2] > self._mq or k.shape[2] > self._mk:
            return f"lengths {q.shape[2]}/{k.shape[2]}"
        if q.device.type not in self._devs:
            return f"device {q.device.type}"
        return None

    def __call__(self, q, k, v, out, scale, **variant_tensors) -> None:
        self.fn(q, k, v, out, scale, **variant_tensors)

    def __repr__(self) -> str:
        return f"LoadedKernel({self.name})"


def load_source_file(path: str | Path, language: str = "triton", name_hint: str = "kernel") -> LoadedKernel:
    """Load a kernel file (no cache involved: the verifier worker uses this on candidates)."""
    if language == "triton":
        mod = import_kernel_file(path, name_hint)
        fwd, sup = getattr(mod, "forward", None), getattr(mod, "SUPPORTS", None)
    elif language == "cuda":
        from .cuda_build import build_cuda_kernel

        fwd, sup = build_cuda_kernel(Path(path), name_hint)
    else:
        raise KernelLoadError(f"unknown kernel language {language!r}")
    if fwd is None:
        raise KernelLoadError(f"{Path(path).name}: defines no forward(q, k, v, out, scale, **variant_tensors)")
    if sup is None:
        raise KernelLoadError(f"{Path(path).name}: defines no SUPPORTS dict")
    return LoadedKernel(fwd, sup, name_hint)
