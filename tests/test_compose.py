"""Composed candidates (search.compose): prefix-LM from SDPA calls.

The module is plain torch, so the CPU runs it at any size (no interpreter); the GPU tests run it
where it matters (SDPA picks cuDNN there). ``run_case`` (tests/test_templates.py) generates the
module, loads it through the loader, runs it into a NaN-poisoned ``out`` and checks it against the
float64 reference and that no input changed.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_templates import make_problem, run_case
from torch_r1attn import variants as V
from torch_r1attn.loader import load_source_file
from torch_r1attn.search import compose
from torch_r1attn.search.templates import TemplatesProposer, _config_key, generate_source, normalize_config
from torch_r1attn.verify.static import check_source

COMPOSE = {"path": "compose"}


@pytest.mark.parametrize("Sq,Sk,prefix,align", [
    (40, 40, 7, "top_left"),        # prefix inside the sequence
    (40, 40, 1, "top_left"),        # one-key prefix: the causal call alone
    (40, 40, 40, "top_left"),       # prefix = everything: one full-attention call
    (33, 33, 50, "top_left"),       # prefix longer than the keys
    (17, 45, 9, "top_left"),        # Sq < Sk, top-left (SDPA's own alignment)
    (45, 17, 9, "top_left"),        # Sq > Sk: late rows see every key
    (41, 41, 13, "bottom_right"),   # bottom-right, equal lengths: no offset
    (23, 40, 5, "bottom_right"),    # an offset: the written-out mask path
    (40, 23, 30, "bottom_right"),   # negative offset, every row still sees key 0
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_prefix_lm_matches_reference(tmp_path, Sq, Sk, prefix, align, dtype):
    run_case(tmp_path, V.prefix_lm(prefix, align), B=2, Hq=2, Hkv=2, Sq=Sq, Sk=Sk, D=16, dtype=dtype, config=COMPOSE)


@pytest.mark.parametrize("Hq,Hkv,D,Dv", [(4, 1, 64, 64), (6, 2, 80, 80), (2, 2, 128, 64)], ids=["gqa4-d64", "gqa3-d80", "dv64-d128"])
def test_prefix_lm_gqa_and_head_dims(tmp_path, Hq, Hkv, D, Dv):
    run_case(tmp_path, V.prefix_lm(19), B=1, Hq=Hq, Hkv=Hkv, Sq=67, Sk=67, D=D, Dv=Dv, dtype=torch.float32,
             config=COMPOSE)


def test_prefix_lm_transformers_layout(tmp_path):
    run_case(tmp_path, V.prefix_lm(11), B=2, Hq=4, Hkv=2, Sq=37, Sk=37, D=32, dtype=torch.float32, config=COMPOSE,
             layout="bshd")


def test_one_module_serves_other_lengths_of_its_bucket(tmp_path):
    """Prefix-LM is length-free: dispatch hands one cached module every length of the bucket, so the
    module built at (64, 64) must be right at (50, 50), (30, 64) and (64, 37) too."""
    from torch_r1attn.reference import reference_attention
    from tests.helpers import assert_close_to_ref

    for align in ("top_left", "bottom_right"):
        var = V.prefix_lm(21, align)
        path = tmp_path / f"k_{align}.py"
        path.write_text(generate_source(make_problem(var, 1, 2, 2, 64, 64, 16, 16, torch.float32), COMPOSE))
        kern = load_source_file(path, name_hint=f"k_{align}")
        g = torch.Generator().manual_seed(3)
        for sq, sk in ((64, 64), (50, 50), (30, 64), (64, 37)):
            q, k, v = (torch.randn(1, 2, s, 16, generator=g) for s in (sq, sk, sk))
            out = kern(q, k, v, torch.full((1, 2, sq, 16), float("nan")), 0.25)
            assert_close_to_ref(out, reference_attention(q, k, v, var, 0.25), name=f"{align} {sq}x{sk}")


def test_applies_only_to_prefix_lm_alone():
    def prob(var, sq=128):
        return make_problem(var, 1, 2, 1, sq, sq, 16, 16, torch.float16)

    assert compose.applies(prob(V.prefix_lm(9)))
    assert compose.applies(prob(V.prefix_lm(9, "bottom_right")))
    for var in (V.prefix_lm(9) + V.softcap(5.0), V.prefix_lm(9) + V.sliding_window(4), V.causal(),
                V.sliding_window(8), V.prefix_lm(9) + V.alibi(2)):
        assert not compose.applies(prob(var)), var.key
        with pytest.raises(ValueError, match="compose"):
            normalize_config(prob(var), COMPOSE)
    assert not compose.applies(prob(V.prefix_lm(9, "bottom_right"), sq=1))  # decode keeps split-KV
    with pytest.raises(ValueError, match="takes no other knob"):
        normalize_config(prob(V.prefix_lm(9)), {"path": "compose", "BLOCK_M": 64})
    assert normalize_config(prob(V.prefix_lm(9)), COMPOSE) == COMPOSE


def test_proposer_offers_it_first_and_never_steps_it():
    prob = make_problem(V.prefix_lm(1024), 4, 32, 32, 4096, 4096, 128, 128, torch.bfloat16, "cuda")
    tp = TemplatesProposer()
    r1 = tp.propose(prob, [], 4)
    assert r1[0].config == COMPOSE and r1[0].provenance == {"template": "compose"}
    assert all(c.config["path"] == "prefill" for c in r1[1:])
    from tests.test_templates import _fb

    # compose was fastest: round two steps the Triton configs, never proposes compose again
    hist = [_fb(r1[0], True, 0.5)] + [_fb(c, True, 1.0 + i) for i, c in enumerate(r1[1:])]
    r2 = tp.propose(prob, hist, 8)
    assert r2 and all(c.config["path"] == "prefill" for c in r2)
    seen = {_config_key(h.candidate.config) for h in hist}
    assert all(_config_key(c.config) not in seen for c in r2)
    # other variants: no composed candidate
    other = make_problem(V.sliding_window(1024), 4, 32, 32, 4096, 4096, 128, 128, torch.bfloat16, "cuda")
    assert all(c.config["path"] != "compose" for c in tp.propose(other, [], 8))


def test_static_check_exempts_only_the_verbatim_module():
    src = generate_source(make_problem(V.prefix_lm(7), 1, 2, 1, 40, 40, 16, 16, torch.float16), COMPOSE)
    assert compose.is_composed_source(src) and check_source(src, "triton") == []
    tampered = {
        "extra import": src.replace("PREFIX = 7", "PREFIX = 7\nimport os"),
        "code in the header": src.replace("import torch\n", "import torch\nX = torch.zeros(1)\n", 1),
        "a changed body": src.replace("    return res\n", "    return res * 1.01\n"),
        "an extra function": src + "\ndef helper():\n    return 1\n",
        "PREFIX not an int": src.replace("PREFIX = 7", "PREFIX = 'x'"),
        "PREFIX zero": src.replace("PREFIX = 7", "PREFIX = 0"),
        "PREFIX a call": src.replace("PREFIX = 7", "PREFIX = int(7)"),
        "a duplicated name": src.replace("PREFIX = 7", "PREFIX = 7\nPREFIX = 8"),
        "another CONFIG": src.replace("CONFIG = {'path': 'compose'}", "CONFIG = {'path': 'prefill'}"),
    }
    for why, bad in tampered.items():
        assert not compose.is_composed_source(bad), why
        assert check_source(bad, "triton"), f"{why}: the full check must run and refuse it"
    assert not compose.is_composed_source(123)


def test_verifier_accepts_and_times_it(tmp_path, cache_dir):
    """End to end through the verifier on the CPU (subprocess worker, reference trials, the
    written / inputs-unchanged / determinism checks; timing is only meaningful on CUDA)."""
    from torch_r1attn.search.base import Candidate
    from torch_r1attn.verify import verify

    prob = make_problem(V.prefix_lm(9), 1, 2, 2, 48, 48, 16, 16, torch.float32)
    cand = Candidate(source=generate_source(prob, COMPOSE), language="triton", proposer="templates",
                     config=dict(COMPOSE), provenance={"template": "compose"})
    res = verify(cand, prob)
    assert res.ok and res.verdict == "pass", res.feedback
    assert {"values", "written", "inputs_unchanged", "deterministic"} <= {c.name for c in res.checks}
    # the same module with its body changed is refused before it runs
    bad = Candidate(source=cand.source.replace("    return res\n", "    return res * 1.01\n"), language="triton")
    res = verify(bad, prob)
    assert not res.ok and res.reason.startswith("static check")


def _cached_roundtrip(dtype, device, shape, native):
    """A cached composed module through the public API: the first call loads it, the repeats take
    the hot runner (``native``: the C++ fast path's module, which answers after the first repeat);
    every answer is the module's returned tensor, right against the reference; a call of other
    lengths in the same bucket (prefix-LM is length-free) too."""
    import torch_r1attn as r1
    from tests.helpers import assert_close_to_ref
    from torch_r1attn import dispatch
    from torch_r1attn.cache import KernelCache, make_check_case
    from torch_r1attn.reference import eager_attention, reference_attention
    from torch_r1attn.spec import AttentionSpec

    B, H, S, D, P = shape
    var = V.prefix_lm(P).to(device)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, S, D, generator=g).to(device, dtype) for _ in range(3))
    scale = D ** -0.5
    spec = AttentionSpec.from_call(q, k, v, var.key)
    src = generate_source(make_problem(var, B, H, H, S, S, D, D, dtype, device), COMPOSE)
    KernelCache().store(spec, src, "triton", {"config": COMPOSE, "measurements": {"time_ms": 1.0},
                                              "provenance": {"proposer": "test"}},
                        make_check_case(q, k, v, var, scale))
    ref = reference_attention(q.cpu(), k.cpu(), v.cpu(), var.to("cpu"), scale)
    outs = [r1.attention(q, k, v, variant=var, on_miss="off")]
    assert dispatch.status()[0]["kernel"], dispatch.status()
    outs += [r1.attention(q, k, v, variant=var) for _ in range(3)]
    if native is not None:
        assert native.size() == 1
    # on the GPU, flash-attention's rule: 2x PyTorch's own same-dtype error (CPU: ref rounding)
    base = eager_attention(q, k, v, var, scale, compute_dtype=dtype).cpu() if device != "cpu" else None
    for o in outs:
        assert_close_to_ref(o.cpu(), ref, baseline=base, name="cached compose")
    assert len({o.data_ptr() for o in outs}) == len(outs)  # a fresh output every call
    s2 = S - 7  # same bucket, other lengths
    q2, k2, v2 = q[:, :, :s2], k[:, :, :s2], v[:, :, :s2]
    o2 = r1.attention(q2, k2, v2, variant=var)
    assert_close_to_ref(o2.cpu(), reference_attention(q2.cpu(), k2.cpu(), v2.cpu(), var.to("cpu"), scale),
                        baseline=eager_attention(q2, k2, v2, var, scale, compute_dtype=dtype).cpu()
                        if device != "cpu" else None)


@pytest.mark.parametrize("native", [False, True], ids=["python", "cpp"])
def test_cached_compose_entry_through_the_api(cache_dir, request, native):
    from torch_r1attn import dispatch

    if not dispatch.kernels_usable(torch.device("cpu")):
        pytest.skip("CPU tensors take cached modules only under TRITON_INTERPRET=1 (a CUDA machine: the _gpu twin)")
    mod = request.getfixturevalue("cpp_hot") if native else None
    _cached_roundtrip(torch.float32, "cpu", (1, 2, 48, 16, 11), mod)


@pytest.mark.gpu
@pytest.mark.parametrize("native", [False, True], ids=["python", "cpp"])
def test_cached_compose_entry_through_the_api_gpu(cache_dir, request, native):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    mod = request.getfixturevalue("cpp_hot") if native else None
    _cached_roundtrip(torch.bfloat16, "cuda", (2, 8, 1000, 128, 250), mod)


@pytest.mark.gpu
@pytest.mark.parametrize("Sq,Sk,prefix,align,Hq,Hkv,D", [
    (1000, 1000, 250, "top_left", 8, 8, 128),
    (777, 777, 100, "bottom_right", 8, 2, 64),
    (513, 1029, 300, "bottom_right", 4, 4, 128),   # offset: the mask path
    (2048, 2048, 2048, "top_left", 4, 4, 80),
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpu_prefix_lm(tmp_path, Sq, Sk, prefix, align, Hq, Hkv, D, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    run_case(tmp_path, V.prefix_lm(prefix, align), B=2, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, dtype=dtype,
             config=COMPOSE, device="cuda")
