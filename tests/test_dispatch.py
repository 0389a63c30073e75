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


@pytest.fixture
def inject():
    made = []

    def put(q, k, v, variant, strided_out=False):
        kern = _Recorder()
        key = table_key(q, k, v, variant)
        dispatch._table[key] = Resolved(spec=AttentionSpec.from_call(q, k, v, variant.key), path="eager",
                                        reason="test", kernel=kern, unsupported=_UNCHECKED, strided_out=strided_out)
        made.append(key)
        return kern

    yield put
    for key in made:
        dispatch._table.pop(key, None)


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
