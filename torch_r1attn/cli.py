"""``r1attn``: the command line. Each command group lives with the code it drives:

* ``cache ls|show|verify|clear|export|import`` — :mod:`torch_r1attn.cli_cache`
* ``prewarm``, ``demo``, ``doctor``           — :mod:`torch_r1attn.cli_tools`

Benchmarks are scripts, not commands: ``benchmarks/bench_variants.py`` (see the README).
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import __version__, cli_cache, cli_tools

    p = argparse.ArgumentParser(prog="r1attn", description="torch_r1attn: generated attention kernels, cached per GPU")
    p.add_argument("--version", action="version", version=f"torch_r1attn {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    cli_cache.register(sub)
    cli_tools.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, PermissionError) as e:
        print(f"r1attn {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
