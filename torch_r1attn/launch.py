"""Bound launches of a loaded kernel module's Triton kernels: the host cost of a cache hit.

``kernel[grid](*args, **kwargs)`` through Triton's ``JITFunction`` binds and specialises every
argument and looks the compiled kernel up by a string key on every call: 22.6 µs of the 36.5 µs a
sliding-window launch cost on the H200's host, against 13.9 µs for calling the ``CompiledKernel``
that launch returned with its argument list (``benchmarks/launch_probe.py``, session 7, outputs
equal bit for bit). :func:`install` puts a :class:`BoundLauncher` in place of each kernel the
module's host code launches; the generated ``forward`` is unchanged and calls it the same way.

Correctness rests on the cache key: a launch reuses a compiled kernel only when everything Triton
specialises on is the same as for the launch that compiled it, so the key is a superset of
Triton's: the current device; per tensor its dtype and whether its address is 16-byte aligned;
per integer whether it is 1, whether it is a multiple of 16 and its width (int32 / int64 /
uint64); per constexpr parameter, keyword and launch option its value; per float only its type
(Triton passes floats as fp32 without specialising). Anything else (None, a tensor descriptor, a
type not listed), a callable grid or a kernel with pre-run hooks makes the launch go through
``JITFunction`` as before; so does every launch under Triton's interpreter, which returns no
compiled kernel. Triton's global knobs (``debug``, stage hooks) are read by the first launch of a
key only: change them before a kernel's first call. The first launch of each key always
goes through ``JITFunction``, so compilation, autotuning hooks and errors are Triton's own.

``R1ATTN_BOUND_LAUNCH=0`` turns it off (every launch through ``JITFunction``).
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["BoundLauncher", "install", "enabled"]

_MAX_KEYS = 64  # compiled kernels kept per launcher (a new key past this goes through Triton)
_I32_LO, _I32_HI, _I64_HI = -(2**31), 2**31, 2**63
# launch options Triton takes as keywords that are not kernel parameters
_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid",
                      "launch_pdl", "debug", "grid", "warmup"})


_current_device = torch.cuda.current_device  # the device Triton launches on (tests replace it)


def enabled() -> bool:
    return os.environ.get("R1ATTN_BOUND_LAUNCH", "1").strip().lower() not in ("0", "false", "no", "off")


def _int_spec(v: int) -> tuple:
    if _I32_LO <= v < _I32_HI:
        width = 32
    elif _I32_LO * 2**32 <= v < _I64_HI:
        width = 64
    else:
        width = 65  # uint64 (or out of range: Triton raises, on the JITFunction path)
    return (v == 1, v % 16 == 0, width)


class BoundLauncher:
    """Stands where a ``@triton.jit`` kernel was in a kernel module; ``launcher[grid](*args,
    **kwargs)`` launches as the kernel would (see the module docstring)."""

    def __init__(self, jit: Any):
        self.jit = jit
        self.fn = getattr(jit, "fn", None)
        params = getattr(jit, "params", None)
        sig = inspect.signature(self.fn) if self.fn is not None else None
        self._names = list(sig.parameters) if sig is not None else []
        self._defaults = {n: p.default for n, p in sig.parameters.items()} if sig is not None else {}
        self._constexpr = frozenset(i for i, p in enumerate(params or ()) if getattr(p, "is_constexpr", False))
        self._compiled: dict[tuple, Any] = {}
        self.bound_launches = 0  # counters for tests and the launch probe
        self.jit_launches = 0
        self.off = sig is None or params is None or not hasattr(jit, "pre_run_hooks") or not enabled()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            return self._launch(grid, args, kwargs)

        return launch

    def _key(self, args: tuple, kwargs: dict) -> tuple | None:
        key: list = [_current_device()]
        constexpr = self._constexpr
        for i, a in enumerate(args):
            t = type(a)
            if t is torch.Tensor or isinstance(a, torch.Tensor):
                key.append((a.dtype, a.data_ptr() & 15 == 0))
            elif t is bool:
                key.append(("b", a))
            elif t is int:
                key.append(("c", a) if i in constexpr else _int_spec(a))
            elif t is float:
                key.append(("c", a) if i in constexpr else "f")
            else:
                return None  # None, descriptors, numpy scalars...: Triton's own path
        for n, v in kwargs.items():
            if type(v) not in (int, bool, str, float) and v is not None:
                return None
            key.append((n, v))
        return tuple(key)

    def _bound_args(self, args: tuple, kwargs: dict) -> list:
        out = list(args)
        for n in self._names[len(args):]:
            v = kwargs.get(n, self._defaults[n])
            if v is inspect.Parameter.empty:
                raise TypeError(f"missing kernel argument {n!r}")
            out.append(v)
        return out

    def _launch(self, grid, args: tuple, kwargs: dict):
        key = None if self.off or callable(grid) or self.jit.pre_run_hooks else self._key(args, kwargs)
        compiled = self._compiled.get(key) if key is not None else None
        if compiled is not None:
            g = tuple(grid)
            if len(g) < 3:
                g = g + (1,) * (3 - len(g))
            compiled[g](*self._bound_args(args, kwargs))
            self.bound_launches += 1
            return compiled
        self.jit_launches += 1
        compiled = self.jit[grid](*args, **kwargs)
        if key is not None and len(self._compiled) < _MAX_KEYS and _is_compiled_kernel(compiled):
            try:  # a launch whose arguments do not bind (a keyword Triton knows, we do not) stays on Triton's path
                if any(n not in self._names and n not in _OPTIONS for n in kwargs):
                    raise TypeError(f"unknown keyword(s) {sorted(set(kwargs) - set(self._names))}")
                self._bound_args(args, kwargs)
            except TypeError as e:
                log.debug("%s: launches stay on Triton's path: %s", getattr(self.fn, "__name__", "?"), e)
                self.off = True
                return compiled
            self._compiled[key] = compiled
        return compiled


def _is_compiled_kernel(obj: Any) -> bool:
    return obj is not None and hasattr(type(obj), "__getitem__") and hasattr(obj, "run") and hasattr(obj, "function")


def host_launched(module_globals: dict) -> dict[str, Any]:
    """The ``@triton.jit`` kernels of a kernel module that its host code launches (named by a
    plain Python function of the module); device-side helpers are left alone."""
    import types

    def names(code) -> set:
        out = set(code.co_names)
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                out |= names(c)
        return out

    def is_jit(o) -> bool:
        return type(o).__module__.startswith("triton.") and hasattr(type(o), "__getitem__")

    mod = module_globals.get("__name__")
    host: set = set()
    device: set = set()  # names a kernel's body uses: replacing one of those would change the kernel
    for o in list(module_globals.values()):
        if isinstance(o, types.FunctionType) and o.__module__ == mod:
            host |= names(o.__code__)
        elif is_jit(o) and isinstance(getattr(o, "fn", None), types.FunctionType):
            device |= names(o.fn.__code__)
    return {n: o for n, o in module_globals.items() if n in host and n not in device and is_jit(o)}


def install(module_globals: dict) -> int:
    """Put a :class:`BoundLauncher` in place of each host-launched Triton kernel of a freshly
    imported kernel module (before its first launch). Returns how many; 0 when turned off or
    under Triton's interpreter (no compiled kernels to bind)."""
    if not enabled() or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return 0
    found = host_launched(module_globals)
    for n, jit in found.items():
        module_globals[n] = BoundLauncher(jit)
    return len(found)
