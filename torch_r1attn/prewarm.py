"""Which attention signatures a model will hit, derived from its config (for ``r1attn prewarm``).

A transformers model with ``attn_implementation="r1attn"`` calls attention with (see
:mod:`torch_r1attn.integrations.hf`):

* prefill: ``Sq = Sk = S``, top-left causal, or a causal sliding window on ``sliding_attention``
  layers; plus ``softcap`` when ``attn_logit_softcapping`` is set;
* decode (KV cache): ``Sq = 1``, bottom-right alignment; ``Sk = S`` on full layers and
  ``min(S, window)`` on sliding layers (transformers' sliding cache keeps only the window);
* with a padded batch, a key-padding row ``(B, 1, 1, Sk)`` on top (``padded=True``).

Layer types come from ``config.layer_types`` when present (Gemma-2/3, Qwen2 and newer configs),
else Gemma-2's documented alternation (even layers sliding), else every layer sliding when
``sliding_window`` is set and not switched off (``use_sliding_window: false``, Qwen2), else full.
Head dim: ``head_dim``, else ``hidden_size // num_attention_heads``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, NamedTuple

import torch

from . import variants as V
from .spec import DTYPE_NAMES, NAME_DTYPES, AttentionSpec, length_bucket
from .variants import Variant

SLIDING, FULL = "sliding_attention", "full_attention"


class Signature(NamedTuple):
    """One (spec, variant) to prewarm; unpacks as ``spec, variant``."""

    spec: AttentionSpec
    variant: Variant

    @property
    def label(self) -> str:
        B, Hq, Hkv, Sq, Sk = self.spec.example or (0, 0, 0, self.spec.sq_bucket, self.spec.sk_bucket)
        phase = "decode" if Sq == 1 else "prefill"
        return f"{phase} {self.spec.variant} B={B} Hq={Hq} Hkv={Hkv} Sq={Sq} Sk={Sk} D={self.spec.head_dim}"


@dataclass(frozen=True)
class AttnConfig:
    """The attention-relevant part of a model config."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    layer_types: tuple[str, ...]
    sliding_window: int | None
    softcap: float | None

    def __post_init__(self):
        for n in ("num_heads", "num_kv_heads", "head_dim"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"model config: {n} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model config: {self.num_heads} attention heads is not a multiple of "
                             f"{self.num_kv_heads} key/value heads")
        bad = [t for t in self.layer_types if t not in (SLIDING, FULL)]
        if bad:
            raise ValueError(f"model config: unsupported layer types {sorted(set(bad))} (known: {SLIDING}, {FULL})")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ValueError("model config: sliding_attention layers need a sliding_window")


def _get(cfg: Any, name: str, default=None):
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def load_config(source: Any) -> Any:
    """A config from a ``config.json`` path (or a directory holding one), a dict, or a
    transformers ``PretrainedConfig``. Raises FileNotFoundError / ValueError (bad JSON)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model config not found: {path}")
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        return data.get("text_config", data) if isinstance(data, dict) else data
    return source


def attn_config(cfg: Any) -> AttnConfig:
    """Read heads, head dim, layer types, window and soft-cap from a config (dict or object).

    Raises ValueError for a config without ``num_attention_heads`` / ``num_hidden_layers`` or
    with inconsistent values."""
    cfg = load_config(cfg)
    heads = _get(cfg, "num_attention_heads")
    layers = _get(cfg, "num_hidden_layers")
    if heads is None or layers is None:
        raise ValueError("model config needs num_attention_heads and num_hidden_layers")
    kv = _get(cfg, "num_key_value_heads") or heads
    head_dim = _get(cfg, "head_dim")
    if not head_dim:
        hidden = _get(cfg, "hidden_size")
        if not hidden:
            raise ValueError("model config needs head_dim or hidden_size")
        if hidden % heads:
            raise ValueError(f"model config: hidden_size {hidden} is not a multiple of {heads} heads")
        head_dim = hidden // heads
    window = _get(cfg, "sliding_window")
    mtype = _get(cfg, "model_type", "")
    types = _get(cfg, "layer_types")
    if types:
        types = tuple(types)
        if len(types) != layers:
            raise ValueError(f"model config: {len(types)} layer_types for {layers} layers")
    elif mtype in ("gemma2",) and window:
        types = tuple(SLIDING if i % 2 == 0 else FULL for i in range(layers))
    elif window and _get(cfg, "use_sliding_window", True) is not False:
        types = (SLIDING,) * layers
    else:
        types = (FULL,) * layers
    cap = _get(cfg, "attn_logit_softcapping")
    return AttnConfig(num_heads=int(heads), num_kv_heads=int(kv), head_dim=int(head_dim), layer_types=types,
                      sliding_window=int(window) if window and SLIDING in types else None,
                      softcap=float(cap) if cap else None)


def signatures_from_config(config: Any, seq_lens: Iterable[int], batch_sizes: Iterable[int] = (1,),
                           dtype: str | torch.dtype = "bf16", *, decode: bool = True,
                           padded: bool = False) -> list[Signature]:
    """Every distinct signature the model hits for these lengths and batch sizes.

    ``config``: a config.json path, a dict, or a transformers config. ``seq_lens``: prompt /
    context lengths. ``dtype``: ``"bf16"``/``"fp16"``/``"fp32"`` or a torch dtype. Returns
    :class:`Signature` ``(spec, variant)`` pairs, deduplicated by spec (the first, i.e. the
    smallest batch, keeps its example shape), prefill before decode.

    Raises ValueError/TypeError for bad lengths, batch sizes, dtypes or configs."""
    ac = attn_config(config)
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise TypeError(f"dtype must be one of {sorted(NAME_DTYPES)}, got {dtype}")
        dtype = DTYPE_NAMES[dtype]
    if dtype not in NAME_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(NAME_DTYPES)}, got {dtype!r}")
    seq_lens, batch_sizes = _ints("seq_lens", seq_lens), _ints("batch_sizes", batch_sizes)
    g = ac.num_heads // ac.num_kv_heads
    kinds = sorted(set(ac.layer_types), key=lambda t: t != FULL)
    out: dict[AttentionSpec, Signature] = {}

    def add(kind: str, Sq: int, Sk: int, B: int, align: str):
        if kind == SLIDING:
            v = V.sliding_window(ac.sliding_window, align)
        else:
            v = V.causal(align)
        if padded and B > 1:
            v = v.with_parts(V.DenseMask(torch.ones(B, 1, 1, Sk, dtype=torch.bool)))
        if ac.softcap:
            v = v + V.softcap(ac.softcap)
        spec = AttentionSpec(dtype=dtype, head_dim=ac.head_dim, head_dim_v=ac.head_dim, gqa=g, variant=v.key,
                             sq_bucket=length_bucket(Sq), sk_bucket=length_bucket(Sk),
                             example=(B, ac.num_heads, ac.num_kv_heads, Sq, Sk))
        out.setdefault(spec, Signature(spec, v))

    for phase in ("prefill", "decode") if decode else ("prefill",):
        for kind in kinds:
            for S in seq_lens:
                for B in batch_sizes:
                    if phase == "prefill":
                        add(kind, S, S, B, "top_left")
                    else:
                        sk = min(S, ac.sliding_window) if kind == SLIDING else S
                        add(kind, 1, sk, B, "bottom_right")
    return list(out.values())


def _ints(name: str, xs: Iterable[int]) -> list[int]:
    xs = list(xs)
    if not xs:
        raise ValueError(f"{name} is empty")
    for x in xs:
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"{name} must be positive ints, got {x!r}")
    return xs


def config_from_args(model_type: str, hidden_size: int, heads: int, kv_heads: int | None, layers: int,
                     head_dim: int | None = None, sliding_window: int | None = None,
                     softcap: float | None = None, layer_types: list[str] | None = None) -> dict[str, Any]:
    """A config dict from command-line sizes (``--model-type llama --hidden-size 4096 ...``)."""
    cfg: dict[str, Any] = {"model_type": model_type, "hidden_size": hidden_size, "num_attention_heads": heads,
                           "num_key_value_heads": kv_heads or heads, "num_hidden_layers": layers}
    if head_dim:
        cfg["head_dim"] = head_dim
    if sliding_window:
        cfg["sliding_window"] = sliding_window
    if softcap:
        cfg["attn_logit_softcapping"] = softcap
    if layer_types:
        cfg["layer_types"] = list(layer_types)
    return cfg
