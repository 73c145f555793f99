"""Sampling: top-k/top-p support vs a numpy sort reference, greedy, seeding, distribution,
stop strings. Few distinct shapes, to keep compilation short."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comet_jax.engine.sampling import (
    SamplingParams,
    TextStream,
    _filter_top_k_top_p,
    needs_filter,
    sample_tokens,
    sampler_kind,
)

B, V = 8, 64
sample = jax.jit(sample_tokens)


def reference_support(logits, top_k, top_p):
    """Boolean [V]: top-k by sort, then the smallest top-p nucleus of the renormalised rest."""
    order = np.argsort(-logits, kind="stable")
    keep = np.zeros(len(logits), bool)
    keep[order[: top_k or len(logits)]] = True
    z = np.where(keep, logits, -np.inf)
    p = np.exp(z - z.max())
    p /= p.sum()
    o = np.argsort(-z, kind="stable")
    before = np.cumsum(p[o]) - p[o]
    nucleus = np.zeros(len(logits), bool)
    nucleus[o[before < top_p]] = True
    return keep & nucleus


def test_filter_matches_sort_reference():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(B, V)) * rng.uniform(0.5, 4, (B, 1))).astype(np.float32)
    top_k = np.array([0, 1, 5, 0, 3, 64, 10, 2], np.int32)
    top_p = np.array([1.0, 1.0, 1.0, 0.5, 0.9, 0.3, 0.95, 0.01], np.float32)
    got = np.isfinite(np.asarray(jax.jit(_filter_top_k_top_p)(logits, top_k, top_p)))
    for i in range(B):
        want = reference_support(logits[i], int(top_k[i]), float(top_p[i]))
        np.testing.assert_array_equal(got[i], want, err_msg=f"row {i}")


def test_greedy_only_sampler_is_the_argmax_of_greedy_rows():
    """sampler_kind picks "greedy" only when no row samples; greedy_only then gives the
    tokens of the full sampler (every row at temperature 0), "sample" / "filter" otherwise."""
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(B, V)).astype(np.float32)
    zeros = np.zeros(B, np.float32)
    off_k, off_p = np.zeros(B, np.int32), np.ones(B, np.float32)
    seeds, counters = np.arange(B, dtype=np.int32), np.full(B, 2, np.int32)
    args = (logits, zeros, off_k, off_p, seeds, counters)
    full = np.asarray(jax.jit(sample_tokens)(*args))
    only = jax.jit(lambda *a: sample_tokens(*a, greedy_only=True))(*args)
    np.testing.assert_array_equal(np.asarray(only), full)
    np.testing.assert_array_equal(full, np.argmax(logits, axis=-1))
    assert sampler_kind(zeros, off_k, off_p) == "greedy"
    assert sampler_kind(zeros, np.full(B, 4, np.int32), off_p) == "greedy"  # top-k unused
    one = zeros.copy()
    one[3] = 0.7
    assert sampler_kind(one, off_k, off_p) == "sample"
    assert sampler_kind(one, off_k, np.full(B, 0.9, np.float32)) == "filter"


def test_host_chosen_filter_matches_device_choice():
    """The engine picks `filtered` on the host; each static choice equals lax.cond's."""
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(B, V)).astype(np.float32)
    temp = np.linspace(0.5, 1.5, B).astype(np.float32)
    seeds, counters = np.arange(B, dtype=np.int32), np.full(B, 2, np.int32)
    static = {f: jax.jit(lambda *a, f=f: sample_tokens(*a, filtered=f)) for f in (False, True)}
    off_k, off_p = np.zeros(B, np.int32), np.ones(B, np.float32)
    on_k = off_k.copy()
    on_k[2] = 3
    on_p = off_p.copy()
    on_p[5] = 0.5
    for top_k, top_p, want in [(off_k, off_p, False), (on_k, off_p, True), (off_k, on_p, True)]:
        assert needs_filter(top_k, top_p) is want
        args = (logits, temp, top_k, top_p, seeds, counters)
        device = np.asarray(sample(*args))
        np.testing.assert_array_equal(np.asarray(static[want](*args)), device)
        # The filter leaves rows with top_k 0 / top_p 1 unchanged: True is always correct.
        np.testing.assert_array_equal(np.asarray(static[True](*args)), device)
    # With a filtering row present, skipping the filter would be wrong for that row.
    args = (logits, temp, on_k, off_p, seeds, counters)
    assert reference_support(logits[2], 3, 1.0)[int(np.asarray(static[True](*args))[2])]


def test_greedy_seeded_and_batch_independent():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(B, V)).astype(np.float32)
    temp = np.array([0, 1, 1, 0.7, 1, 0, 2, 1], np.float32)
    top_k = np.array([0, 0, 5, 0, 3, 0, 0, 10], np.int32)
    top_p = np.array([1, 1, 1, 0.8, 1, 1, 1, 0.9], np.float32)
    seeds = np.arange(B, dtype=np.int32) * 7
    counters = np.full(B, 3, np.int32)
    toks = np.asarray(sample(logits, temp, top_k, top_p, seeds, counters))
    greedy = logits.argmax(-1)
    assert (toks[temp == 0] == greedy[temp == 0]).all()
    for i in range(B):
        assert reference_support(logits[i], int(top_k[i]), float(top_p[i]))[toks[i]]
    # Same (seed, counter) -> same token wherever the row sits in the batch.
    perm = rng.permutation(B)
    toks_p = np.asarray(
        sample(logits[perm], temp[perm], top_k[perm], top_p[perm], seeds[perm], counters[perm])
    )
    np.testing.assert_array_equal(toks_p, toks[perm])


def test_temperature_sampling_follows_softmax():
    # One row's logits replicated over many counters: the empirical frequencies must match
    # softmax(logits / T) within sampling error (4 sigma of a 4000-draw binomial < 0.032).
    logits = np.tile(
        np.log(np.array([0.5, 0.3, 0.15, 0.05] + [1e-9] * (V - 4), np.float32)), (B, 1)
    )
    counts = np.zeros(V)
    for c in range(500):
        toks = sample(
            logits,
            np.ones(B, np.float32),
            np.zeros(B, np.int32),
            np.ones(B, np.float32),
            np.arange(B, dtype=np.int32),
            np.full(B, c, np.int32),
        )
        np.add.at(counts, np.asarray(toks), 1)
    freq = counts / counts.sum()
    np.testing.assert_allclose(freq[:4], [0.5, 0.3, 0.15, 0.05], atol=0.032)


def test_text_stream_stop_strings_and_holdback():
    vocab = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 6: "\n\n"}
    decode = lambda ids: "".join(vocab[i] for i in ids)
    ts = TextStream(decode, stop=("world",))
    out = [ts.push([1]), ts.push([1, 2]), ts.push([1, 2, 3])]
    assert "".join(out) == "Hello"  # the last len("world") - 1 chars are held back
    assert ts.push([1, 2, 3, 4]) == " " and ts.stopped and ts.emitted == "Hello "
    assert ts.push([1, 2, 3, 4, 5]) == ""  # nothing after a stop
    ts = TextStream(decode, stop=("\n\n",))
    assert ts.push([1, 2, 5]) == "Hello" and ts.push([1, 2, 5], final=True) == "!"
    # An incomplete UTF-8 character is held until it completes.
    utf = {1: b"a", 2: b"\xc3", 3: b"\xa9"}
    dec = lambda ids: b"".join(utf[i] for i in ids).decode("utf-8", errors="replace")
    ts = TextStream(dec)
    assert ts.push([1, 2]) == "a" and ts.push([1, 2, 3]) == "é"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-1), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(seed=-2), "seed"),
        (dict(stop=("",)), "stop"),
    ],
)
def test_sampling_params_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_sampling_params_normalises_stop():
    assert SamplingParams(stop="x").stop == ("x",)
    assert jnp.asarray(0).dtype == jnp.int32  # x64 stays off: the step's int32 inputs hold
