"""``r1attn prewarm`` fills the cache so that a fresh process running the model with
``attn_implementation="r1attn"`` has zero misses (CPU: Triton interpreter, a tiny Llama, fp32).

This is the contract between prewarm's signature derivation (prewarm.py) and what the HF
integration actually asks dispatch for at run time (integrations/hf.py): if the two disagree on a
variant key or a length bucket, a deployment would search on its first requests.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

CONFIG = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)

RUN = textwrap.dedent('''
    import json, sys, torch
    import torch_r1attn.integrations.hf_register  # noqa: F401
    from torch_r1attn import dispatch
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = AutoConfig.from_pretrained(sys.argv[1])
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="r1attn").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        m(ids)
        m.generate(ids[:, :24], attention_mask=torch.ones(2, 24, dtype=torch.long), max_new_tokens=6,
                   do_sample=False)
    print("STATUS " + json.dumps(dispatch.status()))
''')


def test_prewarmed_model_runs_with_zero_misses(tmp_path, cache_dir):
    from transformers import AutoConfig

    kw = dict(CONFIG)
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    cfg.save_pretrained(tmp_path / "model")
    env = {**os.environ, "R1ATTN_CACHE_DIR": str(cache_dir), "TRITON_INTERPRET": "1",
           "R1ATTN_ROUNDS": "1", "R1ATTN_SAMPLES": "1", "R1ATTN_MAX_CANDIDATES": "1", "R1ATTN_WORKERS": "1"}
    pre = subprocess.run(
        [sys.executable, "-m", "torch_r1attn.cli", "prewarm", "--config", str(tmp_path / "model" / "config.json"),
         "--seq-lens", "30", "--batch-sizes", "2", "--dtype", "fp32", "--gpus", "none"],
        capture_output=True, text=True, env=env, timeout=900)
    assert pre.returncode == 0, pre.stdout[-2000:] + pre.stderr[-3000:]
    script = tmp_path / "run.py"
    script.write_text(RUN)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "model")], capture_output=True, text=True,
                         env={**env, "R1ATTN_ON_MISS": "off"}, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    status = json.loads(next(line for line in run.stdout.splitlines() if line.startswith("STATUS "))[7:])
    assert status, "the model never reached dispatch"
    misses = [s for s in status if s["source"] == "miss"]
    assert not misses, f"signatures the prewarm did not cover: {[s['uri'] for s in misses]}\n" \
                       f"prewarm said:\n{pre.stdout[-2000:]}"
    assert all(s["source"] in ("cache-kernel", "cache-negative") for s in status), status
