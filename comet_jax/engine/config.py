"""`EngineConfig`: the static knobs of the serving engine (batching, paging, buckets, precision).

A frozen dataclass of plain values; gin binds it at the edges (CLI, experiment files). Derived
values (bucket lists, pages per sequence) are properties so that the config stays the single
source of truth.

Shape buckets: the jitted steps only ever see these shapes, so steady-state serving never
recompiles.
  decode  : tokens [B, 1]   with B in `decode_buckets`
  prefill : tokens [Bp, C]  with Bp in `prefill_batch_buckets`, C in `chunk_buckets`
  pages   : page table [B, P] with P in `page_buckets` (the smallest bucket >= the longest
            sequence of the step; gathering fewer pages is cheaper for short contexts).
"""

from __future__ import annotations

import dataclasses
import math
import os

PRECISIONS = ("bf16", "w8a8", "w4a16", "w4axkv4")
KV_DTYPES = ("bf16", "int4")
SCHEDULES = ("mixed", "prefill_first")


def _pow2_buckets(limit: int, start: int = 1) -> tuple[int, ...]:
    out, b = [], start
    while b < limit:
        out.append(b)
        b *= 2
    out.append(limit)
    return tuple(out)


def _check_buckets(
    name: str, buckets: tuple[int, ...] | None, limit: int, pad_above: bool = False
) -> None:
    """``pad_above``: the last bucket may exceed the limit (its rows past it are padding);
    only the last may reach it."""
    if buckets is None:
        return
    if not buckets or any(not isinstance(b, int) or b <= 0 for b in buckets):
        raise ValueError(f"{name}={buckets!r}; expected a non-empty tuple of positive ints")
    if tuple(sorted(set(buckets))) != tuple(buckets):
        raise ValueError(f"{name}={buckets!r} must be strictly increasing")
    if pad_above:
        if buckets[-1] < limit or (len(buckets) > 1 and buckets[-2] >= limit):
            raise ValueError(
                f"{name}={buckets!r} must end with one bucket >= the limit {limit} (the "
                "buckets before it below the limit)"
            )
    elif buckets[-1] != limit:
        raise ValueError(f"{name}={buckets!r} must end with the limit {limit}")


def default_page_size(kernels: str, interpret: bool) -> int:
    """EngineConfig.page_size when None: 128 for the Pallas kernels on a GPU (measured
    fastest), 16 otherwise (CPU, reference kernels, interpret mode)."""
    import jax

    gpu = not interpret and kernels != "reference" and jax.default_backend() == "gpu"
    return 128 if gpu else 16


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Serving engine configuration.

    Attributes:
      max_batch: most sequences running at once (the largest decode batch).
      max_tokens_per_step: token budget of one engine step (decode tokens + prefill chunk
        tokens); also the largest prefill chunk.
      max_prefill_seqs: most sequences whose prompt chunks run in one step.
      schedule: what a step holds. "mixed" (default): the running sequences' decode rows and
        prompt chunks, then waiting prompts admitted into the budget left (chunked prefill
        mixed with decode). "prefill_first": while some prompt chunk can run (a running
        sequence's next chunk, or a waiting prompt admitted from free pages, leaving one page
        per running sequence), a step holds prompt chunks only and the decode rows wait; a
        step with none is a "mixed" one. Offline runs where all prompts arrive at once then
        decode in fewer, fuller steps; online, every decode waits out the prefills.
      max_prefill_grid: most positions of a prefill call's attention grid, its batch bucket x
        chunk bucket (attention sees the call's chunks padded to that [B, T] grid, with q, k,
        v and the output gathered into it: about (2 Hq + 2 Hkv) x D x 2 bytes a position,
        ~160 KiB for LLaMA-3-8B). The scheduler shortens or defers a prompt chunk that would
        make the grid larger, and only the buckets within it are compiled. None (default):
        2 x max_tokens_per_step (or the smallest prefill batch bucket x max_tokens_per_step
        if larger). Without a limit, 64 prefill sequences x 8192-token chunks compiled an 8B
        step with 8.1 GiB of scratch that no real step used (docs/benchmarks.md, 2026-11-27).
      max_model_len: longest sequence (prompt + generated) the engine accepts.
      page_size: tokens per KV page (16, 32, 64 or 128). None (default): 128 when the
        engine will run the Pallas kernels on a GPU, else 16. On the H100 page 128 gave the
        fastest KV4 decode and prefill kernels (page 16: 1.4x slower decode even with 256 keys
        gathered per step) and 1-1.5% more serving throughput than page 64 for bf16 and
        W4AxKV4 (docs/benchmarks.md, docs/kernels_attention.md); small pages waste less of a
        sequence's last page, which matters for the small CPU pools.
      num_pages: KV pool size in pages (page 0 is a reserved scratch page); None = plan it from
        free device memory x `memory_fraction`.
      memory_fraction: share of free device memory given to the KV pool when num_pages is None
        (free = XLA's preallocation, XLA_PYTHON_CLIENT_MEM_FRACTION, minus the weights). After
        the ahead-of-time compile, a pool that leaves less than the largest step's scratch is
        an error (`LLMEngine.check_step_memory`), not an out-of-memory at the first request.
      precision: 'bf16' | 'w8a8' | 'w4a16' | 'w4axkv4' (projection backends; w4axkv4 also
        implies an INT4 KV cache).
      kv_dtype: 'bf16' | 'int4' | None (None: int4 for w4axkv4, bf16 otherwise).
      kv_group: KV4 quantization group along head_dim.
      compute_dtype: 'bfloat16' | 'float32' activations.
      decode_buckets, prefill_batch_buckets, chunk_buckets, page_buckets: shape buckets (None:
        powers of two up to the limit; pages: a single bucket, the max pages per sequence).
        Each list ends with its limit, except decode_buckets, whose last bucket may exceed
        max_batch (padding rows): a decode batch of rows that are a multiple of 8 lets the
        Mosaic GPU W4Ax GEMM write its outputs without a slice (w4ax_mgpu.OUT_ROW_TILE;
        `bench_throughput.py --decode-row-align`).
      kernels: 'auto' (Pallas on GPU or with interpret, jnp reference/simulation on CPU) |
        'pallas' | 'reference'.
      interpret: run Pallas kernels in interpret mode (CPU; slow, for testing kernels).
      aot_compile: compile every bucket at start-up (else on first use).
      compile_workers: XLA compilations run at once by the start-up compile
        (`ModelRunner.compile_many`: shapes are traced and lowered one after another, their
        compilations overlap in a thread pool). None (default): min(8, CPU count). Same
        executables for any value; 1 compiles one shape at a time.
      warm_up: with aot_compile, also run every compiled bucket once at start-up on an
        all-padding batch (`ModelRunner.warm_up`), so that the device's first-run work is not
        paid by the first requests. On the H100 (LLaMA-3-8B shapes, W4AxKV4, 256 requests of
        1024/512) the first workload after start-up took 13.89 s against 13.25 s for the next
        one without it, 13.14 / 13.15 s with it (warm-up 1.4 s; docs/benchmarks.md).
      tp: tensor-parallel degree: the steps run on a mesh of the first `tp` devices with
        params and KV pages sharded (comet_jax/parallel); 1 = one device.
      seed: default sampling seed of requests that give none.
      cuda_graphs: let XLA run the step executables as CUDA graphs (command buffers); no
        effect on CPU. With async_scheduling the graph launch overlaps the previous step on
        the GPU; measured on an H100 (docs/benchmarks.md), graphs + async gave the shortest
        decode steps for bf16 and W4AxKV4.
      xla_remat: keep XLA's rematerialization pass for the step executables (off by default:
        it counts the donated KV pool twice and, with a large pool, recomputes fusions for
        nothing; see runner.NO_REMAT). An ablation switch.
      async_scheduling: schedule and dispatch step N+1 before step N's tokens are back, so
        host work overlaps device work (LLMEngine.step); same tokens as synchronous mode.
      pack_prefill: a prefill call with several sequences runs its embedding, projections and
        MLP on the step's real tokens packed into `max_tokens_per_step` rows (or the smallest
        of `pack_buckets` that holds them), not on its padded [batch bucket, chunk bucket]
        grid, whenever that is fewer rows (attention still sees the grid); same logits.
      pack_buckets: packed row counts of those calls, increasing, ending with
        max_tokens_per_step (None: that alone). Each bucket below a prefill shape's grid is
        one more compiled executable of that shape; they pay when steps' prefill tokens vary
        below the grid (at 1024/512 on LLaMA-3-8B shapes, decode rows take part of each
        step's budget and the 8 x 1024 grid ran 10% padding rows: `experiments/bench_host.py
        --pack-buckets`).
      prefill_dequantize: INT4 cache with Pallas kernels: prefill attention dequantizes the
        pages of the call once into bf16 and runs the bf16-page kernel
        (`kv4_attention.paged_prefill_attention(dequantize=True)`) instead of unpacking each
        page once per row tile. On by default: measured on an H100 (docs/benchmarks.md) 1.2-1.5x
        faster prefill attention on every shape tried and +2.5% serving throughput at
        1024/512. Same values up to the bf16 rounding of K/V. Costs a temporary bf16 copy of
        the call's pages for one layer at a time (prefill batch x page-table width x page x
        Hkv x D x 4 bytes, e.g. 134 MB for 4 x 8192 tokens of LLaMA-3-8B), taken from the
        memory the KV pool leaves free. The pass covers the whole page-table width whether the
        pages are used or not, so with a long max_model_len and one page bucket, short prompts
        pay for the full width: give `page_buckets`, or turn it off (the in-kernel unpack
        reads only the pages in use).
      kv_write_kernel: INT4 cache with Pallas kernels: each layer's new K/V are quantized and
        stored into their pages by one Pallas kernel (`pallas_kernels.kv4_write`, the same
        bytes) instead of XLA's quantize + six scatters. On by default: on the H100
        (LLaMA-3-8B, batch 256 decode) the cache write took 0.10 ms per step against 0.70 ms
        for XLA's scatters and min/max reductions, and serving at 1024/512 ran 2.4% faster
        (docs/benchmarks.md, 2026-11-26). Bit-exact with the XLA write (CPU interpret-mode tests,
        and on the device by `bench_attention.py`).
      kv_recent_window: W > 0 keeps each running sequence's newest W tokens' K/V unquantized
        (compute dtype) beside the INT4 pages and attends to them in float
        (`comet_jax.engine.recent_window`; the serving form of
        `QuantRecipe.kv_recent_window`, docs/accuracy.md). INT4 cache only; the rings
        (max_batch x W tokens per layer) are reserved before the page pool is planned.
      kv_window_kernel: with a recent window and the Pallas kernels, a decode step attends the
        ring inside the decode kernel as one more key block (W a power of two >= 16; other W
        use the XLA path) instead of XLA's dots and log-sum-exp merge beside it, which traced
        at about 11 small kernels per layer on the H100. On by default: serving LLaMA-3-8B
        shapes at 1024/512 with W = 16 on one H100, 5541.5 vs 5392.8 tok/s for the XLA path
        (+2.8%, both runs on the same GPU; docs/benchmarks.md, 2026-11-26).
      prefill_own_kv: a prefill call none of whose rows has a cached prefix (every chunk
        starts its sequence, as in an offline batch of whole prompts) attends over the
        chunk's own K/V as the projections computed them, with cuDNN flash attention on a
        GPU (`kv_cache.own_chunk_attention`), instead of over its pages read back; the K/V
        are written to the pages as before for the decode steps. Calls with a prefix (a
        long prompt's later chunks, a preempted sequence's recompute past its first chunk)
        take the paged kernels. Each prefill shape compiles one more executable. For a bf16
        cache the values attended are the same; for the INT4 cache a prompt's own prefill
        then sees unquantized K/V (what QServe's and vLLM's prefill do), and only later
        steps read the INT4 pages; with a recent window the call also writes the chunk's
        newest tokens into the rings (its own attention already sees all of its keys
        unquantized). Off by default; one device (tp = 1).
      decode_fused_write: INT4 cache with Pallas kernels, no recent window: the decode
        attention kernel quantizes and stores each row's new K/V itself (the program of a
        row and KV head, after its pages; the same bytes as the write kernel) and attends
        the new token as one more key from registers, instead of a separate write kernel
        launched before it (`paged_decode_attention(new_kv=...)`). Prefill keeps the write
        kernel. Off by default.
      decode_qk_int8: INT4 cache with Pallas kernels, groups of >= 64 channels: the decode
        attention kernel takes the logits from int8 tensor-core dots of q against the K
        nibbles (`paged_decode_attention(qk_int8=True)`), q as two INT8 parts per row (the
        rounding's residual in the tile's spare rows: `q_residual`), so its error against
        the reference is the f16-nibble path's (1.7e-3, also when 4 of q's 128 channels are
        20x the rest; one part had 3.7e-2). Faster: serving 18883.8 vs 18019.3 tok/s (H200,
        2026-11-28, same machine; B = 16, S = 16384 with flash-decoding splits 143.6-145.0
        vs 149.6-150.9 us; docs/kernels_attention.md). None (default): on where it applies
        (:attr:`resolved_decode_qk_int8`); False: the f16-nibble logits.
      gc_freeze: at the end of start-up (compile, warm-up) run ``gc.collect()`` then
        ``gc.freeze()``: Python's full collections then skip every object alive at that point
        (the compiled steps, params, tokenizer, the modules), so that a collection during
        serving no longer stalls the step loop for the time it takes to walk them. Measured
        on the H100 (LLaMA-3-8B W4AxKV4 at 1024/512, docs/benchmarks.md run 69): without it
        two collections stopped the loop for 0.6 s each (the GPU idle meanwhile), 14707.2
        against 15047.4 tok/s with it. Off by default in the library, because it is
        process-wide: frozen objects that later become cyclic garbage are not collected
        until ``gc.unfreeze()`` (``LLMEngine.close`` calls it), which a process building many
        engines (tests, sweeps) would notice; the CLI's commands and
        ``experiments/bench_throughput.py`` turn it on.
      gc_full_every_steps: 0 leaves Python's full (generation-2) collections to its own
        schedule; N > 0 holds them off while requests run (the generation-2 threshold raised
        at start-up, restored by ``LLMEngine.close``) and runs one whenever the engine drains
        (a step leaves no request and nothing in flight) or N steps after the last, at the
        latest; the young generations are collected as usual. The full collections of a
        serving run otherwise land every ~44 decode steps at batch 1214 (30-50 ms each with
        ``gc_freeze``, longer than the host's slack in a 43 ms step: run 78's long steps,
        docs/benchmarks.md), and every ~20 at the H200's batch 2222, where the host's
        slack is smaller. Held off, the decode steps that found the device idle went from
        12 / 11 to 1 / 1 in two same-machine pairs on the H200 (runs 111 and 112,
        docs/benchmarks.md), the throughput within the runs' spread (+0.55%, -0.11%; on
        the H100, run 81, no difference either): steadier steps, not faster ones.
        Process-wide, like gc_freeze: off in the library, 1000 in the CLI and
        ``experiments/bench_throughput.py``.
    """

    max_batch: int = 16
    max_tokens_per_step: int = 256
    max_prefill_seqs: int = 2
    schedule: str = "mixed"
    max_prefill_grid: int | None = None
    max_model_len: int = 1024
    page_size: int | None = None
    num_pages: int | None = None
    memory_fraction: float = 0.9
    precision: str = "bf16"
    kv_dtype: str | None = None
    kv_group: int = 64
    compute_dtype: str = "bfloat16"
    decode_buckets: tuple[int, ...] | None = None
    prefill_batch_buckets: tuple[int, ...] | None = None
    chunk_buckets: tuple[int, ...] | None = None
    page_buckets: tuple[int, ...] | None = None
    kernels: str = "auto"
    interpret: bool = False
    aot_compile: bool = True
    compile_workers: int | None = None
    warm_up: bool = True
    seed: int = 0
    tp: int = 1
    cuda_graphs: bool = True
    xla_remat: bool = False
    async_scheduling: bool = True
    pack_prefill: bool = True
    pack_buckets: tuple[int, ...] | None = None
    prefill_dequantize: bool = True
    kv_write_kernel: bool = True
    kv_recent_window: int = 0
    kv_window_kernel: bool = True
    prefill_own_kv: bool = False
    decode_fused_write: bool = False
    decode_qk_int8: bool | None = None
    gc_freeze: bool = False
    gc_full_every_steps: int = 0

    def __post_init__(self):
        if self.page_size is None:
            object.__setattr__(self, "page_size", default_page_size(self.kernels, self.interpret))
        bools = (
            "cuda_graphs",
            "xla_remat",
            "async_scheduling",
            "aot_compile",
            "warm_up",
            "interpret",
            "pack_prefill",
            "prefill_dequantize",
            "kv_write_kernel",
            "kv_window_kernel",
            "prefill_own_kv",
            "decode_fused_write",
            "gc_freeze",
        )
        for name in bools:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a bool")
        if self.decode_qk_int8 is not None and not isinstance(self.decode_qk_int8, bool):
            raise ValueError(f"decode_qk_int8={self.decode_qk_int8!r} must be a bool or None")
        n = self.gc_full_every_steps
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"gc_full_every_steps={n!r} must be an int >= 0 (0: Python's own)")
        if not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"tp={self.tp!r} must be a positive int")
        for name in (
            "max_batch",
            "max_tokens_per_step",
            "max_prefill_seqs",
            "max_model_len",
            "page_size",
            "kv_group",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}={v!r} must be a positive int")
        if self.num_pages is not None and (
            not isinstance(self.num_pages, int) or self.num_pages < 2
        ):
            raise ValueError(f"num_pages={self.num_pages!r} must be an int >= 2 or None")
        if not 0.0 < self.memory_fraction <= 1.0:
            raise ValueError(f"memory_fraction={self.memory_fraction!r} must be in (0, 1]")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; expected one of {PRECISIONS}")
        if self.kv_dtype is not None and self.kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype={self.kv_dtype!r}; expected one of {KV_DTYPES} or None")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r}; expected one of {SCHEDULES}")
        if self.kernels not in ("auto", "pallas", "reference"):
            raise ValueError(f"kernels={self.kernels!r}; expected auto|pallas|reference")
        if self.compute_dtype not in ("bfloat16", "float32"):
            raise ValueError(f"compute_dtype={self.compute_dtype!r}; expected bfloat16|float32")
        w = self.kv_recent_window
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(f"kv_recent_window={w!r} must be an int >= 0 (0 = off)")
        if w and self.resolved_kv_dtype != "int4":
            raise ValueError(
                f"kv_recent_window={w} needs the INT4 KV cache (kv_dtype is "
                f"{self.resolved_kv_dtype!r})"
            )
        if self.prefill_own_kv and self.tp > 1:
            raise ValueError(f"prefill_own_kv runs on one device (tp={self.tp})")
        if self.decode_fused_write and w:
            raise ValueError(
                f"decode_fused_write writes the pages only; with kv_recent_window={w} the "
                "decode step also fills the rings (use one or the other)"
            )
        if self.decode_qk_int8 and (self.resolved_kv_dtype != "int4" or self.kv_group < 64):
            raise ValueError(
                "decode_qk_int8 needs the INT4 KV cache with groups of >= 64 channels (kv_dtype "
                f"{self.resolved_kv_dtype!r}, kv_group={self.kv_group})"
            )
        if self.max_prefill_seqs > self.max_batch:
            raise ValueError(
                f"max_prefill_seqs={self.max_prefill_seqs} must be <= max_batch={self.max_batch}"
            )
        # Coerce gin/JSON lists to tuples so the config stays hashable.
        buckets = ("decode_buckets", "prefill_batch_buckets", "chunk_buckets", "page_buckets")
        for name in (*buckets, "pack_buckets"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, tuple):
                object.__setattr__(self, name, tuple(v))
        _check_buckets("decode_buckets", self.decode_buckets, self.max_batch, pad_above=True)
        _check_buckets("prefill_batch_buckets", self.prefill_batch_buckets, self.max_prefill_seqs)
        _check_buckets("chunk_buckets", self.chunk_buckets, self.max_tokens_per_step)
        _check_buckets("page_buckets", self.page_buckets, self.max_pages_per_seq)
        _check_buckets("pack_buckets", self.pack_buckets, self.max_tokens_per_step)
        w = self.compile_workers
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 1):
            raise ValueError(f"compile_workers={w!r} must be a positive int or None")
        g = self.max_prefill_grid
        if g is not None:
            if isinstance(g, bool) or not isinstance(g, int) or g <= 0:
                raise ValueError(f"max_prefill_grid={g!r} must be a positive int or None")
            need = self.prefill_batch_bucket_list[0] * self.max_tokens_per_step
            if g < need:
                raise ValueError(
                    f"max_prefill_grid={g} is below one full-budget chunk's grid: smallest "
                    f"prefill batch bucket {self.prefill_batch_bucket_list[0]} x "
                    f"max_tokens_per_step {self.max_tokens_per_step} = {need}"
                )

    @property
    def resolved_decode_qk_int8(self) -> bool:
        """``decode_qk_int8``, None resolved: on for the INT4 cache with groups of >= 64
        channels (the decode kernel's int8 logits), off otherwise."""
        if self.decode_qk_int8 is not None:
            return self.decode_qk_int8
        return self.resolved_kv_dtype == "int4" and self.kv_group >= 64

    @property
    def resolved_kv_dtype(self) -> str:
        if self.kv_dtype is not None:
            return self.kv_dtype
        return "int4" if self.precision == "w4axkv4" else "bf16"

    @property
    def max_pages_per_seq(self) -> int:
        return math.ceil(self.max_model_len / self.page_size)

    @property
    def decode_bucket_list(self) -> tuple[int, ...]:
        return self.decode_buckets or _pow2_buckets(self.max_batch)

    @property
    def prefill_batch_bucket_list(self) -> tuple[int, ...]:
        return self.prefill_batch_buckets or _pow2_buckets(self.max_prefill_seqs)

    @property
    def chunk_bucket_list(self) -> tuple[int, ...]:
        start = min(16, self.max_tokens_per_step)
        return self.chunk_buckets or _pow2_buckets(self.max_tokens_per_step, start)

    @property
    def pack_bucket_list(self) -> tuple[int, ...]:
        """The packed row counts of multi-sequence prefill calls: `pack_buckets`, or
        (max_tokens_per_step,); () when `pack_prefill` is off."""
        if not self.pack_prefill:
            return ()
        return self.pack_buckets or (self.max_tokens_per_step,)

    @property
    def resolved_compile_workers(self) -> int:
        """`compile_workers`, resolved (None: min(8, CPU count))."""
        if self.compile_workers is not None:
            return self.compile_workers
        return max(1, min(8, os.cpu_count() or 1))

    @property
    def prefill_grid_limit(self) -> int:
        """`max_prefill_grid`, resolved (None: its default)."""
        if self.max_prefill_grid is not None:
            return self.max_prefill_grid
        first = self.prefill_batch_bucket_list[0]
        return max(2, first) * self.max_tokens_per_step

    def prefill_shape_fits(self, batch_bucket: int, chunk_bucket: int) -> bool:
        """Whether a prefill call of this (batch bucket, chunk bucket) is within the grid
        limit (only those are compiled and scheduled)."""
        return batch_bucket * chunk_bucket <= self.prefill_grid_limit

    @property
    def page_bucket_list(self) -> tuple[int, ...]:
        return self.page_buckets or (self.max_pages_per_seq,)


def bucket_for(value: int, buckets: tuple[int, ...], name: str) -> int:
    """The smallest bucket >= value (buckets sorted); ValueError when none fits."""
    for b in buckets:
        if b >= value:
            return b
    raise ValueError(f"{name}={value} exceeds the largest bucket {buckets[-1]}")
