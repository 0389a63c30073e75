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

    def forward(q, k, v, out, scale, **variant_tensors) -> None | torch.Tensor:
        # q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv), out (B, Hq, Sq, Dv) preallocated.
        # Writes every element of out and returns None; mutates no input.
        # Or returns a tensor of out's shape, dtype and device holding the result (out is then
        # ignored): for modules whose last step already made an output (a composed module's
        # SDPA call, search.compose), so they need not copy it into out. It must not share
        # memory with an input.
        # variant_tensors are named as Variant.tensors() names them ("p0_doc_ids", ...).

Triton candidates are Python files imported as uniquely named modules (never ``exec`` in the
caller's process: the file on disk *is* what was verified, checked by hash before import).
CUDA candidates are ``.cu`` files with the same ``forward`` entry point, built by
:mod:`torch_r1attn.cuda_build` (nvcc + ctypes; see there for why not ``torch.utils.cpp_extension``).

**Cache entries** (:func:`load`): the source bytes are read once, checked against the entry's
``source_sha256``, and *those bytes* are what is imported (or built) — never a second read of the
path, so a file swapped between check and use is not run. A Triton entry is imported through
:class:`VerifiedSourceLoader`, whose ``get_source`` returns the verified text under the entry's
real filename; ``linecache`` is seeded with the same text so ``inspect.getsource`` (which
``triton.jit`` calls when the module executes) sees the verified source, not the file on disk.
A CUDA entry's verified bytes are copied to a private per-entry build dir
(``shard/.build/``) and built from there by :mod:`torch_r1attn.cuda_build`, under the entry's
lock, so concurrent processes build it once and later processes reuse the library. Loaded kernels are memoised per
(source path, source hash).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.util
import itertools
import linecache
import logging
import os
import stat
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from .spec import DTYPE_NAMES

log = logging.getLogger(__name__)

_counter = itertools.count()
_MAX_SOURCE_BYTES = 8 << 20


class KernelLoadError(RuntimeError):
    """A kernel source could not be imported/built or breaks the contract."""


class KernelIntegrityError(KernelLoadError):
    """A cached source does not match its recorded hash (or is not a plain private file)."""


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
    _bind_launches(mod)
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

    def __call__(self, q, k, v, out, scale, **variant_tensors) -> torch.Tensor:
        """Run the kernel; returns the result: ``out``, or the tensor the kernel returned (checked
        against out's shape, dtype and device, and for shared memory with an input)."""
        r = self.fn(q, k, v, out, scale, **variant_tensors)
        if r is None:
            return out
        return check_returned(r, out, (q, k, v, *variant_tensors.values()), self.name)

    def __repr__(self) -> str:
        return f"LoadedKernel({self.name})"


def check_returned(r: Any, out: torch.Tensor, inputs: tuple, name: str = "kernel") -> torch.Tensor:
    """``r`` if it may stand for ``out`` (see the contract), else KernelLoadError naming why."""
    if not isinstance(r, torch.Tensor):
        raise KernelLoadError(f"{name}: forward returned {type(r).__name__}, expected None or a tensor")
    if r.shape != out.shape or r.dtype != out.dtype or r.device != out.device:
        raise KernelLoadError(f"{name}: forward returned a {r.dtype} tensor of shape {tuple(r.shape)} on {r.device}; "
                              f"out is {out.dtype} {tuple(out.shape)} on {out.device}")
    base = r.untyped_storage().data_ptr()
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.device == r.device and x.untyped_storage().data_ptr() == base:
            raise KernelLoadError(f"{name}: forward returned a tensor that shares memory with an input")
    return r


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
    return _make_kernel(fwd, sup, Path(path).name, name_hint)


def _make_kernel(fwd, sup, fname: str, name_hint: str) -> LoadedKernel:
    if fwd is None:
        raise KernelLoadError(f"{fname}: defines no forward(q, k, v, out, scale, **variant_tensors)")
    if sup is None:
        raise KernelLoadError(f"{fname}: defines no SUPPORTS dict")
    return LoadedKernel(fwd, sup, name_hint)


# ------------------------------------------------------------------------- verified imports
class VerifiedSourceLoader(importlib.abc.ExecutionLoader):
    """Imports a module from bytes already checked by hash, reporting ``filename`` as its file.

    ``get_source``/``get_code`` serve the verified bytes, so ``inspect``/``linecache`` (and with
    them ``triton.jit``) and the executed code all agree on one text.
    """

    def __init__(self, source: bytes, filename: str):
        self._source = source
        self._filename = filename

    def get_filename(self, fullname: str) -> str:
        return self._filename

    def get_source(self, fullname: str) -> str:
        return importlib.util.decode_source(self._source)

    def get_code(self, fullname: str):
        return compile(self._source, self._filename, "exec", dont_inherit=True)

    def is_package(self, fullname: str) -> bool:
        return False


def import_kernel_source(source: bytes, filename: str | Path, name_hint: str = "kernel") -> ModuleType:
    """Import verified ``source`` bytes as a fresh, uniquely named module whose file is
    ``filename``. Raises KernelLoadError if executing the module fails."""
    filename = str(filename)
    safe = "".join(c if c.isalnum() else "_" for c in name_hint)[:60]
    modname = f"torch_r1attn._kernels.{safe}_{next(_counter)}"
    loader = VerifiedSourceLoader(source, filename)
    spec = importlib.util.spec_from_loader(modname, loader)
    mod = importlib.util.module_from_spec(spec)
    text = loader.get_source(modname)
    # mtime None marks a loader-provided entry: linecache.checkcache keeps it instead of
    # re-reading the path, so inspect.getsource returns these verified lines.
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    sys.modules[modname] = mod  # triton.jit needs the module importable while compiling
    try:
        loader.exec_module(mod)
    except Exception as e:
        sys.modules.pop(modname, None)
        raise KernelLoadError(f"importing {Path(filename).name} failed: {type(e).__name__}: {e}") from e
    _bind_launches(mod)
    return mod


def _bind_launches(mod: ModuleType) -> None:
    """Host-launched Triton kernels of ``mod`` go through bound launches (:mod:`.launch`): the
    verifier checks a candidate on the same launch path a cache hit uses."""
    from . import launch

    try:
        n = launch.install(vars(mod))
    except Exception as e:  # noqa: BLE001 - the module works unchanged; only its launch cost is higher
        log.warning("%s: bound launches not installed (%s: %s); launching through Triton", mod.__name__,
                    type(e).__name__, e)
        return
    if n:
        log.debug("%s: %d kernel(s) launch bound", mod.__name__, n)


def read_verified(path: str | Path, sha256: str | None) -> bytes:
    """Read ``path`` once (no symlinks, a regular file of this user, not group/other-writable)
    and return its bytes if their sha256 is ``sha256``; else raise KernelIntegrityError."""
    if not sha256:
        raise KernelIntegrityError(f"{path}: no source hash recorded; refusing to load it")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise KernelIntegrityError(f"{path}: cannot be opened safely ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise KernelIntegrityError(f"{path}: not a private regular file of this user")
        if st.st_size > _MAX_SOURCE_BYTES:
            raise KernelIntegrityError(f"{path}: {st.st_size} bytes is too large for a kernel source")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    got = hashlib.sha256(data).hexdigest()
    if got != sha256:
        raise KernelIntegrityError(f"{path}: sha256 {got[:16]}... does not match the entry's {sha256[:16]}...; "
                                   "not loading it")
    return data


_loaded: dict[tuple[str, str], LoadedKernel] = {}
_load_mu = threading.RLock()


def load(entry) -> LoadedKernel:
    """The kernel of a positive :class:`~torch_r1attn.cache.CacheEntry`, memoised per
    (source path, source hash).

    Raises KernelIntegrityError when the source on disk is not the one the entry recorded,
    KernelLoadError when it fails to import/build or breaks the kernel contract, ValueError for
    a negative entry.
    """
    if entry.negative or entry.source_path is None:
        raise ValueError(f"{entry.path}: a negative cache entry has no kernel to load")
    sha = entry.meta.get("source_sha256")
    key = (str(entry.source_path), str(sha))
    hit = _loaded.get(key)
    if hit is not None:
        return hit
    with _load_mu:
        hit = _loaded.get(key)
        if hit is not None:
            return hit
        data = read_verified(entry.source_path, sha)
        name = f"{entry.spec.dirname}"
        if entry.language == "triton":
            mod = import_kernel_source(data, entry.source_path, name)
            kernel = _make_kernel(getattr(mod, "forward", None), getattr(mod, "SUPPORTS", None),
                                  entry.source_path.name, name)
        elif entry.language == "cuda":
            kernel = _build_cuda_entry(entry, data, sha)
        else:
            raise KernelLoadError(f"{entry.path}: unknown kernel language {entry.language!r}")
        _loaded[key] = kernel
        log.debug("r1attn loader: loaded %s (%s)", entry.path, entry.language)
        return kernel


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise KernelIntegrityError(f"build dir {path} is not a private directory of this user")
    return path


def _build_cuda_entry(entry, data: bytes, sha: str) -> LoadedKernel:
    from .cache import _file_lock
    from .cuda_build import build_cuda_kernel

    name = f"r1attn_{entry.spec.hash}_{sha[:12]}"
    # A stable per-(entry, source) build dir next to the shard: cuda_build keys its .so by the
    # source hash and reuses it, so the entry is compiled once, not once per process.
    build = _private_dir(_private_dir(entry.path.parent / ".build") / f"{entry.path.name}-{sha[:16]}")
    lock = _file_lock(entry.lock_path, timeout=1800) if entry.lock_path is not None else None
    if lock is not None:
        lock.acquire()
    try:
        # The compiler reads a copy of the verified bytes, never the entry path; written
        # tmp + rename so a concurrent reader of the copy never sees half of it.
        src = build / "kernel.cu"
        fd, tmp = tempfile.mkstemp(prefix="kernel.", suffix=".cu.tmp", dir=build)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, src)
        fwd, sup = build_cuda_kernel(src, name)
    except KernelLoadError:
        raise
    except Exception as e:
        raise KernelLoadError(f"{entry.path}: CUDA build failed: {type(e).__name__}: {e}") from e
    finally:
        if lock is not None:
            lock.release()
    return _make_kernel(fwd, sup, entry.source_path.name, name)


def forget_loaded() -> None:
    """Drop the memo of loaded kernels (tests)."""
    with _load_mu:
        _loaded.clear()
