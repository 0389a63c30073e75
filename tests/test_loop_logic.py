"""The search loop's own decisions, with a scripted verifier pool (no kernels run here):
budget waves, the win margin, re-verification in a fresh worker, negative verdicts, and the
dispatch table staying on one entry per length bucket."""

from __future__ import annotations

import time

import pytest
import torch

import torch_r1attn as r1
from torch_r1attn import config, dispatch, variants as V
from torch_r1attn.problem import Problem
from torch_r1attn.search.base import Candidate
from torch_r1attn.search.loop import run_search
from torch_r1attn.spec import AttentionSpec
from torch_r1attn.verify.result import VerifyResult


class FakePool:
    """Plays the verifier: each candidate's config carries the speed-up it 'measures'."""

    def __init__(self, workers=2, delay=0.0, fresh_ok=True, meaningful=True):
        self.workers, self.delay, self.fresh_ok, self.meaningful = workers, delay, fresh_ok, meaningful
        self.verified: list[str] = []
        self.fresh: list[str] = []

    def _result(self, c: Candidate, ok: bool = True) -> VerifyResult:
        sp = c.config["speedup"]
        return VerifyResult(ok=ok, compiled=True, verdict="pass" if ok else "fail", reason="scripted",
                            time_ms=1.0 / sp if self.meaningful else None, best_baseline="flex",
                            best_baseline_ms=1.0 if self.meaningful else None,
                            speedup=sp if self.meaningful else None, timing_meaningful=self.meaningful)

    def verify_many(self, cands, problem):
        time.sleep(self.delay)
        self.verified += [c.config["name"] for c in cands]
        out = [self._result(c, ok=c.config.get("ok", True)) for c in cands]
        for c, r in zip(cands, out):
            r.seconds = c.config.get("seconds", 0.0)
        return out

    def fill_baselines(self, results, problem):
        return 0  # every scripted result carries its speed-up (or, on purpose, none)

    def reverify_fresh(self, c, problem):
        self.fresh.append(c.config["name"])
        return self._result(c, ok=self.fresh_ok)

    def close(self):
        pass


class Scripted:
    name = "templates"

    def __init__(self, rounds):
        self.rounds = list(rounds)

    def propose(self, problem, history, n):
        batch = self.rounds.pop(0) if self.rounds else []
        return [Candidate(source=f"# {cfg['name']}\n", config=cfg) for cfg in batch[:n]]

    def close(self):
        pass


@pytest.fixture
def problem():
    spec = AttentionSpec(dtype="fp32", head_dim=16, head_dim_v=16, gqa=1, variant="causal", sq_bucket=32,
                         sk_bucket=32, example=(1, 2, 2, 32, 32))
    return Problem.from_spec(spec, V.causal(), device="cpu", small=True)


def _s(**kw):
    base = dict(rounds=3, samples=6, max_candidates=24, budget_s=60.0, win_margin=0.03)
    base.update(kw)
    return config.Settings.from_env(environ={}, **base)


def _cands(*speedups, prefix="c"):
    return [{"name": f"{prefix}{i}", "speedup": s} for i, s in enumerate(speedups)]


def test_winner_is_fastest_and_reverified_fresh(problem, cache_dir):
    pool = FakePool()
    res = run_search(problem, [Scripted([_cands(1.1, 1.4, 1.2)])], settings=_s(rounds=1), pool=pool)
    assert res.winner is not None and res.winner.config["name"] == "c1"
    assert pool.fresh == ["c1"] and res.speedup == pytest.approx(1.4)
    assert res.entry is not None and not res.negative


def test_below_the_margin_is_a_negative_verdict(problem, cache_dir):
    pool = FakePool()
    res = run_search(problem, [Scripted([_cands(0.8, 1.02)])], settings=_s(rounds=1), pool=pool)
    assert res.winner is None and res.negative and "bar" in res.reason
    assert pool.fresh == []  # nothing below the bar is worth a fresh re-verification
    from torch_r1attn import cache

    assert cache.default_cache().lookup(problem.spec).negative


def test_winner_failing_fresh_reverification_is_not_stored(problem, cache_dir):
    pool = FakePool(fresh_ok=False)
    res = run_search(problem, [Scripted([_cands(1.5, 1.3)])], settings=_s(rounds=1), pool=pool)
    assert res.winner is None and res.negative
    assert pool.fresh == ["c0", "c1"]  # the next best got its chance too


def test_results_without_baselines_are_decided_by_the_fresh_reverification(problem, cache_dir):
    """The job that was to time the baselines failed, so its wave's correct results have a time but
    no speed-up: that is no verdict on speed. The fresh re-verification times them and decides."""

    class NoBaselines(FakePool):
        def verify_many(self, cands, problem):
            out = super().verify_many(cands, problem)
            for r in out:
                r.speedup = r.best_baseline = r.best_baseline_ms = None
            return out

    pool = NoBaselines()
    res = run_search(problem, [Scripted([_cands(1.1, 1.4)])], settings=_s(rounds=1), pool=pool)
    assert pool.fresh == ["c1"]  # the fastest by time
    assert res.winner is not None and res.speedup == pytest.approx(1.4)


def test_scaling_curve_follows_completion_order(problem, cache_dir):
    """A wave's candidates end at different times: the curve has each at its own time, in the
    order they ended, with the best speed-up so far; the history keeps proposal order."""
    import json

    pool = FakePool(workers=3)
    cands = [{"name": "slow", "speedup": 1.5, "seconds": 9.0}, {"name": "fast", "speedup": 1.1, "seconds": 2.0},
             {"name": "mid", "speedup": 1.2, "seconds": 5.0}]
    res = run_search(problem, [Scripted([cands])], settings=_s(rounds=1), pool=pool)
    curve = json.loads(res.report_path.read_text())["curve"]
    assert [c["n"] for c in curve] == [1, 2, 3]
    assert [c["t"] for c in curve] == sorted(c["t"] for c in curve)
    assert 2.0 <= curve[0]["t"] < 5.0 <= curve[1]["t"] < 9.0 <= curve[2]["t"]
    assert [c["best_speedup"] for c in curve] == pytest.approx([1.1, 1.2, 1.5])
    assert [h.candidate.config["name"] for h in res.history] == ["slow", "fast", "mid"]
    assert res.candidates_tried == 3


def test_budget_is_checked_between_waves(problem, cache_dir):
    pool = FakePool(workers=2, delay=0.4)
    res = run_search(problem, [Scripted([_cands(*[1.1] * 8)])], settings=_s(rounds=1, samples=8, budget_s=0.5),
                     pool=pool)
    # wave 1 (2 candidates, 0.4 s) fits, wave 2 starts before 0.5 s, wave 3 would start after
    assert pool.verified == ["c0", "c1", "c2", "c3"], pool.verified
    assert res.candidates_tried == 4


def test_rounds_see_history_and_duplicates_are_skipped(problem, cache_dir):
    seen_history = []

    class Recorder(Scripted):
        def propose(self, problem, history, n):
            seen_history.append(len(history))
            return super().propose(problem, history, n)

    pool = FakePool()
    # round 2 repeats round 1's c0 (same source, same hash) next to a new candidate
    rounds = [_cands(1.1, 1.2), [{"name": "c0", "speedup": 1.1}, {"name": "d1", "speedup": 1.3}]]
    res = run_search(problem, [Recorder(rounds)], settings=_s(rounds=3), pool=pool)
    assert seen_history == [0, 2, 3]  # each round saw every verdict so far; round 3 got nothing new
    assert pool.verified == ["c0", "c1", "d1"]
    assert res.candidates_tried == 3 and res.winner.config["name"] == "d1"


def test_interpreter_results_keep_the_first_correct_candidate(problem, cache_dir):
    pool = FakePool(meaningful=False)
    res = run_search(problem, [Scripted([[{"name": "a", "speedup": 1.0, "ok": False},
                                          {"name": "b", "speedup": 1.0}, {"name": "c", "speedup": 1.0}]])],
                     settings=_s(rounds=1), pool=pool)
    assert res.winner.config["name"] == "b"  # proposal order = best guess first


def test_dispatch_table_stays_on_one_entry_per_bucket(monkeypatch, cache_dir):
    monkeypatch.setenv("R1ATTN_ON_MISS", "off")
    config.set_settings(None)
    dispatch.reset()
    q = torch.randn(1, 2, 1, 16)
    for sk in range(17, 33):  # a decode loop: Sk grows one key per step, all in bucket 32
        kv = torch.randn(1, 2, sk, 16)
        r1.attention(q, kv, kv, variant=V.causal("bottom_right"))
    assert len(dispatch.status()) == 1
    kv = torch.randn(1, 2, 33, 16)
    r1.attention(q, kv, kv, variant=V.causal("bottom_right"))
    assert len(dispatch.status()) == 2  # the next bucket is a new signature


@pytest.mark.parametrize("variant,S,D,dtype,want_len", [
    (V.causal() + V.relative_bias(torch.randn(32, 2 * 4096 - 1)), 4096, 128, torch.bfloat16, (129, 129)),
    (V.sliding_window(1024), 4096, 128, torch.bfloat16, (129, 129)),
    (V.causal(), 100, 64, torch.float16, (100, 100)),  # bucket 128, call length 100: capped at the call
    (V.causal(), 48, 16, torch.float16, None),  # a small bucket keeps its <= 64 edge shapes
])
def test_check_set_stays_small_for_large_buckets(variant, S, D, dtype, want_len):
    """Session 8: at S4096 the check set fell back to an in-bucket ~2049x2049 shape (~7 MB an
    entry, 114 MB for one run's cache). Large buckets now store short awkward shapes instead."""
    from torch_r1attn.cache import split_check_set
    from torch_r1attn.search.loop import check_set

    q = torch.empty(4, 32, S, D, dtype=dtype, device="meta")
    spec = AttentionSpec.from_call(q, q, q, variant.key)
    prob = Problem.from_spec(spec, variant, device="cpu", shape=(4, 32, 32, S, S))
    ts = check_set(prob)
    cases = split_check_set(ts)
    assert len(cases) == 2
    total = sum(t.numel() * t.element_size() for t in ts.values())
    for c in cases:
        B, Hq, Sq, _ = c.q.shape
        assert B == 1 and Hq == 2  # the edge shapes' two kv heads (GQA 1)
        if want_len is None:
            assert Sq <= 64 and c.k.shape[2] <= 64
    if want_len is not None:
        assert (cases[0].q.shape[2], cases[0].k.shape[2]) == want_len
        assert cases[1].q.shape[2] <= 65 and cases[1].k.shape[2] <= 127
    assert total < (1.6e6 if D == 128 else 1e6), total
