"""Bad candidates made from the known-good kernel (``good_attention.py``) by one named edit each.

Each mutant is a complete, standalone kernel source (what a proposer would hand the verifier);
writing them as edits keeps the one thing that is wrong with each visible, and keeps them in step
with the good kernel. Every edit's anchor must occur exactly once in the good kernel, so a change
there cannot silently turn a bad kernel into a good one. Candidates whose whole point is their
own structure (hangs, segfaults, ``os._exit``, the SDPA cheat, ``try/except``) stay files.
"""

from __future__ import annotations

from pathlib import Path

GOOD = Path(__file__).with_name("good_attention.py")

_LAUNCH = '''    _attn_fwd[grid](q, k, v, out, scale,
                    *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                    H, H // HK, SQ, SK, offset,
                    D=D, DV=DV, BD=BD, BDV=BDV, BM=BM, BN=BN, IS_CAUSAL=CAUSAL,
                    IEEE=q.dtype == torch.float32)
'''

_ELEMENTWISE = '''

@triton.jit
def _{name}(X, N, EPS, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N)
    tl.store(X + offs, ({expr}).to(X.dtype.element_ty), mask=offs < N)


def forward('''

# name -> (what is wrong and which check must catch it, [(anchor, replacement), ...])
MUTANTS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "bad_wrong_math.py": (
        "applies the softmax scale twice (wrong math). Expected: check 'values'.",
        [("s = tl.dot(q, k, input_precision=\"ieee\") * sm_scale\n",
          "s = tl.dot(q, k, input_precision=\"ieee\") * sm_scale * sm_scale\n"),
         ("s = tl.dot(q, k) * sm_scale\n", "s = tl.dot(q, k) * sm_scale * sm_scale\n")]),
    "bad_assumes_contiguous.py": (
        "computes every stride from the shapes, as if q, k, v and out were contiguous (B, H, S, D): "
        "right on contiguous tensors, wrong on transformers' (B, S, H, D)-strided views. Expected: "
        "check 'values' on the [B,S,H,D strides] trial.",
        [("*q.stride(), *k.stride(), *v.stride(), *out.stride(),",
          "*_contig(q), *_contig(k), *_contig(v), *_contig(out),"),
         ("def forward(q, k, v, out, scale, **variant_tensors):\n",
          "def _contig(x):\n    B, H, S, D = x.shape\n    return H * S * D, S * D, D, 1\n\n\n"
          "def forward(q, k, v, out, scale, **variant_tensors):\n")]),
    "bad_partial_write.py": (
        "never writes the last query row of out. Expected: check 'written'.",
        [("mask=(offs_m[:, None] < SQ) & (offs_dv[None, :] < DV))",
          "mask=(offs_m[:, None] < SQ - 1) & (offs_dv[None, :] < DV))")]),
    "bad_block_multiple_only.py": (
        "only visits whole key blocks, so keys past the last multiple of BN are ignored (right when "
        "Sk is a block multiple). Expected: check 'values' on the odd-length edge shapes.",
        [("for start_n in range(0, SK, BN):", "for start_n in range(0, (SK // BN) * BN, BN):")]),
    "bad_clamps_inputs.py": (
        "clamps q, k, v to [-5, 5] (right on N(0,1), wrong on large magnitudes). Expected: check "
        "'values', failing only on the large-magnitude distributions.",
        [("    m_i = tl.full([BM], float(\"-inf\"), tl.float32)\n",
          "    q = tl.minimum(tl.maximum(q, -5.0), 5.0)\n    m_i = tl.full([BM], float(\"-inf\"), tl.float32)\n"),
         ("        if IEEE:\n            s = tl.dot(q, k,",
          "        k = tl.minimum(tl.maximum(k, -5.0), 5.0)\n        if IEEE:\n            s = tl.dot(q, k,"),
         ("        if IEEE:\n            acc = ",
          "        v = tl.minimum(tl.maximum(v, -5.0), 5.0)\n        if IEEE:\n            acc = ")]),
    "bad_mutates_input.py": (
        "computes the right output, then zeroes k with a second Triton kernel (mutates an input). "
        "Expected: check 'inputs_unchanged' (the static check cannot see a store through a pointer).",
        [("\n\ndef forward(", _ELEMENTWISE.format(name="zero", expr="x * 0")),
         (_LAUNCH, _LAUNCH + "    _zero[(triton.cdiv(k.numel(), 256),)](k, k.numel(), 0.0, BLOCK=256)\n")]),
    "bad_nondeterministic.py": (
        "adds a tiny call-dependent perturbation (every other call) kept in a module-level counter. "
        "Expected: static check (module-level container written); with static checks off: 'deterministic'.",
        [("BOTTOM_RIGHT = False\n", "BOTTOM_RIGHT = False\n_STATE = {\"calls\": 0}\n"),
         ("\n\ndef forward(", _ELEMENTWISE.format(name="nudge", expr="x.to(tl.float32) * (1.0 + EPS)")),
         (_LAUNCH, _LAUNCH + "    _STATE[\"calls\"] += 1\n"
                             "    if _STATE[\"calls\"] % 2 == 0:  # inside the error bound, but not the same bits\n"
                             "        eps = 1e-3 if q.dtype != torch.float32 else 1e-6\n"
                             "        _nudge[(triton.cdiv(out.numel(), 256),)](out, out.numel(), eps, BLOCK=256)\n")]),
    "bad_drifts.py": (
        "right for the first two calls, then adds 0.5 to every output (a kernel that drifts). "
        "Expected: static check (module-level container written); with static checks off: 'consecutive_calls'.",
        [("BOTTOM_RIGHT = False\n", "BOTTOM_RIGHT = False\n_STATE = {\"calls\": 0}\n"),
         ("\n\ndef forward(", _ELEMENTWISE.format(name="shift", expr="x.to(tl.float32) + EPS")),
         (_LAUNCH, _LAUNCH + "    _STATE[\"calls\"] += 1\n"
                             "    if _STATE[\"calls\"] > 2:\n"
                             "        _shift[(triton.cdiv(out.numel(), 256),)](out, out.numel(), 0.5, BLOCK=256)\n")]),
    "bad_illegal_memory.py": (
        "(GPU) stores through an out-of-bounds pointer (an illegal memory access: a sticky CUDA error "
        "that poisons the worker's context). Expected: verdict 'crash'; the caller's context is fine.",
        [("tl.store(O + b * sob", "tl.store(O + (1 << 40) + b * sob")]),
    "bad_side_stream.py": (
        "(GPU) does the right work on a side stream that the caller's stream never waits for (timers "
        "on the current stream miss it; a consumer reading out in stream order sees garbage). "
        "Expected: static check (torch.cuda.Stream); with static checks off: a failed stream-order, "
        "written or speed-plausibility check.",
        [(_LAUNCH, "    side = torch.cuda.Stream()  # never joined back to the caller's stream\n"
                   "    with torch.cuda.stream(side):\n"
                   + "".join("    " + line + "\n" for line in _LAUNCH.splitlines()))]),
}


def source(name: str) -> str:
    """The mutant's full source. Raises KeyError for an unknown name, AssertionError when an
    anchor no longer occurs exactly once in the good kernel."""
    why, edits = MUTANTS[name]
    s = GOOD.read_text()
    body = s[s.index('"""', 3) + 3:]  # drop the good kernel's docstring
    for old, new in edits:
        n = body.count(old)
        assert n == 1, f"{name}: anchor {old[:60]!r} occurs {n} times in good_attention.py (must be 1)"
        body = body.replace(old, new)
    return f'"""Bad: {why}"""\n' + body
