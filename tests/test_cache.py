"""The kernel cache: layout, integrity, refusals, replacement, locks, concurrency, crashes."""

import json
import logging
import multiprocessing as mp
import os
import signal
import stat
import struct
import time
from pathlib import Path

import pytest
import torch

from tests.test_loader import TRITON_KERNEL, make_problem, store_kernel, tampered
from torch_r1attn import cache as cache_mod
from torch_r1attn import loader
from torch_r1attn.cache import Built, CacheError, KernelCache, split_check_set
from torch_r1attn.spec import AttentionSpec

FORK = mp.get_context("fork")


@pytest.fixture
def kc(cache_dir):
    loader.forget_loaded()
    yield KernelCache(cache_dir)
    loader.forget_loaded()


@pytest.fixture
def warn(caplog):
    caplog.set_level(logging.WARNING, logger="torch_r1attn")
    return caplog


def quarantined(kc):
    return sorted(os.listdir(kc.shard / ".quarantine"))


# ------------------------------------------------------------------------------ basics
def test_store_lookup_roundtrip_and_layout(kc):
    spec, (q, k, v), scale, checks = make_problem()
    meta = {"config": {"BM": 16}, "measurements": {"time_ms": 0.5, "baselines_ms": {"sdpa": 0.6}, "speedup": 1.2},
            "provenance": {"proposer": "templates", "model": None, "prompt_sha256": "ab", "seconds": 3.5}}
    entry = kc.store(spec, TRITON_KERNEL, "triton", meta, checks)
    assert entry.path == kc.root / "v1" / kc.shard.name / spec.dirname
    assert kc.shard.name.startswith("cpu_interpreter-smnone-torch") or "sm" in kc.shard.name
    assert entry.source_path.read_text() == TRITON_KERNEL and not entry.negative and entry.language == "triton"
    for key, val in meta.items():
        assert entry.meta[key] == val
    assert entry.meta["spec"]["hash"] == spec.hash and entry.meta["fingerprint"] == kc.fingerprint
    assert entry.meta["created"] and entry.meta["r1attn_version"] and entry.meta["check"] == {"cases": 1}
    # safetensors metadata values are JSON strings
    from safetensors import safe_open

    with safe_open(entry.path / "entry.safetensors", "pt") as f:
        raw = f.metadata()
        assert json.loads(raw["measurements"]) == meta["measurements"]
        assert set(f.keys()) == set(checks)
    got = kc.load_check_set(entry)
    assert all(torch.equal(got[n], checks[n]) for n in checks)
    assert len(split_check_set(got)) == 1
    assert stat.S_IMODE(os.stat(kc.root).st_mode) == 0o700
    fresh = KernelCache(kc.root).lookup(spec)
    assert fresh.meta == entry.meta


def test_repeat_lookups_come_from_memory_until_the_entry_changes(kc, monkeypatch):
    spec, _, _, checks = make_problem()
    store_kernel(kc, spec, checks)
    first = kc.lookup(spec)
    reads = []
    real = kc._read
    monkeypatch.setattr(kc, "_read", lambda *a: reads.append(a) or real(*a))
    assert kc.lookup(spec) is first and kc.lookup(spec) is first
    assert reads == []
    other = KernelCache(kc.root)  # another process/instance replaces the entry
    store_kernel(other, spec, checks, source=TRITON_KERNEL + "\n# v2\n")
    again = kc.lookup(spec)
    assert again is not first and again.source_path.read_text().endswith("# v2\n") and len(reads) == 1
    other.remove(spec.dirname)
    assert kc.lookup(spec) is None


def test_negative_entries(kc):
    spec, _, _, _ = make_problem()
    e = kc.store_negative(spec, {"measurements": {"best_baseline": "sdpa", "best_baseline_ms": 0.4},
                                 "provenance": {"candidates": 12}})
    assert e.negative and e.source_path is None and e.language is None
    got = KernelCache(kc.root).lookup(spec)
    assert got.negative and got.meta["measurements"]["best_baseline"] == "sdpa"
    assert got.meta["fingerprint"] == kc.fingerprint and got.meta["r1attn_version"]


def test_negative_entry_from_another_version_is_a_miss(kc, monkeypatch, caplog):
    import torch_r1attn

    spec, _, _, _ = make_problem()
    kc.store_negative(spec, {})
    monkeypatch.setattr(torch_r1attn, "__version__", "999.0")
    caplog.set_level(logging.INFO, logger="torch_r1attn")
    assert KernelCache(kc.root).lookup(spec) is None
    assert "decided by torch_r1attn" in caplog.text
    assert (kc.shard / spec.dirname).is_dir()  # stale, not damaged: kept until replaced


def test_entry_timed_under_another_protocol_is_a_miss(kc, monkeypatch, caplog):
    """Kernels too: a speed-up measured by an older timing protocol is not a verdict any more."""
    spec, _, _, checks = make_problem()
    store_kernel(kc, spec, checks)
    assert kc.lookup(spec) is not None and kc.lookup(spec).meta["timing_protocol"] == cache_mod.TIMING_PROTOCOL
    monkeypatch.setattr(cache_mod, "TIMING_PROTOCOL", cache_mod.TIMING_PROTOCOL + 1)
    caplog.set_level(logging.INFO, logger="torch_r1attn")
    assert KernelCache(kc.root).lookup(spec) is None
    assert "timing protocol" in caplog.text
    store_kernel(kc, spec, checks)  # searched again: the new entry replaces it and is a hit
    assert KernelCache(kc.root).lookup(spec) is not None


def test_replacing_an_entry_without_exchange_support(kc, monkeypatch):
    spec, _, _, checks = make_problem()
    store_kernel(kc, spec, checks)
    monkeypatch.setattr(cache_mod, "_exchange", lambda a, b: False)
    e = store_kernel(kc, spec, checks, source=TRITON_KERNEL + "\n# v3\n")
    assert e.source_path.read_text().endswith("# v3\n")
    assert [n for n in os.listdir(kc.shard) if not n.startswith(".")] == [spec.dirname]
    assert not [n for n in os.listdir(kc.shard) if n.startswith((".tmp-", ".trash-"))]


@pytest.mark.parametrize("bad,exc,match", [
    (dict(spec="nope"), TypeError, "AttentionSpec"),
    (dict(language="rust"), ValueError, "language"),
    (dict(source="  "), ValueError, "non-empty"),
    (dict(checks={}), ValueError, "at least one check case"),
    (dict(checks="drop_ref"), ValueError, "lacks ref"),
    (dict(checks="bad_name"), ValueError, "not named"),
    (dict(checks="wrong_dtype"), ValueError, "spec's dtype"),
    (dict(meta={"spec": 1}), ValueError, "reserved"),
    (dict(meta={"config": object()}), TypeError, "JSON"),
])
def test_store_rejects_bad_arguments(kc, bad, exc, match):
    spec, _, _, checks = make_problem()
    c = bad.get("checks", checks)
    if c == "drop_ref":
        c = {n: t for n, t in checks.items() if n != "c0.ref"}
    elif c == "bad_name":
        c = {**checks, "q": checks["c0.q"]}
    elif c == "wrong_dtype":
        c = {**checks, "c0.q": checks["c0.q"].float()}
    with pytest.raises(exc, match=match):
        kc.store(bad.get("spec", spec), bad.get("source", TRITON_KERNEL), bad.get("language", "triton"),
                 bad.get("meta", {}), c)
    assert not (kc.shard / spec.dirname).exists()


# ------------------------------------------------------------------------------ damage and refusals
def test_truncated_safetensors_is_a_logged_miss_and_quarantined(kc, warn):
    spec, _, _, checks = make_problem()
    e = store_kernel(kc, spec, checks)
    f = e.path / "entry.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    assert KernelCache(kc.root).lookup(spec) is None
    assert "truncated" in warn.text and spec.dirname in warn.text
    assert not (kc.shard / spec.dirname).exists() and len(quarantined(kc)) == 1


@pytest.mark.parametrize("damage", ["empty", "header_garbage", "tensor_byte", "wrong_spec"])
def test_corrupt_metadata_file_is_a_miss(kc, warn, damage):
    spec, _, _, checks = make_problem()
    e = store_kernel(kc, spec, checks)
    f = e.path / "entry.safetensors"
    data = bytearray(f.read_bytes())
    if damage == "empty":
        data = b""
    elif damage == "header_garbage":
        data[10] ^= 0xFF
    elif damage == "tensor_byte":
        data[-3] ^= 0x01
    elif damage == "wrong_spec":  # a valid entry of another spec copied into this key's directory
        other, _, _, oc = make_problem(torch.float32)
        data = store_kernel(kc, other, oc).path.joinpath("entry.safetensors").read_bytes()
    f.write_bytes(bytes(data))
    assert KernelCache(kc.root).lookup(spec) is None
    assert "unusable" in warn.text


def test_flipped_source_byte_is_never_imported(kc, warn, tmp_path):
    spec, _, _, checks = make_problem()
    e = store_kernel(kc, spec, checks)
    mark = tmp_path / "ran"
    src = bytearray(tampered(mark).encode())
    e.source_path.write_bytes(bytes(src))
    assert KernelCache(kc.root).lookup(spec) is None
    assert "does not match its sha256" in warn.text
    assert not mark.exists()
    # a single flipped byte in the original text, too
    e = store_kernel(kc, spec, checks)
    raw = bytearray(e.source_path.read_bytes())
    raw[len(raw) // 2] ^= 0x20
    e.source_path.write_bytes(bytes(raw))
    assert KernelCache(kc.root).lookup(spec) is None
    assert len(quarantined(kc)) == 2


def test_symlink_planted_at_entry_path_is_refused(kc, warn, tmp_path):
    spec, _, _, checks = make_problem()
    e = store_kernel(kc, spec, checks)
    mark = tmp_path / "ran"
    evil = tmp_path / "evil_entry"
    os.rename(e.path, evil)
    (evil / "kernel.py").write_text(tampered(mark))
    os.symlink(evil, kc.shard / spec.dirname)
    assert KernelCache(kc.root).lookup(spec) is None
    assert "symlink" in warn.text
    assert not os.path.lexists(kc.shard / spec.dirname) and not mark.exists()
    # and the next store writes a real directory there
    assert store_kernel(kc, spec, checks).path.is_dir()


def test_symlink_planted_inside_an_entry_is_refused(kc, warn, tmp_path):
    spec, _, _, checks = make_problem()
    e = store_kernel(kc, spec, checks)
    other = tmp_path / "kernel.py"
    other.write_bytes(e.source_path.read_bytes())  # even with the right content
    e.source_path.unlink()
    os.symlink(other, e.source_path)
    assert KernelCache(kc.root).lookup(spec) is None
    assert "kernel.py is a symlink" in warn.text


def test_symlink_planted_at_lock_path_is_refused(kc, warn, tmp_path):
    spec, _, _, checks = make_problem()
    kc._ensure_layout()
    target = tmp_path / "victim"
    target.write_text("do not truncate me")
    lock = kc.shard / ".locks" / f"{spec.dirname}.lock"
    os.symlink(target, lock)
    with pytest.raises(CacheError, match="symlink"):
        store_kernel(kc, spec, checks)
    assert "symlink" in warn.text and target.read_text() == "do not truncate me"
    assert not (kc.shard / spec.dirname).exists()
    os.symlink(target, kc.shard / ".locks" / f"{spec.dirname}.search.lock")
    with pytest.raises(CacheError, match="symlink"):
        kc.try_search_lock(spec)
    # the planted links were moved aside, so the next attempt works
    assert store_kernel(kc, spec, checks).path.is_dir()
    assert target.read_text() == "do not truncate me"


@pytest.mark.parametrize("where", ["root", "schema", "shard", "locks"])
def test_group_or_world_writable_dirs_are_refused(kc, where):
    spec, _, _, checks = make_problem()
    store_kernel(kc, spec, checks)
    path = {"root": kc.root, "schema": kc.shard.parent, "shard": kc.shard, "locks": kc.shard / ".locks"}[where]
    os.chmod(path, 0o777)
    fresh = KernelCache(kc.root)
    with pytest.raises(CacheError, match="writable by group/others"):
        fresh.lookup(spec)
    with pytest.raises(CacheError, match="writable by group/others"):
        store_kernel(fresh, spec, checks)
    os.chmod(path, 0o700)
    assert fresh.lookup(spec) is not None


def test_group_writable_entry_is_a_miss(kc, warn):
    spec, _, _, checks = make_problem()
    e = store_kernel(kc, spec, checks)
    os.chmod(e.source_path, 0o666)
    assert KernelCache(kc.root).lookup(spec) is None
    assert "writable by group/others" in warn.text


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
def test_foreign_owner_is_refused(kc, warn):
    spec, _, _, checks = make_problem()
    e = store_kernel(kc, spec, checks)
    os.chown(e.path, 4242, -1)
    assert KernelCache(kc.root).lookup(spec) is None
    assert "owned by uid 4242" in warn.text
    os.chown(kc.root, 4242, -1)
    with pytest.raises(CacheError, match="owned by uid 4242"):
        KernelCache(kc.root).lookup(spec)


def test_symlinked_root_of_another_owner_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    spec, _, _, checks = make_problem()
    assert store_kernel(KernelCache(link), spec, checks).path.is_dir()  # our own link: fine
    os.chmod(real, 0o757)
    with pytest.raises(CacheError, match="writable by group/others"):
        KernelCache(link).lookup(spec)


def test_fingerprint_change_is_a_miss_not_a_stale_load(kc):
    spec, _, _, checks = make_problem()
    store_kernel(kc, spec, checks)
    newer = dict(kc.fingerprint, triton="99.0.0")
    other = KernelCache(kc.root, fingerprint=newer)
    assert other.shard != kc.shard
    assert other.lookup(spec) is None
    other_torch = KernelCache(kc.root, fingerprint=dict(kc.fingerprint, torch="3.0.0"))
    assert other_torch.lookup(spec) is None
    assert kc.lookup(spec) is not None


def test_entry_copied_into_another_fingerprints_shard_is_refused(kc, warn):
    import shutil

    spec, _, _, checks = make_problem()
    e = store_kernel(kc, spec, checks)
    other = KernelCache(kc.root, fingerprint=dict(kc.fingerprint, cuda="99.9"))
    other._ensure_layout()
    shutil.copytree(e.path, other.shard / spec.dirname)
    assert other.lookup(spec) is None
    assert "fingerprint" in warn.text


def test_leftover_temp_dir_of_a_dead_writer_is_removed(kc):
    spec, _, _, checks = make_problem()
    kc._ensure_layout()
    junk = kc.shard / f".tmp-{spec.dirname}-99999-dead"
    junk.mkdir()
    (junk / "kernel.py").write_text("partial")
    assert kc.lookup(spec) is None  # never read as an entry
    store_kernel(kc, spec, checks)
    assert not junk.exists()


# ------------------------------------------------------------------------------ locks
def test_try_search_lock_is_exclusive_and_released(kc):
    spec, _, _, _ = make_problem()
    a = kc.try_search_lock(spec)
    assert a is not None
    assert KernelCache(kc.root).try_search_lock(spec) is None  # another holder is refused at once
    a.release()
    b = KernelCache(kc.root).try_search_lock(spec)
    assert b is not None
    b.release()


def test_lock_timeout_raises_cache_error(kc):
    spec, _, _, checks = make_problem()
    kc._ensure_layout()
    held = cache_mod._file_lock(kc.shard / ".locks" / f"{spec.dirname}.lock", timeout=0)
    held.acquire()
    try:
        with pytest.raises(CacheError, match="timed out"):
            store_kernel(KernelCache(kc.root, lock_timeout=0.2), spec, checks)
    finally:
        held.release()


def _hold_search_lock_then_die(root, spec_dict, ready):
    c = KernelCache(root)
    lk = c.try_search_lock(AttentionSpec.from_dict(spec_dict))
    assert lk is not None
    ready.set()
    time.sleep(60)


def test_search_lock_of_a_killed_holder_is_released(kc):
    spec, _, _, _ = make_problem()
    ready = FORK.Event()
    p = FORK.Process(target=_hold_search_lock_then_die, args=(str(kc.root), spec.to_dict(), ready))
    p.start()
    assert ready.wait(30)
    assert kc.try_search_lock(spec) is None
    os.kill(p.pid, signal.SIGKILL)
    p.join(10)
    lk = kc.try_search_lock(spec)
    assert lk is not None
    lk.release()


# ------------------------------------------------------------------------------ concurrency
def _get_or_build_worker(root, spec_dict, checks, counter, out_dir, go, i):
    spec = AttentionSpec.from_dict(spec_dict)
    c = KernelCache(root)

    def build():
        with open(counter, "a") as f:  # O_APPEND: one line per build, from any process
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough that every other process arrives while we build
        return Built(source=TRITON_KERNEL, language="triton", meta={"provenance": {"builder": os.getpid()}},
                     check_tensors=checks)

    go.wait(30)
    e = c.get_or_build(spec, build, timeout=60)
    data = loader.read_verified(e.source_path, e.source_sha256)
    (Path(out_dir) / f"{i}.json").write_text(json.dumps({"sha": e.source_sha256, "len": len(data),
                                                          "builder": e.meta["provenance"]["builder"]}))


@pytest.mark.slow
def test_eight_processes_one_cold_key_one_build(kc, tmp_path):
    spec, _, _, checks = make_problem()
    counter, out = tmp_path / "builds.txt", tmp_path / "out"
    out.mkdir()
    go = FORK.Event()
    procs = [FORK.Process(target=_get_or_build_worker,
                          args=(str(kc.root), spec.to_dict(), checks, str(counter), str(out), go, i))
             for i in range(8)]
    for p in procs:
        p.start()
    go.set()
    for p in procs:
        p.join(90)
    assert [p.exitcode for p in procs] == [0] * 8
    assert len(counter.read_text().splitlines()) == 1
    results = [json.loads((out / f"{i}.json").read_text()) for i in range(8)]
    assert len({(r["sha"], r["len"], r["builder"]) for r in results}) == 1
    assert kc.lookup(spec).source_path.read_text() == TRITON_KERNEL


def _version_source(i: int) -> str:
    return f"VERSION = {i}\n" + TRITON_KERNEL


def _consistent(entry, c: KernelCache) -> str | None:
    """None if the entry is whole: source hash, tensors and both files from one version."""
    try:
        src = loader.read_verified(entry.source_path, entry.source_sha256).decode()
    except Exception as e:  # noqa: BLE001 - reported as the finding
        return f"source: {e}"
    ver = int(src.split("\n", 1)[0].split("=")[1])
    tensors = c.load_check_set(entry)
    if entry.meta["version"] != ver or int(tensors["c0.scale"].item()) != ver:
        return f"mixed versions: source {ver}, meta {entry.meta['version']}, tensors {tensors['c0.scale'].item()}"
    if tensors["c0.q"].numel() != 256 * 1024:
        return "short tensors"
    return None


def _reader(root, spec_dict, stop, bad_file, seen_file):
    spec = AttentionSpec.from_dict(spec_dict)
    n = 0
    while not stop.is_set():
        c = KernelCache(root)  # fresh instance: no in-memory layer, every read hits the disk
        try:
            e = c.lookup(spec)
        except CacheError:
            continue
        if e is not None:
            try:
                why = _consistent(e, c)
            except CacheError:  # the entry was replaced between lookup and load: fine
                why = None
            if why:
                with open(bad_file, "a") as f:
                    f.write(why + "\n")
            n += 1
    Path(seen_file).write_text(str(n))


@pytest.mark.slow
def test_sigkilled_writers_never_expose_a_partial_entry(kc, tmp_path):
    # 512 KiB of q, written in 64 KiB chunks, so kills land mid-file
    _, _, _, checks = make_problem()
    big = torch.randn(1, 4, 256, 256).half()
    checks = dict(checks)
    checks["c0.q"] = big
    checks["c0.k"] = big[:, :, :8].clone()
    checks["c0.v"] = big[:, :, :8].clone()
    checks["c0.ref"] = torch.zeros(1, 4, 256, 256, dtype=torch.float64)
    checks.pop("c0.baseline")
    spec = AttentionSpec(dtype="fp16", head_dim=256, head_dim_v=256, gqa=1, variant="full", sq_bucket=256,
                         sk_bucket=8)
    kc.store(spec, _version_source(-1), "triton", {"version": -1},
             dict(checks, **{"c0.scale": torch.tensor(-1.0, dtype=torch.float64)}))
    stop = FORK.Event()
    bad, seen = tmp_path / "bad.txt", tmp_path / "seen.txt"
    reader = FORK.Process(target=_reader, args=(str(kc.root), spec.to_dict(), stop, str(bad), str(seen)))
    reader.start()
    stages = ["mkdir", "write:kernel.py", "write:entry.safetensors", "write:entry.safetensors#3", "fsync", "rename"]
    try:
        for i in range(20):
            target = stages[i % len(stages)]
            n_before = int(target.split("#")[1]) if "#" in target else 1
            target = target.split("#")[0]
            stage_file = tmp_path / f"stage{i}.txt"
            # park on the n-th occurrence of the stage: count occurrences in the hook
            w = FORK.Process(target=_killable_writer_nth,
                             args=(str(kc.root), spec.to_dict(), checks, i, str(stage_file), target, n_before))
            w.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if stage_file.exists() and stage_file.read_text().count(target + "\n") >= n_before:
                    break
                time.sleep(0.005)
            else:
                pytest.fail(f"writer {i} never reached {target}")
            os.kill(w.pid, signal.SIGKILL)
            w.join(10)
            assert w.exitcode == -signal.SIGKILL
            e = KernelCache(kc.root).lookup(spec)
            assert e is not None and _consistent(e, KernelCache(kc.root)) is None
            assert e.meta["version"] == -1  # the old entry survives every kill before the swap
    finally:
        stop.set()
        reader.join(30)
    assert not bad.exists(), bad.read_text()
    assert int(seen.read_text()) > 0
    # the next writer is not blocked by any dead holder's lock and cleans the debris
    t0 = time.monotonic()
    e = KernelCache(kc.root, lock_timeout=5).store(spec, _version_source(100), "triton", {"version": 100},
                                                   dict(checks, **{"c0.scale": torch.tensor(100.0, dtype=torch.float64)}))
    assert time.monotonic() - t0 < 5
    assert _consistent(e, kc) is None and e.meta["version"] == 100
    assert not [n for n in os.listdir(kc.shard) if n.startswith((".tmp-", ".trash-"))]


def _killable_writer_nth(root, spec_dict, checks, i, stage_file, stage_target, nth):
    seen = {"n": 0}
    cache_mod._WRITE_CHUNK = 64 << 10

    def hook(stage):
        with open(stage_file, "a") as f:
            f.write(stage + "\n")
        if stage == stage_target:
            seen["n"] += 1
            if seen["n"] >= nth:
                time.sleep(30)  # parked here until the parent's SIGKILL

    cache_mod._WRITE_HOOK = hook
    checks = dict(checks, **{"c0.scale": torch.tensor(float(i), dtype=torch.float64)})
    KernelCache(root).store(AttentionSpec.from_dict(spec_dict), _version_source(i), "triton", {"version": i}, checks)


def test_default_cache_follows_settings(cache_dir):
    c = cache_mod.default_cache()
    assert c is cache_mod.default_cache() and c.root == cache_dir
    cache_mod.reset_default_cache()
    assert cache_mod.default_cache() is not c


def test_safetensors_header_length_overflow_is_corrupt():
    with pytest.raises(cache_mod._Corrupt, match="truncated"):
        cache_mod._parse_meta_file(struct.pack("<Q", 1 << 40) + b"{}")


def test_damage_seen_lock_free_but_gone_under_the_lock_is_not_quarantined(kc, monkeypatch):
    """A reader racing a writer's swap may see an inconsistent moment; the re-read under the
    key's lock decides, so a good entry is never quarantined by a race."""
    spec, _, _, checks = make_problem()
    store_kernel(kc, spec, checks)
    fresh = KernelCache(kc.root)
    real, calls = fresh._read, []

    def flaky(name, expect):
        calls.append(name)
        if len(calls) == 1:
            raise cache_mod._Corrupt("simulated mid-swap read")
        return real(name, expect)

    monkeypatch.setattr(fresh, "_read", flaky)
    assert fresh.lookup(spec) is not None and len(calls) == 2
    assert quarantined(kc) == []


def test_network_filesystem_roots_keep_locks_on_local_disk(cache_dir, monkeypatch, tmp_path):
    import tempfile

    local = tmp_path / "localtmp"
    local.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(local))
    monkeypatch.setattr(cache_mod, "_is_network_fs", lambda p: True)
    c = KernelCache(cache_dir)
    spec, _, _, checks = make_problem()
    e = store_kernel(c, spec, checks)
    assert e.lock_path.parent.parent == local / f"torch_r1attn-locks-{os.getuid()}"
    assert not (c.shard / ".locks").exists() or not os.listdir(c.shard / ".locks")
    lk = c.try_search_lock(spec)
    assert lk is not None and KernelCache(cache_dir).try_search_lock(spec) is None
    lk.release()


def test_real_mounts_are_parsed():
    assert cache_mod._is_network_fs(Path("/")) in (True, False)
    assert cache_mod._is_network_fs(Path("/proc")) is False
