"""`QuantRecipe`: what to quantize and how, as one frozen dataclass of plain values.

A recipe names a weight format, an activation scheme, the KV cache format and the rotation
option; `comet_jax.quant.convert.quantize_model` turns (float params, recipe, calibration stats)
into a quantized model. Presets (`PRESETS`, `preset(name, **overrides)`) are the rows of the
accuracy table:

| preset | weights | activations | KV | rotation |
|---|---|---|---|---|
| ``bf16`` | float | float | float | no |
| ``w8a8`` | INT8 per channel, RTN | INT8 per token | float | no |
| ``w4a16_rtn`` / ``w4a16_gptq`` | INT4 per channel | float | float | no |
| ``w4a4_rtn`` | INT4 RTN | INT4 per token | float | no |
| ``w4a8kv4`` | INT4 GPTQ | INT8 per token | KV4 | no |
| ``fmpq_w4ax`` / ``fmpq_w4axkv4`` | INT4 GPTQ | FMPQ INT4/INT8 blocks | float / KV4 | no |
| ``rot_w4a4kv4`` | INT4 GPTQ | INT4 per token | KV4 | Hadamard |
| ``rot_fmpq_w4axkv4`` | INT4 GPTQ | FMPQ | KV4 | Hadamard |

Activation schemes: ``"none"`` (float), ``"uniform4"`` / ``"uniform8"`` (every channel INT4 /
INT8, no permutation; W4A4 and W4A8 run on the W4Ax kernel with one empty segment),
``"fmpq"`` (permutation + INT4/INT8 blocks from `fmpq`, an `FMPQConfig`).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
from typing import Any

from comet_jax.quant.fmpq import FMPQConfig

W_QUANTIZERS = ("rtn", "gptq", "lwc")
ACT_SCHEMES = ("none", "uniform4", "uniform8", "fmpq")
ACT_GRANULARITIES = ("segment", "block")
KV_GROUPS = (32, 64, 128)


@dataclasses.dataclass(frozen=True)
class QuantRecipe:
    """A quantization recipe (module docstring).

    Attributes:
      name: label used in reports.
      w_bits: None (float weights), 4 or 8. Weights are symmetric.
      w_quantizer: "rtn", "gptq" (needs calibration Hessians) or "lwc" (learned clipping).
      w_group: None = per-output-channel scales; else the group size along K (a multiple of
        `tile`).
      w_clip: RTN/GPTQ range multiplier (1.0 = max |w|).
      act: activation scheme, one of ACT_SCHEMES.
      act_granularity: "segment" (per token per precision segment, the kernel format) or
        "block" (per token per FMPQ block; simulation only).
      act_clip: activation range multiplier.
      fmpq: FMPQ plan configuration (block size, outlier rule / INT8 budget); its block_size
        is also the block of the uniform schemes.
      tile: INT4 packing tile (the kernel's K tile); must divide fmpq.block_size.
      kv4: simulate the INT4 KV cache (asymmetric, per token per head, groups of `kv_group`).
      kv_group: KV4 group size along head_dim.
      kv_recent_window: for a query at position t, the keys and values at positions
        > t - kv_recent_window (the query itself and the W-1 tokens before it) stay
        unquantized; older ones go through KV4. 0 = every position KV4. Needs kv4. The
        serving engine delivers the same semantics (`EngineConfig.kv_recent_window`, which a
        quantized checkpoint's recipe sets: `comet_jax.engine.recent_window`; docs/accuracy.md,
        "KV4 recent bf16 window").
      rotation: online Hadamard rotation of every linear input (QuaRot-style), weights rotated
        offline to match.
      fold: fold permutations into producing weights where the math allows (down_proj input
        into gate/up rows; o_proj input into q/k/v rows when the plan has the foldable form).
      attn_out_foldable: plan the o_proj input with `fmpq.plan_attention_out` (always
        foldable, coarser) instead of the free sort with a run-time gather.
      sorted_gather: store each run-time permutation with both segments in ascending source
        channel order (`fmpq.gather_order`), the quantized weight columns reordered to match
        after quantization (GPTQ still runs in the plan's order): the same integers and
        scales in every GEMM, so the same outputs bit for bit, and the act_quant kernel's
        gather reads each row nearly in order (act_quant in 0.52-0.55x the score order's
        time on the H100; LLaMA-3-8B serving 2.04x bf16 against 1.96x with the score order,
        two machines, docs/benchmarks.md 2026-11-27).
        Applies with per-segment activation scales and per-channel weight scales only (the
        order decides the blocks / groups otherwise).
      gptq_percdamp, gptq_act_order: GPTQ options.
      lwc_steps, lwc_lr: learned weight clipping options.
    """

    name: str = "custom"
    w_bits: int | None = None
    w_quantizer: str = "rtn"
    w_group: int | None = None
    w_clip: float = 1.0
    act: str = "none"
    act_granularity: str = "segment"
    act_clip: float = 1.0
    # 25% of the blocks INT8: on SmolLM2 the threshold rule (8 x median) marks only ~4% of the
    # channels and leaves perplexity in the thousands (docs/accuracy.md, INT8-budget ablation).
    fmpq: FMPQConfig = FMPQConfig(block_size=64, rule="budget", int8_budget=0.25)
    tile: int = 64
    kv4: bool = False
    kv_group: int = 64
    kv_recent_window: int = 0
    rotation: bool = False
    fold: bool = True
    attn_out_foldable: bool = False
    sorted_gather: bool = True
    gptq_percdamp: float = 0.01
    gptq_act_order: bool = False
    lwc_steps: int = 100
    lwc_lr: float = 5e-3

    def __post_init__(self):
        if self.w_bits not in (None, 4, 8):
            raise ValueError(f"w_bits={self.w_bits!r} must be None, 4 or 8")
        if self.w_quantizer not in W_QUANTIZERS:
            raise ValueError(f"w_quantizer={self.w_quantizer!r} must be one of {W_QUANTIZERS}")
        if self.act not in ACT_SCHEMES:
            raise ValueError(f"act={self.act!r} must be one of {ACT_SCHEMES}")
        if self.act_granularity not in ACT_GRANULARITIES:
            raise ValueError(
                f"act_granularity={self.act_granularity!r} must be one of {ACT_GRANULARITIES}"
            )
        if self.w_bits is None and self.act != "none":
            raise ValueError(f"act={self.act!r} needs quantized weights (w_bits=4 or 8)")
        if self.w_bits == 8 and self.act not in ("none", "uniform8"):
            raise ValueError(f"w_bits=8 supports act 'none' or 'uniform8', got {self.act!r}")
        if self.w_bits == 8 and self.w_group is not None:
            raise ValueError(f"w_bits=8 is per channel only, got w_group={self.w_group}")
        if self.w_bits == 8 and self.act == "none":
            raise ValueError("w_bits=8 with float activations is not a supported format")
        if self.fmpq.block_size % self.tile:
            raise ValueError(f"tile={self.tile} must divide fmpq.block_size={self.fmpq.block_size}")
        if self.w_group is not None and (self.w_group <= 0 or self.w_group % self.tile):
            raise ValueError(
                f"w_group={self.w_group} must be a positive multiple of tile={self.tile}"
            )
        if self.kv_group not in KV_GROUPS:
            raise ValueError(f"kv_group={self.kv_group} must be one of {KV_GROUPS}")
        w = self.kv_recent_window
        if isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 0:
            raise ValueError(f"kv_recent_window={w!r} must be an int >= 0 (0 = off)")
        object.__setattr__(self, "kv_recent_window", int(w))  # numpy ints -> int (JSON)
        if w and not self.kv4:
            raise ValueError(
                f"kv_recent_window={w} needs kv4=True (a float window of a float cache is "
                "the float cache)"
            )
        for name in ("w_clip", "act_clip"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"{name}={v} must be in (0, 1]")

    @property
    def is_float(self) -> bool:
        return self.w_bits is None

    @property
    def needs_hessian(self) -> bool:
        return self.w_bits is not None and self.w_quantizer in ("gptq", "lwc")

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> QuantRecipe:
        d = json.loads(text) if isinstance(text, str) else dict(text)
        d["fmpq"] = FMPQConfig(**d["fmpq"])
        return cls(**d)


def _presets() -> dict[str, QuantRecipe]:
    w4 = dict(w_bits=4, w_quantizer="gptq")
    return {
        "bf16": QuantRecipe(name="bf16"),
        "w8a8": QuantRecipe(name="w8a8", w_bits=8, act="uniform8"),
        "w4a16_rtn": QuantRecipe(name="w4a16_rtn", w_bits=4, w_quantizer="rtn"),
        "w4a16_gptq": QuantRecipe(name="w4a16_gptq", **w4),
        "w4a4_rtn": QuantRecipe(name="w4a4_rtn", w_bits=4, w_quantizer="rtn", act="uniform4"),
        "w4a8kv4": QuantRecipe(name="w4a8kv4", act="uniform8", kv4=True, **w4),
        "fmpq_w4ax": QuantRecipe(name="fmpq_w4ax", act="fmpq", **w4),
        "fmpq_w4axkv4": QuantRecipe(name="fmpq_w4axkv4", act="fmpq", kv4=True, **w4),
        "rot_w4a4kv4": QuantRecipe(
            name="rot_w4a4kv4", act="uniform4", kv4=True, rotation=True, **w4
        ),
        "rot_fmpq_w4axkv4": QuantRecipe(
            name="rot_fmpq_w4axkv4", act="fmpq", kv4=True, rotation=True, **w4
        ),
    }


PRESETS: dict[str, QuantRecipe] = _presets()


def preset(name: str, **overrides: Any) -> QuantRecipe:
    """A named preset with fields replaced (``preset("fmpq_w4ax", w_group=64)``)."""
    if name not in PRESETS:
        raise ValueError(f"preset name={name!r}; expected one of {sorted(PRESETS)}")
    r = dataclasses.replace(PRESETS[name], **overrides)
    return r
