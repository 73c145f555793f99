"""LLMEngine on a tiny random-weight LLaMA (f32 compute, reference kernels on CPU).

Exactness: tokens are compared exactly. Both sides run f32 with the same weights, so the
greedy argmax only differs on near-ties, which random logits of this size do not produce.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from comet_jax.engine.config import EngineConfig
from comet_jax.engine.engine import LLMEngine, count_backend_compiles
from comet_jax.engine.runner import precision_plan, preset_config
from comet_jax.engine.sampling import SamplingParams
from models.llama import LlamaForCausalLM, init_params

CFG = EngineConfig(
    max_batch=4,
    max_tokens_per_step=32,
    max_prefill_seqs=2,
    max_model_len=128,
    page_size=16,
    num_pages=48,
    decode_buckets=(4,),
    prefill_batch_buckets=(2,),
    chunk_buckets=(32,),
    compute_dtype="float32",
    kernels="reference",
    async_scheduling=False,  # the `engine` fixture runs both modes
)
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


@pytest.fixture(scope="module")
def model():
    cfg = preset_config("tiny")
    return cfg, init_params(LlamaForCausalLM(cfg), jax.random.key(0))


@pytest.fixture(scope="module")
def sync_engine(model):
    return LLMEngine.build(*model, CFG, progress=False)


@pytest.fixture(scope="module", params=["sync", "async"])
def engine(request, sync_engine):
    """Both scheduling modes, one compiled runner (the async engine dispatches step N+1
    before reading step N's tokens)."""
    if request.param == "sync":
        return sync_engine
    cfg = dataclasses.replace(CFG, async_scheduling=True)
    return LLMEngine(cfg, sync_engine.runner, progress=False)


def prompts(seed, lengths, vocab=320):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, int(n)).tolist() for n in lengths]


def dense_greedy(model, prompts, n, width=64, attention=None):
    """Greedy continuation by full causal recomputation (no cache), one jitted shape;
    `attention`: another plug-in than the default dense one (e.g. the KV4 simulation)."""
    cfg, params = model
    m = LlamaForCausalLM(cfg) if attention is None else LlamaForCausalLM(cfg, attention=attention)
    fwd = jax.jit(
        lambda toks, lens: m.apply({"params": params}, toks, cache=lens, logits_at=lens - 1)[0][
            :, 0
        ]
    )
    seqs = [list(p) for p in prompts]
    for _ in range(n):
        toks = np.zeros((len(seqs), width), np.int32)
        for i, s in enumerate(seqs):
            toks[i, : len(s)] = s
        lens = np.array([len(s) for s in seqs], np.int32)
        nxt = np.asarray(jnp.argmax(fwd(toks, lens), -1))
        for s, t in zip(seqs, nxt):
            s.append(int(t))
    return [s[len(p) :] for s, p in zip(seqs, prompts)]


def test_greedy_matches_dense_forward(model, engine):
    ps = prompts(0, [1, 7, 45, 16, 33])  # single token, multi-chunk (45 > 32), page edges
    outs = engine.generate(ps, GREEDY)
    want = dense_greedy(model, ps, GREEDY.max_tokens)
    for o, w in zip(outs, want):
        assert o["finish_reason"] == "length"
        assert o["token_ids"] == w
    assert engine.allocator.num_used == 0
    st = engine.stats  # the blocked-on-results share is part of the device time
    assert 0.0 < st.wait_time_s <= st.device_time_s
    assert engine.metrics()["device_wait_seconds_total"] == st.wait_time_s


def test_preemption_gives_the_same_tokens(engine):
    ps = prompts(1, [30, 25, 40, 12, 35, 28, 20, 33])
    params = SamplingParams(max_tokens=20, temperature=0.0)
    want = engine.generate(ps, params)
    # 8 usable pages = 128 tokens for a load that needs ~420: preemption must kick in.
    small = LLMEngine(
        dataclasses.replace(engine.config, num_pages=9), engine.runner, progress=False
    )
    got = small.generate(ps, params)
    assert small.scheduler.num_preemptions > 0
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
    assert small.allocator.num_used == 0


def test_prefill_first_schedule_gives_the_same_tokens(engine):
    """EngineConfig.schedule="prefill_first" through the model (asynchronous engine): the
    mixed schedule's greedy tokens, with enough pages and with a pool that forces
    preemption; no page leaks."""
    ps = prompts(4, [30, 25, 40, 12, 35, 28, 20, 33])
    params = SamplingParams(max_tokens=20, temperature=0.0)
    want = [w["token_ids"] for w in engine.generate(ps, params)]
    for pages in (None, 9):
        cfg = dataclasses.replace(engine.config, schedule="prefill_first")
        if pages is not None:
            cfg = dataclasses.replace(cfg, num_pages=pages)
        other = LLMEngine(cfg, engine.runner, progress=False)
        assert [g["token_ids"] for g in other.generate(ps, params)] == want
        assert other.allocator.num_used == 0
        if pages is not None:
            assert other.scheduler.num_preemptions > 0


def test_packed_prefill_same_tokens_as_padded_grid(model, sync_engine):
    """CFG's two-sequence prefill calls ([2, 32] grid, 32-token budget) run packed; turning
    packing off gives the same streams; an over-full call is refused on the host."""
    from comet_jax.engine.runner import StepInputs, packs

    assert packs(2, 32, CFG.max_tokens_per_step) and sync_engine.runner.pack_tokens == 32
    ps = prompts(5, [13, 19, 30, 7, 25])
    want = sync_engine.generate(ps, GREEDY)
    cfg = dataclasses.replace(CFG, pack_prefill=False)
    padded = LLMEngine.build(*model, cfg, progress=False)
    assert padded.runner.pack_tokens == 0
    got = padded.generate(ps, GREEDY)
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
    inp = StepInputs.zeros(2, 32, 8)
    inp.num_valid[:] = [20, 20]
    with pytest.raises(ValueError, match="40 tokens, more than the 32 packed rows"):
        sync_engine.runner.run(inp)


def test_pack_rows_options_are_exactly_the_rows_used():
    """`prefill_row_options` (what the engine compiles) is exactly the set of `pack_rows`
    values over every token count a call of that shape can hold."""
    from comet_jax.engine.runner import pack_rows, prefill_row_options

    for buckets, max_tokens in (((32,), 32), ((8, 16, 32), 32), ((512, 1024, 2048), 2048)):
        for b in (1, 2, 3, 8):
            for t in (1, 4, 16, 64, 1024):
                cap = min(b * t, max_tokens)
                used = {pack_rows(b, t, n, buckets) for n in range(1, cap + 1)}
                assert used == set(prefill_row_options(b, t, buckets, max_tokens)), (b, t)
    assert pack_rows(8, 1024, 7192, (4096, 7168, 8192)) == 0  # 8192: not below the grid
    assert pack_rows(8, 1024, 7000, (4096, 7168, 8192)) == 7168
    assert pack_rows(8, 1024, 10, ()) == 0 and pack_rows(1, 1024, 10, (16,)) == 0


def test_pack_buckets_same_tokens_fewer_rows(model, sync_engine):
    """Packed prefill rows in buckets below the step budget: the engine compiles one
    executable per bucket below each grid, runs two-sequence calls on the smallest that holds
    their tokens, and produces the same token streams as the one-bucket engine."""
    cfg = dataclasses.replace(CFG, pack_buckets=(8, 16, 32))
    eng = LLMEngine.build(*model, cfg, progress=False)
    p = CFG.max_pages_per_seq
    assert eng.bucket_shapes() == [(4, 1, p, 0), (2, 32, p, 8), (2, 32, p, 16), (2, 32, p, 32)]
    assert set(eng.runner.step_memory()) == set(eng.bucket_shapes())
    used = []
    for key, fn in list(eng.runner._compiled.items()):
        eng.runner._compiled[key] = lambda *a, fn=fn, key=key: used.append(key) or fn(*a)
    ps = prompts(5, [3, 4, 13, 19, 30, 7, 25])
    want = sync_engine.generate(ps, GREEDY)
    got = eng.generate(ps, GREEDY)
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
    assert {k[3] for k in used if k[1] > 1} >= {8, 32}  # 3 + 4 tokens: 8 rows; 13 + 19: 32
    with pytest.raises(ValueError, match="pack_buckets=.*must end with the limit 32"):
        dataclasses.replace(CFG, pack_buckets=(8, 16))


def test_decode_bucket_past_max_batch_pads_rows(model, sync_engine):
    """The last decode bucket may exceed max_batch (padding rows, so that the decode batch
    rows can be a multiple of the Mosaic GPU GEMM's output row tile): max_batch 3 decoding
    in a 4-row bucket gives the same tokens as the 4-row engine; a second bucket at or past
    the limit, or a last one below it, is an error."""
    cfg = dataclasses.replace(CFG, max_batch=3, decode_buckets=(2, 4))
    eng = LLMEngine.build(*model, cfg, progress=False)
    assert [s[0] for s in eng.bucket_shapes() if s[1] == 1] == [2, 4]
    ps = prompts(11, [5, 9, 21, 3, 14])
    want = sync_engine.generate(ps, GREEDY)
    got = eng.generate(ps, GREEDY)
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
    assert eng.allocator.num_used == 0
    for bad in ((2,), (3, 4), (4, 8)):
        with pytest.raises(ValueError, match="decode_buckets=.*one bucket >= the limit 3"):
            dataclasses.replace(cfg, decode_buckets=bad)


def test_gc_freeze_after_start_up_and_close(model, sync_engine):
    """EngineConfig.gc_freeze: start-up ends with gc.collect() + gc.freeze() (the same
    tokens); close() aborts what still runs (its pages freed) and unfreezes the collector."""
    import gc

    eng = LLMEngine(dataclasses.replace(CFG, gc_freeze=True), sync_engine.runner, progress=False)
    try:
        # (refcounting still frees frozen objects: the count only shrinks from there)
        assert 0 < gc.get_freeze_count() <= eng.gc_frozen_objects
        ps = prompts(12, [7, 19])
        want = sync_engine.generate(ps, GREEDY)
        assert [g["token_ids"] for g in eng.generate(ps, GREEDY)] == [w["token_ids"] for w in want]
        eng.add_request(None, ps[1], SamplingParams(max_tokens=30, temperature=0.0))
        eng.step()
        assert eng.allocator.num_used > 0 and eng.has_unfinished()
    finally:
        eng.close()
    assert gc.get_freeze_count() == 0 and eng.gc_frozen_objects == 0
    assert eng.allocator.num_used == 0 and not eng.has_unfinished()
    assert sync_engine.gc_frozen_objects == 0  # off by default
    with pytest.raises(ValueError, match="gc_freeze=1 must be a bool"):
        dataclasses.replace(CFG, gc_freeze=1)


def test_gc_full_collections_held_off_while_requests_run(model, sync_engine):
    """EngineConfig.gc_full_every_steps: Python's generation-2 threshold is raised at
    start-up (no full collection of its own while requests run), the engine runs one every
    N steps and when it drains, the tokens are the same, and close() restores Python's
    thresholds."""
    import gc

    before = gc.get_threshold()
    eng = LLMEngine(
        dataclasses.replace(CFG, gc_full_every_steps=4), sync_engine.runner, progress=False
    )
    try:
        assert gc.get_threshold()[:2] == before[:2] and gc.get_threshold()[2] > 10**9
        ps = prompts(12, [7, 19])
        want = sync_engine.generate(ps, GREEDY)
        full = []
        gc.callbacks.append(lambda phase, info: full.append(info) if phase == "start" else None)
        try:
            got = eng.generate(ps, GREEDY)
        finally:
            gc.callbacks.pop()
        assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
        steps = eng.stats.steps
        assert eng.gc_full_collections == steps // 4 + (steps % 4 > 0)  # every 4th + drain
        assert sum(i["generation"] == 2 for i in full) == eng.gc_full_collections
        assert eng.step() == [] and eng.gc_full_collections == steps // 4 + (steps % 4 > 0)
    finally:
        eng.close()
    assert gc.get_threshold() == before
    assert sync_engine.gc_full_collections == 0  # off by default
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="gc_full_every_steps"):
            dataclasses.replace(CFG, gc_full_every_steps=bad)


def test_no_recompilation_after_warmup(engine):
    compiles = count_backend_compiles()
    before = engine.runner.num_compilations
    ps = prompts(2, [3, 50, 17, 64, 1, 9])
    sps = [
        SamplingParams(max_tokens=int(m), temperature=t, top_k=k, top_p=p, seed=i)
        for i, (m, t, k, p) in enumerate(
            [
                (5, 0, 0, 1),
                (9, 1, 0, 1),
                (2, 0.8, 5, 1),
                (7, 1, 0, 0.9),
                (12, 0, 0, 1),
                (4, 1.2, 3, 0.5),
            ]
        )
    ]
    engine.generate(ps, sps)
    assert compiles() == 0, "XLA compiled during steady-state serving"
    assert engine.runner.num_compilations == before
    with pytest.raises(RuntimeError, match="not compiled"):
        engine.runner.run(
            __import__("comet_jax.engine.runner", fromlist=["x"]).StepInputs.zeros(3, 1, 8)
        )


@pytest.mark.parametrize("precision", ["bf16", "w4axkv4"])
def test_warm_up_runs_each_shape_once_and_writes_only_the_scratch_page(model, precision):
    """Start-up warm-up (EngineConfig.warm_up): every compiled shape runs once on an
    all-padding batch; the pages of the pool other than the scratch page 0 keep their bytes
    (here: the K/V of served requests), and the engine then serves the same tokens."""
    cfg, params = model
    if precision != "bf16":
        plan = precision_plan(cfg, precision)
        params = init_params(LlamaForCausalLM(cfg, linear=plan), jax.random.key(1))
    ec = dataclasses.replace(CFG, precision=precision, num_pages=24, warm_up=False)
    cold = LLMEngine.build(cfg, params, ec, progress=False)
    assert cold.warm_up_time_s == 0.0
    ps = prompts(8, [20, 5, 37])
    want = cold.generate(ps, GREEDY)
    before = [np.asarray(a) for a in jax.tree.leaves(cold.runner.cache)]
    assert cold.runner.warm_up() == len(cold.bucket_shapes())
    assert cold.runner.warm_up() == 0  # each shape once
    after = [np.asarray(a) for a in jax.tree.leaves(cold.runner.cache)]
    assert any(b[:, 1:].any() for b in before)  # served K/V live past the scratch page
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a[:, 1:], b[:, 1:])  # axis 1: pages
    warm = LLMEngine.build(cfg, params, dataclasses.replace(ec, warm_up=True), progress=False)
    assert warm.warm_up_time_s > 0.0 and warm.metrics()["warm_up_time_seconds"] > 0.0
    assert [o["token_ids"] for o in warm.generate(ps, GREEDY)] == [o["token_ids"] for o in want]


def test_step_memory_checked_against_free_memory(sync_engine):
    """After the AOT compile the engine compares each step's scratch (XLA's memory analysis)
    with the memory left beside weights and pool, and names the fix when it does not fit."""
    mem = sync_engine.runner.step_memory()
    assert set(mem) == set(sync_engine.bucket_shapes())
    need = sync_engine.check_step_memory()  # the build already ran it with the real free bytes
    assert need == max(m["temp"] + m["output"] - m["alias"] for m in mem.values()) > 0
    assert all(m["alias"] >= sync_engine.runner.cache.nbytes for m in mem.values())  # donated
    assert sync_engine.check_step_memory(free_bytes=need) == need
    with pytest.raises(ValueError, match="lower memory_fraction"):
        sync_engine.check_step_memory(free_bytes=need - 1)


def test_sampler_variant_chosen_on_host(engine):
    """Greedy-only batches run the argmax-only sampler, sampling batches the one without the
    top-k/top-p filter, batches with a filtering request the one with it (no device-side
    branch in any executable)."""
    runner = engine.runner
    calls = {"greedy": 0, "sample": 0, "filter": 0}
    originals = dict(runner._compiled_samplers)
    assert {f for _, f in originals} == set(calls)
    for (b, f), fn in originals.items():
        runner._compiled_samplers[b, f] = lambda *a, fn=fn, f=f: (
            calls.__setitem__(f, calls[f] + 1) or fn(*a)
        )
    try:
        engine.generate(prompts(8, [5, 7]), GREEDY)
        assert calls["greedy"] > 0 and calls["sample"] == calls["filter"] == 0
        engine.generate(prompts(8, [5]), SamplingParams(max_tokens=3, temperature=1, seed=2))
        assert calls["sample"] > 0 and calls["filter"] == 0
        engine.generate(prompts(8, [5]), SamplingParams(max_tokens=3, temperature=1, top_k=4))
        assert calls["filter"] > 0
    finally:
        runner._compiled_samplers.update(originals)
    hlo = runner._compiled[4, 1, CFG.max_pages_per_seq, 0].as_text()
    assert "conditional" not in hlo  # the model executable has no host-synchronising branch


def test_compiler_options_cuda_graphs_and_remat(model):
    from comet_jax.engine.runner import _compiler_options

    no_remat = {"xla_disable_hlo_passes": "rematerialization"}  # every step executable
    assert _compiler_options(False) == {**no_remat, "xla_gpu_enable_command_buffer": ""}
    assert _compiler_options(True) == no_remat
    assert _compiler_options(True, xla_remat=True) == {}
    assert (
        LLMEngine.build(
            *model, dataclasses.replace(CFG, xla_remat=True, aot_compile=False), progress=False
        ).runner.compiler_options
        == {}
    )
    with pytest.raises(ValueError, match="cuda_graphs"):
        dataclasses.replace(CFG, cuda_graphs="yes")


def test_async_mode_same_streams_under_pressure(sync_engine):
    """A mixed load (greedy and seeded top-k/top-p, stop tokens, max_tokens 1..12, a pool
    small enough to preempt, one abort mid-way) gives identical per-request token streams,
    finish reasons and zero leaked pages in both scheduling modes."""
    ps = prompts(11, [3, 30, 1, 25, 40, 12, 35, 9])
    full = sync_engine.generate(ps[:1], SamplingParams(max_tokens=8, temperature=0))[0]
    sps = [
        SamplingParams(max_tokens=8, temperature=0, stop_token_ids=(full["token_ids"][2],)),
        SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=5),
        SamplingParams(max_tokens=1, temperature=0),
        SamplingParams(max_tokens=10, temperature=0.7, top_k=5, seed=6),
        SamplingParams(max_tokens=12, temperature=0),
        SamplingParams(max_tokens=2, temperature=1.0, seed=7),
        SamplingParams(max_tokens=11, temperature=0),
        SamplingParams(max_tokens=12, temperature=0),
    ]

    def run(async_scheduling):
        cfg = dataclasses.replace(CFG, num_pages=12, async_scheduling=async_scheduling)
        eng = LLMEngine(cfg, sync_engine.runner, progress=False)
        events = {}
        ids = [
            eng.add_request(f"r{i}", p, sp, lambda o: events.setdefault(o.request_id, []).append(o))
            for i, (p, sp) in enumerate(zip(ps, sps))
        ]
        steps = 0
        while eng.has_unfinished():
            eng.step()
            steps += 1
            if steps == 6:
                assert eng.abort(ids[7])
        assert eng.allocator.num_used == 0 and eng.scheduler.num_preemptions > 0
        out = {}
        for rid, evs in events.items():
            toks = [t for e in evs for t in e.new_token_ids]
            assert all(t >= 0 for t in toks)  # no PENDING placeholder ever leaves the engine
            assert evs[-1].num_output_tokens == len(toks)
            out[rid] = (toks, evs[-1].finish_reason)
        return out

    sync, async_ = run(False), run(True)
    assert async_ == sync
    assert sync["r0"] == (full["token_ids"][:2], "stop")
    assert len(sync["r2"][0]) == 1 and sync["r7"][1] == "abort"


def test_abort_frees_pages_at_once(engine):
    events = []
    ids = [
        engine.add_request(None, p, SamplingParams(max_tokens=30, temperature=0), events.append)
        for p in prompts(3, [20, 20, 20])
    ]
    for _ in range(3):
        engine.step()
    used = engine.allocator.num_used
    victim = engine.scheduler.running[0]
    n_pages = len(victim.pages)
    assert engine.abort(ids[0]) and n_pages > 0
    assert engine.allocator.num_used == used - n_pages
    assert not engine.abort(ids[0])  # already finished
    while engine.has_unfinished():
        engine.step()
    final = {e.request_id: e for e in events if e.finished}
    assert final[ids[0]].finish_reason == "abort"
    assert all(final[i].finish_reason == "length" for i in ids[1:])
    assert engine.allocator.num_used == 0


def test_seeded_sampling_independent_of_batch(engine):
    p = prompts(4, [10])[0]
    sp = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.95, seed=123)
    alone = engine.generate([p], sp)[0]["token_ids"]
    crowd = engine.generate(
        prompts(5, [5, 30]) + [p], [SamplingParams(max_tokens=8, seed=9)] * 2 + [sp]
    )[2]["token_ids"]
    other = engine.generate([p], dataclasses.replace(sp, seed=124))[0]["token_ids"]
    assert alone == crowd
    assert alone != other


class LetterTokenizer:
    eos_id = None

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(65 + i % 26) for i in ids)


def test_stop_tokens_and_stop_strings(engine):
    p = prompts(6, [12])[0]
    full = engine.generate([p], SamplingParams(max_tokens=12, temperature=0))[0]["token_ids"]
    out = engine.generate(
        [p], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(full[3],))
    )[0]
    assert out["finish_reason"] == "stop"
    assert out["token_ids"] == full[: full.index(full[3])]
    engine.tokenizer = LetterTokenizer()
    try:
        text = LetterTokenizer().decode(full)
        stop = text[4:6]
        out = engine.generate([p], SamplingParams(max_tokens=12, temperature=0, stop=(stop,)))[0]
    finally:
        engine.tokenizer = None
    assert out["finish_reason"] == "stop"
    assert out["text"] == text[: text.index(stop)]


def test_bad_requests_rejected(engine):
    with pytest.raises(ValueError, match="empty"):
        engine.add_request(None, [], GREEDY)
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request(None, [5, 320], GREEDY)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(None, [1] * 125, GREEDY)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request(None, [1], SamplingParams(stop=("x",)))
    assert not engine.has_unfinished()


def test_w4axkv4_engine_serves_with_int4_cache(model):
    cfg = model[0]
    plan = precision_plan(cfg, "w4axkv4")
    params = init_params(LlamaForCausalLM(cfg, linear=plan), jax.random.key(1))
    ec = dataclasses.replace(CFG, precision="w4axkv4", num_pages=24)
    eng = LLMEngine.build(cfg, params, ec, progress=False)
    assert eng.runner.cache_config.dtype == "int4"
    assert eng.runner.cache.k.dtype == jnp.uint8
    outs = eng.generate(prompts(7, [5, 40, 18]), SamplingParams(max_tokens=5, temperature=0))
    assert all(len(o["token_ids"]) == 5 for o in outs)
    assert eng.allocator.num_used == 0


@pytest.mark.slow
@pytest.mark.data
def test_real_smollm2_end_to_end_matches_dense(smollm2_float, smollm2_tokenizer):
    """The default model (GGUF loader, float32 on CPU) through the paged engine, chunked
    prefill included, gives the dense model's greedy tokens."""
    from comet_jax.checkpoint.hf import params_from_hf_tensors
    from models.config import ModelConfig

    hf_config, tensors = smollm2_float
    cfg = ModelConfig.from_hf(hf_config)
    params = params_from_hf_tensors(cfg, tensors)
    tok = smollm2_tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ps = [tok.encode(chat), tok.encode("The quick brown fox")]
    ec = dataclasses.replace(
        CFG,
        max_batch=2,
        max_prefill_seqs=1,
        num_pages=16,
        decode_buckets=(2,),
        prefill_batch_buckets=(1,),
    )
    eng = LLMEngine.build(cfg, params, ec, tokenizer=tok, progress=False)
    outs = eng.generate(ps, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert [o["token_ids"] for o in outs] == dense_greedy((cfg, params), ps, 8)
    assert "Paris" in outs[0]["text"]


@pytest.mark.parametrize("window", [1, 4, 16])
def test_kv_recent_window_serves_the_simulated_semantics(model, window):
    """EngineConfig.kv_recent_window = W: the paged INT4 cache with its float ring gives the
    greedy tokens of the accuracy simulation (`DenseAttention` with the KV4 fake quantizer and
    `kv_recent_window=W`), through chunked prefill (prompts longer than the 32-token chunk),
    decode, and preemption by recompute (a pool too small for the load). f32 everywhere: exact but for summation order."""
    from comet_jax.quant.convert import KV4Transform
    from models.attention import DenseAttention

    ps = prompts(1, [30, 25, 40, 12, 35, 28, 20, 33])
    sp = SamplingParams(max_tokens=20, temperature=0.0)
    # 8 usable pages = 128 tokens for a load that needs ~420: preemption must kick in.
    ec = dataclasses.replace(
        CFG, kv_dtype="int4", kv_group=64, num_pages=9, kv_recent_window=window
    )
    eng = LLMEngine.build(*model, ec, progress=False)
    assert eng.runner.cache.ring_k.shape[1:] == (4, model[0].num_kv_heads, window, 64)
    got = [o["token_ids"] for o in eng.generate(ps, sp)]
    sim = DenseAttention(kv_transform=KV4Transform(64), kv_recent_window=window)
    assert got == dense_greedy(model, ps, sp.max_tokens, attention=sim)
    assert eng.scheduler.num_preemptions > 0  # the ring is rebuilt by the recompute
    assert eng.allocator.num_used == 0
    assert sorted(eng.scheduler._free_window_slots) == list(range(CFG.max_batch))


@pytest.mark.slow
def test_kv_recent_window_pallas_interpret_and_tensor_parallel(model):
    """The window on the GPU path (Pallas kernels with causal_shift + lse, interpret mode;
    W = 4 with the ring attended in XLA beside the decode kernel, W = 16 also with the ring
    inside it, `kv_window_kernel`) and on a 2-device mesh (rings sharded over KV heads) gives
    the reference engine's greedy tokens (same tolerance scheme as the KV4 kernels above for
    Pallas; exact for TP)."""
    ps = prompts(12, [5, 40, 1, 17])
    sp = SamplingParams(max_tokens=6, temperature=0)
    ec = dataclasses.replace(CFG, kv_dtype="int4", kv_group=64, num_pages=24, kv_recent_window=4)

    def tokens(cfg):
        engine = LLMEngine.build(*model, cfg, progress=False)
        attention = engine.runner.model.attention
        attention = getattr(attention, "inner", attention)  # TP: the sharded wrapper's inner
        assert attention.window_kernel is cfg.kv_window_kernel
        return [g["token_ids"] for g in engine.generate(ps, sp)]

    want = tokens(ec)
    refs = {4: want, 16: tokens(dataclasses.replace(ec, kv_recent_window=16))}
    for window, window_kernel in ((4, False), (16, False), (16, True)):
        ref = refs[window]
        pec = dataclasses.replace(
            ec, kernels="pallas", interpret=True, kv_recent_window=window,
            kv_window_kernel=window_kernel,
        )  # fmt: skip
        got = tokens(pec)
        assert [g[:3] for g in got] == [w[:3] for w in ref], (window, window_kernel)
        same = sum(a == b for g, w in zip(got, ref) for a, b in zip(g, w))
        assert same >= 0.75 * sum(len(w) for w in ref)
    if jax.device_count() >= 2:
        assert tokens(dataclasses.replace(ec, tp=2)) == want


def test_kv_recent_window_validation():
    with pytest.raises(ValueError, match="INT4 KV cache"):
        dataclasses.replace(CFG, kv_recent_window=4)  # bf16 cache
    with pytest.raises(ValueError, match="kv_recent_window"):
        dataclasses.replace(CFG, kv_dtype="int4", kv_recent_window=-1)


@pytest.mark.slow
@pytest.mark.parametrize("prefill_dequantize,kv_write_kernel", [(False, True), (True, False)])
def test_pallas_kv4_kernels_in_interpret_mode_match_reference(
    model, prefill_dequantize, kv_write_kernel
):
    """The GPU path (Pallas paged decode/prefill kernels over the INT4 cache), run in
    interpret mode, gives the jnp-reference engine's greedy tokens; with
    `prefill_dequantize` prefill attends over its pages dequantized once into bf16, with
    `kv_write_kernel` the Pallas kernel quantizes and stores new K/V.

    The kernel rounds p * scale to f16 before the V dot (documented in kv4_attention.py), so
    it is not bit-equal to the reference; a random tiny model has near-flat logits (top-2
    margins of ~0.003 occur), so a later token may flip on a near tie. Required: the prefill
    token and the next two decode tokens of every sequence are equal, and most tokens overall.
    """
    ps = prompts(8, [5, 40, 1, 17])
    ec = dataclasses.replace(CFG, kv_dtype="int4", num_pages=24)
    sp = SamplingParams(max_tokens=6, temperature=0)
    want = LLMEngine.build(*model, ec, progress=False).generate(ps, sp)
    pec = dataclasses.replace(
        ec,
        kernels="pallas",
        interpret=True,
        prefill_dequantize=prefill_dequantize,
        kv_write_kernel=kv_write_kernel,
    )
    pallas = LLMEngine.build(*model, pec, progress=False)
    assert pallas.runner.model.attention.prefill_dequantize is prefill_dequantize
    assert pallas.runner.model.attention.kv_write_kernel is kv_write_kernel
    got = [g["token_ids"] for g in pallas.generate(ps, sp)]
    want = [w["token_ids"] for w in want]
    assert [g[:3] for g in got] == [w[:3] for w in want]
    same = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
    assert same >= 0.75 * sum(len(w) for w in want)


@pytest.mark.slow
def test_w4a16_kernel_in_interpret_mode_matches_simulation(model):
    """precision="w4a16" on the GPU path (the W4A16 GEMM, interpret mode) gives the simulated
    engine's greedy tokens. The kernel rounds activations to bf16 (~2e-3 relative) where the
    simulation multiplies in f32, so as above: the first three tokens of every sequence equal,
    and most tokens overall."""
    cfg = model[0]
    params = init_params(
        LlamaForCausalLM(cfg, linear=precision_plan(cfg, "w4a16")), jax.random.key(2)
    )
    ec = dataclasses.replace(CFG, precision="w4a16", num_pages=24)
    ps = prompts(9, [5, 40, 1, 17])
    sp = SamplingParams(max_tokens=6, temperature=0)
    want = [
        w["token_ids"] for w in LLMEngine.build(cfg, params, ec, progress=False).generate(ps, sp)
    ]
    pallas = LLMEngine.build(
        cfg, params, dataclasses.replace(ec, kernels="pallas", interpret=True), progress=False
    )
    assert pallas.runner.model.linear.mode == "pallas"  # the kernel, not the simulation
    got = [g["token_ids"] for g in pallas.generate(ps, sp)]
    assert [g[:3] for g in got] == [w[:3] for w in want]
    same = sum(a == b for g, w in zip(got, want) for a, b in zip(g, w))
    assert same >= 0.75 * sum(len(w) for w in want)


@pytest.mark.parametrize("tp", [2, 4])
def test_engine_tensor_parallel_matches_single_device(model, engine, tp):
    """EngineConfig.tp runs the same steps on a mesh: same greedy tokens as one device.

    Tolerance: tokens equal (f32 model; partial sums reduced in another order differ by
    ~1e-6 in logits, far below the tiny model's token margins on these prompts).
    """
    import jax

    if jax.device_count() < tp:
        pytest.skip(f"needs {tp} devices (tests/conftest.py forces 8 host devices)")
    ps = prompts(5, [1, 9, 40])
    want = engine.generate(ps, GREEDY)
    sharded = LLMEngine.build(*model, dataclasses.replace(CFG, tp=tp), progress=False)
    assert sharded.runner.mesh is not None and sharded.runner.mesh.size == tp
    got = sharded.generate(ps, GREEDY)
    assert [g["token_ids"] for g in got] == [w["token_ids"] for w in want]
    assert sharded.allocator.num_used == 0


def test_engine_tp_validation():
    with pytest.raises(ValueError, match="tp=0"):
        dataclasses.replace(CFG, tp=0)


def test_precision_plan_block_follows_the_layer_widths():
    """Random-weight W4AxKV4 plans take COMET's 128-channel blocks (the K tile the GEMM tuning
    table is keyed on) where every layer input allows it, else 64."""
    from models.projection import as_plan

    def blocks(name):
        plan = as_plan(precision_plan(preset_config(name), "w4axkv4"))
        return {plan.backend_for(0, p).block for p in ("q_proj", "o_proj", "up_proj", "down_proj")}

    assert blocks("llama3-8b") == {128}
    assert blocks("tiny") == {64}  # hidden size 64
    plan = as_plan(precision_plan(preset_config("llama3-8b"), "w4axkv4", block=64))
    assert plan.backend_for(0, "q_proj").block == 64


_HLO_DTYPES = {"uint8": "u8", "int8": "s8", "float16": "f16", "bfloat16": "bf16", "float32": "f32"}


@pytest.mark.parametrize(
    "cache",
    [
        dict(),
        dict(kv_dtype="int4", kv_group=64),
        dict(kv_dtype="int4", kv_group=64, kv_recent_window=4),
        dict(kv_dtype="int4", kv_group=64, kv_recent_window=4, tp=2),
        dict(precision="w4axkv4", kv_group=64, kv_recent_window=4),
        dict(kv_dtype="int4", kv_group=64, kv_recent_window=4, prefill_own_kv=True),
    ],
    ids=["bf16", "int4", "int4_window", "int4_window_tp2", "w4axkv4_window", "window_own_kv"],
)  # fmt: skip
def test_compiled_steps_update_the_cache_in_place(model, cache):
    """No compiled step (prefill and decode buckets, and the own-K/V prefill executables)
    copies a whole cache array: the pages, scales and the recent window's rings are donated
    and updated in place, layer after layer. (A copy of the rings in every layer was found
    this way, docs/benchmarks.md 2026-11-26.)"""
    ec = dataclasses.replace(CFG, num_pages=24, **cache)
    cfg, params = model
    if ec.precision == "w4axkv4":  # quantized linears: params in the plan's shapes
        plan = precision_plan(cfg, "w4axkv4")
        params = init_params(LlamaForCausalLM(cfg, linear=plan), jax.random.key(1))
    runner = LLMEngine.build(cfg, params, ec, progress=False).runner
    leaves = jax.tree_util.tree_leaves(runner.cache)
    # per-device shapes (TP shards the KV heads; the compiled HLO is per device)
    dims = [x.sharding.shard_shape(x.shape) for x in leaves]
    shapes = {f"{_HLO_DTYPES[str(x.dtype)]}[{','.join(map(str, d))}]" for x, d in zip(leaves, dims)}
    assert runner.num_compilations >= 2  # a decode and a prefill shape at least
    assert bool(runner._own_kv) == bool(ec.prefill_own_kv)
    for key, compiled in [*runner._compiled.items(), *runner._own_kv.items()]:
        text = compiled.as_text()
        assert any(s in text for s in shapes), key  # the check looks at the right shapes
        copies = [
            ln.strip()[:160]
            for ln in text.splitlines()
            if " copy(" in ln and any(s in ln.split("=", 1)[1][:48] for s in shapes)
        ]
        assert not copies, (key, copies[:3])


def test_page_size_default_follows_the_kernels(monkeypatch):
    """page_size=None resolves to 128 for the Pallas kernels on a GPU (measured fastest there)
    and 16 elsewhere; an explicit value is kept."""
    import jax

    from comet_jax.engine.config import EngineConfig

    assert EngineConfig().page_size == 16  # CPU
    assert EngineConfig(kernels="pallas", interpret=True).page_size == 16
    assert EngineConfig(page_size=64).page_size == 64
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert EngineConfig().page_size == 128
    assert EngineConfig(kernels="pallas").page_size == 128
    assert EngineConfig(kernels="reference").page_size == 16
    assert dataclasses.replace(EngineConfig(), max_batch=4).page_size == 128
    with pytest.raises(ValueError, match="page_size"):
        EngineConfig(page_size=0)


def _hlo_ops(compiled) -> str:
    """A compiled step's HLO without its source locations (the call stacks that traced it)."""
    import re

    text = compiled.as_text().split("\nFileNames")[0]
    return re.sub(r"(, )?metadata=\{[^}]*\}", "", text)


def test_parallel_compile_builds_the_same_executables(model):
    """compile_workers > 1 overlaps the start-up compilations in a thread pool: the same
    shapes (and samplers, each batch's once) as a one-at-a-time compile, the same HLO, the
    same tokens; `on_done` reports every shape once, in bucket order."""
    ec = dataclasses.replace(
        CFG, decode_buckets=(2, 4), prefill_batch_buckets=(1, 2), chunk_buckets=(16, 32)
    )
    serial = LLMEngine.build(*model, dataclasses.replace(ec, compile_workers=1), progress=False)
    pooled = LLMEngine.build(*model, dataclasses.replace(ec, compile_workers=3), progress=False)
    assert pooled.config.resolved_compile_workers == 3
    assert set(pooled.runner._compiled) == set(serial.runner._compiled)
    assert len(serial.runner._compiled) == len(serial.bucket_shapes()) >= 6
    assert set(pooled.runner._compiled_samplers) == set(serial.runner._compiled_samplers)
    for key, exe in serial.runner._compiled.items():  # source locations differ, not ops
        assert _hlo_ops(pooled.runner._compiled[key]) == _hlo_ops(exe), key
    ps = prompts(11, [5, 30, 12])
    want = serial.generate(ps, GREEDY)
    assert [g["token_ids"] for g in pooled.generate(ps, GREEDY)] == [w["token_ids"] for w in want]
    # a fresh runner compiled through compile_many directly: on_done order and coverage
    fresh = LLMEngine.build(*model, dataclasses.replace(ec, aot_compile=False), progress=False)
    seen = []
    fresh.runner.compile_many(fresh.bucket_shapes(), 2, on_done=seen.append)
    assert seen == list(fresh.bucket_shapes())
    assert set(fresh.runner._compiled) == set(serial.runner._compiled)
    with pytest.raises(ValueError, match="workers=0 must be a positive int"):
        fresh.runner.compile_many(fresh.bucket_shapes(), 0)
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ValueError, match="compile_workers=.* must be a positive int or None"):
            dataclasses.replace(CFG, compile_workers=bad)


def test_parallel_compile_retries_a_failed_compilation_alone(model, monkeypatch):
    """A pooled XLA compilation that fails with a runtime error (as XLA's ptxas launch once
    did with 8 workers on the GPU machine) is compiled again after the pool drains, with a
    warning: every shape still compiles, in order. One that fails again raises."""
    ec = dataclasses.replace(
        CFG, decode_buckets=(2, 4), chunk_buckets=(16, 32), aot_compile=False,
    )  # fmt: skip
    real = jax.stages.Lowered.compile
    calls = {"n": 0, "fail_on": {2}}

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] in calls["fail_on"]:
            raise jax.errors.JaxRuntimeError("INTERNAL: Failed to launch ptxas")
        return real(self, *a, **k)

    monkeypatch.setattr(jax.stages.Lowered, "compile", flaky)
    engine = LLMEngine.build(*model, ec, progress=False)
    seen = []
    with pytest.warns(RuntimeWarning, match="compiled again alone"):
        engine.runner.compile_many(engine.bucket_shapes(), 2, on_done=seen.append)
    assert seen == list(engine.bucket_shapes())
    assert set(engine.runner._compiled) == set(engine.bucket_shapes())
    fresh = LLMEngine.build(*model, ec, progress=False)
    calls.update(n=0, fail_on=set(range(1, 1000)))
    with pytest.raises(jax.errors.JaxRuntimeError, match="ptxas"), pytest.warns(RuntimeWarning):
        fresh.runner.compile_many(fresh.bucket_shapes(), 2)


def test_step_inputs_of_decode_rows_and_a_token_not_in_flight(sync_engine):
    """_inputs: a decode row takes its one id (the prompt's last token, or an output), a
    PENDING one reads the in-flight step's slot on the device (src) and gives id 0, and a
    PENDING id with no step in flight is an error naming the request, as is a prefill
    chunk ending in one."""
    from comet_jax.engine.scheduler import PENDING, Chunk
    from comet_jax.engine.scheduler import Sequence as Seq

    eng = LLMEngine(CFG, sync_engine.runner, progress=False)
    a = Seq("a", (11, 12, 13), GREEDY)
    b = Seq("b", (21, 22), GREEDY, output_ids=[31, PENDING])
    c = Seq("c", (41,), GREEDY, output_ids=[51])
    for s in (a, b, c):
        s.pages = [len(s.request_id)]
    eng._inflight_slots = {id(b): 9}
    rows = [Chunk(a, 2, 1, True), Chunk(b, 3, 1, True), Chunk(c, 1, 1, True)]
    inp = eng._inputs(rows, CFG.decode_bucket_list, 1)
    np.testing.assert_array_equal(inp.tokens[:3, 0], [13, 0, 51])
    np.testing.assert_array_equal(inp.src[:4], [-1, 9, -1, -1])
    np.testing.assert_array_equal(inp.start[:3], [2, 3, 1])
    eng._inflight_slots = {}
    with pytest.raises(RuntimeError, match="b: pending token cannot be supplied"):
        eng._inputs(rows, CFG.decode_bucket_list, 1)
    with pytest.raises(RuntimeError, match="b: pending token cannot be supplied"):
        eng._inputs([Chunk(b, 2, 2, True)], CFG.prefill_batch_bucket_list, 32)
