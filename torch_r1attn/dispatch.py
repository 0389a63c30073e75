"""Dispatch: spec → callable, the on-miss policy, and the fallback choice.

The hot path is one dict lookup keyed by the spec's fields, then a launch::

    forward(q, k, v, variant, ...)
      └─ _table[spec_key]  ─ hit ─> Resolved(kernel | fallback)  -> launch
                           └ miss ─> _resolve(): cache.lookup(spec)
                                      ├─ positive entry -> loader.load -> kernel
                                      ├─ negative entry -> fallback (cached verdict)
                                      └─ miss -> on_miss: background (tuner thread, fallback now)
                                                          sync (search now) | off (fallback)

A ``Resolved`` that is waiting for a background search re-checks at most once a second (a cheap
float compare on the hot path) and swaps the kernel in as soon as the tuner — in this process or
another one sharing the cache — has stored it.

Every reason for not using a kernel is logged once per (signature, reason) at INFO, and once at
WARNING when a kernel was expected but failed to load.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import fallback
from .config import settings
from .spec import AttentionSpec, length_bucket
from .variants import Variant

log = logging.getLogger(__name__)

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_UNCHECKED = object()
_RECHECK_S = 1.0


@dataclass
class Resolved:
    spec: AttentionSpec
    path: str  # fallback path: sdpa | flex | eager
    reason: str
    kernel: Callable | None = None
    kernel_info: dict[str, Any] = field(default_factory=dict)
    pending: Any = None  # a background job handle while a search runs
    next_check: float = 0.0
    unsupported: Any = None  # _UNCHECKED until the kernel's SUPPORTS was checked for this entry
    source: str = "miss"  # how it was decided: cache-kernel | cache-negative | no-kernels | miss
    strided_out: bool = False  # the kernel was verified on (B, S, H, D)-strided q, k, v and out


_table: dict[tuple, Resolved] = {}
_lock = threading.RLock()
_logged: set[tuple] = set()


def log_once(level: int, key: tuple, msg: str, *args) -> None:
    if key in _logged:
        return
    _logged.add(key)
    log.log(level, msg, *args)


def kernels_usable(device: torch.device) -> bool:
    """Generated Triton kernels run on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (tests)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


_reset_hooks: list[Callable[[], None]] = []


def on_reset(hook: Callable[[], None]) -> None:
    """Call ``hook`` whenever the table is forgotten (the front end drops its hot runners)."""
    _reset_hooks.append(hook)


def reset() -> None:
    """Forget every resolved signature (tests; after ``r1attn cache clear``)."""
    with _lock:
        _table.clear()
        for hook in _reset_hooks:
            hook()
        _logged.clear()


def table_key(q, k, v, variant: Variant) -> tuple:
    """The dispatch-table key of a call. Keyed like the spec (length *buckets*), so a decode loop
    whose Sk grows by one per step stays on one entry instead of resolving (a disk lookup) every
    step."""
    return (variant.key, q.dtype, q.shape[-1], v.shape[-1], q.shape[1] // k.shape[1],
            length_bucket(q.shape[2]), length_bucket(k.shape[2]), q.device)


def forward(q, k, v, variant: Variant, scale: float, enable_gqa: bool, dropout_p: float, on_miss: str | None,
            key: tuple | None = None, bshd_out: bool = False):
    """Run one validated call (functional.attention validates). ``key``: its :func:`table_key`
    when the caller has it memoised. ``bshd_out``: the caller will transpose the result to
    (B, S, H, Dv) (transformers does): a kernel verified on strided layouts then writes straight
    into that layout and the (B, H, S, Dv) view is returned, so the caller's ``.contiguous()`` is
    free (as it is after SDPA's flash/cuDNN kernels)."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if dropout_p > 0.0 or needs_grad or q.dtype not in _KERNEL_DTYPES:
        path, reason = fallback.choose(variant, q.device, settings().fallback)
        if dropout_p > 0.0:
            if not fallback.sdpa_expressible(variant):
                raise ValueError(f"dropout_p > 0 needs an SDPA-expressible variant; {variant.key} is not")
            path, reason = "sdpa", "dropout_p > 0 (generated kernels are inference-only)"
        elif needs_grad:
            reason = "inputs require grad: differentiable built-in path (" + reason + ")"
        log_once(logging.INFO, ("nokernel", variant.key, path, reason), "r1attn %s: %s -> %s", variant.key, reason, path)
        return fallback.run(path, q, k, v, variant, scale, enable_gqa, dropout_p)

    if key is None:
        key = table_key(q, k, v, variant)
    r = _table.get(key)
    if r is None:
        with _lock:
            r = _table.get(key)
            if r is None:
                spec = AttentionSpec.from_call(q, k, v, variant.key)
                r = _resolve(spec, variant, q.device, on_miss or settings().on_miss)
                _table[key] = r
    elif r.pending is not None and time.monotonic() >= r.next_check:
        _poll(r)

    if r.kernel is not None:
        # everything SUPPORTS can restrict (dtype, dims, GQA, lengths <= bucket max, device) is
        # fixed by the table key, so the check runs once per entry, not per call
        why = r.unsupported
        if why is _UNCHECKED:
            why = r.unsupported = r.kernel.unsupported(q, k, v)
        if why is None:
            if not r.strided_out and not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
                # an entry verified before the strided-layout trial existed: hand it what it was checked on
                q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            if bshd_out and r.strided_out:
                B, H, S, _ = q.shape
                out = q.new_empty((B, S, H, v.shape[-1])).transpose(1, 2)
            else:  # empty_like: ~3x cheaper on the host than torch.empty(shape, dtype=, device=)
                out = (torch.empty_like(q, memory_format=torch.contiguous_format) if v.shape[-1] == q.shape[-1]
                       else q.new_empty(q.shape[:-1] + (v.shape[-1],)))
            res = r.kernel.fn(q, k, v, out, scale, **variant.tensors())
            return out if res is None else res  # a composed module returns its own output
        log_once(logging.INFO, ("unsup", r.spec.uri, why), "r1attn %s: kernel does not support this call (%s); "
                 "fallback %s", r.spec.uri, why, r.path)
    return fallback.run(r.path, q, k, v, variant, scale, enable_gqa, dropout_p)


def hot_runner(key: tuple, variant: Variant, bshd_out: bool = False,
               enable_gqa: bool = False) -> Callable | bool | None:
    """A runner for repeat calls of a *settled* table entry: a loaded kernel whose SUPPORTS was
    checked, or a fallback verdict, with no search pending. The front end keeps it beside its
    validation memo, so a repeat call with the same shapes, dtypes, devices and variant costs one
    dict lookup and this closure: what :func:`forward` decides per call (grad, layout) it still
    decides, the rest is fixed by the key; the closure returns None when a call needs
    :func:`forward` after all.

    Returns None while the entry may still change (ask again after a later call), False when no
    runner applies (the front end stops asking). Runners are dropped on :func:`reset`."""
    if key[1] not in _KERNEL_DTYPES:
        return False  # forward never tables these (float64): always its first branch
    r = _table.get(key)
    if r is None or r.pending is not None or (r.kernel is not None and r.unsupported is _UNCHECKED):
        return None
    if r.kernel is None or r.unsupported is not None:
        return _fallback_runner(r.path, variant, enable_gqa)
    fn, tensors = r.kernel.fn, variant.tensors()
    grad_enabled, empty_like, contiguous = torch.is_grad_enabled, torch.empty_like, torch.contiguous_format
    check_layout = not r.strided_out  # verified on contiguous inputs only: others go through forward (it copies)
    if r.strided_out and bshd_out:  # the kernel writes (B, S, H, Dv) and the caller wants that layout
        mode = 2

        def alloc(q, v):
            B, H, S, _ = q.shape
            return q.new_empty((B, S, H, v.shape[-1])).transpose(1, 2)
    elif key[2] == key[3]:  # q's and v's head dims, fixed by the key: empty_like is ~3x cheaper than torch.empty
        mode = 0

        def alloc(q, v):
            return empty_like(q, memory_format=contiguous)  # standard strides, as forward's
    else:
        mode = 1

        def alloc(q, v):
            return q.new_empty(q.shape[:-1] + (v.shape[-1],))

    def run(q, k, v, scale):
        if grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return None
        if check_layout and not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
            return None
        out = alloc(q, v)
        res = fn(q, k, v, out, scale, **tensors)
        return out if res is None else res

    # what the C++ fast path (hotpath.py) needs to do the same: the launch, the variant's tensors,
    # the allocation (0 empty_like, 1 (B, H, S, Dv), 2 (B, S, H, Dv) transposed), the layout check
    run.native = (fn, tensors, mode, check_layout)
    return run


def _fallback_runner(path: str, variant: Variant, enable_gqa: bool) -> Callable:
    """Repeat calls of a fallback verdict: what :func:`forward` runs for them, minus the table
    lookup (grad goes through forward, which logs why it picked a differentiable path)."""
    grad_enabled, run_path = torch.is_grad_enabled, fallback.run

    def run(q, k, v, scale):
        if grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return None
        return run_path(path, q, k, v, variant, scale, enable_gqa)

    run.native = None  # the C++ fast path calls this runner as it is
    return run


def _resolve(spec: AttentionSpec, variant: Variant, device: torch.device, policy: str) -> Resolved:
    path, reason = fallback.choose(variant, device, settings().fallback)
    r = Resolved(spec=spec, path=path, reason=reason)
    if not kernels_usable(device):
        r.source = "no-kernels"
        log_once(logging.INFO, ("dev", spec.uri), "r1attn %s: no kernels on %s; fallback %s (%s)",
                 spec.uri, device.type, path, reason)
        return r
    if _try_cache(r):
        return r
    if policy == "off":
        log_once(logging.INFO, ("off", spec.uri), "r1attn %s: cache miss, on_miss=off; fallback %s (%s)",
                 spec.uri, path, reason)
    elif policy == "sync":
        from .search import tuner

        tuner.search_now(spec, variant)
        _try_cache(r)
    else:  # background
        from .search import tuner

        r.pending = tuner.submit(spec, variant)
        r.next_check = time.monotonic() + _RECHECK_S
        log_once(logging.INFO, ("bg", spec.uri), "r1attn %s: cache miss; searching in the background, "
                 "fallback %s meanwhile (%s)", spec.uri, path, reason)
    return r


def _try_cache(r: Resolved) -> bool:
    """Load a cached verdict into ``r``. True when the cache decided (kernel or negative entry)."""
    from . import cache as cache_mod
    from . import loader

    try:
        entry = cache_mod.default_cache().lookup(r.spec)
    except cache_mod.CacheError as e:
        log_once(logging.WARNING, ("cacheerr", r.spec.uri, str(e)), "r1attn %s: cache unusable (%s); fallback %s",
                 r.spec.uri, e, r.path)
        return True
    if entry is None:
        return False
    if entry.negative:
        r.source = "cache-negative"
        log_once(logging.INFO, ("neg", r.spec.uri), "r1attn %s: cached verdict: no kernel beat %s; using it",
                 r.spec.uri, r.path)
        return True
    try:
        r.kernel = loader.load(entry)
    except Exception as e:  # noqa: BLE001 - any load failure means "use the fallback", said loudly
        log_once(logging.WARNING, ("loadfail", r.spec.uri), "r1attn %s: cached kernel failed to load (%s: %s); "
                 "fallback %s", r.spec.uri, type(e).__name__, e, r.path)
        return True
    r.kernel_info = dict(entry.meta.get("measurements", {}))
    r.strided_out = "strided_layouts" in (entry.meta.get("checks") or [])
    r.unsupported = _UNCHECKED
    r.source = "cache-kernel"
    r.pending = None
    log_once(logging.INFO, ("hit", r.spec.uri), "r1attn %s: using cached kernel %s", r.spec.uri, entry.path)
    return True


def _poll(r: Resolved) -> None:
    with _lock:
        if r.pending is None:
            return
        r.next_check = time.monotonic() + _RECHECK_S
        done = r.pending.done()
        if _try_cache(r) or done:
            r.pending = None


def status() -> list[dict[str, Any]]:
    """What each resolved signature runs (for ``r1attn doctor`` and tests)."""
    return [
        {"uri": r.spec.uri, "kernel": r.kernel is not None, "fallback": r.path, "reason": r.reason,
         "pending": r.pending is not None, "source": r.source}
        for r in list(_table.values())
    ]
