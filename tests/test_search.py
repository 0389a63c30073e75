"""The whole loop on the CPU: propose → verify (interpreter) → cache → load → dispatch.

Kept small: one template candidate per signature, tiny shapes, fp32 (the interpreter's bf16 dot
is wrong). The loop's own logic (dedupe, budgets, selection, negative entries) is tested with
scripted proposers whose sources are real kernels or deliberately wrong ones.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

import torch_r1attn as r1
from torch_r1attn import functional
from torch_r1attn import config, dispatch, variants as V
from torch_r1attn.problem import Problem
from torch_r1attn.reference import reference_attention
from torch_r1attn.search import tuner
from torch_r1attn.search.base import Candidate
from torch_r1attn.search.loop import run_search
from torch_r1attn.spec import AttentionSpec
from tests.helpers import assert_close_to_ref

pytestmark = pytest.mark.slow

FAST = dict(rounds=1, samples=1, max_candidates=2, budget_s=300.0, workers=1, verify_timeout_s=240.0)


@pytest.fixture
def fast_settings(cache_dir, monkeypatch):
    s = config.Settings.from_env(**FAST)
    config.set_settings(s)
    yield s
    config.set_settings(None)


def _qkv(B=1, Hq=2, Hkv=2, Sq=24, Sk=24, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Sq, D, generator=g), torch.randn(B, Hkv, Sk, D, generator=g),
            torch.randn(B, Hkv, Sk, D, generator=g))


VARIANTS = {
    "full": lambda: V.full(),
    "causal": lambda: V.causal(),
    "sliding_window": lambda: V.sliding_window(7),
    "prefix_lm": lambda: V.prefix_lm(5),
    "document": lambda: V.causal() + V.document(torch.arange(24) // 9),
    "alibi": lambda: V.causal() + V.alibi(2),
    "softcap": lambda: V.softcap(4.0),
    "relative_bias": lambda: V.relative_bias(torch.randn(2, 9)),
    "score_mod": lambda: V.score_mod(lambda s, b, h, qi, ki: s - 0.05 * (qi - ki)),
    "mask_mod": lambda: V.mask_mod(lambda b, h, qi, ki: (qi - ki) % 4 != 3),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_loop_end_to_end_every_variant(name, fast_settings):
    var = VARIANTS[name]()
    q, k, v = _qkv()
    spec = AttentionSpec.from_call(q, k, v, var.key)
    res = tuner.search_now(spec, var, fast_settings)
    assert res.winner is not None, f"{name}: no kernel ({res.reason}); history: " + \
        "; ".join(fb.text[:200] for fb in res.history)
    assert res.entry is not None and not res.negative
    assert res.report_path is not None and res.report_path.exists()
    report = json.loads(res.report_path.read_text())
    assert report["candidates_tried"] >= 1 and report["status"] == "kernel"
    # a fresh dispatch table loads the cached kernel and runs it (cache hit, no search)
    dispatch.reset()
    out = r1.attention(q, k, v, variant=var, on_miss="off")
    st = dispatch.status()
    assert st and st[0]["kernel"], st
    ref = reference_attention(q.double(), k.double(), v.double(), var, 1 / math.sqrt(q.shape[-1]))
    assert_close_to_ref(out, ref)
    # verified on (B, S, H, D)-strided layouts too: the transformers path writes its layout directly
    assert "strided_layouts" in res.entry.meta["checks"]
    assert next(iter(dispatch._table.values())).strided_out
    qs, ks, vs = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    out_s = functional._attention(qs, ks, vs, variant=var, on_miss="off", bshd_out=True)
    assert out_s.transpose(1, 2).is_contiguous()
    assert_close_to_ref(out_s, ref)


def test_background_policy_picks_kernel_up(fast_settings):
    var = V.sliding_window(5)
    q, k, v = _qkv(Sq=20, Sk=20)
    out0 = r1.attention(q, k, v, variant=var, on_miss="background")  # returns at once (fallback)
    st = dispatch.status()
    assert st[0]["pending"] and not st[0]["kernel"]
    for job in list(tuner._jobs.values()):
        assert job.wait(600)
    dispatch._table[next(iter(dispatch._table))].next_check = 0.0  # skip the 1 s recheck interval
    out1 = r1.attention(q, k, v, variant=var, on_miss="background")
    st = dispatch.status()
    assert st[0]["kernel"] and not st[0]["pending"], st
    torch.testing.assert_close(out0, out1, atol=1e-4, rtol=1e-4)


class _Scripted:
    name = "scripted"

    def __init__(self, sources):
        self.sources = list(sources)

    def propose(self, problem, history, n):
        out, self.sources = self.sources[:n], self.sources[n:]
        return [Candidate(source=s, proposer="scripted", config={"i": i}) for i, s in enumerate(out)]

    def close(self):
        pass


WRONG = textwrap.dedent('''
    import triton
    import triton.language as tl

    SUPPORTS = {"dtypes": ["fp32"], "head_dims": [16], "head_dims_v": [16], "gqa": "any", "devices": ["cpu", "cuda"]}

    @triton.jit
    def _fill(o_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(o_ptr + offs, tl.zeros([BLOCK], dtype=tl.float32) + 0.5, mask=offs < n)

    def forward(q, k, v, out, scale, **variant_tensors):
        n = out.numel()
        _fill[(triton.cdiv(n, 256),)](out, n, BLOCK=256)
''')


def test_negative_entry_when_nothing_is_correct(fast_settings):
    from torch_r1attn import cache

    var = V.causal()
    q, k, v = _qkv(Sq=16, Sk=16)
    spec = AttentionSpec.from_call(q, k, v, var.key)
    problem = Problem.from_spec(spec, var, device="cpu", small=True)
    dup = "\n" + WRONG.replace("\n", "   \n") + "\n\n"  # same kernel, only whitespace differs
    res = run_search(problem, [_Scripted([WRONG, dup])], settings=fast_settings.replace(samples=2))
    assert res.winner is None and res.negative
    assert res.candidates_tried == 1  # the whitespace-only duplicate was skipped
    entry = cache.default_cache().lookup(spec)
    assert entry is not None and entry.negative
    # a later call uses the cached verdict: no search is started
    dispatch.reset()
    r1.attention(q, k, v, variant=var, on_miss="background")
    assert not dispatch.status()[0]["pending"]


def test_two_processes_one_search(fast_settings, cache_dir, tmp_path):
    script = tmp_path / "miss.py"
    script.write_text(textwrap.dedent('''
        import json, sys, torch
        from torch_r1attn import variants as V, config
        from torch_r1attn.search import tuner
        from torch_r1attn.spec import AttentionSpec
        q = torch.randn(1, 2, 16, 16); k = torch.randn(1, 2, 16, 16)
        var = V.prefix_lm(3)
        spec = AttentionSpec.from_call(q, k, k, var.key)
        r = tuner.search_now(spec, var, config.Settings.from_env(rounds=1, samples=1, max_candidates=1, workers=1))
        print("RESULT " + json.dumps({"cached": r.cached, "winner": r.winner is not None, "reason": r.reason}))
    '''))
    env = {**__import__("os").environ, "R1ATTN_CACHE_DIR": str(cache_dir), "TRITON_INTERPRET": "1"}
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    results = []
    for (so, se), p in zip(outs, procs):
        assert p.returncode == 0, se[-2000:]
        results.append(json.loads(next(l for l in so.splitlines() if l.startswith("RESULT "))[7:]))
    searched = [r for r in results if not r["cached"]]
    assert len(searched) == 1, results
    assert searched[0]["winner"]


def test_background_search_does_not_outlive_the_caller(tmp_path, cache_dir):
    """The caller exits while its background search is verifying: the process ends promptly and no
    verifier worker is left behind (found by a marker in the environment the workers inherit)."""
    import glob
    import os
    import time

    mark = f"r1attn-exit-{os.getpid()}-{time.monotonic_ns()}"
    code = textwrap.dedent('''
        import time, torch, torch_r1attn as r1
        from torch_r1attn import variants as V
        q = torch.randn(1, 2, 24, 16)
        r1.attention(q, q, q, variant=V.sliding_window(5), on_miss="background")
        time.sleep(3.0)  # the tuner is verifying in worker processes now
    ''')
    env = {**os.environ, "R1ATTN_TEST_MARK": mark, "R1ATTN_CACHE_DIR": str(cache_dir), "TRITON_INTERPRET": "1"}
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert time.monotonic() - t0 < 60, "exit waited for the search"
    time.sleep(1.0)
    left = []
    for e in glob.glob("/proc/[0-9]*/environ"):
        try:
            with open(e, "rb") as f:
                if mark.encode() in f.read():
                    left.append(e.split("/")[2])
        except OSError:
            pass
    assert not left, f"processes left behind: {left}"
