"""Front end + variants + fallback against an independent float64 reference (CPU and GPU).

The reference here is written out in this file (a second, naive implementation: loops over
heads, explicit masks), so a bug in ``variants.py``'s eager math cannot hide in both places.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import torch_r1attn as r1
from torch_r1attn import fallback, variants as V
from tests.helpers import assert_close_to_ref


# ---------------------------------------------------------------- an independent naive reference
def naive(q, k, v, allowed=None, bias=None, scale=None, softcap=None, score_fn=None):
    """float64 attention written from scratch: allowed (Sq,Sk) or (B,H,Sq,Sk) bool, bias additive."""
    q, k, v = q.double(), k.double(), v.double()
    B, Hq, Sq, D = q.shape
    g = Hq // k.shape[1]
    k = k.repeat_interleave(g, 1)
    v = v.repeat_interleave(g, 1)
    scale = 1 / math.sqrt(D) if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    if score_fn is not None:
        s = score_fn(s)
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.double()
    out = torch.zeros(B, Hq, Sq, v.shape[-1], dtype=torch.float64)
    allowed = torch.ones(Sq, k.shape[2], dtype=torch.bool) if allowed is None else allowed
    allowed = allowed.expand(B, Hq, Sq, k.shape[2])
    for b in range(B):
        for h in range(Hq):
            for i in range(Sq):
                a = allowed[b, h, i]
                if not a.any():
                    continue  # fully masked row -> 0
                w = torch.softmax(s[b, h, i][a], dim=0)
                out[b, h, i] = w @ v[b, h][a]
    return out


def pos_grid(Sq, Sk, align="top_left"):
    off = Sk - Sq if align == "bottom_right" else 0
    i = torch.arange(Sq).view(-1, 1) + off
    j = torch.arange(Sk).view(1, -1)
    return i, j


def inputs(B, Hq, Hkv, Sq, Sk, D, Dv=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Sk, Dv or D, generator=g).to(dtype)
    return q, k, v


SIZES = [  # (B, Hq, Hkv, Sq, Sk, D, Dv)
    (1, 2, 2, 1, 1, 64, 64),
    (2, 4, 1, 17, 17, 80, 80),
    (1, 4, 4, 127, 129, 64, 32),
    (1, 8, 2, 129, 127, 128, 128),
    (2, 2, 2, 33, 70, 16, 16),
]


@pytest.fixture(autouse=True)
def _no_search(monkeypatch):
    from torch_r1attn import config, dispatch

    monkeypatch.setenv("R1ATTN_ON_MISS", "off")
    config.set_settings(None)
    dispatch.reset()
    yield
    config.set_settings(None)


def _run(q, k, v, variant, **kw):
    return r1.attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1], variant=variant, **kw)


def _check(out, ref, q):
    base = ref.to(q.dtype)
    assert_close_to_ref(out, ref, base if q.dtype != torch.float32 else None)


# ---------------------------------------------------------------------------------- variants
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ["full", "causal", "causal_br", "sliding", "prefix", "doc_causal",
                                  "alibi_causal", "softcap", "relbias", "sliding_softcap", "scoremod",
                                  "maskmod", "dense_bool", "dense_bias"])
def test_variant_matches_naive_reference(name, size):
    B, Hq, Hkv, Sq, Sk, D, Dv = size
    q, k, v = inputs(B, Hq, Hkv, Sq, Sk, D, Dv)
    i, j = pos_grid(Sq, Sk)
    ib, _ = pos_grid(Sq, Sk, "bottom_right")
    causal = j <= i
    kw = {}
    if name == "full":
        var, ref = None, naive(q, k, v)
    elif name == "causal":
        var, ref = V.causal(), naive(q, k, v, causal)
    elif name == "causal_br":
        var, ref = V.causal("bottom_right"), naive(q, k, v, j <= ib)
    elif name == "sliding":
        var, ref = V.sliding_window(5), naive(q, k, v, (i - j >= 0) & (i - j < 5))
    elif name == "prefix":
        var, ref = V.prefix_lm(7), naive(q, k, v, (j < 7) | causal)
    elif name == "doc_causal":
        L = max(Sq, Sk)
        doc = torch.arange(L) // 6
        var = V.causal() + V.document(doc)
        ref = naive(q, k, v, causal & (doc[i.clamp(max=L - 1)] == doc[j]))
    elif name == "alibi_causal":
        slopes = V.alibi_slopes(Hq)
        var = V.causal() + V.alibi(Hq)
        bias = slopes.view(1, Hq, 1, 1) * (j - i).view(1, 1, Sq, Sk)
        ref = naive(q, k, v, causal, bias=bias)
    elif name == "softcap":
        var, ref = V.softcap(2.0), naive(q, k, v, softcap=2.0)
    elif name == "relbias":
        R = 4
        table = torch.randn(Hq, 2 * R + 1)
        idx = (j - i).clamp(-R, R) + R
        var, ref = V.relative_bias(table), naive(q, k, v, bias=table[:, idx].unsqueeze(0))
    elif name == "sliding_softcap":
        var = V.sliding_window(9) + V.softcap(3.0)
        ref = naive(q, k, v, (i - j >= 0) & (i - j < 9), softcap=3.0)
    elif name == "scoremod":
        var = V.score_mod(lambda s, b, h, qi, ki: s - 0.1 * (qi - ki).abs())
        ref = naive(q, k, v, bias=-0.1 * (i - j).abs().view(1, 1, Sq, Sk))
    elif name == "maskmod":
        var = V.mask_mod(lambda b, h, qi, ki: (qi + ki) % 3 != 1)
        ref = naive(q, k, v, (i + j) % 3 != 1)
    elif name == "dense_bool":
        m = torch.rand(B, 1, Sq, Sk, generator=torch.Generator().manual_seed(1)) > 0.4
        var, ref, kw = None, naive(q, k, v, m), {"attn_mask": m}
    else:  # dense_bias
        bias = torch.randn(1, Hq, Sq, Sk, generator=torch.Generator().manual_seed(2))
        var, ref, kw = None, naive(q, k, v, bias=bias), {"attn_mask": bias}
    out = _run(q, k, v, var, **kw)
    assert out.shape == (B, Hq, Sq, Dv) and out.dtype == q.dtype
    _check(out, ref, q)


def test_composition_order_is_canonical():
    d = torch.zeros(8, dtype=torch.long)
    assert (V.causal() + V.document(d)).key == (V.document(d) + V.causal()).key == "causal+doc"
    assert (V.causal() + V.sliding_window(4)).key == "sw4"
    assert (V.softcap(2.0) + V.alibi(2)).key != (V.alibi(2) + V.softcap(2.0)).key  # score order matters
    assert V.causal("bottom_right").key == "causal@br"
    assert V.alibi(2).key == "alibi"  # not positional-aligned part only: no @br suffix needed


def test_callable_keys_differ_for_different_functions():
    a = V.score_mod(lambda s, b, h, q, k: s * 2).key
    b = V.score_mod(lambda s, b, h, q, k: s * 3).key
    assert a != b and a.startswith("sm-")
    scale = 2.0
    c1 = V.score_mod(lambda s, b, h, q, k: s * scale).key
    scale = 3.0
    c2 = V.score_mod(lambda s, b, h, q, k: s * scale).key
    assert c1 != c2  # captured scalars are part of the key


# ------------------------------------------------------------------------- SDPA equivalence
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_sdpa_semantics_match(dtype, device):
    q, k, v = (t.to(device) for t in inputs(2, 4, 2, 33, 47, 64, dtype=dtype))
    for kw in ({}, {"is_causal": True}, {"scale": 0.3},
               {"attn_mask": torch.rand(2, 1, 33, 47, device=device) > 0.3},
               {"attn_mask": torch.randn(33, 47, device=device).to(dtype)}):
        out = r1.attention(q, k, v, enable_gqa=True, **kw)
        ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)
        torch.testing.assert_close(out, ref)


def test_fully_masked_rows_match_sdpa(device):
    q, k, v = (t.to(device) for t in inputs(1, 2, 2, 8, 8, 32))
    m = torch.ones(8, 8, dtype=torch.bool, device=device)
    m[3] = False
    out = r1.attention(q, k, v, attn_mask=m)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
    torch.testing.assert_close(out, torch.nan_to_num(ref), atol=1e-6, rtol=0)
    assert (out[:, :, 3] == 0).all()
    # a structured variant that masks whole rows: prefix 0 + sliding window over nothing is not
    # possible, so use a mask_mod that kills row 5
    out2 = r1.attention(q, k, v, variant=V.mask_mod(lambda b, h, qi, ki: qi != 5))
    assert torch.isfinite(out2).all() and (out2[:, :, 5] == 0).all()


def test_module_matches_functional():
    q, k, v = inputs(1, 4, 4, 16, 16, 32)
    m = r1.R1Attention(V.sliding_window(4) + V.softcap(5.0))
    torch.testing.assert_close(m(q, k, v), r1.attention(q, k, v, variant=V.sliding_window(4) + V.softcap(5.0)))
    assert "sw4+softcap5" in repr(m)


def test_gradients_flow_through_fallback():
    q, k, v = (t.requires_grad_() for t in inputs(1, 2, 2, 9, 9, 16))
    out = r1.attention(q, k, v, variant=V.causal() + V.alibi(2))
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ------------------------------------------------------------------------------ bad inputs
def _bad(**over):
    q, k, v = inputs(1, 4, 2, 8, 8, 16)
    args = dict(query=q, key=k, value=v, enable_gqa=True)
    args.update(over)
    return args


@pytest.mark.parametrize("over, exc, match", [
    (dict(query=torch.randn(4, 8, 16)), ValueError, "query must have shape"),
    (dict(key=torch.randn(1, 2, 8, 8)), ValueError, "head dim"),
    (dict(value=torch.randn(1, 2, 9, 16)), ValueError, "length"),
    (dict(key=torch.randn(1, 3, 8, 16), value=torch.randn(1, 3, 8, 16)), ValueError, "multiple"),
    (dict(enable_gqa=False), ValueError, "enable_gqa"),
    (dict(query=torch.randn(1, 4, 8, 16, dtype=torch.float16)), TypeError, "dtypes differ"),
    (dict(query=torch.randint(0, 3, (1, 4, 8, 16))), TypeError, "query must be float"),
    (dict(attn_mask=torch.ones(3, 8, dtype=torch.bool)), ValueError, "does not broadcast"),
    (dict(attn_mask=torch.ones(8, 8, dtype=torch.int32)), TypeError, "attn_mask must be bool"),
    (dict(attn_mask=torch.ones(8, 8, dtype=torch.bool), is_causal=True), ValueError, "together"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(scale="x"), TypeError, "scale"),
    (dict(dropout_p=1.5), ValueError, "dropout_p"),
    (dict(variant="causal"), TypeError, "variant must be"),
    (dict(variant=V.alibi(3)), ValueError, "3 slopes"),
    (dict(variant=V.document(torch.zeros(4, dtype=torch.long))), ValueError, "doc_ids has length"),
    (dict(variant=V.relative_bias(torch.randn(3, 5))), ValueError, "rows"),
    (dict(query=torch.randn(1, 4, 8, 300), key=torch.randn(1, 2, 8, 300)), ValueError, "head dims up to"),
    (dict(query=torch.randn(1, 4, 0, 16)), ValueError, "empty"),
])
def test_bad_input_raises_clear_error(over, exc, match):
    with pytest.raises(exc, match=match):
        r1.attention(**_bad(**over))


@pytest.mark.parametrize("make, exc, match", [
    (lambda: V.sliding_window(0), ValueError, "sliding_window size"),
    (lambda: V.sliding_window(2.5), TypeError, "sliding_window size"),
    (lambda: V.prefix_lm(-1), ValueError, "prefix_len"),
    (lambda: V.softcap(0.0), ValueError, "softcap"),
    (lambda: V.softcap(float("inf")), ValueError, "softcap"),
    (lambda: V.alibi(0), ValueError, "num_heads"),
    (lambda: V.alibi(torch.tensor([1.0, float("nan")])), ValueError, "finite"),
    (lambda: V.relative_bias(torch.randn(2, 4)), ValueError, "odd"),
    (lambda: V.document(torch.rand(8)), TypeError, "integer"),
    (lambda: V.score_mod(lambda s, b: s), TypeError, "5 arguments"),
    (lambda: V.mask_mod(3), TypeError, "callable"),
    (lambda: V.causal("middle"), ValueError, "align"),
    (lambda: V.causal("top_left") + V.causal("bottom_right"), ValueError, "alignments"),
])
def test_bad_variant_parameters(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


# ------------------------------------------------------------------------------ fallback choice
def test_fallback_choice_cpu_and_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fallback.choose(V.causal(), cpu)[0] == "sdpa"
    assert fallback.choose(V.softcap(3.0), cpu)[0] == "eager"
    assert fallback.choose(V.causal(), cuda)[0] == "sdpa"
    assert fallback.choose(V.sliding_window(8), cuda)[0] == "flex"
    assert fallback.choose(V.causal() + V.relative_bias(torch.zeros(1, 3)), cuda)[0] == "flex"
    assert fallback.choose(V.relative_bias(torch.zeros(1, 3)), cuda)[0] == "sdpa"  # no causal skipping to gain
    assert fallback.choose(V.causal() + V.alibi(2), cuda)[0] == "flex"
    assert fallback.choose(V.softcap(3.0), cuda)[0] == "flex"


def test_fallback_logged_once_per_signature(caplog):
    import logging

    q, k, v = inputs(1, 2, 2, 8, 8, 16)
    with caplog.at_level(logging.INFO, logger="torch_r1attn"):
        for _ in range(3):
            r1.attention(q, k, v, variant=V.softcap(4.0))
    msgs = [r.getMessage() for r in caplog.records if "softcap4" in r.getMessage()]
    assert len(msgs) == 1, msgs


# ---------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["causal", "sliding", "doc", "alibi", "softcap", "relbias", "prefix", "decode"])
def test_gpu_fallback_variants(name, dtype):
    B, Hq, Hkv, S, D = 2, 8, 2, 1024, 128
    Sq = 1 if name == "decode" else S
    q, k, v = (t.cuda() for t in inputs(B, Hq, Hkv, Sq, S, D, dtype=dtype))
    var = {
        "causal": V.causal(), "sliding": V.sliding_window(256), "prefix": V.prefix_lm(256),
        "doc": V.causal() + V.document((torch.arange(S) // 100).cuda()),
        "alibi": V.causal() + V.alibi(Hq), "softcap": V.causal() + V.softcap(30.0),
        "relbias": V.causal() + V.relative_bias(torch.randn(Hq, 257).cuda()),
        "decode": V.causal("bottom_right"),
    }[name]
    out = r1.attention(q, k, v, enable_gqa=True, variant=var)
    from torch_r1attn.reference import eager_attention

    ref = eager_attention(q, k, v, var.to("cuda"), 1 / math.sqrt(D))
    low = eager_attention(q, k, v, var.to("cuda"), 1 / math.sqrt(D), compute_dtype=dtype)
    assert_close_to_ref(out, ref, low)


def test_call_memo_hits_for_a_reused_variant_and_never_pins_big_tensors():
    from torch_r1attn import functional

    functional._validated.clear()
    q, k, v = torch.randn(1, 2, 33, 16), torch.randn(1, 2, 33, 16), torch.randn(1, 2, 33, 16)
    var = V.causal() + V.softcap(20.0)
    a = r1.attention(q, k, v, variant=var)
    b = r1.attention(q, k, v, variant=var)
    assert len(functional._validated) == 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    view = torch.ones(1, 2, 33, 33 * 1024, dtype=torch.bool)[..., :33]  # small view of a 2.2 MB buffer
    r1.attention(q, k, v, variant=V.Variant([V.DenseMask(view)]))
    assert len(functional._validated) == 1  # a mask holding > 1 MiB is not kept alive by the memo
    r1.attention(q, k, v, variant=V.Variant([V.DenseMask(torch.ones(1, 1, 33, 33, dtype=torch.bool))]))
    assert len(functional._validated) == 2  # a small one is
    with pytest.raises(ValueError, match=r"dense mask of shape \(4, 2, 33, 33\) does not broadcast.*dim B"):
        r1.attention(q, k, v, variant=V.Variant([V.DenseMask(torch.ones(4, 2, 33, 33, dtype=torch.bool))]))
    with pytest.raises(ValueError, match="dense bias of shape .* does not broadcast.*dim Sk"):
        r1.attention(q, k, v, variant=V.Variant([V.DenseBias(torch.zeros(1, 1, 33, 34))]))


def test_decode_steps_reuse_validation_but_length_checks_still_run(monkeypatch):
    """Growing Sk by one per step (decoding) hits the length-bucketed memo: no full validation per
    step, but what depends on the exact lengths is still checked."""
    from torch_r1attn import functional

    functional._validated.clear()
    functional._by_length.clear()
    full = []
    real = functional._validate
    monkeypatch.setattr(functional, "_validate", lambda *a: full.append(1) or real(*a))
    q = torch.randn(1, 4, 1, 16)
    kb, vb = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 64, 16)
    var = V.causal("bottom_right") + V.softcap(10.0)
    for L in range(33, 65):  # one length bucket
        out = r1.attention(q, kb[:, :, :L], vb[:, :, :L], enable_gqa=True, variant=var)
        ref = eager_reference(q, kb[:, :, :L], vb[:, :, :L], var)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert len(full) == 1
    with pytest.raises(ValueError, match="key has length 40 but value has length 39"):
        r1.attention(q, kb[:, :, :40], vb[:, :, :39], enable_gqa=True, variant=var)
    docs = V.causal("bottom_right") + V.document(torch.zeros(48, dtype=torch.long))
    r1.attention(q, kb[:, :, :40], vb[:, :, :40], enable_gqa=True, variant=docs)
    with pytest.raises(ValueError, match="doc_ids has length 48"):
        r1.attention(q, kb[:, :, :50], vb[:, :, :50], enable_gqa=True, variant=docs)


def eager_reference(q, k, v, var):
    from torch_r1attn.reference import reference_attention

    return reference_attention(q, k, v, var, 1 / math.sqrt(q.shape[-1]), dtype=torch.float64).to(q.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_eager_in_low_precision_takes_a_score_mod_that_promotes(dtype):
    """A score_mod adding a captured float32 tensor promotes low-precision scores to float32; the
    eager path (and the verifier's low-precision reference, which found it on the H200) must
    still compute in ``compute_dtype`` instead of failing in P @ V."""
    from torch_r1attn.reference import eager_attention, reference_attention

    g = torch.Generator().manual_seed(0)
    tab = torch.randn(4, generator=g) * 0.5

    def head_bias(score, b, h, q_idx, kv_idx):
        return score + tab[h]

    var = V.causal() + V.score_mod(head_bias)
    q, k, v = (torch.randn(1, 4, 33, 16, generator=g).to(dtype) for _ in range(3))
    low = eager_attention(q, k, v, var, 0.25, compute_dtype=dtype)
    assert low.dtype == dtype
    ref = reference_attention(q, k, v, var, 0.25)
    assert_close_to_ref(low, ref, name="eager")
    out = r1.attention(q, k, v, variant=var, on_miss="off")
    assert_close_to_ref(out, ref)
