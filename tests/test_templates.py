"""The templates proposer: generated Triton kernels against the float64 reference.

On the CPU every kernel runs under the Triton interpreter (conftest sets TRITON_INTERPRET=1),
so shapes are tiny and dtypes fp16/fp32 (the interpreter's bf16 tl.dot is wrong). Each case is
generated from a Problem, written to a file, imported with loader.load_source_file and run into
a NaN-poisoned ``out`` (every element must be written). GPU tests (``-m gpu``) run real shapes.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.helpers import assert_close_to_ref
from torch_r1attn import variants as V
from torch_r1attn.loader import load_source_file
from torch_r1attn.problem import Problem
from torch_r1attn.reference import eager_attention, reference_attention
from torch_r1attn.search.base import Feedback
from torch_r1attn.search.codegen import Untraceable
from torch_r1attn.search.templates import (
    TemplatesProposer, _config_key, default_config, generate_source, normalize_config,
)
from torch_r1attn.spec import AttentionSpec


def make_problem(variant, B, Hq, Hkv, Sq, Sk, D, Dv, dtype, device="cpu") -> Problem:
    q = torch.empty(B, Hq, Sq, D, dtype=dtype, device="meta")
    k = torch.empty(B, Hkv, Sk, D, dtype=dtype, device="meta")
    v = torch.empty(B, Hkv, Sk, Dv, dtype=dtype, device="meta")
    spec = AttentionSpec.from_call(q, k, v, variant.key)
    return Problem(spec=spec, variant=variant, shape=(B, Hq, Hkv, Sq, Sk), device=device)


def run_case(tmp_path, variant, *, B=1, Hq=2, Hkv=1, Sq=17, Sk=33, D=16, Dv=None, dtype=torch.float16,
             config=None, device="cpu", gen=None, check_dtype=torch.float64, name="k", layout="bhsd"):
    """Generate, load and run one kernel; compare with the reference. Returns the output.
    ``layout="bshd"``: q, k, v and out as (B, S, H, D)-laid-out views (transformers' layout)."""
    from torch_r1attn.verify.check import as_layout

    Dv = Dv or D
    g = gen or torch.Generator().manual_seed(0)
    q = as_layout(torch.randn(B, Hq, Sq, D, generator=g).to(device, dtype), layout)
    k = as_layout(torch.randn(B, Hkv, Sk, D, generator=g).to(device, dtype), layout)
    v = as_layout(torch.randn(B, Hkv, Sk, Dv, generator=g).to(device, dtype), layout)
    variant = variant.to(device)
    prob = make_problem(variant, B, Hq, Hkv, Sq, Sk, D, Dv, dtype, device)
    src = generate_source(prob, config or {})
    path = tmp_path / f"{name}.py"
    path.write_text(src)
    kern = load_source_file(path, name_hint=name)
    assert kern.unsupported(q, k, v) is None
    out = as_layout(torch.full((B, Hq, Sq, Dv), float("nan"), dtype=dtype, device=device), layout)
    scale = 1.0 / math.sqrt(D)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    out = kern(q, k, v, out, scale, **variant.tensors())  # out, or the tensor the kernel returned
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0), "kernel mutated an input"
    ref = reference_attention(q, k, v, variant, scale, dtype=check_dtype)
    # on the GPU, flash-attention's rule: 2x PyTorch's own same-dtype error (CPU: ref rounding)
    base = eager_attention(q, k, v, variant, scale, compute_dtype=dtype) if device != "cpu" else None
    assert_close_to_ref(out, ref, baseline=base, name=f"{variant.key} {config}")
    return out


@pytest.fixture(autouse=True)
def _triton_template_only(monkeypatch):
    """These tests are about the Triton template: keep the Hopper-only fa3 path (search.gluon_fa3)
    out of the proposer even on an sm_90 machine (tests/test_gluon_fa3.py covers it)."""
    from torch_r1attn.search import gluon_fa3

    monkeypatch.setattr(gluon_fa3, "_is_hopper", lambda device: False)


CFG_A = {"BLOCK_M": 16, "BLOCK_N": 16}
CFG_B = {"BLOCK_M": 32, "BLOCK_N": 16, "split_loop": False, "exp2": False, "fold_scale": True}
CFG_C = {"BLOCK_M": 16, "BLOCK_N": 32, "reverse_m": False}
CFG_D = {"BLOCK_M": 32, "BLOCK_N": 16, "branch_mask": True}
CONFIGS = [pytest.param(CFG_A, id="m16n16"), pytest.param(CFG_B, id="m32n16-onemask-exp-fold"),
           pytest.param(CFG_C, id="m16n32"), pytest.param(CFG_D, id="m32n16-branch")]

_doc = torch.tensor([0] * 7 + [1] * 13 + [2] * 9 + [3] * 11)  # 40 positions, block-crossing docs
_g = torch.Generator().manual_seed(1)
_rel_h = torch.randn(2, 13, generator=_g)
_rel_1 = torch.randn(1, 9, generator=_g)
_bias_full = torch.randn(1, 2, 17, 33, generator=_g)
_bias_row = torch.randn(17, 1, generator=_g)
_mask_bqk = torch.rand(1, 1, 17, 33, generator=_g) > 0.4
_mask_hk = torch.rand(2, 1, 33, generator=_g) > 0.3
_mask_dead = _mask_bqk.clone()
_mask_dead[..., 3, :] = False  # a fully-masked row must give 0, not NaN
_mask_dead[..., 11, :] = False
_tab = torch.randn(2, generator=_g)
_keep = torch.rand(33, generator=_g) > 0.3


def _score_fn(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, score + _tab[h] * (q_idx - kv_idx), score * 0.5)


def _mask_fn(b, h, q_idx, kv_idx):
    return _keep[kv_idx] & ((kv_idx - q_idx) <= 4)


VARIANTS = {
    "full": V.full(),
    "causal": V.causal(),
    "causal_br": V.causal("bottom_right"),
    "sliding_window": V.sliding_window(6),
    "sliding_window+softcap": V.sliding_window(9) + V.softcap(4.0),
    "causal+alibi": V.causal() + V.alibi(2),
    "causal+document": V.causal() + V.document(_doc),
    "document_nonmonotone": V.document(torch.tensor([0, 1, 2] * 14)),
    "prefix_lm": V.prefix_lm(12),
    "relative_bias_h+causal": V.relative_bias(_rel_h) + V.causal(),
    "relative_bias_1": V.relative_bias(_rel_1),
    "dense_mask_qk": V.Variant([V.DenseMask(_mask_bqk)]),
    "dense_mask_hk": V.Variant([V.DenseMask(_mask_hk)]),
    "dense_mask_deadrows": V.Variant([V.DenseMask(_mask_dead)]),
    "dense_bias_hqk": V.Variant([V.DenseBias(_bias_full)]),
    "dense_bias_q+causal": V.Variant([V.DenseBias(_bias_row), V.Causal()]),
    "score_mod": V.score_mod(_score_fn),
    "mask_mod_captured": V.mask_mod(_mask_fn),
    "softcap+alibi+causal_br": V.softcap(3.0) + V.alibi(2) + V.causal("bottom_right"),
}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_matches_reference(tmp_path, name, config):
    run_case(tmp_path, VARIANTS[name], config=config, name=name.replace("+", "_"))


@pytest.mark.parametrize("Sq,Sk,D,Dv,Hq,Hkv,dtype", [
    (1, 33, 16, 16, 2, 1, torch.float16),
    (17, 9, 24, 24, 4, 2, torch.float16),     # Sq > Sk, non-power-of-two head dim, GQA 2:1
    (33, 47, 16, 24, 2, 2, torch.float32),    # Dv != D, fp32 (ieee dot)
    (33, 17, 24, 40, 4, 2, torch.float16),
])
@pytest.mark.parametrize("variant", ["causal", "causal_br", "causal+document", "sliding_window+softcap"])
def test_awkward_shapes(tmp_path, variant, Sq, Sk, D, Dv, Hq, Hkv, dtype):
    var = VARIANTS[variant]
    if variant == "causal+document":  # ids sized for this call
        var = V.causal() + V.document(torch.arange(max(Sq, Sk)) // 5)
    run_case(tmp_path, var, B=2, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, Dv=Dv, dtype=dtype, config=CFG_A)


@pytest.mark.parametrize("rel_vec", [True, False], ids=["vec", "gather"])
@pytest.mark.parametrize("config", [CFG_A, CFG_D, {**CFG_B, "exp2": True}], ids=["split", "branch", "fold"])
@pytest.mark.parametrize("Sq,Sk,align", [(40, 40, "top_left"), (23, 40, "bottom_right"), (40, 23, "top_left"),
                                         (37, 51, "bottom_right")])
def test_relative_bias_full_table_takes_the_unclamped_path(tmp_path, config, Sq, Sk, align, rel_vec):
    # a 2*S-1 table covers every distance: the launcher picks the clamp-free path (NOCLAMP);
    # rows past Sq and keys past Sk of the last tiles must still read inside the table (rel_vec:
    # inside the padded aligned copies), every row's shift 0-3 occurs
    S = max(Sq, Sk)
    tab = torch.randn(2, 2 * S - 1, generator=torch.Generator().manual_seed(5))
    var = V.relative_bias(tab) + V.causal(align)
    config = {**config, "rel_vec": rel_vec}
    src = generate_source(make_problem(var, 1, 2, 1, Sq, Sk, 16, 16, torch.float16), config)
    assert "p0_NOCLAMP: tl.constexpr" in src or "p1_NOCLAMP: tl.constexpr" in src
    assert ("_rel_align[" in src) == rel_vec
    run_case(tmp_path, var, Sq=Sq, Sk=Sk, config=config, name="relfull")


@pytest.mark.parametrize("table", ["shared_fp16", "per_head_wider", "short_clamped"])
def test_relative_bias_aligned_copies_other_tables(tmp_path, table):
    """rel_vec with a (1, 2R+1) table shared by the heads (head stride 0), an fp16 table wider than
    the call needs (R > S), and a table too short for NOCLAMP (the clamped gather runs instead)."""
    g = torch.Generator().manual_seed(7)
    tab = {"shared_fp16": lambda: torch.randn(1, 2 * 45 - 1, generator=g).half(),
           "per_head_wider": lambda: torch.randn(2, 2 * 60 + 1, generator=g),
           "short_clamped": lambda: torch.randn(2, 2 * 6 + 1, generator=g)}[table]()
    run_case(tmp_path, V.causal() + V.relative_bias(tab), Sq=45, Sk=45, config={**CFG_A, "rel_vec": True},
             name="relcopies")


def test_relative_bias_prep_kernel_writes_shifted_copies(tmp_path):
    """``_rel_align``: out[h, c, x] = table[h, x - c] where 0 <= x - c < L, else 0, for every x < W
    (so a row of copy c starting at o + c holds the band table[o:]), from a strided table."""
    import importlib.util

    tab = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))[:, ::2]  # (3, 20), stride 2
    var = V.causal() + V.relative_bias(tab[:, :19])
    src = generate_source(make_problem(var, 1, 3, 3, 40, 40, 16, 16, torch.float16), {**CFG_A, "rel_vec": True})
    path = tmp_path / "relprep.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("relprep", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    t = tab[:, :19]
    W = 48
    out = torch.full((3, 4, W), float("nan"))
    mod._rel_align[(mod._cdiv(W, 16), 4, 3)](t, out, t.stride(0), t.stride(1), t.shape[1], W, BLOCK=16)
    want = torch.zeros(3, 4, W)
    for c in range(4):
        want[:, c, c:c + 19] = t
    assert torch.equal(out, want)


def test_relative_bias_tiles_load_as_16_byte_vectors_on_sm90(tmp_path):
    """The point of rel_vec: compiled for the H200 (sm90, compile only, no GPU needed) the bias
    tile of every kv loop loads as ld.global.v4 (4 fp32 per load), the scalar gather as b32 loads;
    with rel_asm=2 as 8-byte pairs straight in the accumulator layout (no shared-memory trip).
    Compiled in a subprocess: this process runs Triton's interpreter."""
    import os
    import re
    import subprocess
    import sys

    S, H = 4096, 32
    var = V.causal() + V.relative_bias(torch.zeros(H, 2 * S - 1))
    prob = make_problem(var, 4, H, H, S, S, 128, 128, torch.bfloat16, "cuda")
    loads, shared = {}, {}
    for vec in (True, False, "asm"):
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2, "rel_vec": bool(vec),
               "rel_asm": 2 if vec == "asm" else 0, "fast_tanh": False}
        path = tmp_path / f"rel_sm90_{vec}.py"
        path.write_text(generate_source(prob, cfg))
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        r = subprocess.run([sys.executable, "-c", _SM90_COMPILE, str(path)], capture_output=True, text=True,
                           env=env, timeout=300)
        if r.returncode == 3:
            pytest.skip(f"cannot compile for sm90 here: {r.stderr.strip()[-300:]}")
        assert r.returncode == 0, r.stderr[-3000:]
        loads[vec] = re.findall(r"ld\.global(?:\.[a-z0-9]+)*", r.stdout)
        shared[vec] = len(re.findall(r"st\.shared", r.stdout))
    # 64x64 fp32 tile / 128 threads = 32 elements per thread: 8 v4 loads per loop, 3 loops
    assert loads[True].count("ld.global.v4.b32") - loads[False].count("ld.global.v4.b32") == 3 * 8
    assert loads[False].count("ld.global.b32") == 3 * 32 and loads[True].count("ld.global.b32") == 0
    # rel_asm=2: 16 pair loads per tile (plus the predicated-off scalar fallback), no shared-memory
    # trip for the bias tile (what is left in shared stores is the output epilogue's)
    assert loads["asm"].count("ld.global.nc.v2.f32") == 3 * 16
    assert shared["asm"] < shared[True] < shared[False]


# argv[1]: a generated relative-bias module (S4096 D128 bf16, M64 N64 w4 s2); prints its sm90 PTX
_SM90_COMPILE = """
import importlib.util, sys
try:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError as e:
    print(e, file=sys.stderr); sys.exit(3)
spec = importlib.util.spec_from_file_location("rel_sm90", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
fn = mod._attn_fwd
consts = dict(GQA=1, D=128, DV=128, BLOCK_M=64, BLOCK_N=64, BLOCK_D=128, BLOCK_DV=128, FAST_TANH=False,
              USE_TMA=False, p1_NOCLAMP=True, sqd=1, skd=1, svd=1, sod=1, p1_sw=1)
sig, attrs = {}, {}
for i, n in enumerate(fn.arg_names):
    if fn.params[i].is_constexpr or n in consts:
        sig[n] = "constexpr"
        continue
    sig[n] = ("*bf16" if n in "QKVO" else "*fp32" if n in ("p1_rel_table", "p1_tab")
              else "fp32" if n == "qk_mul" else "i32")
    if n not in ("qk_mul", "p1_sh", "p1_R"):  # what Triton specialises at S4096 (divisible by 16)
        attrs[(i,)] = [["tt.divisibility", 16]]
src = ASTSource(fn, sig, {k: v for k, v in consts.items() if k in fn.arg_names}, attrs)
try:
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
except FileNotFoundError as e:  # no ptxas in this triton build
    print(e, file=sys.stderr); sys.exit(3)
print(k.asm["ptx"])
"""


@pytest.mark.parametrize("variant", [V.sliding_window(5) + V.alibi(2), V.prefix_lm(7) + V.softcap(3.0),
                                     V.alibi(2) + V.causal() + V.relative_bias(_rel_h)])
def test_branch_mask_and_split_loops_agree(tmp_path, variant):
    outs = [run_case(tmp_path, variant, Sq=37, Sk=45, config={**CFG_A, "branch_mask": b}, name=f"br{b}")
            for b in (False, True)]
    torch.testing.assert_close(outs[0], outs[1], atol=2e-3, rtol=0)


PIPE = {"pipeline_qk": True}


@pytest.mark.parametrize("config", [{**CFG_A, **PIPE}, {**CFG_C, **PIPE}, {**CFG_B, "split_loop": True, **PIPE}],
                         ids=["m16n16", "m16n32", "m32n16-exp-fold"])
@pytest.mark.parametrize("variant", ["full", "causal", "prefix_lm", "sliding_window+softcap", "causal+alibi",
                                     "causal+document", "relative_bias_h+causal", "dense_bias_q+causal",
                                     "score_mod", "softcap+alibi+causal_br"])
def test_pipelined_interior_matches_reference(tmp_path, variant, config):
    """The interior loop with the next tile's Q.K^T issued first: every variant, with runs of
    zero, one and many fully-allowed tiles (Sq=17, Sk=33 and the prefix's long run)."""
    run_case(tmp_path, VARIANTS[variant], config=config, name="pipe")


@pytest.mark.parametrize("Sq,Sk", [(1, 70), (40, 40), (64, 64), (23, 90)])
def test_pipelined_interior_run_lengths(tmp_path, Sq, Sk):
    """Interior runs of every length, including none (Sq=1 decode-like) and exactly one tile."""
    for var in (V.full(), V.causal("bottom_right"), V.prefix_lm(20)):
        run_case(tmp_path, var, Sq=Sq, Sk=Sk, config={**CFG_A, **PIPE}, name="piperun")


def test_pipelined_interior_code_and_validation():
    prob = make_problem(V.causal(), 1, 2, 1, 64, 64, 16, 16, torch.float16)
    src = generate_source(prob, {**CFG_A, **PIPE})
    interior = src.split("# fully-allowed interior blocks")[1].split("# boundary blocks after it")[0]
    assert "qk_next = tl.dot(q, tl.trans(k_next)" in interior and interior.index("qk_next =") < interior.index("m_new")
    with pytest.raises(ValueError, match="pipeline_qk"):
        normalize_config(prob, {"pipeline_qk": True, "split_loop": False})
    with pytest.raises(ValueError, match="warp_specialize=False"):
        normalize_config(prob, {"pipeline_qk": True, "warp_specialize": True})
    assert not normalize_config(prob, {"pipeline_qk": False, "branch_mask": True})["pipeline_qk"]
    # not yet measured: never proposed as a neighbour
    from torch_r1attn.search.templates import _neighbours
    assert not any(c["pipeline_qk"] for c in _neighbours(prob, normalize_config(prob, {})))


def _square_mod(score, b, h, q_idx, kv_idx):
    return score * score * 0.1


def test_alibi_before_a_nonlinear_part_keeps_its_row_term(tmp_path):
    # the row term only cancels when nothing non-linear follows; here a square follows
    var = V.alibi(2) + V.causal() + V.score_mod(_square_mod)
    src = generate_source(make_problem(var, 1, 2, 1, 17, 33, 16, 16, torch.float16), CFG_A)
    assert "(kv_r - q_pos_c)" in src and "(kv_idx - qmin)" not in src
    run_case(tmp_path, var, config=CFG_A, name="alibi_sq")


def test_interval_masks_are_row_bounds_not_element_math():
    prob = make_problem(V.sliding_window(9) + V.alibi(2), 1, 2, 1, 64, 64, 16, 16, torch.float16, "cuda")
    src = generate_source(prob, {})
    assert "row_lb_c = (q_pos - 8)[:, None]" in src and "row_ub_c = (tl.minimum(q_pos, Sk - 1))[:, None]" in src
    loops = src.split("for start_n in")[1:]
    assert len(loops) == 3
    assert "kv_r >= row_lb_c" in loops[0] and "kv_r <= row_ub_c" in loops[0]
    assert "allowed" not in loops[1]
    assert "kv_r >= row_lb_c" not in loops[2] and "kv_r <= row_ub_c" in loops[2]
    # ALiBi is the last score part: row-free column term, already in base-2 units, no extra multiply
    assert "(kv_idx - qmin)" in src and "s * 1.44" not in src
    assert "* 1.4426950408889634" in src.split("p1_slope = ")[1].split("\n")[0]


def test_batched_document_ids(tmp_path):
    ids = torch.stack([_doc, torch.arange(40) // 5])
    run_case(tmp_path, V.causal() + V.document(ids), B=2, Sq=33, Sk=40, config=CFG_C)


def test_fully_masked_rows_are_zero(tmp_path):
    # top-left sliding window with Sq > Sk: rows past Sk + window see nothing
    out = run_case(tmp_path, V.sliding_window(3), Sq=33, Sk=8, config=CFG_A)
    assert torch.all(out[:, :, 10:] == 0)


@pytest.mark.parametrize("config", [pytest.param({}, id="default"),
                                    pytest.param({"num_splits": 4, "BLOCK_N": 16}, id="4splits"),
                                    pytest.param({"num_splits": 1, "exp2": False, "split_loop": False}, id="1split")])
@pytest.mark.parametrize("case", [
    dict(variant=V.causal("bottom_right"), Sq=1, Sk=70, Hq=4, Hkv=1, B=2),
    dict(variant=V.causal("bottom_right") + V.alibi(4) + V.softcap(5.0), Sq=3, Sk=50, Hq=4, Hkv=2, D=24),
    dict(variant=V.sliding_window(20, "bottom_right") + V.document(torch.tensor([0] * 30 + [1] * 40)),
         Sq=4, Sk=70, Hq=2, Hkv=1),
    dict(variant=V.relative_bias(_rel_h) + V.Variant([V.DenseBias(torch.randn(2, 1, 33))]), Sq=2, Sk=33,
         Hq=2, Hkv=1, Dv=24),
], ids=["causal_br_gqa4", "alibi_softcap", "sw_doc", "relbias_densebias"])
def test_decode_split_kv(tmp_path, case, config):
    case = dict(case)
    var = case.pop("variant")
    prob = make_problem(var, 1, case["Hq"], case["Hkv"], case["Sq"], case["Sk"], 16, 16, torch.float16)
    assert default_config(prob)["path"] == "decode"
    run_case(tmp_path, var, config=config, name="decode", **case)


def test_hopper_knobs_run_in_interpreter(tmp_path):
    # tensor descriptors and warp specialisation default off on the CPU but the interpreter runs them
    for cfg in ({"tma": True}, {"tma": True, "warp_specialize": True}):
        run_case(tmp_path, V.causal() + V.alibi(2), D=24, Dv=40, config={**CFG_A, **cfg}, name="tma")


def test_untraceable_callable_raises(tmp_path):
    def data_dependent(score, b, h, q_idx, kv_idx):
        if q_idx > 3:  # Python control flow on a traced value
            return score
        return score * 2

    prob = make_problem(V.score_mod(data_dependent), 1, 2, 1, 17, 17, 16, 16, torch.float16)
    with pytest.raises(Untraceable, match="control flow"):
        generate_source(prob, {})
    assert TemplatesProposer().propose(prob, [], 4) == []


def test_supports_and_contract(tmp_path):
    prob = make_problem(V.causal(), 2, 4, 2, 100, 200, 24, 40, torch.float16)
    src = generate_source(prob, {})
    path = tmp_path / "k.py"
    path.write_text(src)
    kern = load_source_file(path)
    assert kern.supports == {"dtypes": ["fp16"], "head_dims": [24], "head_dims_v": [40], "gqa": [2],
                             "max_seqlen_q": 128, "max_seqlen_k": 256, "devices": ["cuda", "cpu"]}
    for bad in ("try:", "except", "exec(", "eval(", "open(", "import os", "threading", "Stream",
                "softmax", "matmul", "scaled_dot_product"):
        assert bad not in src, bad
    q = torch.randn(1, 4, 9, 24, dtype=torch.float16)
    k = torch.randn(1, 2, 9, 24, dtype=torch.float16)
    v = torch.randn(1, 2, 9, 40, dtype=torch.float16)
    with pytest.raises(ValueError, match="out has shape"):
        kern(q, k, v, torch.empty(1, 4, 9, 24, dtype=torch.float16), 0.2)
    kd = load_source_file(_write(tmp_path, generate_source(make_problem(V.document(torch.zeros(9, dtype=torch.long)),
                                                                        1, 4, 2, 100, 200, 24, 40, torch.float16))))
    with pytest.raises(ValueError, match="missing variant tensor 'p0_doc_ids'"):
        kd(q, k, v, torch.empty(1, 4, 9, 40, dtype=torch.float16), 0.2)


def _write(tmp_path, src):
    p = tmp_path / f"k{abs(hash(src)) % 10**8}.py"
    p.write_text(src)
    return p


@pytest.mark.parametrize("variant", [V.causal() + V.softcap(5.0), V.document(_doc) + V.causal("bottom_right")],
                         ids=["softcap", "doc-br"])
def test_transformers_layout(tmp_path, variant):
    run_case(tmp_path, variant, B=2, Hq=4, Hkv=2, Sq=33, Sk=40, D=16, config=CFG_B, layout="bshd")


def test_non_contiguous_inputs(tmp_path):
    g = torch.Generator().manual_seed(3)
    B, H, S, D = 1, 2, 17, 16
    qkv = torch.randn(B, S, 3, H, D, generator=g).half()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) views, strided
    assert not q.is_contiguous()
    var = V.causal() + V.alibi(2)
    src = generate_source(make_problem(var, B, H, H, S, S, D, D, torch.float16), CFG_A)
    kern = load_source_file(_write(tmp_path, src))
    out_full = torch.full((B, S, H, D), float("nan"), dtype=torch.float16)
    out = out_full.transpose(1, 2)  # write through a strided out
    kern(q, k, v, out, 0.25, **var.tensors())
    assert_close_to_ref(out, reference_attention(q, k, v, var, 0.25))


# ------------------------------------------------------------------------------------ configs
def test_config_validation():
    prob = make_problem(V.softcap(5.0), 1, 2, 1, 64, 64, 16, 16, torch.float16)
    with pytest.raises(ValueError, match="unknown template knob"):
        normalize_config(prob, {"BLOCK_K": 16})
    with pytest.raises(ValueError, match="BLOCK_M=48"):
        normalize_config(prob, {"BLOCK_M": 48})
    with pytest.raises(ValueError, match="fast_tanh"):
        normalize_config(prob, {"fast_tanh": True})
    cpu = default_config(prob)
    assert not cpu["tma"] and not cpu["warp_specialize"] and not cpu["fast_tanh"]
    gpu = default_config(make_problem(V.softcap(5.0), 4, 32, 32, 4096, 4096, 128, 128, torch.bfloat16, "cuda"))
    assert gpu["fast_tanh"] and gpu["path"] == "prefill"
    assert (gpu["BLOCK_M"], gpu["num_warps"]) == (64, 4)  # structured variants: M64 w4 (H200 round 2)
    causal = default_config(make_problem(V.causal(), 4, 32, 32, 4096, 4096, 128, 128, torch.bfloat16, "cuda"))
    assert (causal["BLOCK_M"], causal["num_warps"]) == (128, 8)
    dec = default_config(make_problem(V.causal("bottom_right"), 32, 32, 8, 1, 8192, 128, 128, torch.bfloat16, "cuda"))
    assert dec["path"] == "decode"
    sw = make_problem(V.sliding_window(1024), 4, 32, 32, 4096, 4096, 128, 128, torch.bfloat16, "cuda")
    with pytest.raises(ValueError, match="warp_specialize=True needs num_warps=8"):
        normalize_config(sw, {"warp_specialize": True, "num_warps": 4})
    assert normalize_config(sw, {"warp_specialize": True, "num_warps": 8})["warp_specialize"]
    # no neighbour of a warp-specialised config steps down to what cannot compile
    from torch_r1attn.search.templates import _neighbours
    ns = _neighbours(sw, normalize_config(sw, {"warp_specialize": True, "num_warps": 8}))
    assert ns and not any(n["warp_specialize"] and n["num_warps"] < 8 for n in ns)


def _fb(cand, ok, ms):
    return Feedback(candidate=cand, ok=ok, time_ms=ms, best_baseline_ms=1.0, best_baseline="sdpa",
                    speedup=(1.0 / ms) if ms else None, text="")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_proposer_rounds(device):
    # proposals are only generated here (never run), so a "cuda" problem is fine on the CPU
    prob = make_problem(V.causal() + V.alibi(32), 4, 32, 32, 4096, 4096, 128, 128, torch.float16, device)
    tp = TemplatesProposer()
    r1 = tp.propose(prob, [], 6)
    assert len(r1) == 6
    assert all(c.proposer == "templates" and c.language == "triton" for c in r1)
    keys = [_config_key(c.config) for c in r1]
    assert len(set(keys)) == 6 and len({c.hash for c in r1}) == 6
    assert r1[0].config == normalize_config(prob, default_config(prob))  # best guess first
    assert [c.config for c in tp.propose(prob, [], 6)] == [c.config for c in r1]  # deterministic
    if device == "cpu":
        assert all(not c.config["tma"] and not c.config["warp_specialize"] for c in r1)
        assert all(c.config["BLOCK_M"] <= 32 and c.config["BLOCK_N"] <= 32 for c in r1)
    # the third config is the fastest; the first failed
    hist = [_fb(r1[0], False, None)] + [_fb(c, True, 2.0 + i) for i, c in enumerate(r1[1:])]
    hist[2] = _fb(r1[2], True, 0.5)
    r2 = tp.propose(prob, hist, 6)
    assert r2, "no second-round proposals"
    seen = set(keys)
    best = r1[2].config
    for c in r2:
        assert _config_key(c.config) not in seen, "repeated a config from history"
    diffs = [sum(c.config[k] != best[k] for k in best) for c in r2]
    assert diffs[0] == 1, "first proposal of round two must be a neighbour of the fastest config"
    assert len({_config_key(c.config) for c in r2}) == len(r2)
    r2b = tp.propose(prob, hist, 6)
    assert [c.config for c in r2b] == [c.config for c in r2]
    # round three: the space shrinks but nothing repeats
    hist3 = hist + [_fb(c, True, 3.0) for c in r2]
    r3 = tp.propose(prob, hist3, 6)
    all_keys = {_config_key(h.candidate.config) for h in hist3}
    assert all(_config_key(c.config) not in all_keys for c in r3)


def test_proposer_avoids_values_that_only_failed():
    prob = make_problem(V.causal(), 4, 32, 32, 4096, 4096, 128, 128, torch.bfloat16, "cuda")
    tp = TemplatesProposer()
    r1 = tp.propose(prob, [], 16)
    tma = [c for c in r1 if c.config["tma"]]
    assert len(tma) >= 2
    hist = [_fb(c, not c.config["tma"], 1.0 + 0.1 * i) for i, c in enumerate(r1)]
    r2 = tp.propose(prob, hist, 20)
    assert r2 and all(not c.config["tma"] for c in r2)


# ---------------------------------------------------------------------------------------- GPU
GPU_VARIANTS = {
    "causal": lambda S, H: V.causal(),
    "sliding_window": lambda S, H: V.sliding_window(256),
    "alibi_causal": lambda S, H: V.causal() + V.alibi(H),
    "softcap_causal": lambda S, H: V.causal() + V.softcap(50.0),
    "document_causal": lambda S, H: V.causal() + V.document(torch.arange(S) // (S // 8)),
    "prefix_lm": lambda S, H: V.prefix_lm(S // 4),
    "relbias_causal": lambda S, H: V.causal() + V.relative_bias(torch.randn(H, 2 * S - 1) * 0.5),
    "full": lambda S, H: V.full(),
    "dense_bias": lambda S, H: V.Variant([V.DenseBias(torch.randn(1, H, S, S))]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 64), (torch.bfloat16, 128), (torch.bfloat16, 80),
                                     (torch.float16, 128)])
@pytest.mark.parametrize("name", list(GPU_VARIANTS))
def test_gpu_real_shapes(tmp_path, name, dtype, D):
    B, H, S = 2, 8, 1024
    var = GPU_VARIANTS[name](S, H)
    prob = make_problem(var, B, H, H, S, S, D, D, dtype, "cuda")
    for i, cfg in enumerate(c.config for c in TemplatesProposer().propose(prob, [], 2)):
        run_case(tmp_path, var, B=B, Hq=H, Hkv=H, Sq=S, Sk=S, D=D, dtype=dtype, config=cfg, device="cuda",
                 check_dtype=torch.float32, name=f"{name}_{i}")


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [{}, {"tma": True}, {"tma": True, "warp_specialize": True, "num_warps": 8},
                                 {"warp_specialize": True, "BLOCK_M": 128, "num_warps": 8}, {"fold_scale": True},
                                 {"pipeline_qk": True}, {"pipeline_qk": True, "tma": True},
                                 {"pipeline_qk": True, "BLOCK_M": 128, "num_warps": 8}])
def test_gpu_gqa_and_hopper_knobs(tmp_path, cfg):
    run_case(tmp_path, V.causal(), B=2, Hq=8, Hkv=2, Sq=1000, Sk=1000, D=128, dtype=torch.bfloat16, config=cfg,
             device="cuda", check_dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [{}, {"tma": True}, {"BLOCK_M": 128, "num_warps": 8}, {"tma": True, "rel_vec": False}])
@pytest.mark.parametrize("name", ["softcap_causal", "document_causal", "relbias_causal"])
def test_gpu_transformers_layout(tmp_path, name, cfg):
    """q, k, v and out as (B, S, H, D)-laid-out views, what the HF path hands kernels (and what the
    verifier's strided-layout trial checks), incl. the tensor-descriptor (TMA) path."""
    S, H = 1000, 8
    run_case(tmp_path, GPU_VARIANTS[name](S, H), B=2, Hq=H, Hkv=H, Sq=S, Sk=S, D=128, dtype=torch.bfloat16,
             config=cfg, device="cuda", check_dtype=torch.float32, layout="bshd")


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [{"rel_asm": 1}, {"rel_asm": 2}, {"rel_asm": 2, "tma": True}, {"tma": True},
                                 {"rel_asm": 2, "BLOCK_M": 128, "num_warps": 8}, {"rel_vec": False}])
@pytest.mark.parametrize("Sq,Sk,tab_dtype", [(1000, 1000, torch.float32), (777, 1029, torch.bfloat16)])
def test_gpu_relative_bias_load_paths(tmp_path, cfg, Sq, Sk, tab_dtype):
    """Every way the bias tile is read (aligned copies through tl.load, inline-asm scalar and pair
    loads, the scalar gather) at odd lengths, Sq != Sk (bottom-right), fp32 and bf16 tables."""
    S = max(Sq, Sk)
    tab = (torch.randn(8, 2 * S - 1, generator=torch.Generator().manual_seed(1)) * 0.5).to(tab_dtype)
    var = V.causal("bottom_right") + V.relative_bias(tab)
    run_case(tmp_path, var, B=2, Hq=8, Hkv=8, Sq=Sq, Sk=Sk, D=128, dtype=torch.bfloat16, config=cfg,
             device="cuda", check_dtype=torch.float32, name="relpaths")


def test_rel_asm_is_refused_on_the_cpu_and_without_rel_vec():
    var = V.causal() + V.relative_bias(torch.randn(2, 79))
    prob = make_problem(var, 1, 2, 2, 40, 40, 16, 16, torch.float16)
    with pytest.raises(ValueError, match="rel_asm needs CUDA"):
        normalize_config(prob, {"rel_asm": 2})
    with pytest.raises(ValueError, match="rel_asm needs rel_vec=True"):
        normalize_config(prob, {"rel_asm": 1, "rel_vec": False})
    assert normalize_config(make_problem(V.causal(), 1, 2, 2, 40, 40, 16, 16, torch.float16), {})["rel_asm"] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("Sq", [1, 4])
def test_gpu_decode(tmp_path, Sq):
    run_case(tmp_path, V.causal("bottom_right"), B=4, Hq=32, Hkv=8, Sq=Sq, Sk=4099, D=128, dtype=torch.bfloat16,
             device="cuda", check_dtype=torch.float32)


def test_static_checker_accepts_every_template():
    from torch_r1attn.verify.static import check_source

    for name, var in VARIANTS.items():
        for cfg in (CFG_A, CFG_B, {"tma": True, "warp_specialize": True}):
            src = generate_source(make_problem(var, 1, 2, 1, 17, 33, 24, 16, torch.float16), cfg)
            assert check_source(src, "triton") == [], (name, cfg)
        src = generate_source(make_problem(var, 1, 4, 1, 2, 33, 16, 16, torch.float16), {})  # decode
        assert check_source(src, "triton") == [], (name, "decode")


def test_d64_round_one_follows_the_h200_searches():
    """At D=64 the first wave (4 workers) holds the configs that won session 5's B8 S2048 D64
    searches: M64 N64 w4 s4 first, M128 N64 w8 s3 for ALiBi / soft-cap / prefix-LM, M128 N32
    w4 s4 for documents; the slow shapes (M128 N128 w8, M256, tma) come last. Plain causal keeps
    its list (cuDNN wins it)."""
    from torch_r1attn.search.templates import _spread

    def short(c):
        return (c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"], c["tma"])

    def spread(var):
        return [short(c) for c in _spread(make_problem(var, 8, 32, 32, 2048, 2048, 64, 64, torch.bfloat16, "cuda"))]

    for var in (V.sliding_window(1024), V.causal() + V.alibi(32), V.prefix_lm(512)):
        sp = spread(var)
        assert sp[0] == (64, 64, 4, 4, False) and (128, 64, 8, 3, False) in sp[:4]
        assert all(c in sp[-4:] for c in [(128, 128, 8, 3, False), (256, 64, 8, 3, False), (64, 64, 4, 4, True)])
    doc = spread(V.causal() + V.document(torch.arange(2048) // 256))
    assert doc[0] == (64, 64, 4, 4, False) and (128, 32, 4, 4, False) in doc[:4]
    assert spread(V.causal())[0] == (128, 64, 4, 3, False)


def test_neighbours_of_an_asm_relative_bias_config_include_the_gather(monkeypatch):
    from torch_r1attn.search import templates as T

    monkeypatch.setattr(T, "_is_cpu", lambda p: False)  # a CUDA problem's knobs, without a GPU
    var = V.causal() + V.relative_bias(torch.randn(4, 2 * 512 - 1))
    prob = make_problem(var, 1, 4, 4, 512, 512, 128, 128, torch.bfloat16, "cuda")
    cfg = T.normalize_config(prob, {})
    assert cfg["rel_vec"] and cfg["rel_asm"] == 1  # the D128 default (H200 session 9)
    near = T._neighbours(prob, cfg)
    assert any(not c["rel_vec"] and c["rel_asm"] == 0 for c in near)
    assert {c["rel_asm"] for c in near if c["rel_vec"]} >= {1, 2}
