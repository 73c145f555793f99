"""Quantizers, INT4 packing and QuantizedTensor: properties on random shapes.

Tolerances: dequantized values are within half a quantization step of the input for
unclipped RTN (plus 1e-6 relative slack for f32 rounding of x/scale); values already on the
integer grid round-trip exactly; packing is exact.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from comet_jax.quant import pack, quantizers
from comet_jax.quant.qtensor import QuantizedTensor

SETTINGS = settings(max_examples=15, deadline=None)


def _shape_and_group(draw):
    rows = draw(st.integers(1, 5))
    groups = draw(st.integers(1, 4))
    group = draw(st.sampled_from([2, 4, 8, 32]))
    return (rows, groups * group), group


@st.composite
def quant_case(draw):
    shape, group = _shape_and_group(draw)
    gran = draw(st.sampled_from(quantizers.GRANULARITIES))
    return dict(
        shape=shape,
        granularity=gran,
        group_size=group if gran == "group" else None,
        bits=draw(st.sampled_from([4, 8])),
        symmetric=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
        scale=draw(st.sampled_from([1e-3, 1.0, 300.0])),
    )


@SETTINGS
@given(quant_case())
def test_roundtrip_within_half_step(case):
    rng = np.random.default_rng(case["seed"])
    x = (rng.standard_normal(case["shape"]) * case["scale"]).astype(np.float32)
    kw = dict(
        bits=case["bits"],
        symmetric=case["symmetric"],
        granularity=case["granularity"],
        group_size=case["group_size"],
    )
    res = quantizers.quantize(x, **kw)
    assert res.q.dtype == (jnp.int8 if case["symmetric"] else jnp.uint8)
    assert res.q.shape == x.shape
    assert res.scale.dtype == jnp.float32
    assert bool(jnp.all(res.scale > 0))
    assert (res.zero is None) == case["symmetric"]
    deq = quantizers.dequantize(
        res.q, res.scale, res.zero, granularity=case["granularity"], group_size=case["group_size"]
    )
    step = quantizers._broadcast(res.scale, x.shape, case["granularity"], case["group_size"])
    err = np.abs(np.asarray(deq) - x)
    assert np.all(err <= 0.5 * np.asarray(step) * (1 + 1e-5) + 1e-6 * np.abs(x))


@SETTINGS
@given(quant_case())
def test_exact_on_representable_grid(case):
    rng = np.random.default_rng(case["seed"])
    bits, sym = case["bits"], case["symmetric"]
    lo, hi = (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1)
    ints = rng.integers(lo, hi + 1, size=case["shape"]).astype(np.float32)
    # Make every reduction group span the full range, so the chosen scale is exactly 1.0
    # (symmetric: max|x| = qmax) or the asymmetric range maps onto 2^b - 1 levels.
    if sym:
        x = np.where(ints == 0, 1.0, ints)
        flat = x.reshape(-1)
        flat[0] = hi
        x = flat.reshape(case["shape"])
        res = quantizers.quantize(x, bits=bits, symmetric=True, granularity="tensor")
        deq = quantizers.dequantize(res.q, res.scale, None, granularity="tensor")
        np.testing.assert_array_equal(np.asarray(deq), x)
    else:
        x = ints - lo  # in [0, 2^b - 2]
        x.reshape(-1)[0] = 2**bits - 1
        res = quantizers.quantize(x, bits=bits, symmetric=False, granularity="tensor")
        deq = quantizers.dequantize(res.q, res.scale, res.zero, granularity="tensor")
        np.testing.assert_allclose(np.asarray(deq), x, rtol=0, atol=1e-5 * (2**bits))


@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_hits_both_ends(bits):
    x = np.random.default_rng(0).uniform(-3.0, 5.0, size=(4, 64)).astype(np.float32)
    res = quantizers.quantize(x, bits=bits, symmetric=False, granularity="row")
    q = np.asarray(res.q)
    assert (q.min(axis=1) == 0).all() and (q.max(axis=1) == 2**bits - 1).all()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("gran,gs", [("row", None), ("group", 16), ("col", None), ("tensor", None)])
def test_all_zero_rows_are_exact(symmetric, gran, gs):
    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    x[1] = 0.0
    x[:, :16] = 0.0 if gran == "col" else x[:, :16]
    res = quantizers.quantize(x, bits=4, symmetric=symmetric, granularity=gran, group_size=gs)
    assert bool(jnp.all(res.scale > 0))
    deq = np.asarray(
        quantizers.dequantize(res.q, res.scale, res.zero, granularity=gran, group_size=gs)
    )
    assert (deq[1] == 0).all()
    assert np.isfinite(deq).all()


def test_clip_ratio_clamps_to_range():
    x = np.array([[0.1, -0.2, 10.0, 0.3]], np.float32)
    res = quantizers.quantize(x, bits=4, symmetric=True, granularity="row", clip_ratio=0.5)
    assert int(res.q[0, 2]) == 7
    np.testing.assert_allclose(float(res.scale[0]), 10.0 * 0.5 / 7, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=3), "bits=3"),
        (dict(bits=4, granularity="group", group_size=5), "group_size=5"),
        (dict(bits=4, granularity="group"), "group_size=None"),
        (dict(bits=4, granularity="row", group_size=8), "group_size=8"),
        (dict(bits=4, granularity="chan"), "granularity='chan'"),
        (dict(bits=4, clip_ratio=1.5), "clip_ratio=1.5"),
    ],
)
def test_quantize_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantizers.quantize(np.ones((2, 16), np.float32), **kwargs)


def test_quantize_rejects_integer_input():
    with pytest.raises(ValueError, match="dtype int32"):
        quantizers.quantize(np.ones((2, 16), np.int32), bits=4)


@st.composite
def pack_case(draw):
    tile = draw(st.sampled_from([2, 4, 32, 64, 128]))
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    k = tile * draw(st.integers(1, 3))
    return tuple(lead) + (k,), tile, draw(st.integers(0, 2**31 - 1))


@SETTINGS
@given(pack_case())
def test_pack_roundtrip_signed_and_unsigned(case):
    shape, tile, seed = case
    rng = np.random.default_rng(seed)
    q = rng.integers(-8, 8, size=shape).astype(np.int8)
    packed = pack.pack_int4(q, tile)
    assert packed.dtype == jnp.int8 and packed.shape == shape[:-1] + (shape[-1] // 2,)
    np.testing.assert_array_equal(np.asarray(pack.unpack_int4(packed, tile)), q)
    lo16, hi16 = pack.unpack_int4_x16(packed, tile)
    halves = q.reshape(*shape[:-1], shape[-1] // tile, 2, tile // 2).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(lo16, np.int32), 16 * halves[..., 0, :])
    np.testing.assert_array_equal(np.asarray(hi16, np.int32), 16 * halves[..., 1, :])
    u = rng.integers(0, 16, size=shape).astype(np.uint8)
    pu = pack.pack_uint4(u, tile)
    assert pu.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(pack.unpack_uint4(pu, tile)), u)


def test_pack_worked_example_from_docstring():
    q = np.array([[1, -2, 3, -8, 7, 0, -1, 5]], np.int8)
    np.testing.assert_array_equal(np.asarray(pack.pack_int4(q, 4)), [[49, -114, -9, 80]])


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="K=6 must be a multiple of tile=4"):
        pack.pack_int4(np.zeros((2, 6), np.int8) + 1, 4)
    with pytest.raises(ValueError, match="tile=3"):
        pack.pack_int4(np.ones((2, 6), np.int8), 3)
    with pytest.raises(ValueError, match="integer array"):
        pack.pack_int4(np.ones((2, 8), np.float32), 4)
    with pytest.raises(ValueError, match="must be int8"):
        pack.unpack_int4(np.ones((2, 8), np.uint8), 4)


@pytest.mark.parametrize(
    "bits,sym,gran,gs",
    [
        (4, True, "row", None),
        (4, False, "group", 32),
        (8, True, "row", None),
        (8, False, "col", None),
    ],
)
def test_qtensor_jit_dequantize_and_meta(bits, sym, gran, gs):
    x = jnp.asarray(np.random.default_rng(2).standard_normal((16, 128)), jnp.float32)
    qt = QuantizedTensor.quantize(x, bits=bits, symmetric=sym, granularity=gran, group_size=gs)
    assert qt.layout == ("int4_pack" if bits == 4 else "int8")
    assert qt.values.shape == ((16, 64) if bits == 4 else (16, 128))
    ref = quantizers.dequantize(
        quantizers.quantize(x, bits=bits, symmetric=sym, granularity=gran, group_size=gs).q,
        qt.scales,
        qt.zeros,
        granularity=gran,
        group_size=gs,
    )
    out = jax.jit(lambda t: t.dequantize(jnp.bfloat16))(qt)
    assert out.dtype == jnp.bfloat16 and out.shape == x.shape
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), rtol=1e-2, atol=1e-2)
    leaves, tree = jax.tree_util.tree_flatten(qt)
    assert len(leaves) == (2 if sym else 3)
    assert jax.tree_util.tree_unflatten(tree, leaves).shape == (16, 128)
    assert qt.nbytes < x.size * 4


def test_qtensor_sharded_across_devices():
    n = len(jax.devices())
    if n < 2:
        pytest.skip("needs >= 2 devices (tests/conftest.py forces 8 host devices)")
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))
    x = jnp.asarray(np.random.default_rng(3).standard_normal((64, 256)), jnp.float32)
    qt = QuantizedTensor.quantize(x, bits=4)
    shard = NamedSharding(mesh, P("tp"))
    qt_s = jax.tree_util.tree_map(lambda a: jax.device_put(a, shard), qt)
    assert len(qt_s.values.sharding.device_set) == 2
    out = jax.jit(lambda t: t.dequantize())(qt_s)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(qt.dequantize()))


def test_qtensor_orbax_roundtrip(tmp_path):
    import orbax.checkpoint as ocp

    x = jnp.asarray(np.random.default_rng(4).standard_normal((8, 128)), jnp.float32)
    qt = QuantizedTensor.quantize(x, bits=4, symmetric=False, granularity="group", group_size=64)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "qt", qt)
    ckpt.wait_until_finished()
    restored = ckpt.restore(tmp_path / "qt", qt)
    assert restored.layout == qt.layout and restored.group_size == 64
    for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(qt)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_qtensor_rejects_bad_meta():
    with pytest.raises(ValueError, match="layout='nibbles'"):
        QuantizedTensor(jnp.zeros(2, jnp.int8), jnp.ones(()), None, layout="nibbles")
    with pytest.raises(ValueError, match="packed=True needs bits=4"):
        QuantizedTensor.quantize(jnp.ones((2, 8)), bits=8, packed=True)
