"""FA3-structured Gluon candidates (search.gluon_fa3).

Gluon has no interpreter, so the CPU tests check what can be checked without a Hopper GPU: which
problems the path applies to, its knobs, that every generated module passes the verifier's
static check and loads through the loader, and how the proposer offers it. The ``gpu`` tests run
the kernels on sm_90 against the float64 reference (``run_case``: NaN-poisoned output, inputs
unchanged, flash-attention's tolerance rule) over awkward sizes, both alignments, GQA, head dims
64 / 128, fp16 / bf16 and the transformers layout, and through the verifier.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_templates import make_problem, run_case
from torch_r1attn import variants as V
from torch_r1attn.loader import load_source_file
from torch_r1attn.search import gluon_fa3
from torch_r1attn.search.templates import TemplatesProposer, generate_source, normalize_config
from torch_r1attn.verify.static import check_source

FA3 = {"path": "fa3"}
APPLY = {
    "sw1024": V.sliding_window(1024),
    "causal+alibi": V.causal() + V.alibi(4),
    "sw64+alibi@br": V.sliding_window(64, "bottom_right") + V.alibi(4),
    "causal@br+alibi": V.causal("bottom_right") + V.alibi(4),
    "prefix1024": V.prefix_lm(1024),
    "prefix100@br+alibi": V.prefix_lm(100, "bottom_right") + V.alibi(4),
}


@pytest.fixture
def hopper(monkeypatch):
    """Pretend the device is an sm_90 GPU (the CPU tests only generate and inspect sources), and
    lift the small-problem gate (tested on its own below)."""
    monkeypatch.setattr(gluon_fa3, "_is_hopper", lambda device: True)
    monkeypatch.setattr(gluon_fa3, "MIN_GPU_MS", 0.0)


@pytest.fixture
def no_work_gate(monkeypatch):
    """GPU correctness tests run small shapes, which the proposer would not offer fa3 for."""
    monkeypatch.setattr(gluon_fa3, "MIN_GPU_MS", 0.0)


def test_small_problems_keep_the_triton_template(monkeypatch):
    """fa3's host cost (~0.2 ms per call on the H200's host) would make a small call host-bound; the
    search times GPU work only, so the gate is in applies(): the anchors pass, small shapes do not."""
    monkeypatch.setattr(gluon_fa3, "_is_hopper", lambda device: True)
    big = make_problem(V.sliding_window(1024), 4, 32, 32, 4096, 4096, 128, 128, torch.bfloat16, "cuda")
    mid = make_problem(V.causal() + V.alibi(32), 8, 32, 32, 2048, 2048, 64, 64, torch.bfloat16, "cuda")
    small = make_problem(V.causal() + V.alibi(8), 1, 8, 8, 1024, 1024, 128, 128, torch.bfloat16, "cuda")
    assert gluon_fa3.estimated_gpu_ms(big) == pytest.approx(0.573, abs=0.01)  # measured 0.562-0.590 (session 12)
    assert gluon_fa3.applies(big) and gluon_fa3.applies(mid)
    assert gluon_fa3.estimated_gpu_ms(small) < gluon_fa3.MIN_GPU_MS and not gluon_fa3.applies(small)
    assert not gluon_fa3.round_one(small)
    with pytest.raises(ValueError, match="ms of GPU work"):
        normalize_config(small, FA3)


def _prob(var, D=128, dtype=torch.bfloat16, Sq=4096, Sk=4096, Hq=4, Hkv=4, Dv=None):
    return make_problem(var, 2, Hq, Hkv, Sq, Sk, D, Dv or D, dtype, "cuda")


@pytest.mark.parametrize("name", list(APPLY))
def test_applies_to_windows_and_alibi(hopper, name):
    assert gluon_fa3.applies(_prob(APPLY[name]))


@pytest.mark.parametrize("why,prob", [
    ("plain causal: cuDNN's", lambda: _prob(V.causal())),
    ("no mask", lambda: _prob(V.alibi(4))),
    ("soft-cap", lambda: _prob(V.causal() + V.softcap(30.0))),
    ("documents", lambda: _prob(V.causal() + V.document(torch.zeros(4096, dtype=torch.int32)))),
    ("prefix-LM under a causal mask: plain causal", lambda: _prob(V.causal() + V.prefix_lm(7))),
    ("fp32", lambda: _prob(V.sliding_window(64), dtype=torch.float32)),
    ("D 80", lambda: _prob(V.sliding_window(64), D=80)),
    ("Dv != D", lambda: _prob(V.sliding_window(64), D=128, Dv=64)),
    ("decode bucket", lambda: _prob(V.sliding_window(64), Sq=1)),
])
def test_refuses_what_it_does_not_implement(hopper, why, prob):
    assert not gluon_fa3.applies(prob()), why


def test_needs_a_hopper_device():
    """Without the fixture: the CPU (and any non-sm_90 device) gets no fa3 path."""
    assert not gluon_fa3.applies(make_problem(V.sliding_window(64), 1, 2, 2, 256, 256, 64, 64, torch.bfloat16, "cpu"))
    assert not gluon_fa3.round_one(make_problem(V.sliding_window(64), 1, 2, 2, 256, 256, 64, 64, torch.bfloat16, "cpu"))
    with pytest.raises(ValueError, match="does not fit"):
        normalize_config(make_problem(V.sliding_window(64), 1, 2, 2, 256, 256, 64, 64, torch.bfloat16, "cpu"), FA3)


def test_needs_triton_with_gluon(hopper, monkeypatch):
    """An older Triton without Gluon's Hopper API: the path is not offered (its modules would not
    import, and every search would spend its first candidates on them)."""
    prob = _prob(V.sliding_window(1024))
    assert gluon_fa3.applies(prob)
    monkeypatch.setattr(gluon_fa3, "_gluon_available", lambda: False)
    assert not gluon_fa3.applies(prob) and not gluon_fa3.round_one(prob)


def test_several_windows_take_the_smallest(hopper):
    """Two windows AND to the smaller one, whatever their order (canonical_parts sorts by key as a
    string: "sw100" after "sw1000")."""
    for var in (V.sliding_window(100) + V.sliding_window(1000), V.sliding_window(1000) + V.sliding_window(100),
                V.sliding_window(13) + V.sliding_window(12) + V.alibi(4)):
        window = min(p.size for p in var.parts if isinstance(p, V.SlidingWindow))
        src = generate_source(_prob(var), FA3)
        assert f"\nWINDOW, PREFIX = {window}, 0\n" in src


def test_prefix_lm_parts(hopper):
    """A prefix-LM mask is a causal mask whose diagonal never drops below the prefix: its length is a
    constant of the module; two prefixes AND to the shorter; under a causal or sliding-window mask
    the prefix adds nothing and is dropped (plain causal is cuDNN's; a window keeps its kernel)."""
    src = generate_source(_prob(V.prefix_lm(1024) + V.alibi(4)), FA3)
    assert "\nWINDOW, PREFIX = 0, 1024\n" in src and "ALIBI_KEY = None" not in src
    assert "\nWINDOW, PREFIX = 0, 300\n" in generate_source(_prob(V.prefix_lm(1000) + V.prefix_lm(300)), FA3)
    assert "\nWINDOW, PREFIX = 64, 0\n" in generate_source(_prob(V.sliding_window(64) + V.prefix_lm(300)), FA3)
    # a zero-length prefix ANDed with any other is plain causal (cuDNN's), whatever the parts' order
    for var in (V.prefix_lm(0) + V.prefix_lm(300), V.prefix_lm(300) + V.prefix_lm(0), V.prefix_lm(0)):
        assert gluon_fa3._parts(_prob(var))[:2] == (0, 0) and not gluon_fa3.applies(_prob(var))
    # a prefix longer than anything is full attention: capped so the tile arithmetic stays in int32
    assert "\nWINDOW, PREFIX = 0, 1073741824\n" in generate_source(_prob(V.prefix_lm(1 << 40)), FA3)
    # the work estimate counts the prefix square: causal's half plus half of prefix^2
    base = gluon_fa3.estimated_gpu_ms(_prob(V.causal() + V.alibi(4)))
    assert gluon_fa3.estimated_gpu_ms(_prob(V.prefix_lm(1024))) == pytest.approx(base * (1 + 1024 ** 2 / 4096 ** 2))


def test_later_rounds_skip_a_stored_fa3_config_that_no_longer_applies(hopper, monkeypatch):
    """A search history with an fa3 winner, read where fa3 no longer applies (another Triton, the
    work gate): the proposer goes on with Triton configs instead of raising."""
    from tests.test_templates import _fb

    prob = _prob(V.sliding_window(1024))
    first = TemplatesProposer().propose(prob, [], 4)
    hist = [_fb(c, ok=True, ms=1.0 + i) for i, c in enumerate(first)]
    assert first[0].config["path"] == "fa3"
    monkeypatch.setattr(gluon_fa3, "_gluon_available", lambda: False)
    later = TemplatesProposer().propose(prob, hist, 4)
    assert later and all(c.config["path"] == "prefill" for c in later)


def test_knobs_are_validated(hopper):
    prob = _prob(V.sliding_window(1024))
    assert normalize_config(prob, FA3) == {"path": "fa3", "block_n": 128, "stages": 3, "pingpong": False}
    with pytest.raises(ValueError, match="takes knobs"):
        normalize_config(prob, {"path": "fa3", "BLOCK_M": 64})  # a Triton knob
    with pytest.raises(ValueError, match="not one of"):
        normalize_config(prob, {"path": "fa3", "stages": 5})
    with pytest.raises(ValueError, match="not one of"):
        normalize_config(prob, {"path": "fa3", "pingpong": 1})
    with pytest.raises(ValueError, match="not one of"):
        normalize_config(prob, {"path": "fa3", "block_n": 128.0})
    with pytest.raises(ValueError, match="shared memory"):  # 128-key tiles x 4 stages at D128: 288 KB
        normalize_config(prob, {"path": "fa3", "stages": 4})
    # at D64 the same ring fits
    assert normalize_config(_prob(V.sliding_window(64), D=64), {"path": "fa3", "stages": 4})["stages"] == 4


@pytest.mark.parametrize("name", list(APPLY))
@pytest.mark.parametrize("cfg", [{}, {"pingpong": True}, {"block_n": 64, "stages": 4}], ids=["dflt", "pp", "n64s4"])
@pytest.mark.parametrize("D,dtype,Hkv", [(128, torch.bfloat16, 4), (64, torch.float16, 1)], ids=["d128-bf16", "d64-fp16-gqa4"])
def test_generated_module_passes_static_check_and_loads(hopper, tmp_path, name, cfg, D, dtype, Hkv):
    var = APPLY[name]
    prob = _prob(var, D=D, dtype=dtype, Hkv=Hkv)
    src = generate_source(prob, {**FA3, **cfg})
    assert check_source(src) == []
    path = tmp_path / "fa3.py"
    path.write_text(src)
    load_source_file(path, name_hint="fa3")  # imports, finds forward and SUPPORTS
    ns: dict = {}
    for line in src.splitlines():  # the header's literals say what the kernel was built for
        if line.startswith(("WINDOW, PREFIX =", "ALIBI_KEY =", "NEEDS =", "ALIGN_BOTTOM_RIGHT =")):
            exec(line, ns)  # noqa: S102 - literals written by generate_source
    window = next((p.size for p in var.canonical_parts if isinstance(p, V.SlidingWindow)), 0)
    prefix = next((p.prefix_len for p in var.canonical_parts if isinstance(p, V.PrefixLM)), 0)
    assert ns["WINDOW"] == window and ns["PREFIX"] == prefix
    assert ns["ALIGN_BOTTOM_RIGHT"] == (var.align == "bottom_right")
    assert set(ns["NEEDS"]) == set(var.tensors())
    assert (ns["ALIBI_KEY"] is not None) == any(isinstance(p, V.Alibi) for p in var.parts)


def _module(tmp_path, var, B=2, Hq=8, Hkv=2, S=300, D=64, dtype=torch.float16, cfg=None):
    from torch_r1attn.loader import import_kernel_file

    path = tmp_path / "fa3.py"
    path.write_text(generate_source(make_problem(var, B, Hq, Hkv, S, S, D, D, dtype, "cuda"), {**FA3, **(cfg or {})}))
    return import_kernel_file(path, "fa3")


def test_cpu_tensors_are_refused_with_a_clear_error(hopper, tmp_path):
    mod = _module(tmp_path, V.sliding_window(16))
    q = torch.randn(2, 8, 64, 64, dtype=torch.float16)
    k = torch.randn(2, 2, 64, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="CUDA"):
        mod.forward(q, k, k, torch.empty_like(q), 0.125)


def test_launch_plan(hopper, tmp_path):
    """The host side of a launch (grid, arguments, constexprs, TMA descriptors, which tensor is
    written), checked without a GPU: GQA, a ragged last query block, the bottom-right offset, ALiBi's
    slopes, a negative scale."""
    mod = _module(tmp_path, V.sliding_window(1024), B=2, Hq=8, Hkv=2, S=300, D=64)
    q = torch.randn(2, 8, 300, 64, dtype=torch.float16)
    k = torch.randn(2, 2, 300, 64, dtype=torch.float16)
    out = torch.empty_like(q)
    grid, args, consts, oc = mod._plan(q, k, k, out, 0.125, {})
    assert grid == (16 * 3,) and oc is out
    q_desc, k_desc, v_desc, o_desc = args[:4]
    assert args[4] is out and tuple(args[7:]) == (300, 300, 0, 8)
    assert q_desc.shape == [2 * 8 * 300, 64] and q_desc.block_shape == [64, 64] and q_desc.strides == [64, 1]
    assert k_desc.shape == [2 * 2 * 300, 64] and k_desc.block_shape == [128, 64]
    assert q_desc.base.data_ptr() == q.data_ptr() and k_desc.base.data_ptr() == k.data_ptr()  # no copies
    assert consts == dict(GQA_G=4, BLOCK_M=128, BLOCK_N=128, HEAD_D=64, NUM_STAGES=3, WINDOW=1024, PREFIX=0,
                          ALIBI=False, SCALE_MAX=True, EVEN_M=False, PINGPONG=False)
    assert mod._plan(q, k, k, out, -0.125, {})[2]["SCALE_MAX"] is False  # the max trick needs scale > 0
    q256 = torch.randn(2, 8, 256, 64, dtype=torch.float16)
    k256 = torch.randn(2, 2, 256, 64, dtype=torch.float16)
    assert mod._plan(q256, k256, k256, torch.empty_like(q256), 0.1, {})[2]["EVEN_M"] is True

    var = V.causal("bottom_right") + V.alibi(8)
    mod = _module(tmp_path, var, B=1, Hq=8, Hkv=8, S=300, D=128, dtype=torch.bfloat16, cfg={"pingpong": True})
    q = torch.randn(1, 8, 77, 128, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 300, 128, dtype=torch.bfloat16)
    grid, args, consts, oc = mod._plan(q, k, k, torch.empty_like(q), 0.088, var.tensors())
    assert grid == (8 * 1,) and tuple(args[7:]) == (77, 300, 223, 8)
    assert args[5] is var.tensors()[mod.ALIBI_KEY]
    assert consts["ALIBI"] and not consts["SCALE_MAX"] and consts["PINGPONG"] and consts["GQA_G"] == 1


def test_launch_plan_copies_what_tma_cannot_read(hopper, tmp_path):
    """The transformers layout is copied and the result goes to a new tensor (which forward
    returns); an input that starts off a 16-byte boundary is copied."""
    mod = _module(tmp_path, V.sliding_window(64), B=2, Hq=4, Hkv=4, S=100, D=64, dtype=torch.bfloat16)
    q = torch.randn(2, 100, 4, 64, dtype=torch.bfloat16).transpose(1, 2)
    out = torch.empty(2, 100, 4, 64, dtype=torch.bfloat16).transpose(1, 2)
    grid, args, consts, oc = mod._plan(q, q, q, out, 0.125, {})
    assert oc is not out and oc.is_contiguous() and oc.shape == out.shape and args[4] is oc
    assert args[0].base.is_contiguous() and args[0].base.data_ptr() != q.data_ptr()
    buf = torch.randn(2 * 4 * 100 * 64 + 3, dtype=torch.bfloat16)
    qm = buf[3:].view(2, 4, 100, 64)  # contiguous, 6 bytes past the allocation's start
    grid, args, consts, oc = mod._plan(qm, qm, qm, torch.empty_like(qm), 0.125, {})
    assert args[0].base.storage_offset() == 0 and torch.equal(args[0].base.view(2, 4, 100, 64), qm)


@pytest.mark.parametrize("why,call,err", [
    ("head dim", lambda q, k: (q[..., :32], k[..., :32]), "head dim"),
    ("gqa ratio", lambda q, k: (q[:, :6], k), "query heads per kv head"),
    ("k/v lengths", lambda q, k: (q, k[:, :, :10]), "do not fit"),
    ("3-D", lambda q, k: (q[0], k), "4-D"),
    ("dtype", lambda q, k: (q.float(), k), "built for"),
    ("empty", lambda q, k: (q[:, :, :0], k), "empty"),
    ("devices", lambda q, k: (q, k.to("meta")), "one device"),
])
def test_launch_plan_refuses_bad_calls(hopper, tmp_path, why, call, err):
    mod = _module(tmp_path, V.sliding_window(16))
    q, k = call(torch.randn(2, 8, 64, 64, dtype=torch.float16), torch.randn(2, 2, 64, 64, dtype=torch.float16))
    v = k if k.dim() != 4 or k.shape[2] == 64 else torch.randn(2, 2, 64, 64, dtype=torch.float16)
    with pytest.raises((ValueError, TypeError), match=err):
        mod._plan(q, k, v, torch.empty(q.shape[:-1] + (q.shape[-1],), dtype=q.dtype), 0.125, {})


def test_proposer_offers_fa3_first_then_triton_and_never_repeats(hopper):
    from tests.test_templates import _fb

    prob = _prob(V.sliding_window(1024))
    prop = TemplatesProposer()
    first = prop.propose(prob, [], 5)
    paths = [c.config["path"] for c in first]
    assert paths[:3] == ["fa3", "fa3", "fa3"] and paths[3:] == ["prefill", "prefill"]
    hist = [_fb(c, ok=True, ms=1.0 + i) for i, c in enumerate(first)]
    later = prop.propose(prob, hist, 8)
    assert later and all(c.config["path"] == "prefill" for c in later)  # fa3's configs were all tried
    seen = {tuple(sorted(c.config.items())) for c in first}
    assert not any(tuple(sorted(c.config.items())) in seen for c in later)


def test_proposer_on_the_cpu_has_no_fa3():
    prob = make_problem(V.sliding_window(8), 1, 2, 2, 64, 64, 16, 16, torch.float16, "cpu")
    assert all(c.config["path"] != "fa3" for c in TemplatesProposer().propose(prob, [], 6))


# ------------------------------------------------------------------------------------ GPU
def _need_hopper():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the fa3 path needs an sm_90 (Hopper) GPU")


GPU_VARIANTS = {
    "sw1024": V.sliding_window(1024),
    "sw37": V.sliding_window(37),
    "sw200+alibi": V.sliding_window(200) + V.alibi(8),
    "causal+alibi": V.causal() + V.alibi(8),
    "sw100@br": V.sliding_window(100, "bottom_right"),
    "causal@br+alibi": V.causal("bottom_right") + V.alibi(8),
    "prefix257": V.prefix_lm(257),
    "prefix700@br+alibi": V.prefix_lm(700, "bottom_right") + V.alibi(8),
}


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(GPU_VARIANTS))
@pytest.mark.parametrize("Sq,Sk", [(1000, 1000), (4096, 4096), (77, 300), (300, 77), (17, 129), (129, 1)],
                         ids=["1000", "4096", "sq<sk", "sq>sk", "sq17", "sk1"])
def test_gpu_fa3_matches_reference(tmp_path, no_work_gate, name, Sq, Sk):
    _need_hopper()
    run_case(tmp_path, GPU_VARIANTS[name], B=2, Hq=8, Hkv=8, Sq=Sq, Sk=Sk, D=128, dtype=torch.bfloat16,
             config=FA3, device="cuda", name=f"fa3_{Sq}_{Sk}")


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [{"pingpong": True}, {"block_n": 64, "stages": 4}, {"stages": 2}],
                         ids=["pingpong", "n64s4", "s2"])
@pytest.mark.parametrize("D,Hkv,dtype", [(128, 2, torch.bfloat16), (64, 8, torch.float16), (64, 1, torch.bfloat16)],
                         ids=["d128-gqa4-bf16", "d64-fp16", "d64-gqa8-bf16"])
def test_gpu_fa3_configs_heads_dtypes(tmp_path, no_work_gate, cfg, D, Hkv, dtype):
    _need_hopper()
    for name, var in (("sw", V.sliding_window(333)), ("alibi", V.causal() + V.alibi(8)), ("prefix", V.prefix_lm(500))):
        run_case(tmp_path, var, B=3, Hq=8, Hkv=Hkv, Sq=1531, Sk=1531, D=D, dtype=dtype, config={**FA3, **cfg},
                 device="cuda", name=f"fa3_{name}")


@pytest.mark.gpu
def test_gpu_fa3_transformers_layout_returns_its_output(tmp_path, no_work_gate):
    """(B, S, H, D) views: the module copies the inputs to TMA's layout and returns a new output."""
    _need_hopper()
    run_case(tmp_path, V.sliding_window(64) + V.alibi(4), B=2, Hq=4, Hkv=2, Sq=700, Sk=700, D=128,
             dtype=torch.bfloat16, config=FA3, device="cuda", layout="bshd")


@pytest.mark.gpu
def test_gpu_fa3_misaligned_views(tmp_path, no_work_gate):
    """Inputs that start at an odd element (16-byte TMA alignment broken) are copied, not misread."""
    _need_hopper()
    var = V.sliding_window(128)
    prob = make_problem(var, 1, 2, 2, 256, 256, 64, 64, torch.bfloat16, "cuda")
    path = tmp_path / "fa3.py"
    path.write_text(generate_source(prob, FA3))
    kern = load_source_file(path, name_hint="fa3")
    from tests.helpers import assert_close_to_ref
    from torch_r1attn.reference import eager_attention, reference_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    buf = torch.randn(3 * 2 * 256 * 64 + 1, device="cuda", dtype=torch.bfloat16, generator=g)
    q, k, v = (buf[1 + i * 2 * 256 * 64: 1 + (i + 1) * 2 * 256 * 64].view(1, 2, 256, 64) for i in range(3))
    obuf = torch.full((2 * 256 * 64 + 3,), float("nan"), device="cuda", dtype=torch.bfloat16)
    out = obuf[3:].view(1, 2, 256, 64)
    res = kern(q, k, v, out, 0.125)
    ref = reference_attention(q, k, v, var, 0.125, dtype=torch.float64)
    assert_close_to_ref(res, ref, baseline=eager_attention(q, k, v, var, 0.125, compute_dtype=torch.bfloat16))


@pytest.mark.gpu
def test_gpu_fa3_through_the_verifier(cache_dir, no_work_gate):
    """The verifier's full protocol (subprocess worker, edge shapes of the bucket, written /
    inputs-unchanged / determinism, timing) passes an fa3 candidate."""
    _need_hopper()
    from torch_r1attn.search.base import Candidate
    from torch_r1attn.verify import verify

    prob = make_problem((V.causal() + V.alibi(8)).to("cuda"), 2, 8, 8, 1024, 1024, 128, 128, torch.bfloat16, "cuda")
    cand = Candidate(source=generate_source(prob, FA3), language="triton", proposer="templates",
                     config=dict(normalize_config(prob, FA3)), provenance={"template": "fa3"})
    res = verify(cand, prob)
    assert res.ok and res.verdict == "pass", res.feedback
    assert {"values", "written", "inputs_unchanged", "deterministic"} <= {c.name for c in res.checks}
    assert res.time_ms is not None and res.time_ms > 0
