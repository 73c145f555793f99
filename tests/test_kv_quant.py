"""KV4 quantizer: format, roundtrip error, agreement with the shared quantizer semantics.

Tolerances: integer and layout checks are exact; reconstruction error is bounded by half a
quantization step (plus the f16 rounding of the stored scale, <= 15 * scale * 2^-11).
"""

import jax.numpy as jnp
import numpy as np
import pytest

from comet_jax.quant import kv_quant, pack, quantizers


@pytest.mark.parametrize("group", [32, 64, 128])
def test_roundtrip_within_half_step(group):
    x = np.random.default_rng(group).standard_normal((3, 5, 128)).astype(np.float32) * 3
    qkv = kv_quant.quantize_kv(x, group)
    assert qkv.packed.shape == (3, 5, 64) and qkv.packed.dtype == jnp.uint8
    assert qkv.scale.shape == (3, 5, 128 // group) and qkv.scale.dtype == jnp.float16
    assert qkv.zero.dtype == jnp.float16
    z = np.asarray(qkv.zero, np.float32)
    assert np.all((z >= 0) & (z <= 15) & (z == np.round(z)))
    deq = np.asarray(kv_quant.dequantize_kv(*qkv, group_size=group))
    step = np.repeat(np.asarray(qkv.scale, np.float32), group, axis=-1)
    assert np.all(np.abs(deq - x) <= step * (0.5 + 16 * 2.0**-11) + 1e-6)


def test_layout_is_half_split_per_group():
    group = 32
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    res = quantizers.quantize(x, bits=4, symmetric=False, granularity="group", group_size=group)
    packed = np.asarray(kv_quant.quantize_kv(x, group).packed)
    q = np.asarray(res.q)
    for t in range(64 // group):
        for j in range(group // 2):
            byte = packed[:, t * group // 2 + j]
            np.testing.assert_array_equal(byte & 0xF, q[:, t * group + j])
            np.testing.assert_array_equal(byte >> 4, q[:, t * group + group // 2 + j])
    np.testing.assert_array_equal(np.asarray(pack.unpack_uint4(packed, tile=group)), q)


def test_zero_is_exact_and_fake_quant_matches_dequant():
    x = np.random.default_rng(1).standard_normal((4, 128)).astype(np.float32)
    x[:, ::7] = 0.0
    fq = np.asarray(kv_quant.fake_quantize_kv(x, 64))
    assert np.all(fq[:, ::7] == 0.0)
    deq = np.asarray(kv_quant.dequantize_kv(*kv_quant.quantize_kv(x, 64), group_size=64))
    np.testing.assert_array_equal(fq, deq)
    # Same integer semantics as the shared quantizer; only the f16 scale rounding differs.
    ref = np.asarray(
        quantizers.fake_quantize(x, bits=4, symmetric=False, granularity="group", group_size=64)
    )
    np.testing.assert_allclose(fq, ref, atol=1e-2 * np.abs(x).max())


def test_bf16_input_keeps_dtype():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 64)), jnp.bfloat16)
    assert kv_quant.fake_quantize_kv(x, 32).dtype == jnp.bfloat16


def test_bad_arguments():
    with pytest.raises(ValueError, match="group_size=48"):
        kv_quant.quantize_kv(np.ones((2, 96), np.float32), 48)
    with pytest.raises(ValueError, match="head_dim=96"):
        kv_quant.quantize_kv(np.ones((2, 96), np.float32), 64)
    with pytest.raises(ValueError, match="uint8"):
        kv_quant.dequantize_kv(np.ones((2, 32), np.int8), np.ones((2, 1)), np.ones((2, 1)), 64)


def test_bytes_per_token_head():
    assert kv_quant.kv4_bytes_per_token_head(128, 128) == 68
    assert kv_quant.kv4_bytes_per_token_head(128, 32) == 80
