"""A *problem*: what the search and the verifier need to know about one signature.

``Problem`` = the spec + a representative variant + the shapes to check and time. Because a
spec's key holds a variant's *role* but not its tensors (``doc`` but not the ids), the problem
carries a **variant factory** that makes a representative variant of the same key for any shape:
packed documents of random lengths, the standard ALiBi slopes, a random bias table, random dense
masks with the same broadcast pattern. User callables (``score_mod`` / ``mask_mod``) are kept as
they are, with their captured tensors.

``variant_to_recipe`` / ``variant_from_recipe`` carry a variant across a process boundary
(verifier workers, tuner processes) as JSON + named tensors. Callables travel only when they can
be imported by name (module-level functions); otherwise the recipe says so and the receiving
side works without them (the candidate kernel has the callable traced into its source; only the
FlexAttention baseline needs the Python function).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import variants as V
from .spec import AttentionSpec

Shape = tuple[int, int, int, int, int]  # (B, Hq, Hkv, Sq, Sk)


# ------------------------------------------------------------------------------------ recipes
def _part_recipe(p: V.Part) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if isinstance(p, V.Causal):
        return {"type": "causal"}, {}
    if isinstance(p, V.SlidingWindow):
        return {"type": "sliding_window", "size": p.size}, {}
    if isinstance(p, V.PrefixLM):
        return {"type": "prefix_lm", "prefix_len": p.prefix_len}, {}
    if isinstance(p, V.Softcap):
        return {"type": "softcap", "cap": float(p.cap)}, {}
    if isinstance(p, V.Document):
        return {"type": "document"}, {"doc_ids": p.doc_ids}
    if isinstance(p, V.Alibi):
        return {"type": "alibi"}, {"slopes": p.slopes}
    if isinstance(p, V.RelativeBias):
        return {"type": "relative_bias"}, {"table": p.table}
    if isinstance(p, V.DenseMask):
        return {"type": "dense_mask"}, {"mask": p.mask_tensor}
    if isinstance(p, V.DenseBias):
        return {"type": "dense_bias"}, {"bias": p.bias}
    if isinstance(p, (V.ScoreMod, V.MaskMod)):
        fn = p.fn
        mod, qual = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
        importable = bool(mod) and "<" not in qual and mod != "__main__"
        caps = {n: t for n, t in V._captures(fn).items() if isinstance(t, torch.Tensor)}
        kind = "score_mod" if isinstance(p, V.ScoreMod) else "mask_mod"
        return {"type": kind, "module": mod if importable else None, "qualname": qual if importable else None,
                "key": p.key}, {f"cap_{n}": t for n, t in caps.items()}
    raise TypeError(f"no recipe for part {type(p).__name__}")


def variant_to_recipe(variant: V.Variant) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(json-able dict, tensors)`` describing ``variant`` (its canonical parts)."""
    parts, tensors = [], {}
    for i, p in enumerate(variant.canonical_parts):
        meta, ts = _part_recipe(p)
        parts.append(meta)
        tensors.update({f"p{i}.{n}": t.detach().cpu().contiguous() for n, t in ts.items()})
    return {"align": variant.align, "parts": parts, "key": variant.key}, tensors


class UnavailableCallable:
    """Stands in for a user callable that could not cross the process boundary."""

    def __init__(self, key: str):
        self.key = key

    def __call__(self, *a, **k):
        raise RuntimeError(f"callable {self.key} is not available in this process")


def variant_from_recipe(recipe: dict[str, Any], tensors: dict[str, torch.Tensor], device="cpu") -> V.Variant:
    """Rebuild a variant. Callables that cannot be imported become :class:`UnavailableCallable`
    parts whose ``key`` still matches (so the spec matches) and whose math raises if used."""
    parts: list[V.Part] = []
    for i, meta in enumerate(recipe["parts"]):
        t = {n.split(".", 1)[1]: x.to(device) for n, x in tensors.items() if n.startswith(f"p{i}.")}
        typ = meta["type"]
        if typ == "causal":
            parts.append(V.Causal())
        elif typ == "sliding_window":
            parts.append(V.SlidingWindow(int(meta["size"])))
        elif typ == "prefix_lm":
            parts.append(V.PrefixLM(int(meta["prefix_len"])))
        elif typ == "softcap":
            parts.append(V.Softcap(float(meta["cap"])))
        elif typ == "document":
            parts.append(V.Document(t["doc_ids"]))
        elif typ == "alibi":
            parts.append(V.Alibi(t["slopes"]))
        elif typ == "relative_bias":
            parts.append(V.RelativeBias(t["table"]))
        elif typ == "dense_mask":
            parts.append(V.DenseMask(t["mask"]))
        elif typ == "dense_bias":
            parts.append(V.DenseBias(t["bias"]))
        elif typ in ("score_mod", "mask_mod"):
            fn = None
            if meta.get("module") and meta.get("qualname"):
                try:
                    obj: Any = importlib.import_module(meta["module"])
                    for a in meta["qualname"].split("."):
                        obj = getattr(obj, a)
                    fn = obj
                except (ImportError, AttributeError):
                    fn = None
            parts.append(_OpaqueCallablePart(typ, meta["key"], fn, t))
        else:
            raise ValueError(f"unknown part type in recipe: {typ!r}")
    return V.Variant(parts, recipe.get("align"))


class _OpaqueCallablePart(V.Part):
    """A score_mod/mask_mod part rebuilt from a recipe: same key, same captured tensors."""

    positional = False

    def __init__(self, typ: str, key: str, fn: Callable | None, captured: dict[str, torch.Tensor]):
        self.kind = "score" if typ == "score_mod" else "mask"
        self._key = key
        self.fn = fn
        self.captured = {n[4:]: t for n, t in captured.items()}

    @property
    def key(self) -> str:
        return self._key

    @property
    def available(self) -> bool:
        return self.fn is not None

    def tensors(self, prefix):
        return {f"{prefix}{n}": t for n, t in self.captured.items()}

    def to_device(self, device: torch.device) -> "_OpaqueCallablePart":
        """Its captured tensors on ``device`` (a kernel reads them there; not a dataclass)."""
        if all(t.device == device for t in self.captured.values()):
            return self
        out = _OpaqueCallablePart.__new__(_OpaqueCallablePart)
        out.kind, out._key, out.fn = self.kind, self._key, self.fn
        out.captured = {n: t.to(device) for n, t in self.captured.items()}
        return out

    def _need(self):
        if self.fn is None:
            raise RuntimeError(f"callable {self._key} is not available in this process")
        return self.fn

    def mask(self, ix):
        return self._need()(ix.b, ix.h, ix.q_idx, ix.kv_idx)

    def score(self, s, ix):
        return self._need()(s, ix.b, ix.h, ix.q_idx, ix.kv_idx)

    def flex_mask(self, offset):
        return self._need()

    def flex_score(self, offset):
        return self._need()


def variant_has_opaque(variant: V.Variant) -> bool:
    return any(isinstance(p, _OpaqueCallablePart) and not p.available for p in variant.parts)


# --------------------------------------------------------------------------- variant factories
def representative_variant(template: V.Variant, B: int, Hq: int, Sq: int, Sk: int,
                           gen: torch.Generator | None = None, device="cpu") -> V.Variant:
    """A variant with ``template``'s key whose tensors fit the shape ``(B, Hq, Sq, Sk)``.

    Shape-free tensors (ALiBi slopes, bias tables, callables' captures) are kept; doc ids and
    dense masks/biases are drawn fresh: packed documents of random lengths (so every block
    shape — inside one document, across a boundary — occurs), dense masks with the same
    broadcast pattern and about 30 % masked.
    """
    gen = gen or torch.Generator().manual_seed(0)
    off = template.offset(Sq, Sk)
    L = max(Sk, Sq + off)
    parts: list[V.Part] = []
    for p in template.canonical_parts:
        if isinstance(p, V.Document):
            rows = p.doc_ids.shape[0] if p.doc_ids.dim() == 2 else None
            parts.append(V.Document(_packed_doc_ids(L, B if rows else None, gen)))
        elif isinstance(p, V.Alibi):
            parts.append(V.Alibi(p.slopes if p.slopes.numel() == Hq else V.alibi_slopes(Hq)))
        elif isinstance(p, V.RelativeBias):
            t = p.table
            if t.shape[0] not in (1, Hq):
                t = torch.randn(Hq, t.shape[1], generator=gen) * 0.5
            parts.append(V.RelativeBias(t))
        elif isinstance(p, V.DenseMask):
            shape = _bcast_shape(p.mask_tensor, B, Hq, Sq, Sk)
            parts.append(V.DenseMask(torch.rand(shape, generator=gen) > 0.3))
        elif isinstance(p, V.DenseBias):
            shape = _bcast_shape(p.bias, B, Hq, Sq, Sk)
            parts.append(V.DenseBias((torch.randn(shape, generator=gen)).to(p.bias.dtype)))
        else:
            parts.append(p)
    return V.Variant(parts, template._align).to(device)


def _bcast_shape(t: torch.Tensor, B, H, Sq, Sk) -> tuple[int, ...]:
    shape = (1,) * (4 - t.dim()) + tuple(t.shape)
    return tuple(n if s > 1 else 1 for s, n in zip(shape, (B, H, Sq, Sk)))


def _packed_doc_ids(L: int, B: int | None, gen: torch.Generator) -> torch.Tensor:
    def one() -> torch.Tensor:
        ndocs = int(torch.randint(1, max(2, min(8, L)) + 1, (1,), generator=gen))
        cuts = torch.sort(torch.randperm(max(L - 1, 1), generator=gen)[: ndocs - 1] + 1).values
        ids = torch.zeros(L, dtype=torch.int32)
        for c in cuts.tolist():
            ids[c:] += 1
        return ids

    return one() if B is None else torch.stack([one() for _ in range(B)])


# ------------------------------------------------------------------------------------- Problem
@dataclass
class Problem:
    """One signature to search: the spec, a representative variant, and shapes.

    ``shape`` is what timing uses (the caller's first call, or the spec's bucket maxima);
    ``edge_shapes`` are the correctness-only shapes of this bucket (lengths 1, odd, block±1,
    bucket max, Sq != Sk where the bucket allows, GQA as in the spec).
    """

    spec: AttentionSpec
    variant: V.Variant
    shape: Shape
    device: str = "cuda"
    edge_shapes: list[Shape] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return self.spec.torch_dtype

    def variant_for(self, shape: Shape, seed: int = 0, device=None) -> V.Variant:
        B, Hq, _, Sq, Sk = shape
        return representative_variant(self.variant, B, Hq, Sq, Sk, torch.Generator().manual_seed(seed),
                                      device or self.device)

    def timing_variant(self, seed: int = 0, device=None) -> V.Variant:
        """The variant that timing runs at ``self.shape``: the caller's own (its document layout,
        dense mask or bias) when its tensors fit that shape, else :meth:`variant_for`.

        Data-dependent masks decide which blocks a kernel visits, so a search timed on a random
        layout tunes for the wrong work: documents timed on one or two random documents behave
        like causal attention, the caller's eight like a sparse mask, and prefer other tiles."""
        if not self.timing_variant_is_callers():
            return self.variant_for(self.shape, seed, device)
        return self.variant.to(device or self.device)

    def timing_variant_is_callers(self) -> bool:
        """Whether :meth:`timing_variant` is the caller's variant (its tensors fit ``shape``)."""
        B, Hq, _, Sq, Sk = self.shape
        return self.variant.fits(B, Hq, Sq, Sk)

    @classmethod
    def from_spec(cls, spec: AttentionSpec, variant: V.Variant, device: str = "cuda",
                  shape: Shape | None = None, small: bool = False) -> "Problem":
        """Build the problem for ``spec``. ``small=True`` (CPU interpreter) caps every length at 64."""
        if shape is None:
            hkv = max(1, 32 // spec.gqa)
            shape = spec.example or (4, hkv * spec.gqa, hkv, spec.sq_bucket, spec.sk_bucket)
        B, Hq, Hkv, Sq, Sk = shape
        cap = 64 if small else None
        edges = edge_shapes(spec, Hq, Hkv, Sq, Sk, variant, cap)
        if small:
            B, Hq, Hkv = min(B, 2), min(Hq, 2 * spec.gqa), min(Hq, 2 * spec.gqa) // spec.gqa
            shape = (B, Hq, Hkv, min(Sq, 48), min(Sk, 48))
        return cls(spec=spec, variant=variant, shape=shape, device=device, edge_shapes=edges)


def edge_shapes(spec: AttentionSpec, Hq: int, Hkv: int, Sq: int, Sk: int, variant: V.Variant,
                cap: int | None = None) -> list[Shape]:
    """The bucket's awkward lengths: 1, odd, 64±1, 128±1, the bucket max; Sq != Sk when the
    bucket allows it. Callables with captured tensors keep lengths <= the call's (their tensors
    were sized for it)."""
    g = spec.gqa
    hq, hkv = 2 * g, 2  # two kv heads are enough to catch head-indexing bugs
    def clip(n: int, bucket: int) -> int:
        lo = 1 if bucket <= 16 else bucket // 2 + 1  # stay inside the bucket
        n = max(lo, min(n, bucket))
        if cap:
            n = min(n, cap)
        if any(isinstance(p, (V.ScoreMod, V.MaskMod)) or type(p).__name__ == "_OpaqueCallablePart"
               for p in variant.parts):
            n = min(n, Sq if bucket == spec.sq_bucket else Sk)
        return max(1, n)

    sqb, skb = spec.sq_bucket, spec.sk_bucket
    cand_q = sorted({clip(x, sqb) for x in (1, 17, 63, 65, 127, 129, sqb - 1, sqb)})
    cand_k = sorted({clip(x, skb) for x in (1, 17, 63, 65, 127, 129, skb - 1, skb)})
    shapes: list[Shape] = []
    pairs = list(zip(cand_q, cand_k)) + [(cand_q[0], cand_k[-1]), (cand_q[-1], cand_k[0])]
    seen = set()
    for sq, sk in pairs:
        if (sq, sk) in seen:
            continue
        seen.add((sq, sk))
        shapes.append((1, hq, hkv, sq, sk))
    return shapes[:8]


def default_scale(spec: AttentionSpec) -> float:
    return 1.0 / math.sqrt(spec.head_dim)
