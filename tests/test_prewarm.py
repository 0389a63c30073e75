"""prewarm.signatures_from_config: every signature a model hits, from its config."""

import json

import pytest
import torch

from torch_r1attn.prewarm import attn_config, config_from_args, signatures_from_config


def _keys(sigs):
    return sorted({s.spec.variant for s in sigs})


def test_llama_prefill_and_decode():
    cfg = config_from_args("llama", 4096, 32, 8, 32)
    sigs = signatures_from_config(cfg, [4096], [1, 8], "bf16")
    assert _keys(sigs) == ["causal", "causal@br"]
    pre = [s for s in sigs if s.spec.variant == "causal"]
    dec = [s for s in sigs if s.spec.variant == "causal@br"]
    assert len(pre) == len(dec) == 1  # batch is not in the key: one spec each, deduplicated
    sp = pre[0].spec
    assert (sp.dtype, sp.head_dim, sp.head_dim_v, sp.gqa, sp.sq_bucket, sp.sk_bucket) == ("bf16", 128, 128, 4, 4096, 4096)
    assert sp.example == (1, 32, 8, 4096, 4096)
    assert (dec[0].spec.sq_bucket, dec[0].spec.sk_bucket) == (1, 4096)
    assert dec[0].variant.align == "bottom_right"
    assert "decode" in dec[0].label and "prefill" in pre[0].label


def test_gemma2_layer_types_window_softcap(tmp_path):
    cfg = {"model_type": "gemma2", "hidden_size": 2304, "num_attention_heads": 8, "num_key_value_heads": 4,
           "head_dim": 256, "num_hidden_layers": 4, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
           "layer_types": ["sliding_attention", "full_attention"] * 2}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    sigs = signatures_from_config(str(tmp_path), [2048, 8192], [1], torch.bfloat16)
    assert _keys(sigs) == ["causal+softcap50", "causal+softcap50@br", "sw4096+softcap50", "sw4096+softcap50@br"]
    dec_sw = sorted(s.spec.sk_bucket for s in sigs if s.spec.variant == "sw4096+softcap50@br")
    assert dec_sw == [2048, 4096]  # the sliding cache holds at most the window
    assert all(s.spec.gqa == 2 and s.spec.head_dim == 256 for s in sigs)
    # every signature's variant key is its spec's key, so a job can be built from it
    assert all(s.variant.key == s.spec.variant for s in sigs)


def test_gemma2_without_layer_types_alternates():
    cfg = config_from_args("gemma2", 2304, 8, 4, 4, head_dim=256, sliding_window=4096)
    assert attn_config(cfg).layer_types == ("sliding_attention", "full_attention") * 2


def test_mistral_all_sliding_qwen2_off_and_padded():
    mistral = config_from_args("mistral", 4096, 32, 8, 2, sliding_window=4096)
    assert _keys(signatures_from_config(mistral, [1024], decode=False)) == ["sw4096"]
    qwen = dict(config_from_args("qwen2", 896, 14, 2, 2, sliding_window=4096), use_sliding_window=False)
    assert _keys(signatures_from_config(qwen, [1024], [2], padded=True, decode=False)) == ["causal+dmask-b1h0q0k1"]


@pytest.mark.parametrize("bad, err", [
    (dict(num_attention_heads=6, num_key_value_heads=4, hidden_size=96, num_hidden_layers=1), "multiple"),
    (dict(num_attention_heads=4, num_hidden_layers=1), "head_dim or hidden_size"),
    (dict(num_hidden_layers=1), "num_attention_heads"),
    (dict(num_attention_heads=4, hidden_size=64, num_hidden_layers=2, layer_types=["full_attention"]), "layer_types"),
    (dict(num_attention_heads=4, hidden_size=64, num_hidden_layers=1, layer_types=["chunked_attention"]),
     "unsupported layer types"),
])
def test_bad_configs(bad, err):
    with pytest.raises(ValueError, match=err):
        signatures_from_config(bad, [128])


def test_bad_arguments(tmp_path):
    cfg = config_from_args("llama", 64, 4, 4, 1)
    with pytest.raises(ValueError, match="seq_lens"):
        signatures_from_config(cfg, [0])
    with pytest.raises(ValueError, match="dtype"):
        signatures_from_config(cfg, [16], dtype="int8")
    with pytest.raises(FileNotFoundError):
        signatures_from_config(str(tmp_path / "missing.json"), [16])
