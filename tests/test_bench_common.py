"""The benchmark helpers that run on the CPU: the interleaved host-time measurement."""

import pytest

from benchmarks.common import interleaved_host_us


def test_interleaved_host_us_pairs_rounds_and_orders():
    calls = []

    def cheap():
        calls.append("a")

    def dear():
        calls.append("b")
        sum(range(300))  # a few microseconds more per call than cheap()

    m = interleaved_host_us({"cheap": cheap, "dear": dear}, rounds=6, calls=50, warmup=5)
    assert set(m) == {"cheap", "dear", "dear-cheap"}
    assert m["dear-cheap"]["median"] > 0 and m["dear"]["median"] > m["cheap"]["median"]
    assert m["dear-cheap"]["p20"] <= m["dear-cheap"]["median"] <= m["dear-cheap"]["p80"]
    # the order rotates every round: round 0 runs cheap first, round 1 dear first
    body = calls[10:]  # after the warm-up calls
    assert body[:50] == ["a"] * 50 and body[100:150] == ["b"] * 50


def test_interleaved_host_us_rejects_empty_work():
    with pytest.raises(ValueError, match="at least one"):
        interleaved_host_us({}, rounds=3)
