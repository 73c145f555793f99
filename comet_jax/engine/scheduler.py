"""Continuous-batching scheduler: waiting/running queues, chunked prefill, preemption.

A `Sequence` holds `tokens = prompt_ids + output_ids` and `num_computed`, the number of
leading tokens whose K/V are in the paged cache. Every step a running sequence processes the
next `tokens[num_computed:]` slice: one token (a decode row) or a chunk of several (a prefill
row). When a slice ends at the last token, the step samples the next token from its logits.

`Scheduler.schedule()` builds one step under the limits of `EngineConfig`:
  1. running sequences in admission order: decode rows (1 token each) and prefill chunks,
     all within `max_tokens_per_step`, `max_prefill_seqs` and the prefill grid limit (a
     chunk that would widen the call's [batch bucket, chunk bucket] grid past
     `max_prefill_grid` is shortened, or waits for a later step); when pages run out, the newest
     running sequence is preempted by recompute (pages freed, `num_computed = 0`, put back at
     the head of the waiting queue with its generated tokens kept) until the page fits;
  2. waiting sequences, first come first served, while a slot (`max_batch`), token budget and
     free pages for their first chunk remain. Admission never preempts.
With `schedule="prefill_first"` a step first tries prompt chunks alone (running sequences'
next chunks, then admissions), from free pages only (no preemption; admission leaves one free
page per running sequence); only a step that finds none is built as above.
A preempted sequence later re-prefills prompt + generated tokens and continues; its sampler
counter is the number of generated tokens, so it draws exactly what it would have drawn.

A dispatched chunk is `commit`ted at once (its tokens count as computed, a sampled token is a
`PENDING` placeholder until `resolve`), so the next step can be scheduled while this one runs.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import time
import typing

from comet_jax.engine.allocator import BlockAllocator, pages_for
from comet_jax.engine.config import EngineConfig, bucket_for
from comet_jax.engine.sampling import SamplingParams

PENDING = -1  # output id of a dispatched step whose sampled token is not back yet


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # stop token or stop string
    LENGTH = "length"  # max_tokens or max_model_len
    ABORT = "abort"  # cancelled by the client


@dataclasses.dataclass(eq=False, slots=True)
class Sequence:
    """One request's state. Identity (not value) equality: used as the page owner.

    ``prompt_ids`` is stored as a tuple: a tuple of ints drops out of the garbage collector's
    tracking after its first collection, so full collections during serving no longer walk
    every running prompt (the 1214 x 1024/512 batch on the CPU, `bench_host.py`: the longest
    full collection 37-53 ms with list prompts, 19-20 ms with tuples; docs/benchmarks.md
    2026-11-27)."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    output_ids: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    seed: int = 0
    window_slot: int = -1  # ring slot of the KV recent window while running (-1: none)

    def __post_init__(self):
        self.prompt_ids = tuple(self.prompt_ids)

    @property
    def tokens(self) -> list[int]:
        return [*self.prompt_ids, *self.output_ids]

    def token_slice(self, start: int, end: int) -> list[int]:
        """tokens[start:end] without building the whole list (a decode row needs one id)."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n : end - n]
        if end <= n:
            return list(self.prompt_ids[start:end])
        return [*self.prompt_ids[start:], *self.output_ids[: end - n]]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def remaining(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED


class Chunk(typing.NamedTuple):
    """Process seq.tokens[start:start+length]; `samples`: it reaches the last token, so the
    step's sampled token is appended. (A NamedTuple: a step builds one per running sequence,
    thousands per step at the largest batches, and a frozen dataclass costs ~3x as much to
    construct.)"""

    seq: Sequence
    start: int
    length: int
    samples: bool


def _chunk(seq: Sequence, length: int) -> Chunk:
    return Chunk(seq, seq.num_computed, length, seq.num_computed + length == seq.num_tokens)


@dataclasses.dataclass
class StepPlan:
    decode: list[Chunk] = dataclasses.field(default_factory=list)  # length-1 chunks
    prefill: list[Chunk] = dataclasses.field(default_factory=list)
    preempted: list[Sequence] = dataclasses.field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def num_tokens(self) -> int:
        return sum(c.length for c in self.decode) + sum(c.length for c in self.prefill)


class Scheduler:
    def __init__(self, config: EngineConfig, allocator: BlockAllocator):
        if config.max_pages_per_seq > allocator.capacity:
            raise ValueError(
                f"max_model_len={config.max_model_len} needs {config.max_pages_per_seq} pages "
                f"but the pool has {allocator.capacity}; lower max_model_len or add pages"
            )
        self.config = config
        self.allocator = allocator
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        # One recent-window ring slot per running sequence (`kv_cache` rings; unused when
        # the cache has no window): taken on admission, returned with the pages.
        self._free_window_slots = list(range(config.max_batch - 1, -1, -1))

    # -- queue management ----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.num_tokens + seq.params.max_tokens - len(seq.output_ids) > self.config.max_model_len:
            raise ValueError(
                f"prompt of {len(seq.prompt_ids)} tokens + max_tokens={seq.params.max_tokens} "
                f"exceeds max_model_len={self.config.max_model_len}"
            )
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Ends `seq` wherever it is; its pages are free on return."""
        if seq.finished:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- paging ----------------------------------------------------------------------------------
    def _release(self, seq: Sequence) -> None:
        self.allocator.free(seq.pages, seq)
        seq.pages = []
        if seq.window_slot >= 0:
            self._free_window_slots.append(seq.window_slot)
            seq.window_slot = -1

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Makes seq own pages for its first `num_tokens` tokens; False if not enough free."""
        need = pages_for(num_tokens, self.config.page_size) - len(seq.pages)
        if need <= 0:
            return True
        if not self.allocator.can_allocate(need):
            return False
        seq.pages.extend(self.allocator.allocate(need, seq))
        return True

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)

    # -- one step ----------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        if self.config.schedule == "prefill_first":
            plan = self._prompt_chunks_only()
            if not plan.empty:
                return plan
        return self._mixed()

    def _prompt_chunks_only(self) -> StepPlan:
        """`schedule="prefill_first"`: prompt chunks of >= 2 tokens only (running sequences in
        admission order, then waiting ones), from free pages; decode rows wait."""
        cfg = self.config
        plan = StepPlan()
        budget = cfg.max_tokens_per_step
        for seq in self.running:
            if budget < 2:
                break
            # seq.remaining < 2, spelled out (once per running sequence and step)
            if len(seq.prompt_ids) + len(seq.output_ids) - seq.num_computed < 2:
                continue  # a decode row, or a last token in flight
            length = self._prefill_room(plan.prefill, min(seq.remaining, budget))
            if length >= 2 and self._grow(seq, seq.num_computed + length):
                plan.prefill.append(_chunk(seq, length))
                budget -= length
        while self.waiting and len(self.running) < cfg.max_batch and budget >= 2:
            seq = self.waiting[0]
            if seq.output_ids[-1:] == [PENDING] or seq.remaining < 2:
                break
            length = self._prefill_room(plan.prefill, min(seq.remaining, budget))
            need = pages_for(seq.num_computed + length, cfg.page_size) - len(seq.pages)
            if length < 2 or self.allocator.num_free - need < len(self.running):
                break  # keep a page per running sequence for its decode rows
            self._admit(seq, length, plan)
            budget -= length
        return plan

    def _admit(self, seq: Sequence, length: int, plan: StepPlan) -> bool:
        """Moves the waiting head `seq` to running with a first chunk of `length` tokens;
        False (nothing changed) when its pages do not fit."""
        if not self._grow(seq, seq.num_computed + length):
            return False
        self.waiting.popleft()
        seq.status = Status.RUNNING
        seq.window_slot = self._free_window_slots.pop()
        self.running.append(seq)
        (plan.prefill if length > 1 else plan.decode).append(_chunk(seq, length))
        return True

    def _mixed(self) -> StepPlan:
        cfg = self.config
        plan = StepPlan()
        budget = cfg.max_tokens_per_step
        running, decode = self.running, plan.decode
        max_len, page = cfg.max_model_len, cfg.page_size
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            # Lengths spelled out (no property calls): this loop runs once per running
            # sequence and step, thousands of rows at the largest batches. A sequence with
            # all the tokens it may have (max_tokens or max_model_len, PENDING ones counted)
            # is running only while its last token is in flight (asynchronous mode).
            n_out = len(seq.output_ids)
            n_tok = len(seq.prompt_ids) + n_out
            if n_out >= seq.params.max_tokens or n_tok >= max_len:
                i += 1  # its last token is in flight; it finishes when that token is back
                continue
            start = seq.num_computed
            length = min(n_tok - start, budget)
            if length == 1 and start < len(seq.pages) * page:
                # a decode row inside its pages (_grow has nothing to do): the common case
                decode.append(Chunk(seq, start, 1, start + 1 == n_tok))
                budget -= 1
                i += 1
                continue
            if length > 1:
                length = self._prefill_room(plan.prefill, length)
                if length == 0:
                    i += 1
                    continue
            # Shrink a prefill chunk to the free pages before preempting anyone for it.
            while length > 1 and not self._grow(seq, seq.num_computed + length):
                owned = len(seq.pages) * cfg.page_size - seq.num_computed
                free = self.allocator.num_free * cfg.page_size
                length = max(1, min(length - 1, owned + free))
            while not self._grow(seq, seq.num_computed + length):
                victim = self.running[-1]
                self._preempt(victim, plan)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break  # seq preempted itself: everything after it is gone too
            chunk = _chunk(seq, length)
            (plan.prefill if length > 1 else plan.decode).append(chunk)
            budget -= length
            i += 1
        while (
            self.waiting and not plan.preempted and len(self.running) < cfg.max_batch and budget > 0
        ):
            seq = self.waiting[0]
            if seq.output_ids[-1:] == [PENDING]:
                break  # preempted while its last token was in flight: back next step
            length = min(seq.remaining, budget)
            if length > 1:
                length = self._prefill_room(plan.prefill, length)
                if length == 0:
                    break
            if not self._admit(seq, length, plan):
                break
            budget -= length
        return plan

    def _prefill_room(self, prefill: list[Chunk], length: int) -> int:
        """The length one more prefill chunk of `length` tokens may take: 0 when the call
        already holds `max_prefill_seqs` chunks or its grid has no room for another sequence,
        else `length` cut so that the grid (batch bucket x chunk bucket of its longest chunk)
        stays within `config.prefill_grid_limit`."""
        cfg = self.config
        if len(prefill) >= cfg.max_prefill_seqs:
            return 0
        batch = bucket_for(len(prefill) + 1, cfg.prefill_batch_bucket_list, "prefill batch")
        longest = max((c.length for c in prefill), default=1)
        room = [
            c for c in cfg.chunk_bucket_list if c >= longest and cfg.prefill_shape_fits(batch, c)
        ]
        return min(length, room[-1]) if room else 0

    def commit(self, chunk: Chunk) -> int | None:
        """Records that `chunk` was dispatched: its tokens count as computed, and when it
        samples, a `PENDING` placeholder is appended to the outputs. Returns the placeholder's
        index in `seq.output_ids` (None when the chunk does not sample); `resolve` fills it.

        Committing at dispatch lets the next step be scheduled before this one's tokens are
        back (the engine's asynchronous mode): a decode row whose last token is still PENDING
        reads it on the device from the step that samples it.
        """
        seq = chunk.seq
        if seq.num_computed != chunk.start:
            raise RuntimeError(f"{seq.request_id}: chunk at {chunk.start} is stale")
        seq.num_computed += chunk.length
        if not chunk.samples:
            return None
        seq.output_ids.append(PENDING)
        return len(seq.output_ids) - 1

    @staticmethod
    def resolve(seq: Sequence, index: int, token: int) -> bool:
        """Fills the placeholder at `index`; False (nothing changed) when the sequence finished
        meanwhile (aborted, or stopped at an earlier token) and the placeholder is gone."""
        out = seq.output_ids
        if seq.status is Status.FINISHED or index >= len(out) or out[index] != PENDING:
            return False
        out[index] = int(token)
        return True

    def complete(self, chunk: Chunk, token: int | None) -> bool:
        """`commit` and `resolve` at once (a step whose tokens are back before the next one is
        scheduled). Returns False (and changes nothing) when the sequence was aborted or
        preempted meanwhile."""
        seq = chunk.seq
        if seq.finished or seq.num_computed != chunk.start:
            return False
        index = self.commit(chunk)
        if index is not None:
            self.resolve(seq, index, token)
        return True
