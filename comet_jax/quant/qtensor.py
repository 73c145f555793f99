"""``QuantizedTensor``: a quantized array as one pytree that jit, sharding and orbax accept.

Array leaves (may be sharded, saved, donated): ``values``, ``scales``, ``zeros``.
Static metadata (part of the tree structure, hashed by jit): ``bits``, ``symmetric``,
``granularity``, ``group_size``, ``layout``, ``tile``, ``shape`` (the logical shape).

Layouts:
  ``"int8"``      values hold one integer per element, shape == ``shape``
                  (int8 when symmetric, uint8 when asymmetric).
  ``"int4_pack"`` 4-bit values packed two per byte along the last axis in the half-split
                  tile layout of :mod:`comet_jax.quant.pack` (``values: [..., K/2]``;
                  int8 when symmetric, uint8 when asymmetric).

The reference semantics is :meth:`QuantizedTensor.dequantize`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from comet_jax.quant import pack, quantizers

LAYOUTS = ("int8", "int4_pack")


@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    values: jax.Array
    scales: jax.Array
    zeros: jax.Array | None
    bits: int = 8
    symmetric: bool = True
    granularity: str = "row"
    group_size: int | None = None
    layout: str = "int8"
    tile: int = pack.DEFAULT_TILE
    shape: tuple[int, ...] = ()

    @classmethod
    def quantize(
        cls,
        x,
        *,
        bits: int,
        symmetric: bool = True,
        granularity: quantizers.Granularity = "row",
        group_size: int | None = None,
        clip_ratio: float = 1.0,
        packed: bool | None = None,
        tile: int = pack.DEFAULT_TILE,
    ) -> QuantizedTensor:
        """Quantizes ``x: [..., K]``; 4-bit tensors are packed unless ``packed=False``."""
        packed = (bits == 4) if packed is None else packed
        if packed and bits != 4:
            raise ValueError(f"packed=True needs bits=4, got bits={bits}")
        res = quantizers.quantize(
            x,
            bits=bits,
            symmetric=symmetric,
            granularity=granularity,
            group_size=group_size,
            clip_ratio=clip_ratio,
        )
        values = res.q
        if packed:
            values = pack.pack_int4(values, tile) if symmetric else pack.pack_uint4(values, tile)
        return cls(
            values=values,
            scales=res.scale,
            zeros=res.zero,
            bits=bits,
            symmetric=symmetric,
            granularity=granularity,
            group_size=group_size,
            layout="int4_pack" if packed else "int8",
            tile=tile,
            shape=tuple(jnp.shape(x)),
        )

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r} must be one of {LAYOUTS}")
        if self.bits not in (4, 8):
            raise ValueError(f"bits={self.bits} must be 4 or 8")
        if self.layout == "int4_pack" and self.bits != 4:
            raise ValueError(f"layout='int4_pack' needs bits=4, got bits={self.bits}")

    def int_values(self) -> jax.Array:
        """The integer values unpacked to one per element: ``shape``, int8 or uint8."""
        if self.layout == "int8":
            return self.values
        if self.symmetric:
            return pack.unpack_int4(self.values, self.tile)
        return pack.unpack_uint4(self.values, self.tile)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """Reference semantics: ``(q - zero) * scale`` in ``dtype``, logical ``shape``."""
        if (self.zeros is None) != self.symmetric:
            raise ValueError(
                f"symmetric={self.symmetric} but zeros is {'missing' if self.zeros is None else 'set'}"
            )
        return quantizers.dequantize(
            self.int_values(),
            self.scales,
            self.zeros,
            granularity=self.granularity,
            group_size=self.group_size,
            dtype=dtype,
        )

    @property
    def nbytes(self) -> int:
        """Bytes of storage (values + scales + zeros)."""
        total = self.values.size * self.values.dtype.itemsize
        total += self.scales.size * self.scales.dtype.itemsize
        if self.zeros is not None:
            total += self.zeros.size * self.zeros.dtype.itemsize
        return int(total)


jax.tree_util.register_dataclass(
    QuantizedTensor,
    data_fields=["values", "scales", "zeros"],
    meta_fields=["bits", "symmetric", "granularity", "group_size", "layout", "tile", "shape"],
)
