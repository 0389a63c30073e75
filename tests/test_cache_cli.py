"""``r1attn cache ...``: ls/show/verify/clear/export/import through ``cli_cache.main``."""

import argparse
import io
import json
import tarfile

import pytest
import torch

from tests.test_loader import TRITON_KERNEL, make_problem, store_kernel
from torch_r1attn import cli_cache, loader
from torch_r1attn.cache import KernelCache


@pytest.fixture
def kc(cache_dir):
    loader.forget_loaded()
    yield KernelCache(cache_dir)
    loader.forget_loaded()


def cli(kc, *argv):
    return cli_cache.main(["cache", "--cache-dir", str(kc.root), *argv])


def two_entries(kc):
    s1, _, _, c1 = make_problem(torch.float16)
    s2, _, _, c2 = make_problem(torch.float32, Sq=40, Sk=40)
    store_kernel(kc, s1, c1, meta={"measurements": {"speedup": 1.25}})
    kc.store_negative(s2, {"measurements": {"best_baseline": "sdpa"}, "best_speedup": 0.789,
                           "reason": "best correct candidate 0.789x the best baseline (sdpa_cudnn), below the 1.03x bar"})
    return s1, s2


def names(kc):
    return kc.entry_names() if kc.shard.exists() else []


def test_ls_marks_entries_of_another_timing_protocol_stale(kc, capsys, monkeypatch):
    from torch_r1attn import cache as cache_mod

    s1, s2 = two_entries(kc)
    monkeypatch.setattr(cache_mod, "TIMING_PROTOCOL", cache_mod.TIMING_PROTOCOL + 1)
    assert cli(kc, "ls") == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if s1.uri in ln or s2.uri in ln]
    assert len(lines) == 2 and all("[stale: was timed under timing protocol" in ln for ln in lines)
    assert cli(kc, "ls", "--json") == 0
    assert all("timing protocol" in json.loads(ln)["stale"] for ln in capsys.readouterr().out.splitlines())


def test_register_adds_the_cache_command():
    parser = argparse.ArgumentParser(prog="r1attn")
    cli_cache.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cache", "clear", "--all"])
    assert args.func is cli_cache.run and args.cache_cmd == "clear" and args.all


def test_ls_and_show(kc, capsys):
    s1, s2 = two_entries(kc)
    assert cli(kc, "ls") == 0
    out = capsys.readouterr().out
    assert s1.uri in out and s2.uri in out and "1.25x" in out and "negative" in out
    neg = next(line for line in out.splitlines() if s2.uri in line)
    assert "(0.79x)" in neg and "below the 1.03x bar" in neg  # what the best correct candidate lost by
    assert cli(kc, "ls", "--json") == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["hash"] for r in rows} == {s1.hash, s2.hash}
    assert next(r for r in rows if r["negative"])["best_speedup"] == pytest.approx(0.789)
    assert all(r["stale"] is None for r in rows)
    assert cli(kc, "show", s1.hash[:6]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["meta"]["spec"]["hash"] == s1.hash and shown["check_tensors"]["c0.q"]["dtype"] == "float16"


def test_key_resolution(kc, capsys):
    s1, s2 = two_entries(kc)
    assert cli_cache.resolve_key(kc, s1.dirname) == s1.dirname
    assert cli_cache.resolve_key(kc, s1.hash) == s1.dirname
    assert cli_cache.resolve_key(kc, "attn_fp32") == s2.dirname
    assert cli(kc, "show", "attn_") == 2
    assert "ambiguous" in capsys.readouterr().err
    assert cli(kc, "show", "no-such-entry") == 2
    assert "no entry matches" in capsys.readouterr().err


def test_clear_key_shard_and_all(kc):
    s1, s2 = two_entries(kc)
    other = KernelCache(kc.root, fingerprint=dict(kc.fingerprint, triton="9.9.9"))
    store_kernel(other, *make_problem()[::3])
    assert cli(kc, "clear", s1.hash) == 0
    assert names(kc) == [s2.dirname] and kc.lookup(s1) is None
    assert cli(kc, "clear") == 0
    assert names(kc) == [] and len(other.entry_names()) == 1
    assert cli(kc, "clear", "--all") == 0
    assert other.entry_names() == []
    assert cli(kc, "clear", "--all", s1.hash) == 2


def test_unsafe_root_is_exit_2(kc, capsys):
    two_entries(kc)
    kc.root.chmod(0o777)
    assert cli(kc, "ls") == 2
    assert "writable by group/others" in capsys.readouterr().err


@pytest.mark.slow
def test_verify_passes_good_and_fails_bad_entries(kc, capsys):
    good, _, _, c1 = make_problem(torch.float16)
    bad, _, _, c2 = make_problem(torch.float32, Sq=40, Sk=40)
    store_kernel(kc, good, c1)
    # a plausible-looking but wrong kernel: it ignores the scale
    assert TRITON_KERNEL.count("* sm_scale\n") == 2
    store_kernel(kc, bad, c2, source=TRITON_KERNEL.replace("* sm_scale\n", "* 1.0\n"))
    assert cli(kc, "verify", good.hash) == 0
    assert f"PASS  {good.dirname}" in capsys.readouterr().out
    assert cli(kc, "verify") == 1
    out = capsys.readouterr().out
    assert f"PASS  {good.dirname}" in out and f"FAIL  {bad.dirname}" in out and "max error" in out
    assert "1 passed, 1 failed" in out


@pytest.mark.slow
def test_verify_reports_a_crashing_kernel(kc, capsys):
    spec, _, _, checks = make_problem()
    src = TRITON_KERNEL + "\nimport os as _os\ndef forward(q, k, v, out, scale, **vt):\n    _os._exit(3)\n"
    store_kernel(kc, spec, checks, source=src)
    assert cli(kc, "verify") == 1
    assert "checker crashed (exit 3)" in capsys.readouterr().out


def test_export_clear_import_roundtrip(kc, tmp_path, capsys):
    s1, s2 = two_entries(kc)
    before = {e.path.name: e.meta for e in kc.entries()}
    archive = tmp_path / "cache.tar.gz"
    assert cli(kc, "export", str(archive)) == 0
    assert cli(kc, "clear") == 0 and names(kc) == []
    assert cli(kc, "import", str(archive)) == 0
    assert "imported 2 entries" in capsys.readouterr().out
    fresh = KernelCache(kc.root)
    assert {e.path.name: e.meta for e in fresh.entries()} == before
    q, k, v = (fresh.load_check_set(fresh.lookup(s1))[f"c0.{n}"] for n in "qkv")
    out = torch.empty_like(q)
    loader.load(fresh.lookup(s1))(q, k, v, out, s1.head_dim ** -0.5)
    assert not torch.isnan(out).any()
    assert fresh.lookup(s2).negative


def _members(archive):
    with tarfile.open(archive) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]


def _write(path, members):
    with tarfile.open(path, "w") as tar:
        for m, data in members:
            tar.addfile(m, io.BytesIO(data) if data is not None else None)


def _tamper_source(members, fix_manifest):
    out = []
    for m, data in members:
        if m.name.endswith("kernel.py"):
            assert b"o = acc / l_safe[:, None]" in data
            data = data.replace(b"o = acc / l_safe[:, None]", b"o = acc * 0.0 + 1.0")
            m.size = len(data)
        out.append((m, data))
    if fix_manifest:  # a careful attacker re-hashes the manifest too; the metadata hash still differs
        import hashlib

        man = json.loads(dict((m.name, d) for m, d in out)["manifest.json"])
        for m, d in out:
            if m.name.startswith("entries/"):
                _, name, fname = m.name.split("/")
                man["entries"][name][fname] = hashlib.sha256(d).hexdigest()
        data = json.dumps(man).encode()
        out = [(m, d) if m.name != "manifest.json" else (m, data) for m, d in out]
        for m, d in out:
            if m.name == "manifest.json":
                m.size = len(d)
    return out


def _add_member(members, name, kind="file", target=""):
    m = tarfile.TarInfo(name)
    if kind == "symlink":
        m.type, m.linkname = tarfile.SYMTYPE, target
        return members + [(m, None)]
    if kind == "hardlink":
        m.type, m.linkname = tarfile.LNKTYPE, target
        return members + [(m, None)]
    m.size = 4
    return members + [(m, b"evil")]


@pytest.mark.parametrize("attack,match", [
    ("source_only", "does not match the manifest"),
    ("source_and_manifest", "does not match its sha256"),
    ("traversal", "path refused"),
    ("absolute", "path refused"),
    ("symlink", "not a regular file"),
    ("hardlink", "not a regular file"),
    ("extra_file", "path refused"),
])
def test_import_rejects_tampered_archives(kc, tmp_path, capsys, attack, match):
    two_entries(kc)
    good = tmp_path / "good.tar"
    kc.export(good)
    kc.clear()
    members = _members(good)
    entry = next(m.name.split("/")[1] for m, _ in members if m.name.startswith("entries/"))
    if attack == "source_only":
        members = _tamper_source(members, fix_manifest=False)
    elif attack == "source_and_manifest":
        members = _tamper_source(members, fix_manifest=True)
    elif attack == "traversal":
        members = _add_member(members, f"entries/{entry}/../../../../evil.py")
    elif attack == "absolute":
        members = _add_member(members, "/tmp/r1attn-evil.py")
    elif attack == "symlink":
        members = _add_member(members, f"entries/{entry}/kernel.cu", "symlink", "/etc/passwd")
    elif attack == "hardlink":
        members = _add_member(members, f"entries/{entry}/kernel.cu", "hardlink", "manifest.json")
    elif attack == "extra_file":
        members = _add_member(members, f"entries/{entry}/sitecustomize.py")
    bad = tmp_path / "bad.tar"
    _write(bad, members)
    assert cli(kc, "import", str(bad)) == 2
    assert match in capsys.readouterr().err
    assert names(kc) == []  # nothing was installed
    assert not (tmp_path / "evil.py").exists()


@pytest.mark.gpu
def test_verify_on_gpu(kc, capsys):
    spec, _, _, checks = make_problem(torch.bfloat16, B=2, H=8, Sq=512, Sk=512, D=64, device="cuda")
    store_kernel(kc, spec, checks)
    assert cli(kc, "verify") == 0
    assert f"PASS  {spec.dirname}" in capsys.readouterr().out
