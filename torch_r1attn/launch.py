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

Status: **on by default; ``R1ATTN_BOUND_LAUNCH=0`` turns it off.** Its first form was measured
on the H200 (session 7): correct (every GPU test passed with it on, including repeated launches
of real kernels checked against the reference and misaligned views), but *slower* (our forward
48.2 µs against ~43.6 µs through ``JITFunction``) because the per-launch key was built by a
Python loop. The key is now built by a function generated for the launch's argument pattern;
measured on the H200 in session 8 (``benchmarks/launch_probe.py``, ``bound_launcher_saves_us``):
our forward costs 9.3 µs less with it than through ``JITFunction`` (sliding window 24.4 vs 33.5
µs, soft-cap 24.7 vs 34.0), outputs equal, and the GPU tests of this module and the loader pass
with it on.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["BoundLauncher", "install", "enabled", "grid3", "host_launched"]

_MAX_KEYS = 64  # compiled kernels kept per launcher (a new key past this goes through Triton)
_I32_LO, _I32_HI, _I64_HI = -(2**31), 2**31, 2**63
# launch options Triton takes as keywords that are not kernel parameters
_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_cooperative_grid",
                      "launch_pdl", "debug", "grid", "warmup"})


_current_device = torch.cuda.current_device  # the device Triton launches on (tests replace it)


def enabled() -> bool:
    """On unless ``R1ATTN_BOUND_LAUNCH=0`` (or false/no/off): see the module docstring's "Status"."""
    return os.environ.get("R1ATTN_BOUND_LAUNCH", "1").strip().lower() not in ("0", "false", "no", "off")


_KW_TYPES = frozenset({int, bool, str, float, type(None)})


def _width(v: int) -> int:
    """Triton's integer argument types: int32, int64, uint64 (beyond: Triton raises, on its own path)."""
    if _I32_LO <= v < _I32_HI:
        return 32
    return 64 if _I32_LO * 2**32 <= v < _I64_HI else 65


def _int_code(v: int) -> int:
    """One number per int argument that tells apart everything Triton specialises an int on
    (equal to 1, a multiple of 16, int32 / int64 / uint64), and more: the value itself below 16,
    16 + the low four bits up to int32's end, 100 + the width beyond."""
    if v < 16:
        return v
    return (v & 15) + 16 if v < _I32_HI else _width(v) + 100


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
        self._fast = None  # generated (key, bound args) for the first bound launch's argument pattern
        self.bound_launches = 0  # counters for tests and the launch probe
        self.jit_launches = 0
        self.off = sig is None or params is None or not hasattr(jit, "pre_run_hooks") or not enabled()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            return self._launch(grid, args, kwargs)

        return launch

    def _key(self, args: tuple, kwargs: dict) -> tuple | None:
        """The specialisation key of a launch, as a flat tuple (the general, slow form; the
        generated :meth:`_fast` builds the same tuple for the argument pattern it was made for).
        After the device and the number of positional arguments, per argument: a tensor adds
        ``dtype, aligned``; an int one code (:func:`_int_code`); a bool ``"b", value``; a
        constexpr ``"c", value``; a float ``"f"``; then the keyword names and their values."""
        key: list = [_current_device(), len(args)]
        constexpr = self._constexpr
        for i, a in enumerate(args):
            t = type(a)
            if t is torch.Tensor:
                key += (a.dtype, a.data_ptr() & 15 == 0)
            elif t is bool:
                key += ("b", a)
            elif t is int:
                key += ("c", a) if i in constexpr else (_int_code(a),)
            elif t is float:
                key += ("c", a) if i in constexpr else ("f",)
            else:
                return None  # None, tensor subclasses, descriptors, numpy scalars...: Triton's own path
        if not _KW_TYPES.issuperset(map(type, kwargs.values())):
            return None
        key.append(tuple(kwargs))
        key += kwargs.values()
        return tuple(key)

    def _make_fast(self, args: tuple, kwargs: dict):
        """Generate a function that, for launches with this one's argument pattern (count, types,
        keyword names), returns ``(key, bound_args)`` with plain expressions (what :meth:`_key`
        and :meth:`_bound_args` compute with loops), else None: 7.2 -> 2.9 µs per launch on the
        development CPU for a 30-argument kernel. Its int expression is :func:`_int_code` written
        inline (a call costs more than the expression); tests check the two keys are equal."""
        n = len(args)
        a = [f"a{i}" for i in range(n)]
        guards, key = [], ["dev()", str(n)]
        for i, x in enumerate(args):
            t = type(x)
            if t is torch.Tensor:
                guards.append(f"type(a{i}) is T")
                key += [f"a{i}.dtype", f"a{i}.data_ptr() & 15 == 0"]
            elif t is bool:
                guards.append(f"type(a{i}) is B")
                key += ['"b"', f"a{i}"]
            elif t is int:
                guards.append(f"type(a{i}) is I")
                key += (['"c"', f"a{i}"] if i in self._constexpr else
                        [f"(a{i} if a{i} < 16 else (a{i} & 15) + 16 if a{i} < 2147483648 else W(a{i}) + 100)"])
            elif t is float:
                guards.append(f"type(a{i}) is F")
                key += ['"c"', f"a{i}"] if i in self._constexpr else ['"f"']
            else:
                return None
        kw_names = list(kwargs)
        kv = [f"k{j}" for j in range(len(kw_names))]
        if kw_names:
            guards.append("KT.issuperset(map(type, kw.values()))")
        key.append(repr(tuple(kw_names)))
        key += kv
        rest = []
        for name in self._names[n:]:
            if name in kwargs:
                rest.append(f"k{kw_names.index(name)}")
            elif self._defaults[name] is inspect.Parameter.empty:
                return None
            else:
                rest.append(f"D[{name!r}]")
        lines = [f"def fast(a, kw):",
                 f"    if len(a) != {n} or len(kw) != {len(kw_names)}:",
                 "        return None",
                 (f"    {', '.join(a)}, = a" if n else "    pass"),
                 "    try:",
                 f"        {''.join(f'{v}, ' for v in kv)}= {''.join(f'kw[{nm!r}], ' for nm in kw_names)}" if kw_names
                 else "        pass",
                 "    except KeyError:",
                 "        return None",
                 f"    if not ({' and '.join(guards) or 'True'}):",
                 "        return None",
                 f"    return ({', '.join(key)},), [{', '.join(a + rest)}]"]
        ns = {"T": torch.Tensor, "B": bool, "I": int, "F": float, "KT": _KW_TYPES, "W": _width,
              "D": dict(self._defaults),
              "dev": lambda: _current_device()}  # looked up per call (tests replace it)
        exec(compile("\n".join(lines), f"<r1attn bound launch {getattr(self.fn, '__name__', '?')}>", "exec"), ns)
        return ns["fast"]

    def _bound_args(self, args: tuple, kwargs: dict) -> list:
        out = list(args)
        for n in self._names[len(args):]:
            v = kwargs.get(n, self._defaults[n])
            if v is inspect.Parameter.empty:
                raise TypeError(f"missing kernel argument {n!r}")
            out.append(v)
        return out

    def _launch(self, grid, args: tuple, kwargs: dict):
        fast = self._fast
        planned = fast(args, kwargs) if fast is not None and type(grid) is tuple else None
        if planned is not None and not self.off and not self.jit.pre_run_hooks:
            key, bound = planned
        else:
            key = None if self.off or callable(grid) or self.jit.pre_run_hooks else self._key(args, kwargs)
            bound = None
        compiled = self._compiled.get(key) if key is not None else None
        if compiled is not None:
            g = grid if len(grid) == 3 else grid3(grid)
            compiled[g](*(bound if bound is not None else self._bound_args(args, kwargs)))
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
            if self._fast is None:
                try:
                    self._fast = self._make_fast(args, kwargs)
                except Exception as e:  # noqa: BLE001 - the general key still binds
                    log.debug("%s: no generated key (%s)", getattr(self.fn, "__name__", "?"), e)
        return compiled


def grid3(grid) -> tuple:
    """A launch grid as the three dimensions a ``CompiledKernel`` wants (``JITFunction`` pads a
    1- or 2-D grid itself; the compiled kernel's runner indexes ``grid[2]``)."""
    g = tuple(grid)
    return g + (1,) * (3 - len(g))


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
