"""`LLMEngine`: continuous batching over the paged KV cache with AOT-compiled step buckets.

    engine = LLMEngine.build(model_config, params, EngineConfig(...), tokenizer=tok)
    engine.add_request("r1", prompt_ids, SamplingParams(max_tokens=32), on_output=callback)
    while engine.has_unfinished():
        engine.step()                   # callbacks receive RequestOutput deltas (streaming)
    outs = engine.generate([ids1, ids2], SamplingParams(temperature=0))   # offline helper

One `step()`: schedule (scheduler.py) -> build padded numpy inputs for the decode rows
([B, 1], B a decode bucket) and the prefill chunks ([Bp, C] buckets) -> dispatch both jitted
calls -> read back [B] sampled ids -> append tokens, check stops, emit outputs. With
`EngineConfig.async_scheduling` (the default) the ids read back are the previous step's:
each step is dispatched before its predecessor's tokens reach the host (decode rows take
their input token on the device), so host work overlaps the GPU's (`step`). At start-up
every bucket is compiled ahead of time (progress bar, `compile_time_s`) and run once on an
all-padding batch (`EngineConfig.warm_up`, `warm_up_time_s`); afterwards the runner refuses
unknown shapes, so steady-state serving cannot recompile.

Thread safety: `add_request`, `abort` and `stats` may be called from any thread while one
thread drives `step()`; the device work of a step runs outside the lock, so an abort frees the
request's pages at once (the in-flight step's writes to them are harmless: a page's next owner
writes every position before reading it).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import sys
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from comet_jax.engine.allocator import (
    BlockAllocator,
    CapacityPlan,
    free_device_memory,
    pages_for,
    plan_num_pages,
)
from comet_jax.engine.config import EngineConfig, bucket_for
from comet_jax.engine.kv_cache import KVCacheConfig
from comet_jax.engine.runner import (
    ModelRunner,
    PagedAttention,
    StepInputs,
    precision_plan,
    prefill_row_options,
    resolve_kernels,
    with_kernel_mode,
)
from comet_jax.engine.sampling import SamplingParams, TextStream
from comet_jax.engine.scheduler import PENDING, Chunk, FinishReason, Scheduler
from comet_jax.engine.scheduler import Sequence as Seq

# Python's generation-2 threshold while EngineConfig.gc_full_every_steps holds full
# collections off (gen-1 collections between full ones: never reached in practice).
_GC_HELD = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    """What one step produced for a request (deltas) and, when finished, why it ended."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int


@dataclasses.dataclass
class _Request:
    seq: Seq
    on_output: Callable[[RequestOutput], None] | None
    text: TextStream | None
    stop_ids: frozenset[int]
    sent: int = 0  # output tokens already reported


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    decode_calls: int = 0
    prefill_calls: int = 0
    prompt_tokens: int = 0
    processed_tokens: int = 0  # tokens run through the model (prefill incl. recompute + decode)
    generated_tokens: int = 0
    requests_added: int = 0
    requests_finished: int = 0
    requests_aborted: int = 0
    host_time_s: float = 0.0  # schedule + input building + output handling
    device_time_s: float = 0.0  # dispatch until results are on the host
    # the part of device_time_s spent blocked on the results (the rest is dispatch): ~0 when
    # the host, not the device, sets the pace
    wait_time_s: float = 0.0


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        *,
        tokenizer=None,
        capacity: CapacityPlan | None = None,
        progress: bool = True,
    ):
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self.capacity = capacity
        # config.num_pages may use only part of the runner's pool (tests share one compiled
        # runner between engines of different pool sizes).
        num_pages = config.num_pages or runner.num_pages
        if num_pages > runner.num_pages:
            raise ValueError(
                f"num_pages={num_pages} exceeds the runner's cache of {runner.num_pages} pages"
            )
        self.allocator = BlockAllocator(num_pages)
        self.scheduler = Scheduler(config, self.allocator)
        self.stats = EngineStats()
        self._requests: dict[str, _Request] = {}
        self._lock = threading.RLock()
        self._ids = itertools.count()
        # Asynchronous mode: the dispatched step whose tokens are not processed yet, as
        # (committed rows per call, (decode tokens, prefill tokens) device arrays).
        self._inflight: tuple | None = None
        self._inflight_slots: dict[int, int] = {}
        self.compile_time_s = 0.0
        self.warm_up_time_s = 0.0
        if config.aot_compile:
            self.compile_all(progress=progress)
            self.check_step_memory()
            runner.allow_lazy = False
            if config.warm_up:
                t0 = time.perf_counter()
                runner.warm_up()
                self.warm_up_time_s = time.perf_counter() - t0
        # Objects the collector skips from now on (EngineConfig.gc_freeze); 0 when off.
        self.gc_frozen_objects = 0
        if config.gc_freeze:
            gc.collect()
            gc.freeze()
            self.gc_frozen_objects = gc.get_freeze_count()
        # EngineConfig.gc_full_every_steps: Python's thresholds to restore at close, the
        # steps since the engine's last full collection, and how many it ran.
        self._gc_threshold = None
        self._gc_steps = 0
        self.gc_full_collections = 0
        if config.gc_full_every_steps:
            self._gc_threshold = gc.get_threshold()
            gc.set_threshold(self._gc_threshold[0], self._gc_threshold[1], _GC_HELD)

    def close(self) -> None:
        """Ends the engine's hold on the process: with ``config.gc_freeze``, gives the
        frozen objects back to the collector (``gc.unfreeze()``, process-wide). Requests still
        running are aborted first (their pages freed). The engine must not step afterwards."""
        with self._lock:
            for rid in list(self._requests):
                self.abort(rid)
        if self.config.gc_freeze:
            gc.unfreeze()
            self.gc_frozen_objects = 0
        if self._gc_threshold is not None:
            gc.set_threshold(*self._gc_threshold)
            self._gc_threshold = None

    @classmethod
    def build(
        cls,
        model_config,
        params,
        config: EngineConfig,
        *,
        tokenizer=None,
        linear=None,
        progress: bool = True,
    ) -> LLMEngine:
        """Model + paged attention + KV pool sized by config (or free memory) -> engine.

        linear: the projection backend/LinearPlan of `params` (a quantized checkpoint's plan);
        None = `precision_plan(config.precision)` (float params for bf16; random-weight
        shaped params otherwise).
        """
        from models.llama import LlamaForCausalLM

        mode, attn_backend = resolve_kernels(config.kernels, config.interpret)
        if linear is None:
            linear = precision_plan(
                model_config, config.precision, mode=mode, interpret=config.interpret
            )
        else:
            linear = with_kernel_mode(linear, mode, config.interpret)
        dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32
        model = LlamaForCausalLM(
            model_config,
            linear=linear,
            attention=PagedAttention(
                attn_backend,
                config.interpret,
                config.prefill_dequantize,
                config.kv_write_kernel,
                config.kv_window_kernel,
                decode_fused_write=config.decode_fused_write,
                decode_qk_int8=config.resolved_decode_qk_int8,
            ),
            dtype=dtype,
            param_dtype=dtype,
        )
        cache_config, plan = plan_capacity(model_config, config)
        if config.num_pages is None:
            # Never more pages than the scheduler can ever hold (every running sequence at
            # max_model_len): a bigger pool only costs memory (on CPU, "free memory" is host RAM).
            usable = config.max_batch * pages_for(config.max_model_len, config.page_size) + 1
            pages = cache_config.triton_safe_pages(min(plan.num_pages, usable))
            plan = dataclasses.replace(plan, num_pages=pages)
            cache_config = dataclasses.replace(cache_config, num_pages=plan.num_pages)
        else:
            plan = dataclasses.replace(plan, num_pages=config.num_pages)
        mesh = None
        if config.tp > 1:
            from comet_jax.parallel.mesh import make_mesh

            if jax.device_count() < config.tp:
                raise ValueError(
                    f"tp={config.tp} needs {config.tp} devices, found {jax.device_count()}"
                )
            mesh = make_mesh(config.tp)
        runner = ModelRunner(
            model,
            params,
            cache_config,
            mesh=mesh,
            cuda_graphs=config.cuda_graphs,
            xla_remat=config.xla_remat,
            out_size=max(config.decode_bucket_list[-1], config.prefill_batch_bucket_list[-1]),
            pack_buckets=config.pack_bucket_list,
            prefill_own_kv=config.prefill_own_kv,
        )
        return cls(config, runner, tokenizer=tokenizer, capacity=plan, progress=progress)

    # -- compilation -----------------------------------------------------------------------------
    def bucket_shapes(self) -> list[tuple[int, int, int, int]]:
        """Every (batch, length, pages, packed rows) the engine may run (`ModelRunner.run`'s
        keys; packed rows 0 = the call's grid)."""
        cfg = self.config
        shapes = [(b, 1, p, 0) for b in cfg.decode_bucket_list for p in cfg.page_bucket_list]
        shapes += [
            (b, c, p, r)
            for b in cfg.prefill_batch_bucket_list
            for c in cfg.chunk_bucket_list
            for p in cfg.page_bucket_list
            if c > 1 and cfg.prefill_shape_fits(b, c)
            for r in prefill_row_options(b, c, cfg.pack_bucket_list, cfg.max_tokens_per_step)
        ]
        return shapes

    def check_step_memory(self, free_bytes: int | None = None) -> int:
        """Raises if a compiled step's scratch (`ModelRunner.step_scratch_bytes`) exceeds the
        device memory left beside the weights and the KV pool, instead of failing at the first
        request; returns that scratch in bytes. free_bytes: default the device's."""
        need = self.runner.step_scratch_bytes()
        free = free_device_memory() if free_bytes is None else free_bytes
        if need > free:
            raise ValueError(
                f"the compiled steps need up to {need / 2**30:.2f} GiB of scratch but only "
                f"{free / 2**30:.2f} GiB of device memory is free beside the weights and the "
                f"KV pool ({self.runner.num_pages} pages): lower memory_fraction "
                f"(now {self.config.memory_fraction}) or num_pages"
            )
        return need

    def compile_all(self, progress: bool = True) -> float:
        from tqdm.auto import tqdm

        shapes = self.bucket_shapes()
        workers = self.config.resolved_compile_workers
        t0 = time.perf_counter()
        bar = tqdm(
            total=len(shapes), desc="compiling step buckets", unit="shape", disable=not progress
        )

        def done(key):
            b, t, p, r = key
            bar.set_postfix_str(f"B={b} T={t} P={p}" + (f" rows={r}" if r else ""))
            bar.update()

        self.runner.compile_many(shapes, workers, on_done=done)
        bar.close()
        self.compile_time_s = time.perf_counter() - t0
        if progress:
            print(
                f"compiled {len(shapes)} step shapes in {self.compile_time_s:.1f} s "
                f"({workers} compile worker{'s' if workers > 1 else ''})",
                file=sys.stderr,
                flush=True,
            )
        return self.compile_time_s

    # -- requests --------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str | None,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_output: Callable[[RequestOutput], None] | None = None,
    ) -> str:
        """Queues a request; ValueError if it can never run (empty/too long/bad ids)."""
        prompt_ids = [int(t) for t in prompt_ids]
        vocab = self.runner.model.config.vocab_size
        if not prompt_ids:
            raise ValueError("prompt is empty; expected at least one token")
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop={params.stop!r} needs a tokenizer")
        with self._lock:
            rid = request_id if request_id is not None else f"req-{next(self._ids)}"
            if rid in self._requests:
                raise ValueError(f"request_id={rid!r} is already in use")
            seed = self.config.seed if params.seed is None else params.seed
            seq = Seq(rid, prompt_ids, params, seed=seed & 0x7FFFFFFF)
            self.scheduler.add(seq)  # raises on too long
            stop_ids = set(params.stop_token_ids)
            eos = getattr(self.tokenizer, "eos_id", None)
            if eos is not None and not params.ignore_eos:
                stop_ids.add(eos)
            text = None
            if self.tokenizer is not None:
                text = TextStream(
                    lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), params.stop
                )
            self._requests[rid] = _Request(seq, on_output, text, frozenset(stop_ids))
            self.stats.requests_added += 1
            self.stats.prompt_tokens += len(prompt_ids)
            return rid

    def abort(self, request_id: str) -> bool:
        """Cancels a request; its pages are free on return. False if unknown or finished."""
        with self._lock:
            req = self._requests.get(request_id)
            if req is None or req.seq.finished:
                return False
            self.scheduler.finish(req.seq, FinishReason.ABORT)
            self.stats.requests_aborted += 1
            self._emit(req, [], "")
            return True

    def has_unfinished(self) -> bool:
        with self._lock:
            return self.scheduler.num_unfinished > 0

    # -- one step --------------------------------------------------------------------------------
    def _inputs(self, chunks: list[Chunk], batch_buckets, length: int) -> StepInputs:
        """The call's StepInputs. One Python pass collects the rows' values and numpy writes
        them column by column (a decode call has thousands of rows: per-element writes took
        ~11 ms of host time per step at 6131 rows, `experiments/bench_host.py`)."""
        cfg = self.config
        n = len(chunks)
        seqs = [c.seq for c in chunks]
        batch = bucket_for(n, batch_buckets, "batch")
        page_counts = [len(s.pages) for s in seqs]
        pages = bucket_for(max(page_counts), cfg.page_bucket_list, "pages")
        inp = StepInputs.zeros(batch, length, pages)
        ids, src_rows, src_slots = [], [], []
        slots = self._inflight_slots
        for i, c in enumerate(chunks):
            seq = c.seq
            if c.length == 1:  # a decode row: its one id (token_slice without the list)
                start, prompt = c.start, len(seq.prompt_ids)
                tok = seq.output_ids[start - prompt] if start >= prompt else seq.prompt_ids[start]
                if tok == PENDING:  # sampled by the step in flight: read on the device
                    slot = slots.get(id(seq))
                    if slot is None:
                        raise RuntimeError(f"{seq.request_id}: pending token cannot be supplied")
                    src_rows.append(i)
                    src_slots.append(slot)
                    tok = 0
                ids.append(tok)
                continue
            row = seq.token_slice(c.start, c.start + c.length)
            if row[-1] == PENDING:  # only a decode row's token can be in flight
                raise RuntimeError(f"{seq.request_id}: pending token cannot be supplied")
            ids.extend(row)
        lengths = np.fromiter((c.length for c in chunks), np.int32, n)
        # Row-major boolean fills: each row's leading `lengths[i]` tokens / `page_counts[i]` pages.
        inp.tokens[:n][np.arange(length) < lengths[:, None]] = ids
        counts = np.asarray(page_counts, np.int32)
        inp.page_table[:n][np.arange(pages) < counts[:, None]] = [p for s in seqs for p in s.pages]
        inp.src[src_rows] = src_slots
        inp.start[:n] = [c.start for c in chunks]
        inp.num_valid[:n] = lengths
        inp.window_slot[:n] = [s.window_slot for s in seqs]
        inp.temperature[:n] = [s.params.temperature for s in seqs]
        inp.top_k[:n] = [s.params.top_k for s in seqs]
        inp.top_p[:n] = [s.params.top_p for s in seqs]
        inp.seeds[:n] = [s.seed for s in seqs]
        inp.counters[:n] = [len(s.output_ids) for s in seqs]
        return inp

    def step(self) -> list[RequestOutput]:
        """Runs one engine step; returns the outputs it produced (also sent to callbacks).

        Synchronous mode: schedule, dispatch, wait for the sampled tokens, process them. With
        `config.async_scheduling`, the tokens processed are those of the previous step: this
        step is scheduled and dispatched first (its decode rows read the in-flight tokens on
        the device), so the host's scheduling, input building and output handling overlap
        the device's work instead of leaving it idle between steps. The token streams are the
        same in both modes; a request that stops at a token also occupies a row of the next
        step, whose output is dropped.
        """
        cfg = self.config
        t0 = time.perf_counter()
        with self._lock:
            plan = self.scheduler.schedule()
            calls = []
            if plan.decode:
                calls.append((plan.decode, self._inputs(plan.decode, cfg.decode_bucket_list, 1)))
            if plan.prefill:
                longest = max(c.length for c in plan.prefill)
                length = bucket_for(longest, cfg.chunk_bucket_list, "chunk")
                calls.append(
                    (
                        plan.prefill,
                        self._inputs(plan.prefill, cfg.prefill_batch_bucket_list, length),
                    )
                )
            # Commit at dispatch: outputs get PENDING placeholders, resolved below.
            committed = [[(c, self.scheduler.commit(c)) for c in chunks] for chunks, _ in calls]
        if not calls and self._inflight is None:
            return []
        t1 = time.perf_counter()
        prev = self._inflight[1] if self._inflight is not None else None
        tokens = [self.runner.run(inp, prev) for _, inp in calls]
        dispatched = (committed, self._pad_calls(tokens)) if calls else None
        if cfg.async_scheduling:
            done, self._inflight = self._inflight, dispatched
        else:
            done = dispatched
        self._inflight_slots = self._slots(self._inflight)
        results = []
        t_wait = time.perf_counter()
        if done is not None:
            results = [(rows, np.asarray(t)) for rows, t in zip(*done) if rows]
        t2 = time.perf_counter()
        outputs = []
        with self._lock:
            processed, resolve, requests = 0, self.scheduler.resolve, self._requests
            for rows, toks in results:
                for (c, index), tok in zip(rows, toks.tolist()):  # Python ints: one pass
                    seq = c.seq
                    if index is None:
                        if not seq.finished:
                            processed += c.length
                        continue
                    if not resolve(seq, index, tok):
                        continue
                    processed += c.length
                    req = requests.get(seq.request_id)
                    if req is not None:
                        outputs.append(self._after_token(req, index))
            st = self.stats
            st.processed_tokens += processed
            st.steps += 1
            st.decode_calls += bool(plan.decode)
            st.prefill_calls += bool(plan.prefill)
            st.host_time_s += (t1 - t0) + (time.perf_counter() - t2)
            st.device_time_s += t2 - t1
            st.wait_time_s += t2 - t_wait
        self._full_collection_point()
        return outputs

    def _full_collection_point(self) -> None:
        """EngineConfig.gc_full_every_steps: the held-off full collection, when the engine
        has drained (no request left, nothing in flight) or N steps after the last one."""
        n = self.config.gc_full_every_steps
        if not n:
            return
        self._gc_steps += 1
        drained = self._inflight is None and self.scheduler.num_unfinished == 0
        if drained or self._gc_steps >= n:
            gc.collect()
            self._gc_steps = 0
            self.gc_full_collections += 1

    def _pad_calls(self, tokens: list) -> tuple:
        """The step's sampler outputs as (decode, prefill) slots for the next step's `prev`."""
        tokens = list(tokens) + [self.runner.no_tokens] * (2 - len(tokens))
        return tuple(tokens)

    def _slots(self, inflight) -> dict[int, int]:
        """id(seq) -> index into concat(prev_a, prev_b) of its in-flight sampled token."""
        if inflight is None:
            return {}
        committed, _ = inflight
        width = self.runner.token_slots(1)
        return {
            id(c.seq): k * width + i
            for k, rows in enumerate(committed)
            for i, (c, index) in enumerate(rows)
            if index is not None
        }

    def _after_token(self, req: _Request, index: int) -> RequestOutput:
        """Stop checks after the sampled token at output `index` (tokens after it may still be
        PENDING); emits the delta."""
        seq = req.seq
        self.stats.generated_tokens += 1
        token = seq.output_ids[index]
        done = index + 1
        reason = None
        if token in req.stop_ids:
            done = index  # the stop token is not part of the completion
            reason = FinishReason.STOP
        elif done >= seq.params.max_tokens:
            reason = FinishReason.LENGTH
        elif len(seq.prompt_ids) + done >= self.config.max_model_len:
            reason = FinishReason.LENGTH
        delta = ""
        if req.text is not None:
            delta = req.text.push(seq.output_ids[:done], final=reason is not None)
            if req.text.stopped:
                reason = FinishReason.STOP
        if reason is not None:
            del seq.output_ids[done:]  # the stop token and any PENDING after it
            self.scheduler.finish(seq, reason)
            self.stats.requests_finished += 1
            return self._emit(req, seq.output_ids[req.sent : done], delta, sent=done)
        # Still running (resolve() found it unfinished): the delta without _emit's checks,
        # the path of every token but a request's last.
        return self._deliver(req, seq.output_ids[req.sent : done], delta, False, done)

    def _emit(
        self, req: _Request, new_ids: list[int], text: str, sent: int | None = None
    ) -> RequestOutput:
        seq = req.seq
        finished = seq.finished
        if finished:  # aborted or stopped: nothing PENDING remains
            seq.output_ids[:] = [t for t in seq.output_ids if t != PENDING]
            del self._requests[seq.request_id]
        sent = len(seq.output_ids) if sent is None else min(sent, len(seq.output_ids))
        return self._deliver(req, new_ids, text, finished, sent)

    def _deliver(
        self, req: _Request, new_ids: list[int], text: str, finished: bool, sent: int
    ) -> RequestOutput:
        """The RequestOutput of ``new_ids`` / ``text``, ``sent`` output tokens reported in
        all, handed to the request's callback."""
        seq = req.seq
        req.sent = sent
        out = RequestOutput(
            request_id=seq.request_id,
            new_token_ids=tuple(new_ids),
            new_text=text,
            finished=finished,
            finish_reason=seq.finish_reason.value if seq.finish_reason else None,
            num_prompt_tokens=len(seq.prompt_ids),
            num_output_tokens=sent,
        )
        if req.on_output is not None:
            req.on_output(out)
        return out

    # -- offline ---------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Sequence[int]], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[dict]:
        """Runs prompts to completion; returns per prompt {token_ids, text, finish_reason}."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        results: dict[str, dict] = {}

        def collect(out: RequestOutput):
            r = results.setdefault(out.request_id, {"token_ids": [], "text": ""})
            r["token_ids"].extend(out.new_token_ids)
            r["text"] += out.new_text
            if out.finished:
                r["finish_reason"] = out.finish_reason

        rids = [self.add_request(None, p, sp, collect) for p, sp in zip(prompts, params)]
        while self.has_unfinished():
            self.step()
        return [results[r] for r in rids]

    def metrics(self) -> dict[str, float]:
        with self._lock:
            st = self.stats
            return {
                "running_requests": len(self.scheduler.running),
                "waiting_requests": len(self.scheduler.waiting),
                "kv_pages_used": self.allocator.num_used,
                "kv_pages_total": self.allocator.capacity,
                "kv_page_size": self.config.page_size,
                "preemptions_total": self.scheduler.num_preemptions,
                "steps_total": st.steps,
                "prompt_tokens_total": st.prompt_tokens,
                "processed_tokens_total": st.processed_tokens,
                "generated_tokens_total": st.generated_tokens,
                "requests_added_total": st.requests_added,
                "requests_finished_total": st.requests_finished,
                "requests_aborted_total": st.requests_aborted,
                "host_time_seconds_total": st.host_time_s,
                "device_time_seconds_total": st.device_time_s,
                "device_wait_seconds_total": st.wait_time_s,
                "compilations_total": self.runner.num_compilations,
                "compile_time_seconds": self.compile_time_s,
                "warm_up_time_seconds": self.warm_up_time_s,
            }


# The filtered sampler's live f32 [rows, vocab] arrays: its logits operand and four
# temporaries (XLA's memory analysis of the compiled `_padded_sample`: 4.0 x rows x vocab x
# 4 B of temporaries; measured on the CPU backend at 256 x 128256).
SAMPLER_ROW_COPIES = 5


def step_working_bytes(model_config, config: EngineConfig, rows: int | None = None) -> int:
    """Device memory one engine step needs besides the weights and the KV pool, at most
    (``rows`` decode rows, default ``config.max_batch``): the sampler's f32 ``[rows, vocab]``
    arrays (``SAMPLER_ROW_COPIES``) and f32 activations of the MLP and residual widths for
    the step's largest token count (an upper bound of XLA's memory analysis of the compiled
    8B steps: 1.12-1.19 GiB at 8192 tokens, docs/benchmarks.md), plus the largest prefill
    call's attention grid (`prefill_grid_bytes`). At batch 7289 (LLaMA-3-8B,
    256-token sequences in KV4) the sampler alone needs 17.4 GiB, more than the 10% of free
    memory that `memory_fraction=0.9` leaves: the pool must give way."""
    rows = config.max_batch if rows is None else rows
    sampler = SAMPLER_ROW_COPIES * rows * model_config.vocab_size * 4
    tokens = max(rows, config.max_tokens_per_step)
    width = 2 * model_config.intermediate_size + 4 * model_config.hidden_size
    return sampler + 4 * tokens * width + prefill_grid_bytes(model_config, config)


def prefill_grid_bytes(model_config, config: EngineConfig) -> int:
    """Bytes of the largest prefill call's attention grid (`config.prefill_grid_limit`
    positions) holding q, k, v and the output in the compute dtype. XLA's memory analysis of
    the compiled LLaMA-3-8B W4AxKV4 steps grew by 15.6 KiB per grid position (64 x 8192 vs
    1 x 8192 positions, docs/benchmarks.md 2026-11-27) against the 20 KiB counted here."""
    item = 4 if config.compute_dtype == "float32" else 2
    heads = 2 * model_config.num_heads + 2 * model_config.num_kv_heads
    return config.prefill_grid_limit * heads * model_config.head_dim * item


def plan_capacity(
    model_config,
    config: EngineConfig,
    *,
    window_slots: int | None = None,
    free_bytes=None,
    rows: int | None = None,
) -> tuple[KVCacheConfig, CapacityPlan]:
    """The KV pool's layout and its page count planned from free device memory
    (`config.memory_fraction` of `free_bytes`, default the device's, leaving at least
    `step_working_bytes` for the steps), before the engine caps it at what `max_batch`
    sequences of `max_model_len` can use.

    window_slots: recent-window rings reserved out of the budget (default: one per
    `config.max_batch` sequence when `config.kv_recent_window` is on). rows: the decode rows
    of the largest step (default `config.max_batch`).
    """
    if window_slots is None:
        window_slots = config.max_batch
    cache_config = KVCacheConfig(
        num_layers=model_config.num_layers,
        num_kv_heads=model_config.num_kv_heads,
        head_dim=model_config.head_dim,
        page_size=config.page_size,
        num_pages=config.num_pages or 2,
        group_size=config.kv_group,
        dtype=config.resolved_kv_dtype,
        recent_window=config.kv_recent_window,
        window_slots=window_slots if config.kv_recent_window else 0,
        window_dtype=config.compute_dtype,
    )
    plan = plan_num_pages(
        free_bytes=free_device_memory() if free_bytes is None else free_bytes,
        fraction=config.memory_fraction,
        cache_config=cache_config,
        step_bytes=step_working_bytes(model_config, config, rows),
    )
    return cache_config, plan


def max_batch_for_memory(
    model_config, config: EngineConfig, *, seq_len: int | None = None, free_bytes=None
) -> int:
    """The most sequences of `seq_len` tokens (default `config.max_model_len`) that the KV
    pool planned from free memory holds at once, every one at full length: the batch of a
    max-throughput run "as memory allows" (COMET's "max throughput under equal memory"),
    which never preempts. With a recent window each sequence also takes a ring out of the
    same budget, and the steps' working memory at n rows (`step_working_bytes`) stays out of
    it; a fixed `config.num_pages` is the pool instead. 0 when not even one sequence
    fits."""
    per_seq = pages_for(seq_len or config.max_model_len, config.page_size)
    if config.num_pages is not None:
        return (config.num_pages - 1) // per_seq

    def fits(n: int) -> int:
        try:
            cache_config, plan = plan_capacity(
                model_config, config, window_slots=n, free_bytes=free_bytes, rows=n
            )
        except ValueError:  # the rings or the step alone leave too little for two pages
            return 0
        return (cache_config.triton_safe_pages(plan.num_pages) - 1) // per_seq

    # fits(n) falls as n's rings and step memory grow: the answer is the largest n >= 1 with
    # fits(n) >= n.
    lo, hi = 0, fits(1)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid) >= mid:
            lo = mid
        else:
            hi = mid - 1
    return lo


def count_backend_compiles() -> Callable[[], int]:
    """Starts counting XLA backend compilations process-wide; returns a reader of the count."""
    count = [0]

    def listener(event: str, duration: float, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            count[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    return lambda: count[0]
