"""Translate a variant's canonical parts into Triton code fragments (translation, not semantics).

The semantics live in :mod:`torch_r1attn.variants` (each part's eager ``mask`` / ``score``);
this module only says how each part looks inside a flash-attention tile. The templates in
:mod:`torch_r1attn.search.templates` paste the fragments into their kernels.

Names a fragment may use, defined by every kernel that pastes fragments::

    off_b            batch index (scalar)
    HEAD             query head: ``off_h`` (scalar, prefill) or ``h_row`` (BLOCK_M,) (decode)
    h_c              HEAD broadcast as a column: ``off_h`` or ``h_row[:, None]``
    q_pos            (BLOCK_M,) row positions = q_idx + offset;   q_pos_c = q_pos[:, None]
    q_idx_c          (BLOCK_M, 1) raw row index (what FlexAttention callables receive)
    row_ok, row_ok_c rows that exist (q_idx < Sq, and a real head in the decode packing)
    qmin, qmax       scalar: smallest / largest q_pos of the program's valid rows
    kv_idx           (BLOCK_N,) key positions of the tile;        kv_r = kv_idx[None, :]
    kv_ok, kv_ok_r   kv_idx < Sk
    s                (BLOCK_M, BLOCK_N) fp32 scaled score ``scale * q.k`` (natural units)
    allowed          (BLOCK_M, BLOCK_N) bool, AND-ed by mask parts (masked loop only)
    lo, hi, flo, fhi scalar kv ranges: [lo, hi) may hold allowed pairs; [flo, fhi) is allowed
                     for every valid row of the program (no per-element mask needed there)
    Sq, Sk, OFFSET, FAST_TANH (constexpr)

Mask parts of the interval kind (causal, sliding window, prefix-LM) do not write per-element
code: they give a per-row lower bound ``lb`` (``kv >= lb(q_pos)``, which holds for every row
once ``kv >= flo``) and/or upper bound ``ub`` (``kv <= ub(q_pos)``, which holds once
``kv < fhi``). The kernel folds them (and ``kv < Sk``) into two row vectors in the prologue, so
a boundary tile pays one or two integer compares per element, and the tiles after the
fully-allowed run test the upper bound only. Other mask parts (documents, dense masks,
``mask_mod``) stay per-element ``mask`` lines, AND-ed in every masked tile.

Score parts are *additive* (ALiBi, relative bias, dense bias: ``s + bias``) or not (soft-cap,
traced ``score_mod``). Additive parts after the last non-additive one are written in the
kernel's score units ``__UNIT__`` (log2(e) with the base-2 softmax, else 1), so the base-2
conversion folds into the qk multiply instead of costing a multiply per element; see
:func:`variant_code`.

Every part becomes a :class:`Fragment` (kernel parameters and the launcher expressions that
feed them, host setup, once-per-program prologue, block-range lines, tile mask lines, tile
score lines). ``score_mod`` / ``mask_mod`` callables are traced by a small ``__torch_function__``
tracer into pointwise Triton expressions; anything else raises :class:`Untraceable`.
Sub-expressions that do not depend on the key index or the score are hoisted into the prologue
(computed once per program, not once per tile).
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import variants as V

log = logging.getLogger(__name__)

LOG2E = 1.4426950408889634


class Untraceable(Exception):
    """A part (usually a user callable) cannot be translated into Triton code.

    ``reason`` says why, in words the search logs (the signature is then left to the LLM
    proposer or the fallback)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Ctx:
    """Where fragments are pasted: the prefill kernel (one query head per program) or the
    decode kernel (all GQA query heads of one kv head packed into the rows)."""

    decode: bool = False
    rel_vec: bool = False  # relative bias: aligned table copies, vector loads (prefill only)
    rel_asm: int = 0  # with rel_vec: 1/2 = inline-asm loads of 1/2 fp32 in the score tile's layout

    @property
    def head(self) -> str:
        return "h_row" if self.decode else "off_h"

    def col(self, expr: str) -> str:
        """A per-head value as a column of the tile (scalar in prefill)."""
        return f"{expr}[:, None]" if self.decode else expr


@dataclass
class Fragment:
    """The code one part contributes. ``params[i]`` is fed by launcher expression ``args[i]``."""

    params: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    host: list[str] = field(default_factory=list)  # launcher lines, before the launch
    prologue: list[str] = field(default_factory=list)
    ranges: list[str] = field(default_factory=list)
    mask: list[str] = field(default_factory=list)  # masked loop only
    score: list[str] = field(default_factory=list)  # every loop
    masks_elements: bool = False  # needs per-element masking somewhere in [lo, hi)
    doc_ranges: list[str] = field(default_factory=list)  # names of per-block range tensors
    lb: list[str] = field(default_factory=list)  # (BLOCK_M,) row expressions: kv >= lb
    ub: list[str] = field(default_factory=list)  # (BLOCK_M,) row expressions: kv <= ub
    additive: bool = False  # score part of the form s + bias (bias not depending on s)
    score_rowfree: list[str] | None = None  # score lines up to a per-row constant (see _alibi)
    constexprs: list[tuple[str, str]] = field(default_factory=list)  # (kernel name, launcher expr)
    helpers: list[str] = field(default_factory=list)  # module-level source the launcher lines call

    def add_param(self, name: str, arg: str) -> None:
        self.params.append(name)
        self.args.append(arg)


def _bind(f: "Fragment", name: str) -> None:
    """Launcher: bind runtime tensor ``name`` from ``**variant_tensors``; kernel: its pointer."""
    f.host.append(f"{name} = _need(variant_tensors, {name!r}, q)")
    f.add_param(name, name)


# ------------------------------------------------------------------------------- mask parts
def _causal(p: V.Causal, pre: str, ctx: Ctx) -> Fragment:
    f = Fragment(masks_elements=True)
    f.ranges += ["hi = tl.minimum(hi, qmax + 1)", "fhi = tl.minimum(fhi, qmin + 1)"]
    f.ub.append("q_pos")
    return f


def _sliding_window(p: V.SlidingWindow, pre: str, ctx: Ctx) -> Fragment:
    f = Fragment(masks_elements=True)
    w = int(p.size)
    f.ranges += [
        f"lo = tl.maximum(lo, qmin - {w - 1})", "hi = tl.minimum(hi, qmax + 1)",
        f"flo = tl.maximum(flo, qmax - {w - 1})", "fhi = tl.minimum(fhi, qmin + 1)",
    ]
    f.lb.append(f"q_pos - {w - 1}")
    f.ub.append("q_pos")
    return f


def _prefix_lm(p: V.PrefixLM, pre: str, ctx: Ctx) -> Fragment:
    f = Fragment(masks_elements=True)
    n = int(p.prefix_len)
    f.ranges += [f"hi = tl.minimum(hi, tl.maximum(qmax + 1, {n}))",
                 f"fhi = tl.minimum(fhi, tl.maximum(qmin + 1, {n}))"]
    f.ub.append(f"tl.maximum(q_pos, {n - 1})")  # kv < n  or  kv <= q_pos
    return f


def _document(p: V.Document, pre: str, ctx: Ctx) -> Fragment:
    """Per-element: ``doc[q_pos] == doc[kv]``. Ranges: a per-query-block (lo, hi, flo, fhi)
    table made on the device by ``_doc_ranges_kernel`` in the launcher (one tiny launch), exact
    for non-decreasing ids (packing) and the full range otherwise."""
    f = Fragment(masks_elements=True)
    t = f"{pre}doc_ids"
    batched = p.doc_ids.dim() == 2
    _bind(f, t)
    f.host += [
        f"{pre}sb, {pre}sl = ({t}.stride(0), {t}.stride(1)) if {t}.dim() == 2 else (0, {t}.stride(0))",
        f"{pre}ranges = _doc_ranges({t}, {pre}sb, {pre}sl, {'B' if batched else '1'}, Sq, Sk, offset, _QBLOCK, _NQBLK)",
    ]
    f.add_param(f"{pre}sb", f"{pre}sb")
    f.add_param(f"{pre}sl", f"{pre}sl")
    f.add_param(f"{pre}ranges", f"{pre}ranges")
    f.doc_ranges.append(f"{pre}ranges")
    f.prologue += [
        f"{pre}base = {t} + off_b.to(tl.int64) * {pre}sb",
        f"{pre}dq = tl.load({pre}base + q_pos * {pre}sl, mask=row_ok, other=-1)",
        f"{pre}rb = {pre}ranges + ({'off_b' if batched else '0'} * _NQBLK_RT + _QBLK) * 4",
    ]
    f.ranges += [
        f"lo = tl.maximum(lo, tl.load({pre}rb))", f"hi = tl.minimum(hi, tl.load({pre}rb + 1))",
        f"flo = tl.maximum(flo, tl.load({pre}rb + 2))", f"fhi = tl.minimum(fhi, tl.load({pre}rb + 3))",
    ]
    f.mask += [
        f"{pre}dk = tl.load({pre}base + kv_idx * {pre}sl, mask=kv_ok, other=-2)",
        f"allowed = allowed & ({pre}dq[:, None] == {pre}dk[None, :])",
    ]
    return f


def _dense_tile(pre: str, t: str, ctx: Ctx, f: Fragment) -> str:
    """Launcher lines for a dense (..)->(B, H, Sq, Sk) tensor; returns the tile pointer expr.
    Broadcast dims get stride 0, so one kernel serves every broadcast pattern of the key."""
    _bind(f, t)
    f.host += [
        f"_m4 = {t}.reshape((1,) * (4 - {t}.dim()) + tuple({t}.shape))",
        f"{pre}st = [(_m4.stride(i) if _m4.shape[i] > 1 else 0) for i in range(4)]",
    ]
    for i, n in enumerate("bhqk"):
        f.add_param(f"{pre}s{n}", f"{pre}st[{i}]")
    f.prologue.append(f"{pre}base = {t} + off_b.to(tl.int64) * {pre}sb + {ctx.col(ctx.head)} * {pre}sh + q_idx_c * {pre}sq")
    return f"{pre}base + kv_r * {pre}sk"


def _dense_mask(p: V.DenseMask, pre: str, ctx: Ctx) -> Fragment:
    f = Fragment(masks_elements=True)
    ptr = _dense_tile(pre, f"{pre}attn_mask", ctx, f)
    f.mask.append(f"allowed = allowed & (tl.load({ptr}, mask=row_ok_c & kv_ok_r, other=0) != 0)")
    f.ranges += ["fhi = tl.minimum(fhi, 0)"]  # no block is known to be fully allowed
    return f


# ------------------------------------------------------------------------------ score parts
def _alibi(p: V.Alibi, pre: str, ctx: Ctx) -> Fragment:
    """``s += slope[h] * (kv - q_pos)``. When nothing non-linear follows (see
    :func:`variant_code`), the kernel instead adds ``slope * (kv - qmin)``: it differs by a
    per-row constant, which softmax cancels, and costs one add per element (the column term is
    a BLOCK_N vector per tile) instead of a subtract, a convert and a multiply-add."""
    f = Fragment(additive=True)
    t = f"{pre}alibi_slopes"
    _bind(f, t)
    m = ", mask=row_ok, other=0.0" if ctx.decode else ""
    f.prologue.append(f"{pre}slope = {ctx.col(f'tl.load({t} + {ctx.head}{m}).to(tl.float32)')} * __UNIT__")
    f.score.append(f"s = s + {pre}slope * (kv_r - q_pos_c).to(tl.float32)")
    if not ctx.decode:
        f.score_rowfree = [f"s = s + ({pre}slope * (kv_idx - qmin).to(tl.float32))[None, :]"]
    return f


def _softcap(p: V.Softcap, pre: str, ctx: Ctx) -> Fragment:
    f = Fragment()
    cap = float(p.cap)
    f.score.append(f"s = _tanh(s * {1.0 / cap!r}, FAST_TANH) * {cap!r}")
    return f


def _relative_bias(p: V.RelativeBias, pre: str, ctx: Ctx) -> Fragment:
    """``s += table[h, clamp(kv - q_pos, -R, R) + R]``. Along a row the index is contiguous in
    kv (a Toeplitz band of the table, which stays in L1).

    When the table covers every distance of the call (``R >= max |kv - q_pos|``, decided by
    the launcher into the constexpr ``{pre}NOCLAMP``; true for the usual ``2*S-1`` tables) the
    clamp is dead and the prefill kernel keeps one pointer per row, ``row + (R - q_pos)``.
    Rows past Sq are clamped so no load leaves the table.

    ``ctx.rel_vec`` (prefill): a row of the band starts at any element, so a tile's loads are
    scalar, one per element, plus a shared-memory round trip into the MMA layout (H200: the
    bias tile, not the index arithmetic, bounds this variant). The launcher then first writes
    four copies of the table, copy ``c`` shifted right by ``c`` elements, with padding past the
    end (one small prep kernel; ``{pre}W`` per copy, a multiple of 16); each row reads the copy
    in which its band starts on a multiple of 4 elements, so the tile loads 16-byte vectors
    and needs no clamp on the key index. Otherwise keys past Sk are clamped per column.

    The copies are fp32 whatever the table's dtype (exact). Triton loads the tile in a blocked
    layout and moves it into the MMA accumulator's layout through shared memory (a barrier per
    tile); ``ctx.rel_asm`` (CUDA) loads it with inline PTX instead, which Triton places straight
    in the consumer's (the score tile's) layout: 1 = one ``ld.global.nc.f32`` per element; 2 =
    two neighbouring elements per ``ld.global.nc.v2.f32`` when their addresses are adjacent and
    8-byte aligned (in the accumulator layout a thread's element pairs are neighbouring keys),
    two scalar loads otherwise, so it is correct in any layout."""
    f = Fragment(additive=True)
    t = f"{pre}rel_table"
    _bind(f, t)
    f.host += [f"{pre}R = ({t}.shape[1] - 1) // 2",
               f"{pre}sh = {t}.stride(0) if {t}.shape[0] > 1 else 0"]
    f.add_param(f"{pre}sh", f"{pre}sh")
    f.add_param(f"{pre}sw", f"{t}.stride(1)")
    f.add_param(f"{pre}R", f"{pre}R")
    f.prologue.append(f"{pre}row = {t} + {ctx.col(ctx.head)} * {pre}sh")
    m = ", mask=row_ok_c, other=0.0" if ctx.decode else ""
    clamped = [
        f"{pre}i = tl.minimum(tl.maximum(kv_r - q_pos_c, -{pre}R), {pre}R) + {pre}R",
        f"s = s + tl.load({pre}row + {pre}i * {pre}sw{m}).to(tl.float32) * __UNIT__",
    ]
    if ctx.decode:
        f.score += clamped
        return f
    f.host.append(f"{pre}noclamp = {pre}R >= max(Sq - 1 + offset, Sk - 1 - offset)")
    f.constexprs.append((f"{pre}NOCLAMP", f"{pre}noclamp"))
    if ctx.rel_vec:
        f.helpers.append(_REL_ALIGN)
        if ctx.rel_asm:
            f.helpers.append(_REL_LD)
        f.host += [
            f"{pre}W = ((({t}.shape[1] + 3 + BLOCK_N) + 15) // 16) * 16",
            f"if {pre}noclamp:",
            f"    {pre}tab = torch.empty(({t}.shape[0], 4, {pre}W), dtype=torch.float32, device={t}.device)",
            f"    _rel_align[(_cdiv({pre}W, 1024), 4, {t}.shape[0])]({t}, {pre}tab, {t}.stride(0), {t}.stride(1),",
            f"                                                      {t}.shape[1], {pre}W, BLOCK=1024)",
            "else:",
            f"    {pre}tab = {t}",
            f"{pre}sh4 = 4 * {pre}W if {t}.shape[0] > 1 else 0",
        ]
        f.add_param(f"{pre}tab", f"{pre}tab")
        f.add_param(f"{pre}W", f"{pre}W")
        f.add_param(f"{pre}sh4", f"{pre}sh4")
        # o >= 0 under NOCLAMP; copy c holds table[x - c] at x, so o + c is the row's start there
        f.prologue += [
            f"{pre}o = {pre}R - tl.minimum(q_pos, Sq - 1 + OFFSET)",
            f"{pre}c = (4 - {pre}o % 4) % 4",
            f"{pre}vp = {pre}tab + {ctx.head} * {pre}sh4 + {pre}c * {pre}W + tl.multiple_of({pre}o + {pre}c, 4)",
        ]
        # the templates' loop bounds let Triton prove a tile's first key a multiple of BLOCK_N
        ld = f"_rel_ld{ctx.rel_asm}" if ctx.rel_asm else "tl.load"
        fast = [f"s = s + {ld}({pre}vp[:, None] + kv_r).to(tl.float32) * __UNIT__"]
    else:
        f.prologue.append(f"{pre}rp = {pre}row + ({pre}R - tl.minimum(q_pos, Sq - 1 + OFFSET)) * {pre}sw")
        fast = [f"{pre}kc = tl.minimum(kv_idx, Sk - 1)",
                f"s = s + tl.load({pre}rp[:, None] + ({pre}kc * {pre}sw)[None, :]).to(tl.float32) * __UNIT__"]
    f.score += [f"if {pre}NOCLAMP:"] + ["    " + ln for ln in fast] + ["else:"] + ["    " + ln for ln in clamped]
    return f


# The relative-bias prep kernel (see _relative_bias): out[h, c, x] = table[h, x - c], 0 outside.
_REL_ALIGN = '''
@triton.jit
def _rel_align(T, OUT, st_h, st_w, L, W, BLOCK: tl.constexpr):
    x = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    c = tl.program_id(1)
    h = tl.program_id(2)
    src = x - c
    ok = (src >= 0) & (src < L)
    val = tl.load(T + h * st_h + src * st_w, mask=ok, other=0.0)
    tl.store(OUT + (h * 4 + c) * W + x, val, mask=x < W)
'''

# Inline-asm fp32 loads for the relative-bias tile (ctx.rel_asm; CUDA only, the interpreter cannot
# run them). The copies are written by an earlier launch and only read here: .nc is safe.
_REL_LD = '''
@triton.jit
def _rel_ld1(ptr):
    return tl.inline_asm_elementwise("ld.global.nc.f32 $0, [$1];", "=f,l", [ptr], dtype=tl.float32,
                                     is_pure=True, pack=1)


@triton.jit
def _rel_ld2(ptr):
    # $2, $3: the pointers of two elements a thread holds next to each other; one 8-byte load when
    # they are adjacent and aligned (neighbouring keys of one row), else two loads
    return tl.inline_asm_elementwise(
        "{ .reg .pred %pv; .reg .b64 %dd, %da; sub.s64 %dd, $3, $2; xor.b64 %dd, %dd, 4; "
        "and.b64 %da, $2, 7; or.b64 %dd, %dd, %da; setp.eq.s64 %pv, %dd, 0; "
        "@%pv ld.global.nc.v2.f32 {$0, $1}, [$2]; @!%pv ld.global.nc.f32 $0, [$2]; "
        "@!%pv ld.global.nc.f32 $1, [$3]; }",
        "=f,=f,l,l", [ptr], dtype=tl.float32, is_pure=True, pack=2)
'''


def _dense_bias(p: V.DenseBias, pre: str, ctx: Ctx) -> Fragment:
    f = Fragment(additive=True)
    ptr = _dense_tile(pre, f"{pre}attn_bias", ctx, f)
    f.score.append(f"s = s + tl.load({ptr}, mask=row_ok_c & kv_ok_r, other=0.0).to(tl.float32) * __UNIT__")
    return f


# --------------------------------------------------------------------------------- tracing
_UNARY = {
    "tanh": "_tanh({0}, FAST_TANH)", "exp": "tl.exp({0})", "exp2": "tl.exp2({0})", "log": "tl.log({0})",
    "log2": "tl.log2({0})", "sqrt": "tl.sqrt({0})", "rsqrt": "tl.rsqrt({0})", "sigmoid": "tl.sigmoid({0})",
    "sin": "tl.sin({0})", "cos": "tl.cos({0})", "floor": "tl.floor({0})", "ceil": "tl.ceil({0})",
}
_FLOAT_ONLY = set(_UNARY)
_BINARY = {"add": "+", "sub": "-", "mul": "*", "truediv": "/", "div": "/", "true_divide": "/",
           "and": "&", "or": "|", "xor": "^", "bitwise_and": "&", "bitwise_or": "|", "bitwise_xor": "^",
           "logical_and": "&", "logical_or": "|",
           "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">=",
           "greater": ">", "less": "<", "greater_equal": ">=", "less_equal": "<=", "not_equal": "!="}
_CMP = {"==", "!=", "<", "<=", ">", ">="}
_DTYPES = {torch.float32: ("float", "tl.float32"), torch.float64: ("float", "tl.float32"),
           torch.float16: ("float", "tl.float16"), torch.bfloat16: ("float", "tl.bfloat16"),
           torch.int32: ("int", "tl.int32"), torch.int64: ("int", "tl.int32"), torch.int16: ("int", "tl.int32"),
           torch.int8: ("int", "tl.int32"), torch.uint8: ("int", "tl.int32"), torch.bool: ("bool", "tl.int1")}


class _Tracer:
    def __init__(self, pre: str, captures: dict[str, Any], ctx: Ctx, frag: Fragment):
        self.pre, self.ctx, self.frag, self.n = pre, ctx, frag, 0
        self.tile: list[str] = []
        self.tensors = {id(t): (n, t) for n, t in captures.items() if isinstance(t, torch.Tensor)}
        self.bound: set[str] = set()

    def emit(self, expr: str, deps: frozenset, kind: str) -> "_Sym":
        name = f"{self.pre}n{self.n}"
        self.n += 1
        (self.tile if deps & {"kv", "s"} else self.frag.prologue).append(f"{name} = {expr}")
        return _Sym(self, name, deps, kind)

    def lift(self, x) -> "_Sym":
        if isinstance(x, _Sym):
            return x
        if isinstance(x, bool):
            return _Sym(self, repr(x), frozenset(), "bool")
        if isinstance(x, numbers.Integral):
            return _Sym(self, repr(int(x)), frozenset(), "int")
        if isinstance(x, numbers.Real):
            v = float(x)
            lit = repr(v) if math.isfinite(v) else f'float("{v}")'
            return _Sym(self, lit, frozenset(), "float")
        if isinstance(x, torch.Tensor):
            if x.numel() == 1 and id(x) in self.tensors:
                return self.load(x, [0] * x.dim())
            raise Untraceable("uses a tensor that is neither a captured variable nor indexed by "
                              f"b/h/q_idx/kv_idx (shape {tuple(x.shape)})")
        raise Untraceable(f"uses a value of type {type(x).__name__}")

    def param(self, t: torch.Tensor) -> str:
        if id(t) not in self.tensors:
            raise Untraceable(f"indexes a tensor (shape {tuple(t.shape)}) that is not a closure/global "
                              "variable of the callable")
        name, _ = self.tensors[id(t)]
        kname = f"{self.pre}{name}"
        if kname not in self.bound:
            self.bound.add(kname)
            if t.dtype not in _DTYPES or t.is_complex():
                raise Untraceable(f"captured tensor {name} has unsupported dtype {t.dtype}")
            _bind(self.frag, kname)
            for d in range(t.dim()):
                self.frag.add_param(f"{kname}_s{d}", f"{kname}.stride({d})")
        return kname

    def load(self, t: torch.Tensor, idx: list) -> "_Sym":
        kname = self.param(t)
        if len(idx) != t.dim():
            raise Untraceable(f"indexes a {t.dim()}-d tensor with {len(idx)} indices")
        terms, deps = [], frozenset()
        for d, i in enumerate(idx):
            if isinstance(i, _Sym):
                if i.kind != "int":
                    raise Untraceable("indexes a tensor with a non-integer value")
                terms.append(f"({i.expr}) * {kname}_s{d}")
                deps |= i.deps
            elif isinstance(i, numbers.Integral) and not isinstance(i, bool):
                ii = int(i) + (t.shape[d] if i < 0 else 0)
                if not 0 <= ii < t.shape[d]:
                    raise Untraceable(f"index {i} out of range for dim {d} of a {tuple(t.shape)} tensor")
                terms.append(f"{ii} * {kname}_s{d}")
            else:
                raise Untraceable(f"uses an index of type {type(i).__name__} (only integer indices are traced)")
        oks = []
        if "q" in deps or ("h" in deps and self.ctx.decode):
            oks.append("row_ok_c")
        if "kv" in deps:
            oks.append("kv_ok_r")
        mask = f", mask={' & '.join(oks)}, other=0" if oks else ""
        kind, tdt = _DTYPES[t.dtype]
        conv = ".to(tl.float32)" if kind == "float" else (".to(tl.int32)" if kind == "int" else "")
        ptr = f"{kname} + " + " + ".join(terms) if terms else kname
        return self.emit(f"tl.load({ptr}{mask}){conv}", deps, kind)

    # ---- ops
    def call(self, name: str, args: tuple, kwargs: dict) -> Any:
        name = name.strip("_")
        if name.startswith("r") and name[1:] in _BINARY and name not in _BINARY and name != "rsqrt":
            a, b = args[0], args[1]
            return self.binary(name[1:], b, a)
        if name == "getitem":
            return self.getitem(args[0], args[1])
        if name in _BINARY:
            return self.binary(name, args[0], args[1])
        if name in ("floordiv", "floor_divide", "mod", "remainder", "fmod"):
            return self.intdiv(name, args[0], args[1])
        if name in ("rfloordiv", "rmod"):
            return self.intdiv(name[1:], args[1], args[0])
        if name == "pow":
            return self.pow(args[0], args[1])
        if name == "neg" or name == "negative":
            a = self.lift(args[0])
            return self.emit(f"-({a.expr})", a.deps, a.kind)
        if name in ("invert", "logical_not", "bitwise_not"):
            a = self.lift(args[0])
            if a.kind != "bool":
                raise Untraceable("~ on a non-bool value")
            return self.emit(f"({a.expr}) == 0", a.deps, "bool")
        if name in ("abs", "absolute"):
            a = self.lift(args[0])
            return self.emit(f"tl.abs({a.expr})", a.deps, a.kind)
        if name in _UNARY:
            a = self.lift(args[0])
            x = a.expr if a.kind == "float" else f"({a.expr}).to(tl.float32)"
            return self.emit(_UNARY[name].format(x), a.deps, "float")
        if name in ("minimum", "maximum", "min", "max", "fmin", "fmax"):
            if len(args) != 2 or kwargs:
                raise Untraceable(f"torch.{name} with {len(args)} arguments is a reduction, not pointwise")
            fn = "tl.minimum" if "min" in name else "tl.maximum"
            a, b = self.lift(args[0]), self.lift(args[1])
            return self.emit(f"{fn}({a.expr}, {b.expr})", a.deps | b.deps, _promote(a, b))
        if name in ("clamp", "clip"):
            lo = kwargs.get("min", args[1] if len(args) > 1 else None)
            hi = kwargs.get("max", args[2] if len(args) > 2 else None)
            x = self.lift(args[0])
            if lo is not None:
                x = self.call("maximum", (x, lo), {})
            if hi is not None:
                x = self.call("minimum", (x, hi), {})
            return x
        if name == "where":
            if len(args) != 3:
                raise Untraceable("torch.where with one argument returns indices, not pointwise")
            c, a, b = (self.lift(x) for x in args)
            return self.emit(f"tl.where({c.expr}, {a.expr}, {b.expr})", c.deps | a.deps | b.deps, _promote(a, b))
        if name in ("to", "type"):
            dt = kwargs.get("dtype", next((x for x in args[1:] if isinstance(x, torch.dtype)), None))
            if dt is None:
                if any(isinstance(x, (torch.device, str)) for x in args[1:]):
                    return self.lift(args[0])
                raise Untraceable(f".{name}() without a dtype")
            return self.cast(args[0], dt)
        casts = {"float": torch.float32, "double": torch.float64, "half": torch.float16,
                 "bfloat16": torch.bfloat16, "int": torch.int32, "long": torch.int64, "bool": torch.bool}
        if name in casts:
            return self.cast(args[0], casts[name])
        if name in ("contiguous", "clone", "detach"):
            return self.lift(args[0])
        raise Untraceable(f"calls {name}, which is not a pointwise op the templates translate")

    def cast(self, x, dt) -> "_Sym":
        a = self.lift(x)
        if dt not in _DTYPES:
            raise Untraceable(f"casts to {dt}")
        kind, tdt = _DTYPES[dt]
        if kind == "bool":
            return self.emit(f"({a.expr}) != 0", a.deps, "bool")
        return self.emit(f"({a.expr}).to({tdt})", a.deps, kind)

    def binary(self, name: str, x, y) -> "_Sym":
        a, b = self.lift(x), self.lift(y)
        op = _BINARY[name]
        if op in _CMP:
            kind = "bool"
        elif op in ("&", "|", "^"):
            if a.kind == "float" or b.kind == "float":
                raise Untraceable(f"bitwise {op} on floating values")
            kind = "bool" if a.kind == b.kind == "bool" else "int"
        elif op == "/":
            kind = "float"
            if a.kind != "float" and b.kind != "float":
                a = _Sym(self, f"({a.expr}) * 1.0", a.deps, "float")  # torch's int / int is true division
        else:
            kind = _promote(a, b)
            if kind == "int":  # bool + bool / bool * int: torch computes in integers
                a, b = _as_int(a), _as_int(b)
        return self.emit(f"({a.expr}) {op} ({b.expr})", a.deps | b.deps, kind)

    def intdiv(self, name: str, x, y) -> "_Sym":
        a, b = self.lift(x), self.lift(y)
        kind = _promote(a, b)
        if kind != "int":
            raise Untraceable(f"{name} on floating values")
        fn = "_floordiv" if "div" in name else ("_fmod" if name == "fmod" else "_floormod")
        return self.emit(f"{fn}({a.expr}, {b.expr})", a.deps | b.deps, "int")

    def pow(self, x, y) -> "_Sym":
        a = self.lift(x)
        if isinstance(y, numbers.Integral) and not isinstance(y, bool) and 1 <= int(y) <= 4:
            e = " * ".join([f"({a.expr})"] * int(y))
            return self.emit(e, a.deps, a.kind)
        b = self.lift(y)
        xa = a.expr if a.kind == "float" else f"({a.expr}).to(tl.float32)"
        return self.emit(f"tl.exp2(({b.expr}) * tl.log2({xa}))", a.deps | b.deps, "float")

    def getitem(self, t, idx) -> Any:
        idx = list(idx) if isinstance(idx, tuple) else [idx]
        if isinstance(t, _Partial):
            idx = t.idx + idx
            t = t.t
        if not isinstance(t, torch.Tensor):
            raise Untraceable(f"indexes a {type(t).__name__}")
        if len(idx) < t.dim():
            return _Partial(t, idx)
        return self.load(t, idx)


def _promote(a: "_Sym", b: "_Sym") -> str:
    if "float" in (a.kind, b.kind):
        return "float"
    if "int" in (a.kind, b.kind):
        return "int"
    return "bool"


def _as_int(a: "_Sym") -> "_Sym":
    if a.kind == "bool":
        return _Sym(a.tr, f"({a.expr}).to(tl.int32)", a.deps, "int")
    return a


class _Partial:
    """``t[i]`` of a multi-dimensional captured tensor, waiting for more indices."""

    def __init__(self, t: torch.Tensor, idx: list):
        self.t, self.idx = t, idx

    def __getitem__(self, more):
        return _CURRENT[-1].getitem(self, more)


_CURRENT: list[_Tracer] = []


class _Sym:
    """A traced value: a Triton expression (or a name bound to one), its index dependencies and
    its kind (bool / int / float)."""

    __slots__ = ("tr", "expr", "deps", "kind")

    def __init__(self, tr: _Tracer, expr: str, deps: frozenset, kind: str):
        self.tr, self.expr, self.deps, self.kind = tr, expr, deps, kind

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        return _CURRENT[-1].call(name, tuple(args), dict(kwargs or {}))

    def __bool__(self):
        raise Untraceable("uses a traced value in Python control flow (if/and/or/while); use torch.where")

    def __index__(self):
        raise Untraceable("uses a traced value as a Python integer")

    __int__ = __float__ = __index__

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if name in ("shape", "dtype", "device", "ndim"):
            raise Untraceable(f"reads .{name} of a traced value")
        return lambda *a, **k: self.tr.call(name, (self,) + a, k)


def _dunder(name: str, reflected: bool = False):
    def op(self, other=None):
        if other is None and name in ("neg", "invert", "abs"):
            return self.tr.call(name, (self,), {})
        return self.tr.call(name, (other, self) if reflected else (self, other), {})

    return op


for _n in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or", "xor"):
    setattr(_Sym, f"__{_n}__", _dunder(_n))
    setattr(_Sym, f"__r{_n}__", _dunder(_n, reflected=True))
for _n in ("eq", "ne", "lt", "le", "gt", "ge"):
    setattr(_Sym, f"__{_n}__", _dunder(_n))
for _n in ("neg", "invert", "abs"):
    setattr(_Sym, f"__{_n}__", _dunder(_n))
_Sym.__hash__ = None  # type: ignore[assignment]


def _trace(fn: Callable, kind: str, pre: str, ctx: Ctx, captures: dict[str, Any]) -> Fragment:
    f = Fragment(masks_elements=(kind == "mask"))
    tr = _Tracer(pre, captures, ctx, f)
    b = _Sym(tr, "off_b", frozenset({"b"}), "int")
    h = _Sym(tr, "h_c", frozenset({"h"}), "int")
    q = _Sym(tr, "q_idx_c", frozenset({"q"}), "int")
    kv = _Sym(tr, "kv_r", frozenset({"kv"}), "int")
    _CURRENT.append(tr)
    try:
        if kind == "score":
            out = fn(_Sym(tr, "s", frozenset({"s"}), "float"), b, h, q, kv)
        else:
            out = fn(b, h, q, kv)
        out = tr.lift(out)
    except Untraceable:
        raise
    except Exception as e:  # any failure while tracing user code means "not translatable"
        raise Untraceable(f"tracing raised {type(e).__name__}: {e}") from e
    finally:
        _CURRENT.pop()
    if kind == "mask":
        if out.kind != "bool":
            raise Untraceable("mask_mod must return a bool value")
        f.mask += tr.tile + [f"allowed = allowed & ({out.expr})"]
        f.ranges.append("fhi = tl.minimum(fhi, 0)")  # no block is known to be fully allowed
    else:
        val = out.expr if out.kind == "float" else f"({out.expr}).to(tl.float32)"
        if "s" not in out.deps:
            val = f"tl.zeros_like(s) + {val}"
        f.score += tr.tile + [f"s = {val}"]
    return f


def _score_mod(p: V.ScoreMod, pre: str, ctx: Ctx) -> Fragment:
    return _trace(p.fn, "score", pre, ctx, V._captures(p.fn))


def _mask_mod(p: V.MaskMod, pre: str, ctx: Ctx) -> Fragment:
    return _trace(p.fn, "mask", pre, ctx, V._captures(p.fn))


def _opaque(p: V.Part, pre: str, ctx: Ctx) -> Fragment:
    """A callable part rebuilt from a recipe (problem._OpaqueCallablePart)."""
    fn = getattr(p, "fn", None)
    if fn is None:
        raise Untraceable(f"callable {p.key} is not available in this process (not importable by name)")
    caps = dict(V._captures(fn))
    # The recipe carries the captured tensors by name; trace against those exact objects.
    caps.update(getattr(p, "captured", {}))
    return _trace(fn, "score" if p.kind == "score" else "mask", pre, ctx, caps)


_HANDLERS: dict[type, Callable[[Any, str, Ctx], Fragment]] = {
    V.Causal: _causal, V.SlidingWindow: _sliding_window, V.PrefixLM: _prefix_lm, V.Document: _document,
    V.DenseMask: _dense_mask, V.MaskMod: _mask_mod, V.Alibi: _alibi, V.Softcap: _softcap,
    V.RelativeBias: _relative_bias, V.DenseBias: _dense_bias, V.ScoreMod: _score_mod,
}


def part_fragment(part: V.Part, index: int, ctx: Ctx = Ctx()) -> Fragment:
    """The fragment of canonical part number ``index`` (tensors named ``p{index}_...``).

    Raises :class:`Untraceable` for callables that cannot be translated and for unknown parts."""
    pre = f"p{index}_"
    for cls in type(part).__mro__:
        h = _HANDLERS.get(cls)
        if h is not None:
            return h(part, pre, ctx)
    if type(part).__name__ == "_OpaqueCallablePart":
        return _opaque(part, pre, ctx)
    raise Untraceable(f"no Triton translation for part {type(part).__name__}")


@dataclass
class VariantCode:
    """All fragments of a variant, merged (order = canonical order: masks, then scores).

    ``exp2``: additive score parts after ``last_nonadditive`` are already in base-2 units
    (their ``__UNIT__`` is log2(e)); the template converts ``s`` to base 2 right after the
    fragment ``last_nonadditive`` (or in the qk multiply when it is -1)."""

    fragments: list[Fragment]
    softcap_first: float | None  # cap of a leading Softcap (its 1/cap folds into the qk scale)
    exp2: bool = False
    last_nonadditive: int = -1  # index into fragments of the last non-additive score part

    @property
    def params(self) -> list[str]:
        return [p for f in self.fragments for p in f.params]

    @property
    def args(self) -> list[str]:
        return [a for f in self.fragments for a in f.args]

    def lines(self, what: str) -> list[str]:
        return [line for f in self.fragments for line in getattr(f, what)]

    @property
    def constexprs(self) -> list[tuple[str, str]]:
        return [c for f in self.fragments for c in f.constexprs]

    @property
    def has_score(self) -> bool:
        return any(f.score for f in self.fragments)

    @property
    def masks_elements(self) -> bool:
        return any(f.masks_elements for f in self.fragments)

    @property
    def has_doc(self) -> bool:
        return any(f.doc_ranges for f in self.fragments)


def variant_code(variant: V.Variant, ctx: Ctx = Ctx(), exp2: bool = False) -> VariantCode:
    """Fragments for every canonical part of ``variant``. Raises :class:`Untraceable`.

    ``exp2``: the kernel's softmax runs in base 2; additive score parts that no non-linear
    part follows are then emitted in base-2 units (``__UNIT__`` = log2(e), which costs nothing
    in a multiply-add) and use their row-free form where they have one (adding a per-row
    constant before a softmax changes nothing)."""
    parts = variant.canonical_parts
    frags = [part_fragment(p, i, ctx) for i, p in enumerate(parts)]
    scores = [p for p in parts if p.kind == "score"]
    first = float(scores[0].cap) if scores and isinstance(scores[0], V.Softcap) else None
    score_idx = [i for i, f in enumerate(frags) if f.score]
    nonadd = [i for i in score_idx if not frags[i].additive]
    last = max(nonadd) if nonadd else -1
    for i in score_idx:
        f = frags[i]
        tail = i > last
        if tail and f.score_rowfree:
            f.score = list(f.score_rowfree)
        unit = LOG2E if (exp2 and tail) else None
        sub = (lambda ln, u=unit: ln.replace("__UNIT__", repr(u)) if u is not None else ln.replace(" * __UNIT__", ""))
        f.score = [sub(ln) for ln in f.score]
        f.prologue = [sub(ln) for ln in f.prologue]
    return VariantCode(frags, first, exp2, last)


# Helpers every generated kernel module defines (pasted verbatim by the templates).
HELPERS = '''
@triton.jit
def _tanh(x, FAST: tl.constexpr):
    if FAST:
        # one MUFU op; max abs error 7e-6 vs torch.tanh (measured on the H200)
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        # portable (the interpreter cannot run inline asm); abs error ~1e-7
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _floordiv(a, b):
    q = a // b
    return q - (((a % b) != 0) & ((a < 0) != (b < 0))).to(q.dtype)


@triton.jit
def _floormod(a, b):
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def _fmod(a, b):
    return a % b
'''
