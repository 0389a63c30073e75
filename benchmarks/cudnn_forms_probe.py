"""Which cuDNN forms can carry ALiBi and the sliding window, and what they cost (one GPU).

Two questions, both about reaching cuDNN's attention kernel (which SDPA exposes only as full or
top-left causal) for variants that today run our Triton dense loop:

* **ALiBi (causal).** ``s = scale q.k + slope (j - q_pos)``; ``-slope q_pos`` is constant along a
  row, so softmax drops it: the bias is ``slope * j``, a *key-only* term. A key-only term fits into
  extra head dimensions: ``q' = [q, a]``, ``k' = [k, b]`` with ``scale a.b = slope j``. Exact in
  bf16 when ``j`` is written in base-256 digits (integers < 256 are exact) and ``slope / scale`` as
  a bf16 hi + lo pair: ``a = [c_hi 256, c_lo 256, c_hi, c_lo]``, ``b = [j1, j1, j0, j0]``, padded
  to a multiple of 8. Times cuDNN causal at D + 8 (V padded, and V left at D if cuDNN takes
  D_v != D_qk), the augmentation itself, and a broadcast key bias through the private cuDNN op with
  ``is_causal`` (fp32 and bf16 bias), each checked against an fp32 reference on one batch.
* **Sliding window.** Its diagonal ``W x W`` chunks are causal squares: cuDNN causal on the
  chunk view ``(B, H * S/W, W, D)`` with its log-sum-exp (the private op), the rest (the strict
  upper triangle of the previous chunk) left to a Triton kernel that starts from that state.
  Times the chunked call and checks the LSE layout.

* **Documents (causal).** Every (batch, head, document) is a causal sequence of its own: cuDNN's
  ragged (varlen) path through the private ``_cudnn_attention_forward`` with cumulative offsets.
  (B, H, S, D) contiguous is already a packed one-head THD tensor ``(B H S, 1, D)`` with one
  sequence per (b, h, document): no copy. Also the (B S, H, D) form (a transposed copy).

    python benchmarks/cudnn_forms_probe.py [--shape B4_H32_S4096_D128 ...] [--docs-only]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import SHAPES, bench_gpu, environment, out_dir, packed_docs, write_json
from torch_r1attn import variants as V


def _sets(B: int, H: int, S: int, D: int) -> list[tuple]:
    """Three (q, k, v) sets of bf16 normals (timing rotates them)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    return [tuple(torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
            for _ in range(3)]


def _measure(row: dict, name: str, fn, sets: list, rep_ms: float, err=None) -> None:
    """row[name]: fn's protocol-2 ms over ``sets`` (first, ``row[name + "_maxerr"] = err(fn(*sets[0]))``
    when ``err`` is given), or the error it raised (a probe records what failed and goes on)."""
    try:
        if err is not None:
            row[f"{name}_maxerr"] = err(fn(*sets[0]))
        row[name] = bench_gpu(fn, sets, rep_ms=rep_ms)
    except Exception as e:  # noqa: BLE001
        row[name] = f"{type(e).__name__}: {str(e)[:300]}"


def alibi_ref(q, k, v, slopes, scale):
    """fp32 causal ALiBi on batch 0."""
    q, k, v = (t[:1].float() for t in (q, k, v))
    S = q.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    i = torch.arange(S, device=q.device)
    s = s + slopes.float()[None, :, None, None] * (i[None, :] - i[:, None]).float()
    s = s.masked_fill(i[None, :] > i[:, None], float("-inf"))
    return torch.matmul(torch.softmax(s, -1), v)


def aug(q, k, v, slopes, scale, pad_to: int, pad_v: bool):
    """(q', k', v') with the key-only ALiBi term in extra head dims (see the module docstring)."""
    B, H, S, D = q.shape
    c = slopes.double() / scale
    c_hi = c.to(q.dtype)
    c_lo = (c - c_hi.double()).to(q.dtype)
    a = torch.zeros(H, pad_to - D, dtype=q.dtype, device=q.device)
    a[:, 0], a[:, 1], a[:, 2], a[:, 3] = c_hi * 256, c_lo * 256, c_hi, c_lo
    j = torch.arange(S, device=q.device)
    b = torch.zeros(S, pad_to - D, dtype=q.dtype, device=q.device)
    b[:, 0] = b[:, 1] = (j // 256).to(q.dtype)
    b[:, 2] = b[:, 3] = (j % 256).to(q.dtype)
    q2 = torch.cat([q, a[None, :, None, :].expand(B, H, S, pad_to - D)], -1)
    k2 = torch.cat([k, b[None, None].expand(B, k.shape[1], S, pad_to - D)], -1)
    v2 = F.pad(v, (0, pad_to - D)) if pad_v else v
    return q2, k2, v2


def probe(B: int, H: int, S: int, D: int, rep_ms: float) -> dict:
    sets = _sets(B, H, S, D)
    scale = D ** -0.5
    slopes = V.alibi_slopes(H).to("cuda")
    row: dict = {"B": B, "H": H, "S": S, "D": D}
    ref = alibi_ref(*sets[0], slopes, scale)

    def err(out):
        return (out[:1].float() - ref).abs().max().item()

    def cudnn(q, k, v, **kw):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, **kw)

    _measure(row, "causal_D", lambda q, k, v: cudnn(q, k, v, is_causal=True), sets, rep_ms)
    for pad in (D + 8, D + 16) + ((192,) if D < 192 else ()):
        for pad_v in (True, False):
            name = f"alibi_aug{pad}_{'vpad' if pad_v else 'v' + str(D)}"

            def fn(q, k, v, pad=pad, pad_v=pad_v):
                q2, k2, v2 = aug(q, k, v, slopes, scale, pad, pad_v)
                o = cudnn(q2, k2, v2, is_causal=True)
                return o[..., :D] if pad_v else o

            _measure(row, name, fn, sets, rep_ms, err)
            if not isinstance(row[name], float):
                continue
            q2, k2, v2 = aug(*sets[0], slopes, scale, pad, pad_v)
            _measure(row, name + "_cudnn_only", lambda q, k, v, q2=q2, k2=k2, v2=v2: cudnn(q2, k2, v2, is_causal=True),
                     sets, rep_ms)
            if pad == D + 8 and pad_v:
                _measure(row, "aug_only", lambda q, k, v, pad=pad: aug(q, k, v, slopes, scale, pad, True), sets, rep_ms)
    j = torch.arange(S, device="cuda").float()
    for bdt in (torch.float32, torch.bfloat16):
        bias = (slopes[:, None] * j[None, :]).to(bdt)[None, :, None, :].expand(B, H, S, S)

        def fn(q, k, v, bias=bias):
            return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, bias, False, 0.0, True, False,
                                                                      scale=scale)[0]
        _measure(row, f"alibi_bias_private_{str(bdt).split('.')[-1]}", fn, sets, rep_ms, err)

    # sliding window: cuDNN causal on the W x W diagonal chunks, with its log-sum-exp
    W = 1024
    if S % W == 0:
        nch = S // W

        def chunks(q, k, v):
            qc, kc, vc = (t.view(B, H * nch, W, D) for t in (q, k, v))
            return torch.ops.aten._scaled_dot_product_cudnn_attention(qc, kc, vc, None, True, 0.0, True, False,
                                                                      scale=scale)

        o, lse = chunks(*sets[0])[:2]
        row["sw_chunk_out"] = {"shape": list(o.shape), "stride": list(o.stride())}
        row["sw_chunk_lse"] = {"shape": list(lse.shape), "stride": list(lse.stride()), "dtype": str(lse.dtype)}
        q, k, v = (t[:1, :1, :W].float() for t in sets[0])
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        s = s.masked_fill(torch.ones(W, W, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
        row["sw_chunk_lse_maxerr"] = (lse.reshape(B, H * nch, W)[0, 0].float() - torch.logsumexp(s, -1)[0, 0]).abs().max().item()
        row["sw_chunk_out_maxerr"] = (o[0, 0].float() - torch.matmul(torch.softmax(s, -1), v)[0, 0]).abs().max().item()
        _measure(row, "sw_chunks_lse", lambda q, k, v: chunks(q, k, v)[0], sets, rep_ms)
        _measure(row, "sw_chunks_nolse",
                 lambda q, k, v: cudnn(*(t.view(B, H * nch, W, D) for t in (q, k, v)), is_causal=True), sets, rep_ms)
    return row


def probe_docs(B: int, H: int, S: int, D: int, rep_ms: float) -> dict:
    sets = _sets(B, H, S, D)
    scale = D ** -0.5
    ids = packed_docs(S, 8, device="cuda")
    starts = torch.nonzero(torch.diff(ids, prepend=ids[:1] - 1)).flatten()  # first index of each doc
    lens = torch.diff(torch.cat([starts, torch.tensor([S], device="cuda")]))
    row: dict = {"B": B, "H": H, "S": S, "D": D, "doc_lens": lens.tolist()}
    # reference: batch 0, head 0, fp32
    q0, k0, v0 = (t[0, 0].float() for t in sets[0])
    i = torch.arange(S, device="cuda")
    allowed = (ids[None, :] == ids[:, None]) & (i[None, :] <= i[:, None])
    ref = torch.softmax((q0 @ k0.T * scale).masked_fill(~allowed, float("-inf")), -1) @ v0

    def err(out):
        return (out[0, 0].float() - ref).abs().max().item()

    # one-head THD: sequences (b, h, doc) in memory order
    base = (torch.arange(B * H, device="cuda") * S)[:, None] + starts[None, :]
    cum1 = torch.cat([base.flatten(), torch.tensor([B * H * S], device="cuda")]).to(torch.int32)
    mx = int(lens.max())

    def thd1(q, k, v):
        qq, kk, vv = (t.reshape(B * H * S, 1, D) for t in (q, k, v))
        o = torch.ops.aten._cudnn_attention_forward(qq, kk, vv, None, cum1, cum1, mx, mx, False, 0.0, True, False,
                                                    scale=scale)[0]
        return o.view(B, H, S, D)

    # (B S, H, D): sequences (b, doc), heads as heads
    baseB = (torch.arange(B, device="cuda") * S)[:, None] + starts[None, :]
    cumB = torch.cat([baseB.flatten(), torch.tensor([B * S], device="cuda")]).to(torch.int32)

    def thdH(q, k, v):
        qq, kk, vv = (t.transpose(1, 2).reshape(B * S, H, D) for t in (q, k, v))
        o = torch.ops.aten._cudnn_attention_forward(qq, kk, vv, None, cumB, cumB, mx, mx, False, 0.0, True, False,
                                                    scale=scale)[0]
        return o.view(B, S, H, D).transpose(1, 2)

    def thdH_nocopy(q, k, v):
        qq, kk, vv = (t.view(B * S, H, D) for t in (q, k, v))
        return torch.ops.aten._cudnn_attention_forward(qq, kk, vv, None, cumB, cumB, mx, mx, False, 0.0, True,
                                                       False, scale=scale)[0]

    _measure(row, "docs_thd1", thd1, sets, rep_ms, err)
    _measure(row, "docs_thdH", thdH, sets, rep_ms, err)
    _measure(row, "docs_thdH_nocopy", thdH_nocopy, [tuple(t.transpose(1, 2).contiguous() for t in s) for s in sets],
             rep_ms)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", action="append", choices=list(SHAPES))
    ap.add_argument("--rep-ms", type=float, default=100.0)
    ap.add_argument("--docs-only", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("cudnn_forms_probe needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for name in args.shape or list(SHAPES):
        r = {} if args.docs_only else probe(*SHAPES[name], rep_ms=args.rep_ms)
        r.update(probe_docs(*SHAPES[name], rep_ms=args.rep_ms))
        rows.append({"shape": name, **r})
        for key, val in r.items():
            print(f"{name} {key}: {val:.4f}" if isinstance(val, float) else f"{name} {key}: {val}", flush=True)
    write_json(out_dir() / "cudnn_forms_probe.json", {"env": environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
