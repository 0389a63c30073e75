"""``r1attn cache``: inspect, re-verify, clear and move the kernel cache.

::

    r1attn cache ls                    entries of this device's shard
    r1attn cache show KEY              one entry's metadata (JSON) and check set
    r1attn cache verify [KEY]          re-run stored check sets, one subprocess per entry
    r1attn cache clear KEY|--all       delete one entry, or every entry of every fingerprint
    r1attn cache clear                 delete every entry of this device's shard
    r1attn cache export FILE           this shard as one tar file (.tar.gz/.tgz compressed)
    r1attn cache import FILE           verify an export and install its entries

``KEY`` is an entry's directory name, its spec hash, a unique prefix of either, or a substring of
its URI that matches one entry. ``--cache-dir`` overrides ``R1ATTN_CACHE_DIR``. Exit codes:
0 success, 1 a verification failed, 2 bad usage or an unusable cache.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from .cache import CACHE_SCHEMA, CacheError, KernelCache, stale_reason


class _UsageError(Exception):
    pass


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``cache`` command to an ``argparse`` subparsers object; its ``func`` is :func:`run`."""
    p = subparsers.add_parser("cache", help="inspect, verify, clear, export and import the kernel cache",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache-dir", default=None, help="cache root (default: R1ATTN_CACHE_DIR or the user cache dir)")
    sub = p.add_subparsers(dest="cache_cmd", required=True)
    ls = sub.add_parser("ls", help="list entries")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    sh = sub.add_parser("show", help="show one entry")
    sh.add_argument("key")
    ve = sub.add_parser("verify", help="re-run stored check sets in subprocesses")
    ve.add_argument("key", nargs="?")
    ve.add_argument("--timeout", type=float, default=None, help="seconds per entry (default: R1ATTN_VERIFY_TIMEOUT_S)")
    cl = sub.add_parser("clear", help="delete entries")
    cl.add_argument("key", nargs="?")
    cl.add_argument("--all", action="store_true", help="every entry of every fingerprint under the root")
    ex = sub.add_parser("export", help="write this device's entries to a tar file")
    ex.add_argument("file")
    im = sub.add_parser("import", help="install entries from an export")
    im.add_argument("file")
    p.set_defaults(func=run)
    return p


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m torch_r1attn.cli_cache cache ls``); returns the exit code."""
    parser = argparse.ArgumentParser(prog="r1attn")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def run(args: argparse.Namespace) -> int:
    try:
        cache = KernelCache(args.cache_dir) if args.cache_dir else KernelCache()
        return _COMMANDS[args.cache_cmd](cache, args)
    except (CacheError, _UsageError) as e:
        print(f"r1attn cache: error: {e}", file=sys.stderr)
        return 2


def resolve_key(cache: KernelCache, key: str) -> str:
    """The one entry directory ``key`` names. Raises _UsageError on no or several matches."""
    names = cache.entry_names()
    if key in names:
        return key
    tiers = [
        [n for n in names if n.rsplit("-", 1)[-1] == key],
        [n for n in names if n.startswith(key) or n.rsplit("-", 1)[-1].startswith(key)],
        [n for n in names if key in n],
    ]
    for found in tiers:
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise _UsageError(f"key {key!r} is ambiguous: {', '.join(found[:5])}{' ...' if len(found) > 5 else ''}")
    raise _UsageError(f"no entry matches {key!r} in {cache.shard}")


def _ls(cache: KernelCache, args) -> int:
    """One line per entry: a kernel's speed-up over the best baseline; for a negative entry the
    best *correct* candidate's, in parentheses (what it lost by), and the search's reason."""
    entries = list(cache.entries())
    if args.json:
        for e in entries:
            print(json.dumps({"name": e.path.name, "hash": e.spec.hash, "uri": e.spec.uri,
                              "negative": e.negative, "language": e.language,
                              "measurements": e.meta.get("measurements"), "created": e.meta.get("created"),
                              "reason": e.meta.get("reason"), "best_speedup": e.meta.get("best_speedup"),
                              "stale": stale_reason(e)}))
        return 0
    print(f"# {cache.shard}  ({len(entries)} entries)")
    for e in entries:
        m = e.meta.get("measurements") or {}
        sp = e.meta.get("best_speedup") if e.negative else m.get("speedup")
        kind = "negative" if e.negative else e.language
        sp_s = "-"
        if isinstance(sp, (int, float)) and not isinstance(sp, bool):
            sp_s = f"({sp:.2f}x)" if e.negative else f"{sp:.2f}x"
        why = f"  {e.meta['reason']}" if e.negative and isinstance(e.meta.get("reason"), str) else ""
        stale = stale_reason(e)
        if stale:
            why += f"  [stale: {stale}; searched again on next use]"
        print(f"{e.spec.hash}  {kind:<8}  {sp_s:>7}  {e.spec.uri}{why}")
    return 0


def _show(cache: KernelCache, args) -> int:
    name = resolve_key(cache, args.key)
    e = cache.read_entry(name)
    if e is None:
        raise _UsageError(f"entry {name} is unusable (quarantined; see the log)")
    tensors = {n: {"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
               for n, t in sorted(cache.load_check_set(e).items())}
    print(json.dumps({"path": str(e.path), "source": str(e.source_path) if e.source_path else None,
                      "meta": e.meta, "check_tensors": tensors}, indent=2, sort_keys=True, default=str))
    return 0


def verify_entry(cache: KernelCache, name: str, timeout: float) -> dict:
    """Run :mod:`torch_r1attn._entry_check` on one entry in a fresh interpreter."""
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "torch_r1attn._entry_check", "--root", str(cache.root), name]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"entry": name, "ok": False, "detail": f"timed out after {timeout:g} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    tail = (proc.stderr or "").strip().splitlines()[-3:]
    return {"entry": name, "ok": False, "detail": f"checker crashed (exit {proc.returncode}): {' | '.join(tail)}"}


def _verify(cache: KernelCache, args) -> int:
    from .config import settings

    timeout = args.timeout or settings().verify_timeout_s
    names = [resolve_key(cache, args.key)] if args.key else cache.entry_names()
    failed = 0
    for name in names:
        r = verify_entry(cache, name, timeout)
        failed += not r["ok"]
        print(f"{'PASS' if r['ok'] else 'FAIL'}  {name}  {r.get('detail', '')}")
    print(f"{len(names) - failed} passed, {failed} failed")
    return 1 if failed else 0


def _clear(cache: KernelCache, args) -> int:
    if args.all and args.key:
        raise _UsageError("give KEY or --all, not both")
    if args.key:
        name = resolve_key(cache, args.key)
        cache.remove(name)
        print(f"removed {name}")
    elif args.all:
        n = 0
        base = cache.root / f"v{CACHE_SCHEMA}"
        for fp_dir in cache.fingerprint_dirs():
            other = KernelCache(cache.root, fingerprint=cache.fingerprint, lock_timeout=cache.lock_timeout)
            other.shard = fp_dir  # same layout rules, another fingerprint's shard
            n += other.clear()
            shutil.rmtree(fp_dir / ".quarantine", ignore_errors=True)
        print(f"removed {n} entries under {base}")
    else:
        print(f"removed {cache.clear()} entries from {cache.shard}")
    _forget_in_process()
    return 0


def _forget_in_process() -> None:
    from . import cache as cache_mod, dispatch

    cache_mod.reset_default_cache()
    dispatch.reset()


def _export(cache: KernelCache, args) -> int:
    n = cache.export(args.file)
    print(f"exported {n} entries of {cache.shard.name} to {args.file}")
    return 0


def _import(cache: KernelCache, args) -> int:
    names = cache.import_archive(args.file)
    print(f"imported {len(names)} entries from {args.file}")
    _forget_in_process()
    return 0


_COMMANDS = {"ls": _ls, "show": _show, "verify": _verify, "clear": _clear, "export": _export, "import": _import}


if __name__ == "__main__":
    sys.exit(main())
