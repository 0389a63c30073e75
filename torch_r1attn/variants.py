"""The attention-variant vocabulary.

A :class:`Variant` is a composition of *parts*. Each part is either

* a **mask part** (which ``(q, kv)`` pairs may attend): :class:`Causal`, :class:`SlidingWindow`,
  :class:`PrefixLM`, :class:`Document`, :class:`MaskMod`, :class:`DenseMask` (bool); or
* a **score part** (how the scaled score ``s = scale * q·k`` is modified): :class:`Alibi`,
  :class:`Softcap`, :class:`RelativeBias`, :class:`ScoreMod`, :class:`DenseBias` (additive).

Semantics, for query row ``i`` and key column ``j`` (0-based)::

    q_pos  = i + offset          offset = 0 (align="top_left", SDPA's is_causal)
                                 offset = Sk - Sq (align="bottom_right", KV-cache decoding)
    s      = scale * <q_i, k_j>
    s      = part(s) for each score part, in the order given   (dense bias is added last)
    allowed = AND of every mask part
    p      = softmax_j(where(allowed, s, -inf));   rows with no allowed j give 0 (SDPA/Flex do too)
    out_i  = sum_j p_ij v_j

Alignment picture for Sq=3, Sk=5, causal (``x`` = attends)::

    top_left (SDPA is_causal)      bottom_right (decode / chunked prefill)
        j: 0 1 2 3 4                   j: 0 1 2 3 4
    i=0    x . . . .               i=0    x x x . .
    i=1    x x . . .               i=1    x x x x .
    i=2    x x x . .               i=2    x x x x x

Mask parts are commutative (the key sorts them); score parts are applied in order (the key keeps it).

Each part provides:

* ``key``: a canonical, stable string (part of the cache key; runtime tensors are *not* in it,
  only their role, so one kernel serves every value of e.g. ``doc_ids``);
* ``tensors(prefix)``: named runtime tensors passed to kernels as ``**variant_tensors``;
* ``mask(ix)`` / ``score(s, ix)``: the eager reference math on broadcast index grids;
* ``flex_mask`` / ``flex_score``: FlexAttention ``mask_mod`` / ``score_mod`` equivalents.

Which built-in path is fastest for a variant lives in :mod:`torch_r1attn.fallback`; how a part
becomes Triton code lives in :mod:`torch_r1attn.search.codegen` (translation, not semantics).
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

ALIGNS = ("top_left", "bottom_right")


@dataclass
class IndexGrid:
    """Broadcastable index tensors for the eager math, shaped to broadcast to (B, H, Sq, Sk)."""

    b: torch.Tensor  # (B, 1, 1, 1)
    h: torch.Tensor  # (1, H, 1, 1)
    q_idx: torch.Tensor  # (1, 1, Sq, 1)   raw row index, what FlexAttention passes
    kv_idx: torch.Tensor  # (1, 1, 1, Sk)
    q_pos: torch.Tensor  # (1, 1, Sq, 1)   q_idx + offset
    B: int
    H: int
    Sq: int
    Sk: int
    offset: int

    @classmethod
    def make(cls, B: int, H: int, Sq: int, Sk: int, offset: int, device) -> "IndexGrid":
        ar = lambda n: torch.arange(n, device=device)  # noqa: E731
        q = ar(Sq).view(1, 1, Sq, 1)
        return cls(
            b=ar(B).view(B, 1, 1, 1), h=ar(H).view(1, H, 1, 1), q_idx=q,
            kv_idx=ar(Sk).view(1, 1, 1, Sk), q_pos=q + offset,
            B=B, H=H, Sq=Sq, Sk=Sk, offset=offset,
        )


class Part:
    """Base class of variant parts. Subclasses are small frozen dataclasses."""

    kind: str = "mask"  # "mask" | "score"
    positional: bool = False  # depends on q_pos (so on the alignment)
    # validate_call does not look at Sq / Sk: a call of other lengths in the same buckets needs no
    # new check (the C++ fast path then keys it by length bucket, as decoding needs). A part whose
    # validate_call reads the lengths sets this False (tests/test_hotpath.py checks every part).
    length_free: bool = True

    @property
    def key(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {}

    def to_device(self, device: torch.device) -> "Part":
        """This part with its tensor fields on ``device`` (self when nothing moves)."""
        changes = {
            f.name: getattr(self, f.name).to(device)
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor) and getattr(self, f.name).device != device
        }
        return dataclasses.replace(self, **changes) if changes else self

    def validate_call(self, B: int, Hq: int, Sq: int, Sk: int, offset: int, device) -> None:
        """Raise ValueError/TypeError if this part cannot apply to the call."""

    def mask(self, ix: IndexGrid) -> torch.Tensor:  # bool, broadcastable
        raise NotImplementedError

    def score(self, s: torch.Tensor, ix: IndexGrid) -> torch.Tensor:
        raise NotImplementedError

    # FlexAttention forms. ``offset`` is closed over (Flex passes raw q_idx).
    def flex_mask(self, offset: int) -> Callable:
        raise NotImplementedError

    def flex_score(self, offset: int) -> Callable:
        raise NotImplementedError


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be >= {lo}, got {v}")
    return v


# --------------------------------------------------------------------------------------- masks
@dataclass(frozen=True, eq=False)
class Causal(Part):
    positional = True

    @property
    def key(self) -> str:
        return "causal"

    def mask(self, ix):
        return ix.kv_idx <= ix.q_pos

    def flex_mask(self, offset):
        def causal_mask(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        return causal_mask


@dataclass(frozen=True, eq=False)
class SlidingWindow(Part):
    """Causal sliding window: query at q_pos sees keys ``q_pos - size < j <= q_pos``
    (``size`` keys including itself; Mistral/Gemma-2/transformers semantics)."""

    size: int
    positional = True

    def __post_init__(self):
        _check_int("sliding_window size", self.size, 1)

    @property
    def key(self) -> str:
        return f"sw{self.size}"

    def mask(self, ix):
        d = ix.q_pos - ix.kv_idx
        return (d >= 0) & (d < self.size)

    def flex_mask(self, offset):
        size = self.size

        def sliding_window_mask(b, h, q_idx, kv_idx):
            d = q_idx + offset - kv_idx
            return (d >= 0) & (d < size)

        return sliding_window_mask


@dataclass(frozen=True, eq=False)
class PrefixLM(Part):
    """Keys ``j < prefix_len`` are visible to every query; the rest causally."""

    prefix_len: int
    positional = True

    def __post_init__(self):
        _check_int("prefix_lm prefix_len", self.prefix_len, 0)

    @property
    def key(self) -> str:
        return f"prefix{self.prefix_len}"

    def mask(self, ix):
        return (ix.kv_idx < self.prefix_len) | (ix.kv_idx <= ix.q_pos)

    def flex_mask(self, offset):
        p = self.prefix_len

        def prefix_lm_mask(b, h, q_idx, kv_idx):
            return (kv_idx < p) | (kv_idx <= q_idx + offset)

        return prefix_lm_mask


@dataclass(frozen=True, eq=False)
class Document(Part):
    """Packed documents: ``doc_ids[..., q_pos] == doc_ids[..., j]``.

    ``doc_ids``: integer tensor, shape ``(L,)`` (shared by the batch) or ``(B, L)``, with
    ``L >= Sk`` and ``L >= Sq + offset``. Kernels skip whole blocks when documents are
    contiguous runs (packing); any id layout is still correct.
    """

    doc_ids: torch.Tensor
    positional = True
    length_free = False  # doc_ids must cover Sk and Sq + offset

    def __post_init__(self):
        t = self.doc_ids
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"document doc_ids must be a tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"document doc_ids must be an integer tensor, got {t.dtype}")
        if t.dim() not in (1, 2):
            raise ValueError(f"document doc_ids must have shape (S,) or (B, S), got {tuple(t.shape)}")

    @property
    def key(self) -> str:
        return "doc" if self.doc_ids.dim() == 1 else "docb"

    def tensors(self, prefix):
        return {f"{prefix}doc_ids": self.doc_ids}

    def validate_call(self, B, Hq, Sq, Sk, offset, device):
        t = self.doc_ids
        L = t.shape[-1]
        if L < Sk or L < Sq + offset:
            raise ValueError(
                f"document doc_ids has length {L}, needs at least max(Sk={Sk}, Sq+offset={Sq + offset})"
            )
        if t.dim() == 2 and t.shape[0] != B:
            raise ValueError(f"document doc_ids has batch {t.shape[0]}, query batch is {B}")

    def _rows(self, ix):
        t = self.doc_ids if self.doc_ids.dim() == 2 else self.doc_ids.unsqueeze(0)  # (B|1, L)
        t = t.view(t.shape[0], 1, 1, -1)
        dq = t[..., ix.q_pos.view(-1)].view(t.shape[0], 1, ix.Sq, 1)
        dk = t[..., : ix.Sk]
        return dq, dk

    def mask(self, ix):
        dq, dk = self._rows(ix)
        return dq == dk

    def flex_mask(self, offset):
        t = self.doc_ids

        if t.dim() == 1:
            def document_mask(b, h, q_idx, kv_idx):
                return t[q_idx + offset] == t[kv_idx]
        else:
            def document_mask(b, h, q_idx, kv_idx):
                return t[b, q_idx + offset] == t[b, kv_idx]

        return document_mask


def _callable_key(tag: str, fn: Callable) -> str:
    """Stable key of a user callable: its source plus the non-tensor values it closes over."""
    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        src = getattr(fn, "__qualname__", repr(fn))
    h = hashlib.sha256(src.encode())
    code = getattr(fn, "__code__", None)
    if code is not None:  # two lambdas on one source line share getsource(); their bytecode differs
        h.update(code.co_code)
        h.update(repr(code.co_consts).encode())
    for name, val in sorted(_captures(fn).items()):
        if isinstance(val, torch.Tensor):
            h.update(f"{name}:T{tuple(val.shape)}{val.dtype}".encode())
        elif isinstance(val, (int, float, bool, str)) or val is None:
            h.update(f"{name}:{val!r}".encode())
    return f"{tag}-{h.hexdigest()[:10]}"


def _captures(fn: Callable) -> dict[str, object]:
    """Values a callable reads from closures and globals (the ones that could change its result)."""
    out: dict[str, object] = {}
    code = getattr(fn, "__code__", None)
    if code is None:
        return out
    if fn.__closure__:
        for name, cell in zip(code.co_freevars, fn.__closure__):
            try:
                out[name] = cell.cell_contents
            except ValueError:  # empty cell
                pass
    g = getattr(fn, "__globals__", {})
    for name in code.co_names:
        if name in g and isinstance(g[name], (torch.Tensor, int, float, bool)):
            out[name] = g[name]
    return out


@dataclass(frozen=True, eq=False)
class MaskMod(Part):
    """FlexAttention-style ``fn(b, h, q_idx, kv_idx) -> bool``. ``q_idx`` is the raw row index
    (as FlexAttention passes it); use ``q_idx + (Sk - Sq)`` yourself for bottom-right logic."""

    fn: Callable

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"mask_mod expects a callable, got {type(self.fn).__name__}")
        _check_arity("mask_mod", self.fn, 4)

    @property
    def key(self) -> str:
        return _callable_key("mm", self.fn)

    def tensors(self, prefix):
        return {f"{prefix}{n}": v for n, v in _captures(self.fn).items() if isinstance(v, torch.Tensor)}

    def mask(self, ix):
        m = self.fn(ix.b, ix.h, ix.q_idx, ix.kv_idx)
        if not isinstance(m, torch.Tensor) or m.dtype != torch.bool:
            raise TypeError("mask_mod must return a bool tensor")
        return m

    def flex_mask(self, offset):
        return self.fn


@dataclass(frozen=True, eq=False)
class DenseMask(Part):
    """SDPA's boolean ``attn_mask`` (True = attend), any shape broadcastable to (B, H, Sq, Sk)."""

    mask_tensor: torch.Tensor
    length_free = False  # broadcastable to (B, H, Sq, Sk)

    @property
    def key(self) -> str:
        return "dmask" + _bcast_code(self.mask_tensor)

    def tensors(self, prefix):
        return {f"{prefix}attn_mask": self.mask_tensor}

    def validate_call(self, B, Hq, Sq, Sk, offset, device):
        _check_bcast("dense mask", self.mask_tensor, B, Hq, Sq, Sk)

    def mask(self, ix):
        return _rows(_as4d(self.mask_tensor), ix)

    def flex_mask(self, offset):
        m = _as4d(self.mask_tensor)

        def dense_mask(b, h, q_idx, kv_idx):
            return m[_bi(m, 0, b), _bi(m, 1, h), _bi(m, 2, q_idx), _bi(m, 3, kv_idx)]

        return dense_mask


# -------------------------------------------------------------------------------------- scores
@dataclass(frozen=True, eq=False)
class Alibi(Part):
    """ALiBi: ``s += slope[h] * (j - q_pos)``. ``slopes``: float tensor (H,)."""

    slopes: torch.Tensor
    kind = "score"
    positional = True

    def __post_init__(self):
        t = self.slopes
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point or t.dim() != 1:
            raise TypeError("alibi slopes must be a 1-D floating tensor (one slope per query head)")
        if not bool(torch.isfinite(t).all()):
            raise ValueError("alibi slopes must be finite")

    @property
    def key(self) -> str:
        return "alibi"

    def tensors(self, prefix):
        return {f"{prefix}alibi_slopes": self.slopes}

    length_free = True  # checks the head count only

    def validate_call(self, B, Hq, Sq, Sk, offset, device):
        if self.slopes.numel() != Hq:
            raise ValueError(f"alibi has {self.slopes.numel()} slopes, query has {Hq} heads")

    def score(self, s, ix):
        sl = self.slopes.to(s.dtype).view(1, -1, 1, 1)
        return s + sl * (ix.kv_idx - ix.q_pos).to(s.dtype)

    def flex_score(self, offset):
        sl = self.slopes

        def alibi_score(score, b, h, q_idx, kv_idx):
            return score + sl[h] * (kv_idx - q_idx - offset)

        return alibi_score


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """The ALiBi paper's slopes ``2^(-8(h+1)/H)`` (geometric, for any head count)."""
    _check_int("alibi num_heads", num_heads, 1)
    n = 2 ** math.floor(math.log2(num_heads))
    base = [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    if n < num_heads:  # the paper's interleaving for non-powers of two
        extra = [2.0 ** (-4.0 * (2 * i + 1) / n) for i in range(num_heads - n)]
        base += extra
    return torch.tensor(base, dtype=torch.float32)


@dataclass(frozen=True, eq=False)
class Softcap(Part):
    """Tanh soft-capping: ``s = cap * tanh(s / cap)`` (Gemma-2, Grok)."""

    cap: float
    kind = "score"

    def __post_init__(self):
        if isinstance(self.cap, bool) or not isinstance(self.cap, (int, float)):
            raise TypeError(f"softcap cap must be a number, got {type(self.cap).__name__}")
        if not (math.isfinite(self.cap) and self.cap > 0):
            raise ValueError(f"softcap cap must be a positive finite number, got {self.cap}")

    @property
    def key(self) -> str:
        return f"softcap{float(self.cap):g}"

    def score(self, s, ix):
        return self.cap * torch.tanh(s / self.cap)

    def flex_score(self, offset):
        cap = float(self.cap)

        def softcap_score(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)

        return softcap_score


@dataclass(frozen=True, eq=False)
class RelativeBias(Part):
    """Learned relative-position bias: ``s += table[h, clip(j - q_pos, -R, R) + R]``.

    ``table``: float tensor ``(H, 2R+1)`` (or ``(1, 2R+1)`` shared by all heads); distances past
    ``R`` reuse the edge entry (T5-style clipping).
    """

    table: torch.Tensor
    kind = "score"
    positional = True

    def __post_init__(self):
        t = self.table
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError("relative_bias table must be a floating tensor of shape (H, 2R+1)")
        if t.dim() != 2 or t.shape[1] % 2 != 1:
            raise ValueError(f"relative_bias table must have shape (H, 2R+1) (odd width), got {tuple(t.shape)}")

    @property
    def radius(self) -> int:
        return (self.table.shape[1] - 1) // 2

    @property
    def key(self) -> str:
        return f"relbias{'h' if self.table.shape[0] > 1 else '1'}"

    def tensors(self, prefix):
        return {f"{prefix}rel_table": self.table}

    length_free = True  # checks the head count only (the kernel clamps distances past the table)

    def validate_call(self, B, Hq, Sq, Sk, offset, device):
        if self.table.shape[0] not in (1, Hq):
            raise ValueError(f"relative_bias table has {self.table.shape[0]} rows, query has {Hq} heads")

    def score(self, s, ix):
        R = self.radius
        idx = (ix.kv_idx - ix.q_pos).clamp(-R, R) + R  # (1,1,Sq,Sk)
        t = self.table.to(s.dtype)
        bias = t[:, idx.view(-1)].view(t.shape[0], ix.Sq, ix.Sk).unsqueeze(0)
        return s + bias

    def flex_score(self, offset):
        t, R = self.table, self.radius
        per_head = t.shape[0] > 1

        def relative_bias_score(score, b, h, q_idx, kv_idx):
            idx = (kv_idx - q_idx - offset).clamp(-R, R) + R
            return score + (t[h, idx] if per_head else t[0, idx])

        return relative_bias_score


@dataclass(frozen=True, eq=False)
class ScoreMod(Part):
    """FlexAttention-style ``fn(score, b, h, q_idx, kv_idx) -> score`` (raw q_idx, like Flex)."""

    fn: Callable
    kind = "score"

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"score_mod expects a callable, got {type(self.fn).__name__}")
        _check_arity("score_mod", self.fn, 5)

    @property
    def key(self) -> str:
        return _callable_key("sm", self.fn)

    def tensors(self, prefix):
        return {f"{prefix}{n}": v for n, v in _captures(self.fn).items() if isinstance(v, torch.Tensor)}

    def score(self, s, ix):
        return self.fn(s, ix.b, ix.h, ix.q_idx, ix.kv_idx)

    def flex_score(self, offset):
        return self.fn


@dataclass(frozen=True, eq=False)
class DenseBias(Part):
    """SDPA's additive float ``attn_mask``, broadcastable to (B, H, Sq, Sk); ``-inf`` masks."""

    bias: torch.Tensor
    kind = "score"
    length_free = False  # broadcastable to (B, H, Sq, Sk)

    @property
    def key(self) -> str:
        return "dbias" + _bcast_code(self.bias)

    def tensors(self, prefix):
        return {f"{prefix}attn_bias": self.bias}

    def validate_call(self, B, Hq, Sq, Sk, offset, device):
        _check_bcast("dense bias", self.bias, B, Hq, Sq, Sk)

    def score(self, s, ix):
        return s + _rows(_as4d(self.bias), ix).to(s.dtype)

    def flex_score(self, offset):
        m = _as4d(self.bias)

        def dense_bias_score(score, b, h, q_idx, kv_idx):
            return score + m[_bi(m, 0, b), _bi(m, 1, h), _bi(m, 2, q_idx), _bi(m, 3, kv_idx)]

        return dense_bias_score


def _as4d(t: torch.Tensor) -> torch.Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _rows(m: torch.Tensor, ix: IndexGrid) -> torch.Tensor:
    """The rows of a dense (.., Sq|1, Sk|1) tensor that the grid covers (it may be a row chunk)."""
    return m[:, :, ix.q_idx.view(-1)] if m.shape[2] > 1 else m


def _bi(m: torch.Tensor, dim: int, idx):
    return idx if m.shape[dim] > 1 else 0


def _check_bcast(what: str, t: torch.Tensor, B: int, Hq: int, Sq: int, Sk: int) -> None:
    """Raise ValueError unless ``t`` broadcasts to (B, Hq, Sq, Sk)."""
    if t.dim() > 4:
        raise ValueError(f"{what} has {t.dim()} dims; it must broadcast to (B, H, Sq, Sk)")
    target = (B, Hq, Sq, Sk)
    shape = (1,) * (4 - t.dim()) + tuple(t.shape)
    for n, s, want in zip(("B", "H", "Sq", "Sk"), shape, target):
        if s not in (1, want):
            raise ValueError(f"{what} of shape {tuple(t.shape)} does not broadcast to (B, H, Sq, Sk)={target} (dim {n})")


def _bcast_code(t: torch.Tensor) -> str:
    """Which of (B, H, Sq, Sk) a dense mask varies along, e.g. ``-b1h0q1k1``."""
    shape = (1,) * (4 - t.dim()) + tuple(t.shape)
    return "-" + "".join(f"{n}{int(s > 1)}" for n, s in zip("bhqk", shape))


def _check_arity(name: str, fn: Callable, n: int) -> None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values())
    if not varargs and len(params) != n:
        want = "(score, b, h, q_idx, kv_idx)" if n == 5 else "(b, h, q_idx, kv_idx)"
        raise TypeError(f"{name} callable must take {n} arguments {want}, it takes {len(params)}")


# ------------------------------------------------------------------------------------- Variant
class Variant:
    """A composition of parts plus the causal alignment. Compose with ``+``.

    >>> v = sliding_window(4096) + softcap(50.0)     # Gemma-2 local layer
    >>> v.key
    'sw4096+softcap50'
    """

    __slots__ = ("parts", "_align", "_key", "_tensors")

    def __init__(self, parts: Iterable[Part] = (), align: str | None = None):
        parts = tuple(parts)
        for p in parts:
            if not isinstance(p, Part):
                raise TypeError(f"variant parts must be Part instances, got {type(p).__name__}")
        if align is not None and align not in ALIGNS:
            raise ValueError(f"align must be one of {ALIGNS}, got {align!r}")
        self.parts = parts
        self._align = align
        self._key: str | None = None
        self._tensors: dict[str, torch.Tensor] | None = None

    @property
    def align(self) -> str:
        return self._align or "top_left"

    def __add__(self, other: "Variant") -> "Variant":
        if not isinstance(other, Variant):
            return NotImplemented
        if self._align and other._align and self._align != other._align:
            raise ValueError(f"cannot compose variants with different alignments: {self._align} vs {other._align}")
        return Variant(self.parts + other.parts, self._align or other._align)

    def with_parts(self, *extra: Part) -> "Variant":
        return Variant(self.parts + tuple(extra), self._align)

    @property
    def mask_parts(self) -> tuple[Part, ...]:
        return tuple(p for p in self.parts if p.kind == "mask")

    @property
    def score_parts(self) -> tuple[Part, ...]:
        # dense bias goes last so SDPA's "scores + attn_mask" order holds after other score parts
        sp = [p for p in self.parts if p.kind == "score"]
        return tuple([p for p in sp if not isinstance(p, DenseBias)] + [p for p in sp if isinstance(p, DenseBias)])

    @property
    def is_full(self) -> bool:
        return not self.parts

    @property
    def canonical_parts(self) -> tuple[Part, ...]:
        """Mask parts sorted by key (AND commutes; duplicates and a causal implied by a sliding
        window dropped), then score parts in application order. Kernels see tensors in this order,
        so ``causal() + document(d)`` and ``document(d) + causal()`` share one kernel."""
        masks: dict[str, Part] = {}
        for p in self.mask_parts:
            if p.key in masks and p.tensors("") and p is not masks[p.key]:
                masks[f"{p.key}#{len(masks)}"] = p  # same role, different tensors: keep both
            else:
                masks.setdefault(p.key, p)
        if "causal" in masks and any(k.startswith("sw") for k in masks):
            del masks["causal"]
        ordered = [masks[k] for k in sorted(masks)]
        return tuple(ordered) + self.score_parts

    @property
    def key(self) -> str:
        k = self._key
        if k is None:
            body = "+".join(p.key for p in self.canonical_parts) or "full"
            if self.align == "bottom_right" and any(p.positional for p in self.parts):
                body += "@br"
            k = self._key = body
        return k

    def to(self, device) -> "Variant":
        """The same variant with its runtime tensors on ``device`` (callables' captures untouched)."""
        device = torch.device(device)
        if all(t.device == device for t in self.tensors().values()):
            return self  # the hot path: nothing to move, no new object
        return Variant([p.to_device(device) for p in self.parts], self._align)

    def offset(self, Sq: int, Sk: int) -> int:
        return Sk - Sq if self.align == "bottom_right" else 0

    def tensors(self) -> dict[str, torch.Tensor]:
        """Named runtime tensors (``p{i}_...``), the ``**variant_tensors`` of the kernel contract."""
        out = self._tensors
        if out is None:  # parts are immutable: compute once (the dispatch hot path reads this)
            out = {}
            for i, p in enumerate(self.canonical_parts):
                out.update(p.tensors(f"p{i}_"))
            self._tensors = out
        return out

    def validate_call(self, B: int, Hq: int, Sq: int, Sk: int, device) -> None:
        off = self.offset(Sq, Sk)
        for p in self.parts:
            p.validate_call(B, Hq, Sq, Sk, off, device)

    @property
    def length_free(self) -> bool:
        """Whether :meth:`validate_call` ignores the lengths (every part's ``length_free``)."""
        return all(p.length_free for p in self.parts)

    def fits(self, B: int, Hq: int, Sq: int, Sk: int) -> bool:
        """Whether this variant's tensors can serve a call of this shape (:meth:`validate_call`)."""
        try:
            self.validate_call(B, Hq, Sq, Sk, None)
        except (ValueError, TypeError):
            return False
        return True

    # ---- eager math (the reference; also the eager fallback)
    def scores_and_mask(self, s: torch.Tensor, ix: IndexGrid) -> tuple[torch.Tensor, torch.Tensor | None]:
        for p in self.score_parts:
            s = p.score(s, ix)
        m = None
        for p in self.mask_parts:
            pm = p.mask(ix)
            m = pm if m is None else (m & pm)
        return s, m

    def dense_mask(self, B: int, H: int, Sq: int, Sk: int, device) -> torch.Tensor | None:
        """The combined boolean mask, materialised at the smallest broadcast shape (None = full)."""
        if not self.mask_parts:
            return None
        ix = IndexGrid.make(B, H, Sq, Sk, self.offset(Sq, Sk), device)
        m = None
        for p in self.mask_parts:
            pm = p.mask(ix)
            m = pm if m is None else (m & pm)
        return m

    # ---- FlexAttention forms
    def flex_mask_mod(self, Sq: int, Sk: int) -> Callable | None:
        if not self.mask_parts:
            return None
        off = self.offset(Sq, Sk)
        fns = [p.flex_mask(off) for p in self.mask_parts]
        if len(fns) == 1:
            return fns[0]

        def combined_mask(b, h, q_idx, kv_idx):
            m = fns[0](b, h, q_idx, kv_idx)
            for f in fns[1:]:
                m = m & f(b, h, q_idx, kv_idx)
            return m

        return combined_mask

    def flex_score_mod(self, Sq: int, Sk: int) -> Callable | None:
        if not self.score_parts:
            return None
        off = self.offset(Sq, Sk)
        fns = [p.flex_score(off) for p in self.score_parts]
        if len(fns) == 1:
            return fns[0]

        def combined_score(score, b, h, q_idx, kv_idx):
            for f in fns:
                score = f(score, b, h, q_idx, kv_idx)
            return score

        return combined_score

    def __repr__(self) -> str:
        return f"Variant({self.key!r})"


# --------------------------------------------------------------------------- public constructors
def full() -> Variant:
    """No mask, no score modification (plain softmax attention)."""
    return Variant()


def causal(align: str = "top_left") -> Variant:
    """Causal mask. ``align="top_left"`` is SDPA's ``is_causal``; ``"bottom_right"`` aligns the last
    query with the last key (KV-cache decoding, chunked prefill)."""
    return Variant((Causal(),), align)


def sliding_window(size: int, align: str | None = None) -> Variant:
    """Causal sliding window of ``size`` keys (each query sees itself and ``size - 1`` before)."""
    return Variant((SlidingWindow(size),), align)


def prefix_lm(prefix_len: int, align: str | None = None) -> Variant:
    """Bidirectional over the first ``prefix_len`` keys, causal after."""
    return Variant((PrefixLM(prefix_len),), align)


def document(doc_ids: torch.Tensor, align: str | None = None) -> Variant:
    """Packed documents: attend only within the same document id. Compose with :func:`causal`."""
    return Variant((Document(doc_ids),), align)


def alibi(num_heads_or_slopes: int | Sequence[float] | torch.Tensor) -> Variant:
    """ALiBi bias. Pass the head count (standard slopes) or explicit slopes."""
    x = num_heads_or_slopes
    if isinstance(x, torch.Tensor):
        slopes = x
    elif isinstance(x, int) and not isinstance(x, bool):
        slopes = alibi_slopes(x)
    elif isinstance(x, (list, tuple)):
        slopes = torch.tensor([float(v) for v in x], dtype=torch.float32)
    else:
        raise TypeError(f"alibi expects a head count or slopes, got {type(x).__name__}")
    return Variant((Alibi(slopes),))


def softcap(cap: float) -> Variant:
    """Tanh soft-capping of the scaled scores."""
    return Variant((Softcap(cap),))


def relative_bias(table: torch.Tensor) -> Variant:
    """Learned relative-position bias table ``(H, 2R+1)``."""
    return Variant((RelativeBias(table),))


def score_mod(fn: Callable) -> Variant:
    """FlexAttention-style score modification ``fn(score, b, h, q_idx, kv_idx)``."""
    return Variant((ScoreMod(fn),))


def mask_mod(fn: Callable) -> Variant:
    """FlexAttention-style mask ``fn(b, h, q_idx, kv_idx) -> bool``."""
    return Variant((MaskMod(fn),))


def compose(*variants: Variant) -> Variant:
    out = Variant()
    for v in variants:
        out = out + v
    return out
