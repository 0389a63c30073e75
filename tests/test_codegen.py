"""codegen: part -> Triton fragments, the callable tracer, and the document block ranges."""

from __future__ import annotations

import pytest
import torch

from torch_r1attn import variants as V
from torch_r1attn.loader import import_kernel_file
from torch_r1attn.search.codegen import Ctx, Untraceable, part_fragment, variant_code
from torch_r1attn.search.templates import generate_source
from tests.test_templates import make_problem, run_case

_slopes = torch.rand(4)
_bias = torch.randn(4, 64)
_scalar = torch.tensor(0.5)


def test_builtin_parts_use_block_ranges():
    vc = variant_code(V.causal() + V.sliding_window(8) + V.prefix_lm(4))
    rng = "\n".join(vc.lines("ranges"))
    assert "qmax + 1" in rng and "qmin + 1" in rng and "qmin - 7" in rng
    # causal is implied by the sliding window: canonical_parts drops it
    assert len(vc.fragments) == 2
    # the document part's ranges come from the per-block table, not a full sweep
    doc = part_fragment(V.Document(torch.zeros(8, dtype=torch.long)), 0)
    assert any("p0_rb" in ln for ln in doc.ranges) and doc.doc_ranges == ["p0_ranges"]
    # a dense mask and a mask_mod never claim a fully-allowed block
    dm = part_fragment(V.DenseMask(torch.ones(4, 4, dtype=torch.bool)), 0)
    assert "fhi = tl.minimum(fhi, 0)" in dm.ranges


def test_score_parts_apply_in_order_dense_bias_last():
    v = V.Variant([V.DenseBias(torch.zeros(4, 4)), V.Softcap(10.0), V.Alibi(torch.ones(2))])
    vc = variant_code(v)
    score = vc.lines("score")
    assert "_tanh" in score[0] and "slope" in score[1] and "p2_base" in score[-1]
    assert vc.params == ["p1_alibi_slopes", "p2_attn_bias", "p2_sb", "p2_sh", "p2_sq", "p2_sk"]
    assert set(v.tensors()) == {"p1_alibi_slopes", "p2_attn_bias"}


def test_tracer_hoists_row_terms_out_of_the_tile():
    def sm(score, b, h, q_idx, kv_idx):
        w = _slopes[h] * (q_idx * 2 + 1)  # no kv / score: once per program
        return score + w * kv_idx

    f = part_fragment(V.ScoreMod(sm), 3)
    assert any("tl.load(p3__slopes" in ln for ln in f.prologue)
    assert not any("tl.load" in ln for ln in f.score)
    assert f.params == ["p3__slopes", "p3__slopes_s0"]
    assert f.score[-1].startswith("s = ")
    # in the decode packing the head varies per row: loads get the row mask
    fd = part_fragment(V.ScoreMod(sm), 3, Ctx(decode=True))
    assert any("row_ok_c" in ln for ln in fd.prologue)


def test_tracer_supported_ops(tmp_path):
    def sm(score, b, h, q_idx, kv_idx):
        d = (q_idx - kv_idx).abs().float()
        s = torch.clamp(score, min=-3.0, max=3.0) + torch.tanh(score / 4) * 0.5
        s = s - torch.log(d + 1) * 0.1 + torch.sigmoid(d) * 0.01 + torch.exp(-d) * _scalar
        s = torch.where((q_idx // 3) % 2 == 0, s, torch.maximum(s, torch.minimum(score, s * 0.5)))
        return s + _bias[h, kv_idx].to(torch.float32) * (h + 1) - (~(kv_idx > q_idx)).float()

    run_case(tmp_path, V.score_mod(sm), Hq=4, Hkv=2, Sq=17, Sk=64, dtype=torch.float32,
             config={"BLOCK_M": 16, "BLOCK_N": 16})


def test_tracer_floor_division_and_modulo_of_negatives(tmp_path):
    def mm(b, h, q_idx, kv_idx):
        d = kv_idx - q_idx  # negative below the diagonal: torch floors, C truncates
        return ((d // 4) % 3 != 1) | (d % 5 == 0)

    run_case(tmp_path, V.mask_mod(mm), Sq=17, Sk=33, config={"BLOCK_M": 16, "BLOCK_N": 16})


def test_tracer_chained_indexing_equals_tuple_indexing():
    tab = torch.randn(2, 33)
    a = part_fragment(V.ScoreMod(lambda s, b, h, q, kv: s + tab[h][kv]), 0)
    b = part_fragment(V.ScoreMod(lambda s, b, h, q, kv: s + tab[h, kv]), 0)
    assert (a.score, a.prologue, a.params) == (b.score, b.prologue, b.params)


@pytest.mark.parametrize("fn,match", [
    (lambda s, b, h, q, kv: s + q.item(), "item"),
    (lambda s, b, h, q, kv: s.softmax(-1), "softmax"),
    (lambda s, b, h, q, kv: s + torch.ones(3)[kv], "not a closure"),
    (lambda s, b, h, q, kv: s if q > 0 else s, "control flow"),
    (lambda s, b, h, q, kv: s + _bias[:, kv], "index of type slice"),
    (lambda s, b, h, q, kv: torch.max(s), "reduction"),
    (lambda s, b, h, q, kv: s + _bias[h], "waiting|Partial|_Partial"),
])
def test_untraceable(fn, match):
    with pytest.raises(Untraceable, match=match):
        part_fragment(V.ScoreMod(fn), 0)


def test_mask_mod_must_return_bool():
    with pytest.raises(Untraceable, match="bool"):
        part_fragment(V.MaskMod(lambda b, h, q, kv: q - kv), 0)


def test_unknown_part_is_untraceable():
    class Weird(V.Part):
        key = "weird"

    with pytest.raises(Untraceable, match="Weird"):
        part_fragment(Weird(), 0)


def _ranges(tmp_path, ids, Sq, Sk, offset, qblock):
    var = V.document(ids)
    src = generate_source(make_problem(var, 1, 2, 1, 32, 32, 16, 16, torch.float16), {})
    p = tmp_path / "docmod.py"
    p.write_text(src)
    mod = import_kernel_file(p)
    ids2 = ids if ids.dim() == 2 else ids.unsqueeze(0)
    nblk = -(-Sq // qblock)
    sb, sl = (ids.stride(0), ids.stride(1)) if ids.dim() == 2 else (0, ids.stride(0))
    return mod._doc_ranges(ids, sb, sl, ids2.shape[0], Sq, Sk, offset, qblock, nblk)


@pytest.mark.parametrize("ids,Sq,Sk,offset", [
    (torch.tensor([0] * 7 + [1] * 13 + [2] * 9 + [3] * 11), 40, 40, 0),
    (torch.tensor([0] * 7 + [1] * 13 + [2] * 9 + [3] * 11), 9, 40, 31),   # bottom-right rows
    (torch.tensor([5, 5, 1, 1, 1, 5, 7, 7] * 4), 32, 32, 0),              # ids repeat: not monotone
    (torch.tensor([[0] * 20 + [1] * 20, [0] * 3 + [4] * 37]), 40, 33, 0),  # per-batch ids
])
def test_doc_ranges_are_exact_and_safe(tmp_path, ids, Sq, Sk, offset):
    r = _ranges(tmp_path, ids, Sq, Sk, offset, 8)
    ids2 = ids if ids.dim() == 2 else ids.unsqueeze(0)
    for b in range(ids2.shape[0]):
        d = ids2[b]
        for blk in range(r.shape[1]):
            lo, hi, flo, fhi = r[b, blk].tolist()
            rows = torch.arange(blk * 8, min(blk * 8 + 8, Sq)) + offset
            allowed = d[rows][:, None] == d[:Sk][None, :]  # (rows, Sk)
            cols = allowed.any(0).nonzero().flatten()
            if len(cols):
                assert lo <= int(cols.min()) and int(cols.max()) < hi, "range drops an allowed key"
            if fhi > flo:
                assert bool(allowed[:, flo:fhi].all()), "'fully allowed' run holds a masked pair"
            monotone = bool((d[1:] >= d[:-1]).all())
            if monotone and len(cols):  # packing: the range is tight
                assert (lo, hi) == (int(cols.min()), int(cols.max()) + 1)
                if bool((d[rows] == d[rows[0]]).all()):
                    assert (flo, fhi) == (lo, hi)
