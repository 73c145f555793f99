"""Scheduler: limits, chunked prefill, preemption by recompute, abort (pure Python).

A fake model makes every step's tokens a function of the sequence's tokens so far, so a run
under page pressure must reproduce the unconstrained run exactly.
"""

import dataclasses

import numpy as np
import pytest

from comet_jax.engine.allocator import BlockAllocator, pages_for
from comet_jax.engine.config import EngineConfig, bucket_for
from comet_jax.engine.sampling import SamplingParams
from comet_jax.engine.scheduler import FinishReason, Scheduler, Sequence, Status


def fake_next(tokens):
    return (sum((i + 1) * t for i, t in enumerate(tokens)) * 31 + len(tokens)) % 97


def run(config, num_pages, prompts, max_tokens, abort_after=None):
    alloc = BlockAllocator(num_pages)
    sched = Scheduler(config, alloc)
    seqs = [
        Sequence(f"r{i}", list(p), SamplingParams(max_tokens=m))
        for i, (p, m) in enumerate(zip(prompts, max_tokens))
    ]
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.num_unfinished:
        steps += 1
        assert steps < 10_000
        plan = sched.schedule()
        assert not plan.empty, "scheduler stalled with unfinished requests"
        chunks = plan.decode + plan.prefill
        # Limits and invariants of one step.
        assert plan.num_tokens <= config.max_tokens_per_step
        assert len(sched.running) <= config.max_batch
        assert len(plan.prefill) <= config.max_prefill_seqs
        assert all(c.length == 1 for c in plan.decode)
        if plan.prefill:  # the call's attention grid stays within the limit
            grid_b = bucket_for(len(plan.prefill), config.prefill_batch_bucket_list, "b")
            grid_t = bucket_for(max(c.length for c in plan.prefill), config.chunk_bucket_list, "t")
            assert config.prefill_shape_fits(grid_b, grid_t)
        assert len({id(c.seq) for c in chunks}) == len(chunks)
        owned = [p for s in sched.running for p in s.pages]
        assert len(owned) == len(set(owned)) == alloc.num_used
        for c in chunks:
            assert c.seq.status is Status.RUNNING
            assert len(c.seq.pages) >= pages_for(c.start + c.length, config.page_size)
        for s in sched.waiting:
            assert not s.pages
        for c in chunks:
            tok = fake_next(c.seq.tokens[: c.start + c.length])
            assert sched.complete(c, tok)
            s = c.seq
            if c.samples and len(s.output_ids) >= s.params.max_tokens:
                sched.finish(s, FinishReason.LENGTH)
        if abort_after is not None and steps == abort_after[1]:
            victim = seqs[abort_after[0]]
            sched.finish(victim, FinishReason.ABORT)
            assert not victim.pages
    assert alloc.num_used == 0, "pages leaked"
    return seqs, sched


def expected(prompt, n):
    toks = list(prompt)
    for _ in range(n):
        toks.append(fake_next(toks))
    return toks[len(prompt) :]


@pytest.mark.parametrize("schedule", ["mixed", "prefill_first"])
@pytest.mark.parametrize("num_pages", [6, 9, 64])
def test_outputs_identical_under_page_pressure(num_pages, schedule):
    """Both schedules: every request's tokens as if it ran alone (fake model), under the
    limits and invariants `run` checks, with and without preemption."""
    rng = np.random.default_rng(num_pages)
    cfg = EngineConfig(
        max_batch=6, max_tokens_per_step=20, max_prefill_seqs=2, max_model_len=64,
        page_size=16, schedule=schedule,
    )  # fmt: skip
    prompts = [list(rng.integers(0, 97, int(n))) for n in rng.integers(1, 40, 12)]
    max_tokens = [int(m) for m in rng.integers(1, 20, 12)]
    seqs, sched = run(cfg, num_pages, prompts, max_tokens)
    for s, p, m in zip(seqs, prompts, max_tokens):
        assert s.finish_reason is FinishReason.LENGTH
        assert s.output_ids == expected(p, m)
    if num_pages == 6:
        assert sched.num_preemptions > 0
    if num_pages == 64:
        assert sched.num_preemptions == 0


def test_prefill_first_runs_prompt_chunks_alone_until_none_can_run():
    """While a prompt chunk can run, prefill_first steps hold prompt chunks only (a running
    sequence's next chunk first, then admissions); decode rows wait and run in the first step
    that has no prompt chunk. Admission leaves a free page per running sequence."""
    cfg = EngineConfig(
        max_batch=4, max_tokens_per_step=16, max_prefill_seqs=2, max_model_len=128,
        page_size=16, schedule="prefill_first",
    )  # fmt: skip
    sched = Scheduler(cfg, BlockAllocator(64))
    a = Sequence("a", [1, 2], SamplingParams(max_tokens=50))
    sched.add(a)
    plan = sched.schedule()
    assert [(c.seq.request_id, c.length) for c in plan.prefill] == [("a", 2)]
    for c in plan.prefill:
        sched.complete(c, 5)
    b = Sequence("b", list(range(40)), SamplingParams(max_tokens=5))
    sched.add(b)
    plan = sched.schedule()  # a could decode; b's prompt runs alone, the whole budget
    assert not plan.decode
    assert [(c.seq.request_id, c.start, c.length) for c in plan.prefill] == [("b", 0, 16)]
    for c in plan.prefill:
        sched.complete(c, 7)
    plan = sched.schedule()  # b's next chunk, still no decode row
    assert not plan.decode and [(c.start, c.length) for c in plan.prefill] == [(16, 16)]
    for c in plan.prefill:
        sched.complete(c, 7)
    plan = sched.schedule()
    assert not plan.decode and [(c.start, c.length) for c in plan.prefill] == [(32, 8)]
    for c in plan.prefill:
        sched.complete(c, 7)
    plan = sched.schedule()  # no prompt left: both decode
    assert not plan.prefill and [c.seq.request_id for c in plan.decode] == ["a", "b"]
    # admission keeps one free page per running sequence: 3 usable pages, 16-token prompts
    small = dataclasses.replace(cfg, max_model_len=32)
    tight = Scheduler(small, BlockAllocator(4))  # page 0 is the scratch page
    seqs = [Sequence(f"t{i}", list(range(16)), SamplingParams(max_tokens=4)) for i in range(3)]
    for t in seqs:
        tight.add(t)
    for want in ("t0", "t1"):  # one prompt per step (the budget), leaving 2 then 1 free pages
        plan = tight.schedule()
        assert [c.seq.request_id for c in plan.prefill] == [want] and not plan.decode
        for c in plan.prefill:
            tight.complete(c, 3)
    plan = tight.schedule()  # t2 would take the last page, the running ones' decode page
    assert not plan.prefill and [c.seq.request_id for c in plan.decode][:1] == ["t0"]
    assert seqs[2].status is Status.WAITING
    with pytest.raises(ValueError, match="schedule='fifo'"):
        dataclasses.replace(cfg, schedule="fifo")


def test_chunked_prefill_mixed_with_decode():
    cfg = EngineConfig(
        max_batch=4, max_tokens_per_step=16, max_prefill_seqs=1, max_model_len=128, page_size=16
    )
    sched = Scheduler(cfg, BlockAllocator(64))
    short = Sequence("a", [1, 2], SamplingParams(max_tokens=50))
    long = Sequence("b", list(range(60)), SamplingParams(max_tokens=5))
    sched.add(short)
    plan = sched.schedule()
    for c in plan.prefill:
        sched.complete(c, 5)
    sched.add(long)
    plan = sched.schedule()
    assert [c.seq.request_id for c in plan.decode] == ["a"]
    assert [(c.seq.request_id, c.start, c.length) for c in plan.prefill] == [("b", 0, 15)]
    assert not plan.prefill[0].samples
    for c in plan.decode + plan.prefill:
        sched.complete(c, 7)
    plan = sched.schedule()
    assert [(c.seq.request_id, c.start, c.length) for c in plan.prefill] == [("b", 15, 15)]


def test_prefill_grid_limit_shortens_then_defers_chunks():
    """A prefill call's attention grid (batch bucket x chunk bucket) stays within
    max_prefill_grid: a chunk that would widen it is cut to the largest chunk bucket that
    fits, or waits when none does; the deferred prompt runs in a later step, and every
    request still produces the unconstrained run's tokens."""
    cfg = EngineConfig(
        max_batch=8, max_tokens_per_step=64, max_prefill_seqs=4, max_model_len=128,
        page_size=16, max_prefill_grid=64,
    )  # fmt: skip
    assert cfg.chunk_bucket_list == (16, 32, 64) and cfg.prefill_batch_bucket_list == (1, 2, 4)
    sched = Scheduler(cfg, BlockAllocator(64))
    a = Sequence("a", list(range(10)), SamplingParams(max_tokens=3))
    b = Sequence("b", list(range(60)), SamplingParams(max_tokens=3))
    c = Sequence("c", list(range(5)), SamplingParams(max_tokens=3))
    for s in (a, b, c):
        sched.add(s)
    plan = sched.schedule()
    # a: 10 (grid 1 x 16); b: 54 tokens of budget left, but 2 x 64 > 64: cut to 32 (2 x 32);
    # c: a third sequence needs batch bucket 4, and 4 x 32 > 64: waits.
    assert [(ch.seq.request_id, ch.length) for ch in plan.prefill] == [("a", 10), ("b", 32)]
    assert list(sched.waiting) == [c] and not c.pages
    # The default limit (2 x max_tokens_per_step) lets all three in.
    sched = Scheduler(dataclasses.replace(cfg, max_prefill_grid=None), BlockAllocator(64))
    for s in (a, b, c):
        s.num_computed, s.pages, s.status = 0, [], Status.WAITING
        sched.add(s)
    assert sched.config.prefill_grid_limit == 128
    plan = sched.schedule()
    assert [(ch.seq.request_id, ch.length) for ch in plan.prefill] == [("a", 10), ("b", 54)]
    # With the limit, under page pressure and with mixed lengths, outputs are unchanged.
    rng = np.random.default_rng(5)
    prompts = [list(rng.integers(0, 97, int(n))) for n in rng.integers(2, 70, 10)]
    max_tokens = [int(m) for m in rng.integers(1, 12, 10)]
    seqs, _ = run(cfg, 12, prompts, max_tokens)
    for s, p, m in zip(seqs, prompts, max_tokens):
        assert s.output_ids == expected(p, m)


def test_prefill_grid_validation():
    base = dict(max_batch=8, max_tokens_per_step=64, max_prefill_seqs=4, max_model_len=128)
    with pytest.raises(ValueError, match="max_prefill_grid=0 must be a positive int"):
        EngineConfig(**base, max_prefill_grid=0)
    with pytest.raises(ValueError, match="below one full-budget chunk's grid"):
        EngineConfig(**base, max_prefill_grid=63)
    with pytest.raises(ValueError, match="smallest prefill batch bucket 2"):
        EngineConfig(**base, prefill_batch_buckets=(2, 4), max_prefill_grid=64)
    assert EngineConfig(**base, prefill_batch_buckets=(4,)).prefill_grid_limit == 4 * 64


def test_abort_frees_pages_at_once_and_other_requests_finish():
    rng = np.random.default_rng(1)
    cfg = EngineConfig(
        max_batch=4, max_tokens_per_step=32, max_prefill_seqs=2, max_model_len=64, page_size=16
    )
    prompts = [list(rng.integers(0, 97, 20)) for _ in range(4)]
    seqs, _ = run(cfg, 32, prompts, [10] * 4, abort_after=(2, 3))
    assert seqs[2].finish_reason is FinishReason.ABORT
    for i in (0, 1, 3):
        assert seqs[i].output_ids == expected(prompts[i], 10)


def test_limits_and_validation():
    cfg = EngineConfig(
        max_batch=2, max_tokens_per_step=8, max_prefill_seqs=1, max_model_len=32, page_size=16
    )
    with pytest.raises(ValueError, match="max_model_len"):
        Scheduler(cfg, BlockAllocator(2))
    sched = Scheduler(cfg, BlockAllocator(8))
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        sched.add(Sequence("x", [1] * 30, SamplingParams(max_tokens=3)))
    for i in range(3):
        sched.add(Sequence(f"s{i}", [1], SamplingParams(max_tokens=3)))
    plan = sched.schedule()
    assert len(plan.decode) == 2 and len(sched.waiting) == 1  # max_batch


def test_token_slice_equals_list_slice():
    seq = Sequence("t", [1, 2, 3, 4, 5], SamplingParams())
    seq.output_ids = [6, 7, 8]
    assert seq.tokens == [1, 2, 3, 4, 5, 6, 7, 8]
    for a in range(9):
        for b in range(a, 9):
            got = seq.token_slice(a, b)
            assert got == seq.tokens[a:b] and isinstance(got, list)


def test_prompt_is_a_tuple_the_collector_stops_tracking():
    """A stored prompt is a tuple of ints: after one collection the garbage collector no
    longer tracks it, so full collections while serving skip the running prompts."""
    import gc

    seq = Sequence("t", [int(i) for i in range(1024)], SamplingParams())
    assert seq.prompt_ids == tuple(range(1024))
    gc.collect()
    assert not gc.is_tracked(seq.prompt_ids)


def test_commit_ahead_with_pending_tokens():
    """Asynchronous mode's bookkeeping: a dispatched sampling chunk leaves a PENDING output;
    the next schedule runs the sequence as a decode row; a sequence whose PENDING token is its
    last allowed one is not scheduled again; resolve fills placeholders only while they exist."""
    from comet_jax.engine.scheduler import PENDING

    cfg = EngineConfig(
        max_batch=4, max_tokens_per_step=32, max_prefill_seqs=2, max_model_len=64, page_size=16
    )
    sched = Scheduler(cfg, BlockAllocator(16))
    a = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=2))
    b = Sequence("b", [4, 5], SamplingParams(max_tokens=1))
    sched.add(a)
    sched.add(b)
    plan1 = sched.schedule()
    idx1 = {c.seq.request_id: sched.commit(c) for c in plan1.prefill}
    assert a.output_ids == [PENDING] and b.output_ids == [PENDING] and a.remaining == 1
    plan2 = sched.schedule()  # before plan1's tokens are back
    assert [c.seq for c in plan2.decode] == [a]  # b: its one allowed token is in flight
    assert plan2.decode[0].start == 3 and not plan2.prefill
    idx2 = sched.commit(plan2.decode[0])
    assert a.output_ids == [PENDING, PENDING]
    assert sched.resolve(a, idx1["a"], 7) and sched.resolve(b, idx1["b"], 8)
    sched.finish(b, FinishReason.LENGTH)
    assert not sched.resolve(b, idx1["b"], 9)  # finished: nothing to fill
    assert sched.resolve(a, idx2, 6) and a.output_ids == [7, 6]
    assert not sched.resolve(a, idx2, 5)  # already filled
    with pytest.raises(RuntimeError, match="stale"):
        sched.commit(plan2.decode[0])
    # A sequence preempted while its last token is PENDING is not re-admitted until resolved.
    c = Sequence("c", [1], SamplingParams(max_tokens=4))
    c.output_ids = [3, PENDING]
    sched.waiting.appendleft(c)
    assert c not in [ch.seq for ch in sched.schedule().prefill]
    assert sched.waiting[0] is c
