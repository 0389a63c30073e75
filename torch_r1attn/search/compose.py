"""Composed candidates: a variant written as a few calls of SDPA's own kernels.

Some masks are a plain SDPA mask almost everywhere. Prefix-LM (keys ``j < P`` visible to every
query, the rest causal) is SDPA's causal mask on every row ``i >= P - 1`` (those rows see the
whole prefix already), and full attention over the first ``P`` keys on the rows before. So::

    out          = sdpa(q, k, v, is_causal=True)                     # cuDNN's causal kernel
    out[..., :P] = sdpa(q[..., :P, :], k[..., :P, :], v[..., :P, :])  # the prefix square, no mask

costs cuDNN's causal time plus a (P x P) full block (1/16 of the full work at P = S/4) plus a
copy of the prefix rows into the causal call's output, which the module returns (the loader's
contract lets a kernel return its output instead of writing the caller's ``out``: writing ``out``
would copy the whole output once more, 0.07 ms of 1.25 at S4096 on the H200, 6%). The rows before
``P`` are computed twice, their causal half (P^2 / 2 pairs) wasted.

This module says which problems have such a form (:func:`applies`) and writes the kernel module
(:func:`generate_source`, the kernel contract of :mod:`torch_r1attn.loader`, plain torch, runs on
any device). The templates proposer offers it first in round one; the verifier checks and times it
like any other candidate, so it is kept only where it is correct and beats the peers and the
Triton configs. Which backend SDPA picks inside is SDPA's choice at call time (cuDNN on the H200).

The verifier's static check refuses SDPA calls in a candidate (an LLM "kernel" that returns the
reference). A composed module is exempt only when :func:`is_composed_source` recognises it as
this module's output: its code after the header is exactly the body below, and the header holds
nothing but the docstring, the two imports and literal constants. So the exemption cannot carry
anyone else's code.
"""

from __future__ import annotations

import ast

from .. import variants as V
from ..problem import Problem
from .base import module_head, supports_for

__all__ = ["applies", "generate_source", "is_composed_source"]


def _prefix(problem: Problem) -> V.PrefixLM | None:
    parts = problem.variant.canonical_parts
    if len(parts) == 1 and isinstance(parts[0], V.PrefixLM) and parts[0].prefix_len >= 1:
        return parts[0]
    return None


def applies(problem: Problem) -> bool:
    """True when ``problem``'s variant has a composed form (prefix-LM alone, prefix >= 1)."""
    return _prefix(problem) is not None and problem.spec.sq_bucket > 16


_BODY = '''
def forward(q, k, v, out, scale, **variant_tensors):
    """Prefix-LM attention of (q, k, v) from SDPA calls, returned (out is not written)."""
    sq, sk = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    off = sk - sq if ALIGN_BOTTOM_RIGHT else 0
    if off != 0:
        # a query offset (bottom-right alignment, Sq != Sk: a length-free entry serving a call of
        # other lengths): SDPA has no offset causal mask, so the mask is written out. Every row
        # sees key 0 (PREFIX >= 1), so no row is empty.
        q_pos = torch.arange(sq, device=q.device)[:, None] + off
        kv = torch.arange(sk, device=q.device)[None, :]
        mask = (kv < PREFIX) | (kv <= q_pos)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    pk = min(PREFIX, sk)  # keys every query sees
    r = min(pk, sq)  # rows i < pk see exactly keys [0, pk); rows i >= pk - 1 are causal
    if r == sq:
        return F.scaled_dot_product_attention(q, k[:, :, :pk], v[:, :, :pk], scale=scale, enable_gqa=gqa)
    res = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if r > 1:  # (r == 1: row 0 under the causal mask sees key 0, the whole one-key prefix)
        res[:, :, :r].copy_(F.scaled_dot_product_attention(q[:, :, :r], k[:, :, :pk], v[:, :, :pk], scale=scale,
                                                           enable_gqa=gqa))
    return res
'''


def generate_source(problem: Problem) -> str:
    """The composed kernel module for ``problem`` (raises ValueError if :func:`applies` is False)."""
    if not applies(problem):
        raise ValueError(f"no composed form for {problem.variant.key} (only prefix-LM alone, prefix >= 1, prefill)")
    part = _prefix(problem)
    head = module_head("torch_r1attn.search.compose (prefix-LM from SDPA calls)", problem,
                       ["import torch", "import torch.nn.functional as F"], supports_for(problem, ["cuda", "cpu"]),
                       {"path": "compose"})
    head += [
        "NEEDS = ()",
        f"PREFIX = {part.prefix_len}",
        f"ALIGN_BOTTOM_RIGHT = {problem.variant.align == 'bottom_right'}",
    ]
    return "\n".join(head) + "\n" + _BODY


_HEADER_NAMES = {"SUPPORTS": dict, "CONFIG": dict, "NEEDS": tuple, "PREFIX": int, "ALIGN_BOTTOM_RIGHT": bool}
_HEADER_IMPORTS = [ast.dump(ast.parse(line).body[0]) for line in ("import torch", "import torch.nn.functional as F")]


def is_composed_source(source: str) -> bool:
    """True when ``source`` is exactly what :func:`generate_source` writes (for some problem):
    the body verbatim, a header of the docstring, ``import torch``, ``import torch.nn.functional
    as F`` and one literal per header name (``PREFIX`` an int >= 1)."""
    if not isinstance(source, str) or not source.endswith(_BODY):
        return False
    header = source[: len(source) - len(_BODY)]
    try:
        tree = ast.parse(header)
    except SyntaxError:
        return False
    body = list(tree.body)
    if not body or not (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                        and isinstance(body[0].value.value, str)):
        return False
    if [ast.dump(n) for n in body[1:3]] != _HEADER_IMPORTS:
        return False
    seen: dict[str, object] = {}
    for node in body[3:]:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            return False
        name = node.targets[0].id
        if name not in _HEADER_NAMES or name in seen:
            return False
        try:
            value = ast.literal_eval(node.value)
        except (ValueError, SyntaxError, TypeError):
            return False
        if type(value) is not _HEADER_NAMES[name]:
            return False
        seen[name] = value
    return set(seen) == set(_HEADER_NAMES) and seen["PREFIX"] >= 1 and seen["CONFIG"] == {"path": "compose"}
