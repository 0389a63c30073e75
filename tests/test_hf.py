"""transformers integration: attn_implementation="r1attn" matches "eager" (CPU, fp32, no search)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from transformers import masking_utils as mu  # noqa: E402

from torch_r1attn import config  # noqa: E402
from torch_r1attn.integrations import hf  # noqa: E402
from tests.helpers import assert_close_to_ref  # noqa: E402

MODELS = {
    "llama": dict(),
    "mistral": dict(sliding_window=8),  # window < sequence length
    "qwen2": dict(num_key_value_heads=2),  # GQA
    "gemma2": dict(num_key_value_heads=2, head_dim=16, sliding_window=8, attn_logit_softcapping=5.0,
                   final_logit_softcapping=30.0, query_pre_attn_scalar=16),
}


@pytest.fixture(autouse=True)
def _no_search(monkeypatch, cache_dir):
    monkeypatch.setenv("R1ATTN_ON_MISS", "off")
    config.set_settings(None)
    hf.register()
    yield
    config.set_settings(None)


def _config(model_type, **extra):
    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=128, max_position_embeddings=256)
    kw.update(MODELS[model_type])
    kw.update(extra)
    return AutoConfig.for_model(model_type, **kw)


def _pair(model_type, dtype=torch.float32, device="cpu"):
    torch.manual_seed(0)
    cfg = _config(model_type)
    eager = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").to(device, dtype).eval()
    ours = AutoModelForCausalLM.from_config(cfg, attn_implementation="r1attn").to(device, dtype).eval()
    ours.load_state_dict(eager.state_dict())
    assert ours.config._attn_implementation == "r1attn"
    return eager, ours


def _inputs(device="cpu", S=20):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, S), generator=g).to(device)
    am = torch.ones(2, S, dtype=torch.long, device=device)
    am[1, :5] = 0  # left padding
    return ids, am


@pytest.mark.parametrize("model_type", list(MODELS))
@pytest.mark.parametrize("padded", [False, True])
def test_logits_match_eager(model_type, padded):
    eager, ours = _pair(model_type)
    ids, am = _inputs()
    mask = am if padded else None
    with torch.no_grad():
        a = eager(ids, attention_mask=mask).logits
        b = ours(ids, attention_mask=mask).logits
    keep = am.bool() if padded else torch.ones_like(am, dtype=torch.bool)
    assert_close_to_ref(b[keep], a[keep].double(), name=f"{model_type} logits")


@pytest.mark.parametrize("model_type", list(MODELS))
def test_greedy_generation_matches_eager(model_type):
    eager, ours = _pair(model_type)
    ids, am = _inputs()
    with torch.no_grad():
        a = eager.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False)
        b = ours.generate(ids, attention_mask=am, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)


def test_masks_are_structured(monkeypatch):
    """The attention function sees causal/window/padding parts, bottom-right when decoding."""
    seen = []
    real = hf.r1attn_attention_forward

    def spy(module, q, k, v, mask, **kw):
        seen.append(mask)
        return real(module, q, k, v, mask, **kw)

    from transformers import AttentionInterface

    AttentionInterface.register("r1attn", spy)
    try:
        _, ours = _pair("gemma2")
        ids, am = _inputs()
        with torch.no_grad():
            ours.generate(ids, attention_mask=am, max_new_tokens=2, do_sample=False)
    finally:
        hf.register()
    keys = [m.variant.key for m in seen]
    assert not any(m.dense for m in seen)
    assert "dmask-b1h0q0k1+sw8" in keys and "causal+dmask-b1h0q0k1" in keys  # prefill, both layer types
    assert "causal+dmask-b1h0q0k1@br" in keys  # decode: bottom-right + padding
    assert any(k.startswith("sw8@br") for k in keys)


def test_mask_function_packed_documents():
    """Packed position ids become Document parts, and the result equals transformers' dense mask."""
    from torch_r1attn.variants import IndexGrid

    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4]])
    psm = mu.find_packed_sequence_indices(pos)
    for base in (mu.causal_mask_function, mu.sliding_window_causal_mask_function(2)):
        fn = mu.and_masks(mu.remap_positions_for_packed_sequence(base, pos), mu.packed_sequence_mask_function(psm))
        sm = hf.r1attn_mask(1, 10, 10, mask_function=fn)
        assert not sm.dense and "doc" in sm.variant.key
        want = mu.sdpa_mask(1, 10, 10, mask_function=fn, allow_is_causal_skip=False)
        got = sm.variant.dense_mask(1, 1, 10, 10, "cpu")
        assert torch.equal(got.expand_as(want), want)


def test_mask_function_unknown_pattern_is_dense():
    odd = mu.and_masks(mu.causal_mask_function, lambda b, h, q, kv: (kv % 2) == 0)
    am = torch.ones(1, 6, dtype=torch.bool)
    sm = hf.r1attn_mask(1, 6, 6, mask_function=odd, attention_mask=am)
    assert sm.dense
    want = mu.sdpa_mask(1, 6, 6, mask_function=odd, attention_mask=am, allow_is_causal_skip=False)
    assert torch.equal(sm.variant.parts[0].mask_tensor, want)


def test_mask_function_misaligned_offsets_are_dense():
    sm = hf.r1attn_mask(1, 2, 8, q_offset=3, kv_offset=0)  # static-cache-like: neither alignment
    assert sm.dense
    sm = hf.r1attn_mask(1, 2, 8, q_offset=6, kv_offset=0)
    assert not sm.dense and sm.variant.key == "causal@br"


def test_attention_function_errors():
    q = torch.randn(1, 2, 4, 8)
    mod = torch.nn.Module()
    with pytest.raises(ValueError, match="mask made for"):
        hf.r1attn_attention_forward(mod, q, q, q, hf.r1attn_mask(1, 3, 3))
    with pytest.raises(TypeError, match="unsupported attention_mask"):
        hf.r1attn_attention_forward(mod, q, q, q, "causal")


def test_set_attn_implementation():
    eager, _ = _pair("llama")
    eager.set_attn_implementation("r1attn")
    assert eager.config._attn_implementation == "r1attn"


@pytest.mark.slow
def test_llama_compile_fullgraph_matches_eager():
    eager, ours = _pair("llama")
    ids, am = _inputs()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(lambda i, m: ours(i, attention_mask=m, use_cache=False).logits, fullgraph=True,
                      backend=backend)
    with torch.no_grad():
        a = eager(ids, attention_mask=am).logits
        b = f(ids, am)
    keep = am.bool()
    assert_close_to_ref(b[keep], a[keep].double())
    assert sum("r1attn.attention" in str(n.target) for n in graphs[0].graph.nodes) == 2  # one per layer


@pytest.mark.gpu
@pytest.mark.parametrize("model_type", list(MODELS))
def test_gpu_bf16_generation_matches_sdpa_or_eager(model_type):
    eager, ours = _pair(model_type, torch.bfloat16, "cuda")
    ids, am = _inputs("cuda", S=96)
    with torch.no_grad():
        a = eager.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False)
        b = ours.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False)
    assert torch.equal(a, b)


def test_layers_share_one_variant_object_so_the_call_memo_hits():
    """Every layer of every forward gets the same Variant object for a tensor-free mask pattern
    (a new object per layer cost a full validation per call: ~28 us on the CPU, ~130 us per layer
    on the H200's host in the Gemma-2 end-to-end run)."""
    from torch_r1attn import functional

    a = hf.r1attn_mask(2, 16, 16, mask_function=mu.causal_mask_function, attention_mask=None)
    b = hf.r1attn_mask(2, 16, 16, mask_function=mu.causal_mask_function,
                       attention_mask=torch.ones(2, 16, dtype=torch.bool))
    assert a.variant is b.variant and a.variant.key == "causal" and not a.variant.tensors()
    sw = hf.r1attn_mask(2, 16, 16, mask_function=mu.and_masks(mu.sliding_window_overlay(4),
                                                               mu.causal_mask_function), attention_mask=None)
    assert sw.variant.key == "sw4" and sw.variant is not a.variant
    pad = torch.ones(2, 16, dtype=torch.bool)
    pad[0, :3] = False
    padded = hf.r1attn_mask(2, 16, 16, mask_function=mu.causal_mask_function, attention_mask=pad)
    assert padded.variant.tensors() and padded.variant is not a.variant  # the padding row is kept

    class Layer(torch.nn.Module):
        is_causal, scaling = True, 0.125

        class config:
            attn_logit_softcapping = 30.0

    q, k, v = torch.randn(2, 4, 16, 64), torch.randn(2, 2, 16, 64), torch.randn(2, 2, 16, 64)
    functional._validated.clear()
    outs = [hf.r1attn_attention_forward(Layer(), q, k, v, m)[0] for m in (a, b, a)]
    assert len(functional._validated) == 1  # three layers, one validation
    assert hf._with_softcap(a.variant, 30.0) is hf._with_softcap(b.variant, 30.0)
    torch.testing.assert_close(outs[0], outs[2], rtol=0, atol=0)
