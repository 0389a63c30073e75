"""The cache-hit fast path in C++ (``csrc/hotpath.cpp``): build, load, register, clear.

A repeat call of :func:`torch_r1attn.attention` whose signature has settled (a loaded kernel
with SUPPORTS checked, or a fallback verdict) costs, in Python, a 12-field memo key, the grad and
layout checks, the output allocation and two call layers: 3.5-4 µs on a fast host, 5-8 µs on the
H200's (benchmarks/NOTES.md, sessions 6 and 9). The extension does the key, the checks and the
allocation in C++ and then calls the same kernel ``forward`` (or fallback runner) the Python path
would; the front end (:mod:`torch_r1attn.functional`) asks it first and falls through to Python
on a miss or whenever a call needs the Python path (grad, layout, an unusual argument).

Build: one ``c++`` invocation against torch's headers and libraries (``~30 s``; no ninja, no
``torch.utils.cpp_extension.load``), into ``<cache root>/hotpath/<hash>/`` keyed by the source,
torch, Python and the compiler, under a file lock, written atomically. It runs in a background
thread the first time a signature settles in a process (so a call never waits for it: until it is
loaded the Python path serves), or up front with :func:`ensure` ``(block=True)`` (``r1attn
prewarm`` does, so a process starting later only loads the built library). ``R1ATTN_HOTPATH=off``
turns it off; a failed build is logged once at WARNING and the Python path stays.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)

MODULE_NAME = "_r1attn_hot"
BUILD_TIMEOUT_S = 300.0

_lock = threading.Lock()
_state = "idle"  # idle | building | ready | failed | off
_error: str | None = None
_module: Any = None
_thread: threading.Thread | None = None
_listeners: list[Callable[[Any], None]] = []


def source_path() -> Path:
    from .cuda_build import CSRC_DIR

    return CSRC_DIR / "hotpath.cpp"


def find_cxx() -> str | None:
    """``$CXX``, else ``c++`` / ``g++`` / ``clang++`` on PATH; None when none is found."""
    for c in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def _flags() -> tuple[list[str], list[str]]:
    from torch.utils import cpp_extension

    inc = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    cflags = ["-O2", "-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", *inc]
    ldflags = [f"-L{lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python", f"-Wl,-rpath,{lib}"]
    return cflags, ldflags


def build_dir(root: Path | None = None) -> Path:
    """Where the library for this source, torch, Python and compiler lives (under the kernel
    cache's root unless ``root`` is given)."""
    from .cache import _default_root

    h = hashlib.sha256()
    h.update(source_path().read_bytes())
    h.update(f"{torch.__version__}|{sys.version}|{find_cxx()}|{torch._C._GLIBCXX_USE_CXX11_ABI}".encode())
    return (Path(root) if root is not None else _default_root()) / "hotpath" / h.hexdigest()[:16]


def _library(d: Path) -> Path:
    return d / (MODULE_NAME + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))


def _compile(d: Path) -> Path:
    """Build the library into ``d`` (atomically, under a lock); returns its path."""
    from .cache import _file_lock

    cxx = find_cxx()
    if cxx is None:
        raise RuntimeError("no C++ compiler (set CXX, or install g++)")
    d.parent.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    for p in (d.parent, d):  # private whatever the umask (the load checks it)
        p.mkdir(exist_ok=True, mode=0o700)
    lib = _library(d)
    with _file_lock(d / ".build.lock", timeout=BUILD_TIMEOUT_S + 60):
        if lib.is_file():
            return lib  # another process built it while we waited
        for stale in d.glob("*.so.tmp"):  # left by a process that exited mid-build (we hold the lock)
            stale.unlink(missing_ok=True)
        cflags, ldflags = _flags()
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".so.tmp")
        os.close(fd)
        cmd = [cxx, *cflags, str(source_path()), "-o", tmp, *ldflags]
        if shutil.which("nice"):  # a background build competes with the caller's own host work
            cmd = [shutil.which("nice"), "-n", "19", *cmd]
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            _children.add(proc)
            try:
                out, _ = proc.communicate(timeout=BUILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise RuntimeError(f"the build took over {BUILD_TIMEOUT_S:.0f} s") from None
            finally:
                _children.discard(proc)
            if proc.returncode != 0:
                tail = "\n".join((out or "").strip().splitlines()[-15:])
                raise RuntimeError(f"{Path(cxx).name} exited with {proc.returncode}:\n{tail}")
            os.chmod(tmp, 0o700)  # the linker picks the mode from the umask; the load checks it
            os.replace(tmp, lib)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return lib


_children: set[subprocess.Popen] = set()


@atexit.register
def _stop_builds() -> None:
    """A process that exits while the background build runs does not leave the compiler behind."""
    for proc in list(_children):
        if proc.poll() is None:
            proc.kill()


def _check_private(lib: Path) -> None:
    """Refuse to load a library that someone else could have written (the kernel cache's rule):
    the file, its directory and the ``hotpath`` directory must be ours and not group/other-writable,
    and the file a regular file, not a link."""
    import stat

    from .cache import _private_problem

    st = os.lstat(lib)
    if not stat.S_ISREG(st.st_mode):
        raise RuntimeError(f"{lib} is not a regular file")
    for path in (lib, lib.parent, lib.parent.parent):
        problem = _private_problem(st if path is lib else os.stat(path), str(path))
        if problem:
            raise RuntimeError(f"refusing to load the fast path: {problem}")


def _load(lib: Path):
    _check_private(lib)
    loader = importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(lib))
    spec = importlib.util.spec_from_file_location(MODULE_NAME, str(lib), loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    for name in ("call", "put", "clear", "size"):
        if not callable(getattr(mod, name, None)):
            raise RuntimeError(f"{lib} has no {name}()")
    return mod


def _enabled() -> bool:
    from .config import settings

    return settings().hotpath != "off"


def _build_and_load(root: Path | None) -> None:
    global _state, _error, _module
    try:
        d = build_dir(root)
        lib = _library(d)
        if not lib.is_file():
            log.info("r1attn: building the C++ cache-hit fast path into %s (once per torch/Python/compiler)", d)
            lib = _compile(d)
        mod = _load(lib)
    except Exception as e:  # noqa: BLE001 - any failure: the Python path stays, said once
        with _lock:
            _state, _error = "failed", f"{type(e).__name__}: {e}"
        log.warning("r1attn: C++ fast path unavailable, the Python path serves every call (%s)", _error)
        return
    with _lock:
        _module, _state = mod, "ready"
        listeners = list(_listeners)
    for cb in listeners:
        cb(mod)
    log.info("r1attn: C++ cache-hit fast path loaded")


def ensure(block: bool = False, *, force: bool = False, root: Path | None = None) -> bool:
    """Start (or with ``block``, finish) building and loading the extension; True when loaded.
    A no-op returning False when ``R1ATTN_HOTPATH=off`` (unless ``force``) or after a failed
    build. ``root``: build under this directory instead of the kernel cache's root."""
    global _state, _thread
    with _lock:
        if _state == "ready":
            return True
        if _state == "failed" or (_state == "off" and not force):
            return False
        if _state in ("idle", "off"):
            if not force and not _enabled():
                _state = "off"
                return False
            _state = "building"
            _thread = threading.Thread(target=_build_and_load, args=(root,), name="r1attn-hotpath-build",
                                       daemon=True)
            _thread.start()
        t = _thread
    if block and t is not None:
        t.join()
    return _state == "ready"


def on_ready(cb: Callable[[Any], None]) -> None:
    """Call ``cb(module)`` when the extension is loaded (now, if it already is)."""
    with _lock:
        _listeners.append(cb)
        mod = _module
    if mod is not None:
        cb(mod)


def put(*args) -> bool:
    """Register a settled entry (see ``csrc/hotpath.cpp``); False when not loaded or not keyable."""
    mod = _module
    return bool(mod.put(*args)) if mod is not None else False


def clear() -> None:
    mod = _module
    if mod is not None:
        mod.clear()


def status() -> dict[str, Any]:
    """For ``r1attn doctor`` and the benchmarks."""
    mod = _module
    return {"state": _state, "error": _error, "entries": mod.size() if mod is not None else 0,
            "compiler": find_cxx()}
