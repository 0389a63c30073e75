"""``torch.ops.r1attn.attention``: the ``torch.library`` custom op behind ``torch.compile``.

Why an op: ``torch.compile`` cannot trace into dispatch (dict lookups, locks, the cache, a
background tuner, JIT-loaded kernels). Wrapping the call in an opaque custom op with a fake
(meta) implementation lets ``torch.compile(model, fullgraph=True)`` put one node in the graph,
and because the op body calls :func:`torch_r1attn.dispatch.forward` *at run time*, a kernel
that a background search stores later is picked up by a graph that was compiled before it existed.

Schema::

    r1attn::attention(Tensor q, Tensor k, Tensor v, Tensor[] variant_tensors, SymInt variant_handle,
                      SymInt[] variant_ints, float[] variant_floats, float scale, bool enable_gqa,
                      str? on_miss) -> Tensor
    r1attn::attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v,
                               Tensor[] variant_tensors, SymInt variant_handle, SymInt[] variant_ints,
                               float[] variant_floats, float scale, bool enable_gqa)
                               -> (Tensor, Tensor, Tensor, Tensor[])

**Variant handles.** An op cannot take a :class:`~torch_r1attn.variants.Variant`. A variant is
split in two (:func:`variant_handle`):

* its *structure* — part types in order, the alignment, and for ``mask_mod``/``score_mod`` the
  callable object itself — is interned in a process-wide registry and named by a small int, the
  **handle**. The handle is a compile-time constant in the graph (computed through
  ``assume_constant_result``, so dynamo guards on the structure's inputs, not on the registry);
* its *numbers* (window size, prefix length: ``variant_ints``; soft-cap: ``variant_floats``) are
  arguments, because under ``dynamic=True`` dynamo makes int attributes symbolic and a symbol
  cannot be interned;
* its *runtime tensors* (document ids, ALiBi slopes, bias tables, dense masks/biases) travel as
  the ``Tensor[]`` argument, so their data flows through the graph like any input.

The op body rebuilds the Variant from (handle, tensors) with :func:`variant_from_handle`.
Callables of ``mask_mod`` / ``score_mod`` parts are held by the registry (by identity) together
with whatever they close over; they must be created outside the compiled region.

**Autograd.** Generated kernels are forward-only. The forward op runs the kernel (or the
fallback) under ``no_grad``; the backward op recomputes the attention through the
differentiable built-in fallback (SDPA / FlexAttention / eager, :func:`fallback.choose`) under
``enable_grad`` and returns its gradients (for q, k, v and the floating variant tensors, e.g. a
learned relative-bias table). Backward is itself an opaque op, so AOTAutograd traces it as one
node too. Dropout (``dropout_p > 0``) never reaches the op: :func:`attention_op` runs plain
traceable SDPA for it, since replaying a dropout mask inside a recompute is not possible.

Outputs are contiguous ``(B, Hq, Sq, Dv)`` (the fake implementation promises that layout, so the
real one makes it so: a no-op for kernels, which allocate contiguous outputs).
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import variants as V
from .variants import Variant

log = logging.getLogger(__name__)

__all__ = ["attention_op", "variant_handle", "variant_from_handle", "register_structure"]

# ------------------------------------------------------------------------------ handle registry
_reg_lock = threading.Lock()
_structures: list[tuple] = []
_ids: dict[tuple, int] = {}
_builders: dict[int, Callable[[list[torch.Tensor]], Variant]] = {}

# parts that carry one runtime tensor: Part class -> (descriptor tag, field holding the tensor)
_TENSOR_FIELDS = {V.Document: ("doc", "doc_ids"), V.Alibi: ("alibi", "slopes"), V.RelativeBias: ("relbias", "table"),
                  V.DenseMask: ("dmask", "mask_tensor"), V.DenseBias: ("dbias", "bias")}
_TENSOR_PARTS = {tag: cls for cls, (tag, _) in _TENSOR_FIELDS.items()}  # descriptor tag -> Part class


def _describe_parts(variant: Variant) -> tuple[tuple, list[int], list[float], list[torch.Tensor]]:
    """``(structure, ints, floats, tensors)``. Plain Python over the parts, so dynamo traces it.

    Numbers (window size, prefix length, soft-cap) are *arguments*, not part of the structure:
    under ``dynamic=True`` dynamo turns int attributes into SymInts, which cannot be interned."""
    descs: list[tuple] = []
    ints: list[int] = []
    floats: list[float] = []
    tensors: list[torch.Tensor] = []
    for p in variant.parts:
        tf = _TENSOR_FIELDS.get(type(p))
        if tf is not None:
            descs.append((tf[0],))
            tensors.append(getattr(p, tf[1]))
        elif isinstance(p, V.Causal):
            descs.append(("causal",))
        elif isinstance(p, V.SlidingWindow):
            descs.append(("sw",))
            ints.append(p.size)
        elif isinstance(p, V.PrefixLM):
            descs.append(("prefix",))
            ints.append(p.prefix_len)
        elif isinstance(p, V.Softcap):
            descs.append(("softcap",))
            floats.append(float(p.cap))
        elif isinstance(p, V.MaskMod):
            descs.append(("mask_mod", p.fn))
        elif isinstance(p, V.ScoreMod):
            descs.append(("score_mod", p.fn))
        else:
            raise TypeError(f"r1attn op: variant part {type(p).__name__} cannot be passed through torch.compile")
    return (variant.align, tuple(descs)), ints, floats, tensors


@torch.compiler.assume_constant_result
def register_structure(structure: tuple) -> int:
    """Intern a variant structure ``(align, part descriptors)``; return its handle (stable for the
    life of the process). Raises TypeError for an unknown descriptor."""
    with _reg_lock:
        h = _ids.get(structure)
        if h is not None:
            return h
        builder = _make_builder(structure)
        h = len(_structures)
        _structures.append(structure)
        _ids[structure] = h
        _builders[h] = builder
        return h


def _make_builder(structure: tuple) -> Callable[[list[torch.Tensor]], Variant]:
    align, descs = structure
    if align not in V.ALIGNS:
        raise TypeError(f"r1attn op: bad alignment {align!r} in variant structure")
    # each maker takes iterators over (ints, floats, tensors)
    makers: list[Callable[[Any, Any, Any], V.Part]] = []
    counts = [0, 0, 0]
    for d in descs:
        tag = d[0]
        if tag == "causal":
            makers.append(lambda i, f, t: V.Causal())
        elif tag == "sw":
            makers.append(lambda i, f, t: V.SlidingWindow(int(next(i))))
            counts[0] += 1
        elif tag == "prefix":
            makers.append(lambda i, f, t: V.PrefixLM(int(next(i))))
            counts[0] += 1
        elif tag == "softcap":
            makers.append(lambda i, f, t: V.Softcap(float(next(f))))
            counts[1] += 1
        elif tag in _TENSOR_PARTS:
            makers.append(lambda i, f, t, cls=_TENSOR_PARTS[tag]: cls(next(t)))
            counts[2] += 1
        elif tag == "mask_mod" and len(d) == 2 and callable(d[1]):
            makers.append(lambda i, f, t, fn=d[1]: V.MaskMod(fn))
        elif tag == "score_mod" and len(d) == 2 and callable(d[1]):
            makers.append(lambda i, f, t, fn=d[1]: V.ScoreMod(fn))
        else:
            raise TypeError(f"r1attn op: unknown variant part descriptor {d!r}")

    def build(ints: list[int], floats: list[float], tensors: list[torch.Tensor]) -> Variant:
        got = (len(ints), len(floats), len(tensors))
        if got != tuple(counts):
            raise ValueError(f"r1attn op: variant handle expects (ints, floats, tensors) counts {tuple(counts)}, "
                             f"got {got}")
        i, f, t = iter(ints), iter(floats), iter(tensors)
        return Variant([m(i, f, t) for m in makers], align)

    return build


def variant_handle(variant: Variant) -> tuple[int, list[int], list[float], list[torch.Tensor]]:
    """``(handle, ints, floats, tensors)`` of ``variant``: what the op takes instead of a Variant.

    Raises TypeError for a part that cannot cross into a graph (an unknown Part subclass)."""
    if not isinstance(variant, Variant):
        raise TypeError(f"variant must be a torch_r1attn.variants.Variant, got {type(variant).__name__}")
    structure, ints, floats, tensors = _describe_parts(variant)
    return register_structure(structure), ints, floats, tensors


def variant_from_handle(handle: int, ints: list[int], floats: list[float], tensors: list[torch.Tensor]) -> Variant:
    """Rebuild the Variant a handle names from its numbers and runtime tensors.

    Raises ValueError for an unknown handle or the wrong number of arguments, and whatever the
    part constructors raise for bad values (e.g. ValueError for a window of 0)."""
    b = _builders.get(handle)
    if b is None:
        raise ValueError(f"r1attn op: unknown variant handle {handle} (handles are per process; "
                         "register the variant with ops.variant_handle first)")
    return b(list(ints), list(floats), list(tensors))


# ------------------------------------------------------------------------------------ the ops
@torch.library.custom_op("r1attn::attention", mutates_args=())
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant_tensors: list[torch.Tensor],
               variant_handle: int, variant_ints: list[int], variant_floats: list[float], scale: float,
               enable_gqa: bool, on_miss: str | None) -> torch.Tensor:
    from . import dispatch

    variant = variant_from_handle(variant_handle, variant_ints, variant_floats, variant_tensors)
    with torch.no_grad():  # the kernel path; gradients come from attention_backward
        out = dispatch.forward(q, k, v, variant, scale, enable_gqa, 0.0, on_miss)
    return out.contiguous()


@_attention.register_fake
def _attention_fake(q, k, v, variant_tensors, variant_handle, variant_ints, variant_floats, scale, enable_gqa,
                    on_miss):
    return q.new_empty(q.shape[:-1] + (v.shape[-1],))


def _autograd_inside_op():
    """Re-enable the Autograd dispatch keys for the recompute.

    A custom op's body runs *below* autograd (its dispatcher adds the Autograd keys to the
    thread-local exclude set), so a plain ``enable_grad()`` recompute records no graph and
    ``autograd.grad`` fails with "does not require grad". The guard restores the exclude set on
    exit; only this op's backward recompute runs with it."""
    C = torch._C
    exc = C._dispatch_tls_local_exclude_set()
    for key in ("AutogradFunctionality", "AutogradCPU", "AutogradOther", "ADInplaceOrView"):
        k = getattr(C.DispatchKey, key, None)
        if k is not None:
            exc = exc.remove(k)
    return C._ForceDispatchKeyGuard(C._dispatch_tls_local_include_set(), exc)


def _grad_wanted(t: torch.Tensor) -> bool:
    return t.dtype.is_floating_point


@torch.library.custom_op("r1attn::attention_backward", mutates_args=())
def _attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        variant_tensors: list[torch.Tensor], variant_handle: int, variant_ints: list[int],
                        variant_floats: list[float], scale: float,
                        enable_gqa: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    from . import fallback
    from .config import settings

    with _autograd_inside_op(), torch.enable_grad():
        qd, kd, vd = (t.detach().requires_grad_() for t in (q, k, v))
        vts = [t.detach().requires_grad_() if _grad_wanted(t) else t for t in variant_tensors]
        variant = variant_from_handle(variant_handle, variant_ints, variant_floats, vts)
        path, _ = fallback.choose(variant, q.device, settings().fallback)
        out = fallback.run(path, qd, kd, vd, variant, scale, enable_gqa)
        inputs = [qd, kd, vd] + [t for t in vts if _grad_wanted(t)]
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
    dq, dk, dv = (torch.zeros_like(x) if g is None else g for x, g in zip((q, k, v), grads[:3]))
    it = iter(grads[3:])
    dts = []
    for t in variant_tensors:
        if _grad_wanted(t):
            g = next(it)
            dts.append(torch.zeros_like(t) if g is None else g.contiguous())
        else:
            dts.append(t.new_empty((0,), dtype=torch.float32))
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), dts


@_attention_backward.register_fake
def _attention_backward_fake(grad_out, q, k, v, variant_tensors, variant_handle, variant_ints, variant_floats,
                             scale, enable_gqa):
    dts = [torch.empty_like(t, memory_format=torch.contiguous_format) if _grad_wanted(t)
           else t.new_empty((0,), dtype=torch.float32) for t in variant_tensors]
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), dts)


def _setup_context(ctx, inputs, output):
    q, k, v, variant_tensors, handle, ints, floats, scale, enable_gqa, _on_miss = inputs
    ctx.save_for_backward(q, k, v, *variant_tensors)
    ctx.handle, ctx.ints, ctx.floats, ctx.scale, ctx.enable_gqa = handle, ints, floats, scale, enable_gqa


def _backward(ctx, grad_out):
    q, k, v, *vts = ctx.saved_tensors
    dq, dk, dv, dts = _attention_backward(grad_out.contiguous(), q, k, v, vts, ctx.handle, ctx.ints, ctx.floats,
                                          ctx.scale, ctx.enable_gqa)
    dvt = [g if _grad_wanted(t) else None for t, g in zip(vts, dts)]
    # the returned structure must mirror the inputs', lists included
    # The returned structure must mirror the inputs' pytree: a list of numbers is a leaf (one
    # None) except when it is empty, which flattens to an empty list.
    def none_for(x):
        return [] if isinstance(x, (list, tuple)) and len(x) == 0 else None

    return dq, dk, dv, dvt, None, none_for(ctx.ints), none_for(ctx.floats), None, None, None


_attention.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------- the front door
def attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: Variant, scale: float,
                 enable_gqa: bool, dropout_p: float = 0.0, on_miss: str | None = None) -> torch.Tensor:
    """Run validated attention through ``torch.ops.r1attn.attention`` (the ``torch.compile`` path).

    Called by :func:`torch_r1attn.attention` while ``torch.compiler.is_compiling()``; arguments
    are already validated there (``variant`` includes ``is_causal`` / ``attn_mask``, ``scale`` is
    a float). Shapes: q ``(B, Hq, Sq, D)``, k ``(B, Hkv, Sk, D)``, v ``(B, Hkv, Sk, Dv)`` ->
    ``(B, Hq, Sq, Dv)``.

    ``dropout_p > 0`` runs traceable SDPA directly (dispatch would pick SDPA for it anyway, and
    the op's recompute-based backward cannot replay a dropout mask); it needs an SDPA-expressible
    variant (ValueError otherwise, as in eager).
    """
    if dropout_p > 0.0:
        return _sdpa_traceable(q, k, v, variant, scale, enable_gqa, dropout_p)
    handle, ints, floats, tensors = variant_handle(variant)
    return torch.ops.r1attn.attention(q, k, v, tensors, handle, ints, floats, float(scale), bool(enable_gqa),
                                      on_miss)


def _sdpa_traceable(q, k, v, variant: Variant, scale: float, enable_gqa: bool, dropout_p: float):
    """SDPA with the variant as a dense bool mask / additive bias, built from traceable ops only."""
    from .fallback import sdpa_expressible

    if not sdpa_expressible(variant):
        raise ValueError(f"dropout_p > 0 needs an SDPA-expressible variant; {variant.key} is not")
    B, Hq, Sq, _ = q.shape
    Sk = k.shape[2]
    parts = variant.parts
    mask: torch.Tensor | None = None
    is_causal = False
    if len(parts) == 1 and isinstance(parts[0], V.Causal) and variant.align == "top_left":
        is_causal = True
    elif parts:
        m = variant.dense_mask(B, Hq, Sq, Sk, q.device)
        if variant.score_parts:
            ix = V.IndexGrid.make(B, Hq, Sq, Sk, variant.offset(Sq, Sk), q.device)
            bias, _ = variant.scores_and_mask(torch.zeros((1, 1, 1, 1), dtype=torch.float32, device=q.device), ix)
            if m is not None:
                bias = bias.masked_fill(~m, float("-inf"))
            mask = bias.to(q.dtype)
        else:
            mask = m
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale, enable_gqa=enable_gqa)


def registered_structures() -> list[tuple[int, Any]]:
    """Every interned ``(handle, structure)`` (for ``r1attn doctor`` and debugging)."""
    with _reg_lock:
        return list(enumerate(_structures))
