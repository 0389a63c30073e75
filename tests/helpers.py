"""Tolerances and comparisons shared by every test (one place, dtype-aware)."""

from __future__ import annotations

import torch

# Extra absolute slack on top of the "2x PyTorch's own error" rule, per dtype.
ATOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 2e-5, torch.float64: 1e-10}


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, baseline: torch.Tensor | None = None,
                        factor: float = 2.0, name: str = "out") -> None:
    """flash-attention's rule: ``|out - ref| <= factor * |baseline - ref| + atol`` elementwise-max,
    where ``baseline`` is PyTorch's own same-dtype computation (None: ``ref`` cast to out's dtype).
    On failure, print the worst elements."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert not torch.isnan(out).any(), f"{name}: has NaN ({int(torch.isnan(out).sum())} elements)"
    ref64 = ref.double()
    err = (out.double() - ref64).abs()
    if baseline is None:
        baseline = ref.to(out.dtype)
    base_err = (baseline.double() - ref64).abs().max().item()
    atol = ATOL[out.dtype]
    bound = factor * base_err + atol
    worst = err.max().item()
    if worst > bound:
        flat = err.flatten()
        idx = torch.topk(flat, min(5, flat.numel())).indices
        rows = []
        for i in idx.tolist():
            pos = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), err.shape))
            rows.append(f"  at {pos}: got {out.double().flatten()[i].item():.6g}, ref {ref64.flatten()[i].item():.6g}")
        raise AssertionError(
            f"{name}: max error {worst:.3g} > bound {bound:.3g} (= {factor} x baseline error {base_err:.3g} + atol {atol})\n"
            + "\n".join(rows)
        )
