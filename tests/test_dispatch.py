"""The cache-hit hot path of dispatch, with a stand-in kernel injected into the table."""

import pytest
import torch

import torch_r1attn as r1
from torch_r1attn import dispatch, variants as V
from torch_r1attn.dispatch import _UNCHECKED, Resolved, table_key
from torch_r1attn.spec import AttentionSpec


class _Recorder:
    """A kernel that records the ``out`` it was handed and fills it with a marker."""

    def __init__(self):
        self.outs = []

    def fn(self, q, k, v, out, scale, **tensors):
        self.outs.append(out)
        out.fill_(7.0)

    def unsupported(self, q, k, v):
        return None


class _Returner(_Recorder):
    """A kernel that leaves ``out`` alone and returns its own output (a composed module)."""

    def fn(self, q, k, v, out, scale, **tensors):
        self.outs.append(out)
        return torch.full_like(out, 5.0)


@pytest.fixture(params=["python", "cpp"])
def inject(request):
    """Put a stand-in kernel in the table. Each test runs twice: repeat calls served by the Python
    hot runner, then with the C++ fast path (csrc/hotpath.cpp) asked first."""
    if request.param == "cpp":
        request.getfixturevalue("cpp_hot")
    made = []

    def put(q, k, v, variant, strided_out=False, kind=_Recorder):
        kern = kind()
        key = table_key(q, k, v, variant)
        dispatch._table[key] = Resolved(spec=AttentionSpec.from_call(q, k, v, variant.key), path="eager",
                                        reason="test", kernel=kern, unsupported=_UNCHECKED, strided_out=strided_out)
        made.append(key)
        return kern

    yield put
    dispatch.reset()  # the entries, and the front end's hot runners that hold them


@pytest.mark.parametrize("dv", [64, 24])
def test_hit_hands_the_kernel_a_fresh_contiguous_out(inject, dv):
    var = V.causal() + V.softcap(30.0)
    # q as a transposed view, the layout transformers passes
    q = torch.randn(2, 17, 4, 64).transpose(1, 2)
    k, v = torch.randn(2, 2, 17, 64), torch.randn(2, 2, 17, dv)
    kern = inject(q, k, v, var)
    a = r1.attention(q, k, v, enable_gqa=True, variant=var)
    b = r1.attention(q, k, v, enable_gqa=True, variant=var)
    assert len(kern.outs) == 2 and kern.outs[0] is a and kern.outs[1] is b
    assert a.shape == (2, 4, 17, dv) and a.is_contiguous() and a.dtype == q.dtype
    assert a.data_ptr() != b.data_ptr() and bool((a == 7.0).all())


def test_a_kernel_that_returns_its_output_is_answered_with_it(inject):
    """The loader's contract lets a kernel return its result instead of writing out (search.compose):
    the first call, the Python hot runner and the C++ fast path all hand back that tensor."""
    var = V.prefix_lm(5)
    q, k, v = torch.randn(1, 2, 17, 32), torch.randn(1, 2, 17, 32), torch.randn(1, 2, 17, 32)
    kern = inject(q, k, v, var, kind=_Returner)
    got = [r1.attention(q, k, v, variant=var) for _ in range(3)]
    assert len(kern.outs) == 3
    for a, handed in zip(got, kern.outs):
        assert a is not handed and bool((a == 5.0).all()) and a.shape == (1, 2, 17, 32)


def test_grad_or_dropout_skip_the_kernel(inject):
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    kern = inject(q, k, v, V.causal())
    r1.attention(q.requires_grad_(), k, v, variant=V.causal())
    r1.attention(q.detach(), k, v, variant=V.causal(), dropout_p=0.5)
    assert kern.outs == []
    r1.attention(q.detach(), k, v, variant=V.causal())
    assert len(kern.outs) == 1


@pytest.mark.parametrize("strided_out", [True, False])
def test_transformers_layout_written_directly_only_by_kernels_verified_on_it(inject, strided_out):
    """HF transposes the result to (B, S, H, Dv): a kernel whose cache entry passed the verifier's
    strided-layout trial writes that layout, so the transpose + .contiguous() copies nothing."""
    from torch_r1attn import functional
    from torch_r1attn.integrations import hf

    var = V.causal()
    q = torch.randn(2, 17, 4, 32).transpose(1, 2)
    k, v = torch.randn(2, 17, 2, 32).transpose(1, 2), torch.randn(2, 17, 2, 32).transpose(1, 2)
    kern = inject(q, k, v, var, strided_out=strided_out)
    out = functional._attention(q, k, v, enable_gqa=True, variant=var, bshd_out=True)
    assert out.shape == (2, 4, 17, 32)
    assert out.transpose(1, 2).is_contiguous() == strided_out
    assert r1.attention(q, k, v, enable_gqa=True, variant=var).is_contiguous()  # the public API: always (B, H, S, D)

    class Layer(torch.nn.Module):
        is_causal = True

    hf_out, _ = hf.r1attn_attention_forward(Layer(), q, k, v, None)
    assert hf_out.shape == (2, 17, 4, 32) and hf_out.is_contiguous() and bool((hf_out == 7.0).all())
    assert (hf_out.data_ptr() == kern.outs[-1].data_ptr()) == strided_out  # no copy when written in place


def test_kernel_not_verified_on_strided_layouts_gets_contiguous_inputs(inject):
    q = torch.randn(1, 9, 2, 16).transpose(1, 2)
    k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    seen = []
    kern = inject(q, k, v, V.causal(), strided_out=False)
    kern.fn = lambda q, k, v, out, scale, **t: seen.append((q.is_contiguous(), out.is_contiguous()))
    r1.attention(q, k, v, variant=V.causal())
    assert seen == [(True, True)]


class _Scales(_Recorder):
    def __init__(self):
        super().__init__()
        self.scales = []

    def fn(self, q, k, v, out, scale, **tensors):
        self.scales.append(scale)
        super().fn(q, k, v, out, scale, **tensors)


def test_repeat_calls_take_the_hot_runner_and_keep_every_per_call_decision(inject, monkeypatch):
    """After one call through dispatch.forward, a repeat call of a settled kernel entry goes
    straight to the kernel (the ~2x cheaper cache-hit path) and still decides per call: explicit
    scales reach the kernel, a bad scale is an error, grad and odd layouts go through forward."""
    var = V.causal() + V.alibi(4)
    q, k, v = (torch.randn(1, 4, 9, 16) for _ in range(3))
    kern = _Scales()
    inject(q, k, v, var)
    dispatch._table[table_key(q, k, v, var)].kernel = kern
    r1.attention(q, k, v, variant=var)  # through forward: checks SUPPORTS, builds the runner
    calls = []
    real_forward = dispatch.forward
    monkeypatch.setattr(dispatch, "forward", lambda *a, **kw: calls.append(1) or real_forward(*a, **kw))
    out = r1.attention(q, k, v, variant=var)
    out2 = r1.attention(q, k, v, variant=var, scale=0.5)
    assert calls == [] and bool((out == 7.0).all()) and out.data_ptr() != out2.data_ptr()
    assert kern.scales == [0.25, 0.25, 0.5]
    for bad, err in ((float("nan"), ValueError), ("0.5", TypeError)):
        with pytest.raises(err, match="scale"):
            r1.attention(q, k, v, variant=var, scale=bad)
    r1.attention(q, k, v, variant=var, scale=1)  # an int scale: the checked path, then the kernel
    assert kern.scales[-1] == 1.0
    n = len(calls)
    with torch.no_grad():
        r1.attention(q, k, v, variant=var)
    assert len(calls) == n  # no_grad: still the hot runner
    r1.attention(q.clone().requires_grad_(), k, v, variant=var)
    assert len(calls) == n + 1 and len(kern.scales) == 5  # grad: forward, a differentiable fallback
    qt = torch.randn(1, 9, 4, 16).transpose(1, 2)
    seen = []
    kern.fn = lambda q, k, v, out, scale, **t: seen.append(q.is_contiguous())
    r1.attention(qt, k, v, variant=var)
    assert seen == [True]  # not verified on strided layouts: forward hands it a contiguous copy


def test_reset_drops_the_hot_runners(inject):
    var = V.causal()
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    kern = inject(q, k, v, var)
    r1.attention(q, k, v, variant=var)
    r1.attention(q, k, v, variant=var)
    assert len(kern.outs) == 2
    dispatch.reset()  # e.g. `r1attn cache clear`: the next call resolves again (here: no kernels on the CPU)
    out = r1.attention(q, k, v, variant=var)
    assert len(kern.outs) == 2 and not bool((out == 7.0).all())


def test_hot_runner_waits_for_a_settled_entry(inject):
    """No runner while a background search is pending or before SUPPORTS was checked."""
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    var = V.causal()
    inject(q, k, v, var)
    key = table_key(q, k, v, var)
    assert dispatch.hot_runner(key, var) is None  # SUPPORTS not checked yet
    dispatch._table[key].unsupported = None
    dispatch._table[key].pending = object()
    assert dispatch.hot_runner(key, var) is None
    dispatch._table[key].pending = None
    assert dispatch.hot_runner(key, var) is not None
    assert dispatch.hot_runner(key, var) is not None
    dispatch._table[key].pending = object()
    assert dispatch.hot_runner(key, var) is None  # a search may still store a kernel
    assert dispatch.hot_runner(key[:1] + (torch.float64,) + key[2:], var) is False  # never tabled


@pytest.mark.parametrize("how", ["unsupported", "verdict"])
def test_fallback_entries_get_a_runner_that_runs_the_fallback(inject, monkeypatch, how):
    """A kernel that does not support the calls, or a fallback verdict: repeat calls run the
    entry's fallback path without forward, with the same result (grad still goes through forward)."""
    import torch.nn.functional as F

    var = V.causal()
    q, k, v = (torch.randn(1, 4, 9, 16) for _ in range(3))
    kern = inject(q, k, v, var)
    r = dispatch._table[table_key(q, k, v, var)]
    if how == "unsupported":
        kern.unsupported = lambda q, k, v: "Sk above the kernel's maximum"
    else:
        r.kernel = None
    r.path = "sdpa"
    first = r1.attention(q, k, v, variant=var)
    forwards = []
    real = dispatch.forward
    monkeypatch.setattr(dispatch, "forward", lambda *a, **kw: forwards.append(1) or real(*a, **kw))
    again = r1.attention(q, k, v, variant=var, scale=0.3)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    assert forwards == [] and kern.outs == []
    torch.testing.assert_close(again, ref)
    torch.testing.assert_close(first, F.scaled_dot_product_attention(q, k, v, is_causal=True))
    r1.attention(q.clone().requires_grad_(), k, v, variant=var)
    assert forwards == [1]


def test_fallback_entries_are_asked_for_a_runner_once(monkeypatch):
    """A signature that runs a fallback asks dispatch for a hot runner once, not on every call
    (the question cost ~1.4 us per call on the CPU)."""
    asked = []
    real = dispatch.hot_runner
    monkeypatch.setattr(dispatch, "hot_runner", lambda *a, **kw: asked.append(1) or real(*a, **kw))
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    var = V.causal()
    for _ in range(4):
        r1.attention(q, k, v, variant=var, on_miss="off")
    assert len(asked) == 1
    dispatch.reset()


def _outcome(fn):
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - the outcome is the comparison
        return type(e).__name__, str(e).split(",")[0]
    return "ok", tuple(out.shape), out.stride()


@pytest.mark.parametrize("case", ["dropout_false", "dropout_none", "dropout_np", "dropout_tensor", "dropout_int",
                                  "gqa_int", "scale_np", "decode_q_strides"])
def test_a_hot_repeat_call_behaves_like_the_first(inject, case):
    """Whatever the first (validated) call of a signature does with an argument, error or result
    layout, a repeat call that could take the hot runner does the same (review of session 6)."""
    import numpy as np

    var = V.causal()
    q, k, v = torch.randn(1, 4, 9, 16), torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
    kw = {"variant": var, "enable_gqa": True}
    if case == "decode_q_strides":  # (B, 1, H, D) transposed: contiguous, odd strides on the size-1 dim
        q = torch.randn(1, 1, 4, 16).transpose(1, 2)
        k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 2, 9, 16)
        kw["variant"] = var = V.causal(align="bottom_right")
    odd = {"dropout_false": {"dropout_p": False}, "dropout_none": {"dropout_p": None},
           "dropout_np": {"dropout_p": np.float32(0.0)}, "dropout_tensor": {"dropout_p": torch.tensor(0.0)},
           "dropout_int": {"dropout_p": 0}, "gqa_int": {"enable_gqa": 1},
           "scale_np": {"scale": np.float64(0.5)}, "decode_q_strides": {}}[case]
    for entry in ("kernel", "fallback"):
        dispatch.reset()
        kern = inject(q, k, v, var, strided_out=True)
        if entry == "fallback":
            dispatch._table[table_key(q, k, v, var)].kernel = None
            dispatch._table[table_key(q, k, v, var)].path = "sdpa"
        cold = _outcome(lambda: r1.attention(q, k, v, **{**kw, **odd}))
        dispatch.reset()
        kern = inject(q, k, v, var, strided_out=True)
        if entry == "fallback":
            dispatch._table[table_key(q, k, v, var)].kernel = None
            dispatch._table[table_key(q, k, v, var)].path = "sdpa"
        r1.attention(q, k, v, **kw)
        r1.attention(q, k, v, **kw)  # the memo now holds a runner
        r1.attention(q, k, v, **kw)  # and the C++ fast path (when asked) an entry
        hot = _outcome(lambda: r1.attention(q, k, v, **{**kw, **odd}))
        assert hot == cold, (entry, case)
        if case == "decode_q_strides" and entry == "kernel":
            assert cold[0] == "ok" and cold[2] == (64, 16, 16, 1)  # forward's contiguous output
        del kern
