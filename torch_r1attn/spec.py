"""``AttentionSpec``: what makes a kernel reusable, and the device fingerprint.

A spec is the cache key of a kernel: (dtype, head dims, GQA ratio, variant key, causal
alignment, query/key length buckets). Batch and head counts are *not* in the key — every
kernel takes them at run time — but the first call's full shape rides along as ``example`` so a
search tunes for what the caller actually runs.

Names are readable (FlashInfer style) and deterministic::

    attn_bf16_dqk128_dv128_g4_sq4096_sk4096_sw1024+softcap50

and ``spec.hash`` is a content hash of the canonical JSON (plus the schema version), used for
directory names where the readable URI would be too long.

The *device fingerprint* (GPU name, compute capability, torch / triton / CUDA versions) is not
in the spec: the cache shards by it, so a new toolchain is a clean miss, never a stale load.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

SCHEMA_VERSION = 1

DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
NAME_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}

# Decode-like query lengths get their own buckets: the best kernel for Sq=1 (split-KV) is not
# the best for Sq=16 and neither is a prefill kernel.
_SMALL_BUCKETS = (1, 2, 4, 8, 16)
MIN_BUCKET = 16


def length_bucket(n: int) -> int:
    """Smallest bucket >= n: 1, 2, 4, 8, 16, then powers of two."""
    if n < 1:
        raise ValueError(f"sequence length must be >= 1, got {n}")
    return 1 << (n - 1).bit_length()  # 1, 2, 4, 8, 16 and every power of two above


@dataclass(frozen=True)
class AttentionSpec:
    dtype: str
    head_dim: int
    head_dim_v: int
    gqa: int
    variant: str
    sq_bucket: int
    sk_bucket: int
    # Not part of the key: the first call's full shape (B, Hq, Hkv, Sq, Sk), for tuning.
    example: tuple[int, int, int, int, int] | None = field(default=None, compare=False, hash=False)

    @property
    def uri(self) -> str:
        return (
            f"attn_{self.dtype}_dqk{self.head_dim}_dv{self.head_dim_v}_g{self.gqa}"
            f"_sq{self.sq_bucket}_sk{self.sk_bucket}_{self.variant}"
        )

    def key_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("example")
        return d

    @functools.cached_property
    def hash(self) -> str:
        payload = json.dumps({"schema": SCHEMA_VERSION, **self.key_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def dirname(self) -> str:
        """Filesystem-safe, readable, unique: the URI (shortened) plus the hash."""
        safe = re.sub(r"[^A-Za-z0-9_.+@-]", "_", self.uri)[:120]
        return f"{safe}-{self.hash}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return NAME_DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["example"] = list(self.example) if self.example else None
        d["uri"] = self.uri
        d["hash"] = self.hash
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AttentionSpec":
        ex = d.get("example")
        return cls(
            dtype=d["dtype"], head_dim=int(d["head_dim"]), head_dim_v=int(d["head_dim_v"]),
            gqa=int(d["gqa"]), variant=d["variant"], sq_bucket=int(d["sq_bucket"]),
            sk_bucket=int(d["sk_bucket"]), example=tuple(int(x) for x in ex) if ex else None,
        )

    @classmethod
    def from_call(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant_key: str) -> "AttentionSpec":
        B, Hq, Sq, D = q.shape
        Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
        return cls(
            dtype=DTYPE_NAMES.get(q.dtype, str(q.dtype).replace("torch.", "")),
            head_dim=D, head_dim_v=Dv, gqa=Hq // Hkv, variant=variant_key,
            sq_bucket=length_bucket(Sq), sk_bucket=length_bucket(Sk), example=(B, Hq, Hkv, Sq, Sk),
        )


@functools.lru_cache(maxsize=None)
def device_fingerprint(device_index: int | None = None) -> dict[str, str]:
    """What a kernel's validity depends on besides its spec. ``None`` = current CUDA device
    (or the CPU when there is none)."""
    import triton  # local: importing triton is slow and only needed here

    fp = {
        "torch": torch.__version__.split("+")[0],
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda or "none"),
    }
    if torch.cuda.is_available():
        idx = torch.cuda.current_device() if device_index is None else device_index
        props = torch.cuda.get_device_properties(idx)
        fp.update(device=props.name, cc=f"{props.major}{props.minor}")
    else:
        fp.update(device="cpu-interpreter", cc="none")
    return fp


def fingerprint_name(fp: dict[str, str]) -> str:
    """Readable directory name of a fingerprint, e.g. ``NVIDIA_H200-sm90-torch2.11.0-triton3.6.0-cuda13.0``."""
    dev = re.sub(r"[^A-Za-z0-9]+", "_", fp["device"]).strip("_")
    return f"{dev}-sm{fp['cc']}-torch{fp['torch']}-triton{fp['triton']}-cuda{fp['cuda']}"
