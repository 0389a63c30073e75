"""Re-verify one cache entry against its stored check set, in this (separate) process.

``python -m torch_r1attn._entry_check --root ROOT ENTRY_DIRNAME`` loads the entry's kernel
through the normal integrity checks, runs it on every stored check case (output NaN-poisoned
first, so every element must be written), checks that no input was mutated, and compares the
output with the stored reference by the tests' rule::

    max|out - ref| <= 2 * max|baseline - ref| + atol[dtype]

(``baseline`` = the stored same-dtype PyTorch output, or the reference rounded to the dtype).
It prints one JSON line ``{"entry", "ok", "detail", "cases": [...]}`` on stdout and exits 0 when
the entry passes, 1 when it fails. ``r1attn cache verify`` runs it once per entry so a kernel
that crashes or hangs takes down only this process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

# Extra absolute slack on top of "2x PyTorch's own error", per dtype (as tests/helpers.py).
ATOL = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 2e-5, "float64": 1e-10}
FACTOR = 2.0


def _check_entry(root: str, name: str) -> dict[str, Any]:
    import torch

    from . import loader
    from .cache import CacheError, KernelCache, split_check_set

    res: dict[str, Any] = {"entry": name, "ok": False, "detail": "", "cases": []}
    cache = KernelCache(root)
    entry = cache.read_entry(name)
    if entry is None:
        res["detail"] = "entry is missing or unusable (see the log: it was quarantined)"
        return res
    if entry.negative:
        res.update(ok=True, detail="negative entry (no kernel to check)")
        return res
    try:
        cases = split_check_set(cache.load_check_set(entry))
    except (CacheError, ValueError) as e:
        res["detail"] = f"check set unusable: {e}"
        return res
    if not cases:
        res["detail"] = "entry has no check cases"
        return res
    kernel = loader.load(entry)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ok = True
    for i, c in enumerate(cases):
        q, k, v = (t.to(device) for t in (c.q, c.k, c.v))
        vt = {n: t.to(device) for n, t in c.variant_tensors.items()}
        before = [t.clone() for t in (q, k, v, *vt.values())]
        why = kernel.unsupported(q, k, v)
        case: dict[str, Any] = {"case": i, "shape": [list(q.shape), list(k.shape), list(v.shape)]}
        if why is not None:
            case.update(ok=False, detail=f"kernel's SUPPORTS rejects its own check case ({why})")
        else:
            out = torch.full(q.shape[:-1] + (v.shape[-1],), float("nan"), dtype=q.dtype, device=device)
            out = kernel(q, k, v, out, c.scale, **vt)
            if device == "cuda":
                torch.cuda.synchronize()
            out = out.cpu()
            ref = c.ref.double()
            base = (c.baseline if c.baseline is not None else c.ref.to(out.dtype)).double()
            atol = ATOL[str(out.dtype).replace("torch.", "")]
            bound = FACTOR * (base - ref).abs().max().item() + atol
            if torch.isnan(out).any():
                case.update(ok=False, detail=f"{int(torch.isnan(out).sum())} output elements not written (NaN)")
            elif any(not torch.equal(a, b) for a, b in zip(before, (q, k, v, *vt.values()))):
                case.update(ok=False, detail="kernel mutated an input")
            else:
                err = (out.double() - ref).abs().max().item()
                case.update(ok=err <= bound, max_err=err, bound=bound,
                            detail="" if err <= bound else f"max error {err:.3g} > bound {bound:.3g}")
        ok &= case["ok"]
        res["cases"].append(case)
    res["ok"] = ok
    res["detail"] = f"{len(cases)} case(s) passed" if ok else "; ".join(
        f"case {c['case']}: {c['detail']}" for c in res["cases"] if not c["ok"])
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m torch_r1attn._entry_check")
    ap.add_argument("--root", required=True, help="cache root")
    ap.add_argument("entry", help="entry directory name in this device's shard")
    args = ap.parse_args(argv)
    import torch

    # The interpreter must be chosen before triton is imported (its JIT reads the variable then).
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        res = _check_entry(args.root, args.entry)
    except Exception as e:  # noqa: BLE001 - reported to the parent as this entry's failure
        res = {"entry": args.entry, "ok": False, "detail": f"{type(e).__name__}: {e}", "cases": []}
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
