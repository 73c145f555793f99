"""Glue between the Flax model, the paged KV cache and the jitted engine step.

One step function serves decode and prefill: it takes a padded batch of token slices

    tokens: [B, T] int32      T = 1 (decode) or a chunk bucket (prefill)
    start: [B] int32          position of tokens[:, 0] (= tokens already in the cache)
    num_valid: [B] int32      real tokens per row (0 for padding rows)
    page_table: [B, P] int32  pages of each row's sequence (unused entries 0)
    sampling arrays [B]       temperature, top_k, top_p, seed, counter

writes the rows' K/V into the cache, attends over each row's pages, and samples one token per
row from the logits of its last valid token. Only [B] int32 leaves the device.

It runs as two executables: the model (tokens, positions, page table -> last-position logits
[B, V] f32, cache updated in place) and the sampler (logits + sampling arrays -> tokens). The
host chooses the sampler variant (argmax only, sampling, or sampling with the top-k/top-p
filter: `sampling.sampler_kind`) from the batch's parameters: a device-side choice
(`lax.cond`) made the host wait for the whole model to run before it could go on, on every
step (measured on an H100: 7-8 ms of an 18 ms decode step).
With XLA command buffers (CUDA graphs, `cuda_graphs`), launching the step's 500-1000-node
graph takes the host 2.5-4.5 ms; without them the one-by-one launches of the ~980-kernel
W4AxKV4 step take longer than its kernels run. Either way the launch only stops idling the GPU when it overlaps the previous
step, which is what the engine's asynchronous scheduling does (the previous step's sampled
tokens are read on the device: `ModelInputs.src`).

The model sees attention through `PagedAttention` (the models/attention.py protocol): its
cache state is a `PagedState` holding the whole `kv_cache.PagedKVCache` (all layers) plus the
batch's page table; each layer writes its slice and attends with `kv_cache.paged_attention`
(decode kernel for T = 1, chunked-prefill kernel otherwise; Pallas on GPU, the jnp reference
or interpret mode on CPU).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from comet_jax.engine import kv_cache
from comet_jax.engine.sampling import SAMPLER_KINDS, sample_tokens, sampler_kind
from models.llama import kernel_order_variables, packing_from_lengths


class PagedState(NamedTuple):
    """Attention cache state threaded through the layers."""

    cache: kv_cache.PagedKVCache
    page_table: jax.Array  # [B, P] int32
    start: jax.Array  # [B] int32
    num_valid: jax.Array  # [B] int32
    window_slot: Any = None  # [B] int32 recent-window ring slots (-1: padding row)


@dataclasses.dataclass(frozen=True)
class PagedAttention:
    """models.attention protocol over the paged cache: write this step's K/V, then attend.

    backend: "pallas" (kernels; `interpret` runs them on CPU) or "reference" (jnp).
    prefill_dequantize: with "pallas" and an INT4 cache, prefill attends over its pages
      dequantized once into bf16 (EngineConfig.prefill_dequantize).
    kv_write_kernel: with "pallas" and an INT4 cache, new K/V are quantized and stored by the
      Pallas write kernel (EngineConfig.kv_write_kernel).
    window_kernel: with "pallas" and a recent window, decode attends the ring inside the
      kernel (EngineConfig.kv_window_kernel).
    own_kv: prefill (T > 1) attends over the chunk's own K/V as computed
      (`kv_cache.own_chunk_attention`: cuDNN flash attention on a GPU) instead of over the
      pages, after writing them as usual (and, with a recent window, the chunk's newest
      tokens into the rings: `recent_window.ring_fill`). Only right for rows with no cached
      prefix: the runner uses it for the executables it runs on such calls alone
      (EngineConfig.prefill_own_kv).
    decode_fused_write: with "pallas" and an INT4 cache (no recent window), the decode
      attention kernel quantizes and stores the step's own K/V itself and attends them from
      registers, instead of a separate write kernel before it
      (EngineConfig.decode_fused_write).
    decode_qk_int8: with "pallas" and an INT4 cache, decode takes its logits from int8 dots
      of q (two INT8 parts per row) against the K nibbles (EngineConfig.decode_qk_int8).
    """

    backend: str = "reference"
    interpret: bool = False
    prefill_dequantize: bool = True
    kv_write_kernel: bool = True
    window_kernel: bool = False
    own_kv: bool = False
    decode_fused_write: bool = False
    decode_qk_int8: bool = False

    def __call__(self, q, k, v, layer_idx, state: PagedState):
        t = q.shape[1]
        ti = jnp.arange(t, dtype=jnp.int32)[None, :]
        positions = state.start[:, None] + ti  # [B, T]
        valid = ti < state.num_valid[:, None]
        page_size = state.cache.config.page_size
        slots = kv_cache.slot_mapping_from_positions(state.page_table, positions, page_size, valid)
        seq_lens = state.start + state.num_valid
        common = dict(
            backend=self.backend,
            interpret=self.interpret,
            write_kernel=self.kv_write_kernel and self.backend == "pallas",
        )
        if state.cache.config.recent_window:
            common["window_slots"] = state.window_slot
            common["window_kernel"] = self.window_kernel and self.backend == "pallas"
        if t == 1:
            if self.decode_qk_int8 and self.backend == "pallas" and state.cache.config.quantized:
                common["qk_int8"] = True
            out, cache = kv_cache.paged_attention(
                q[:, 0],
                k[:, 0],
                v[:, 0],
                state.cache,
                layer_idx,
                state.page_table,
                seq_lens,
                slots[:, 0],
                mode="decode",
                fused_write=self.decode_fused_write and self.backend == "pallas",
                **common,
            )
            out = out[:, None]
        elif self.own_kv:
            cache = kv_cache.write_kv(
                state.cache, layer_idx, k, v, slots, kernel=common["write_kernel"],
                interpret=self.interpret,
            )  # fmt: skip
            if cache.config.recent_window:
                from comet_jax.engine import recent_window

                cache = recent_window.ring_fill(
                    cache, layer_idx, k, v, state.window_slot, state.start, state.num_valid,
                    seq_lens,
                )  # fmt: skip
            out = kv_cache.own_chunk_attention(q, k, v, state.num_valid)
        else:
            out, cache = kv_cache.paged_attention(
                q,
                k,
                v,
                state.cache,
                layer_idx,
                state.page_table,
                seq_lens,
                slots,
                mode="prefill",
                q_lens=state.num_valid,
                **common,
                **self._prefill_kwargs(state.cache),
            )
        return out.astype(q.dtype), state._replace(cache=cache)

    def _prefill_kwargs(self, cache) -> dict:
        quantized = cache.config.quantized
        if self.prefill_dequantize and self.backend == "pallas" and quantized:
            return {"dequantize": True}
        return {}


class ModelInputs(NamedTuple):
    """The model executable's share of `StepInputs`, plus the previous step's sampled tokens.

    A decode row whose input token was sampled by the step still in flight (asynchronous
    scheduling) names it in `src`: tokens[i, 0] is replaced on the device by
    concat(prev_a, prev_b)[src[i]] when src[i] >= 0. prev_a, prev_b: [S] int32, the padded
    outputs of the previous step's two sampler calls (decode, prefill).
    """

    tokens: Any  # [B, T] int32
    start: Any  # [B] int32
    num_valid: Any  # [B] int32
    page_table: Any  # [B, P] int32
    src: Any  # [B] int32, -1: the host's token
    prev_a: Any  # [S] int32
    prev_b: Any  # [S] int32
    window_slot: Any  # [B] int32 recent-window ring slot (-1: padding row)


class StepInputs(NamedTuple):
    """Host-built (numpy) inputs of one step; see the module docstring for shapes."""

    tokens: np.ndarray
    start: np.ndarray
    num_valid: np.ndarray
    page_table: np.ndarray
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    seeds: np.ndarray
    counters: np.ndarray
    src: np.ndarray
    window_slot: np.ndarray

    @staticmethod
    def zeros(batch: int, length: int, pages: int) -> StepInputs:
        i32 = lambda *s: np.zeros(s, np.int32)
        return StepInputs(
            tokens=i32(batch, length),
            start=i32(batch),
            num_valid=i32(batch),
            page_table=i32(batch, pages),
            temperature=np.zeros(batch, np.float32),
            top_k=i32(batch),
            top_p=np.ones(batch, np.float32),
            seeds=i32(batch),
            counters=i32(batch),
            src=np.full(batch, -1, np.int32),
            window_slot=np.full(batch, -1, np.int32),
        )

    def abstract(self) -> StepInputs:
        return StepInputs(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in self))

    def model_inputs(self, prev_a, prev_b) -> ModelInputs:
        return ModelInputs(
            self.tokens,
            self.start,
            self.num_valid,
            self.page_table,
            self.src,
            prev_a,
            prev_b,
            self.window_slot,
        )

    def sampling_inputs(self) -> tuple:
        return self.temperature, self.top_k, self.top_p, self.seeds, self.counters


def packs(batch: int, length: int, pack_tokens: int) -> bool:
    """Whether a [batch, length] call runs its token-wise ops on ``pack_tokens`` packed rows
    (a multi-sequence prefill call whose grid is larger than the step's token budget)."""
    return pack_tokens > 0 and batch > 1 and length > 1 and batch * length > pack_tokens


def pack_rows(batch: int, length: int, tokens: int, pack_buckets: tuple[int, ...]) -> int:
    """Packed rows a [batch, length] call holding `tokens` real tokens runs its token-wise ops
    on: the smallest of `pack_buckets` (increasing) that holds the tokens, when that is smaller
    than the grid; 0 = the grid itself (one sequence, decode, packing off, or no smaller
    bucket). `prefill_row_options` lists the values it can take for a shape."""
    if not pack_buckets or batch == 1 or length == 1:
        return 0
    for rows in pack_buckets:
        if rows >= tokens:
            return rows if rows < batch * length else 0
    return 0


def prefill_row_options(
    batch: int, length: int, pack_buckets: tuple[int, ...], max_tokens: int
) -> tuple[int, ...]:
    """Every `pack_rows` value of a [batch, length] call holding at most `max_tokens` real
    tokens (the shapes to compile): the buckets below the grid, and 0 when some token count
    keeps the grid (it is no larger than max_tokens)."""
    if not pack_buckets or batch == 1 or length == 1:
        return (0,)
    grid = batch * length
    rows = tuple(r for r in pack_buckets if r < grid)
    return ((0,) if grid <= max_tokens else ()) + rows


def model_variables(model, params) -> dict:
    """The Flax variables the runner's executables take: ``{"params": params}`` plus, where
    the model has any, the ``"kernel_orders"`` collection (``models.llama``: the RMSNorm
    weights and FMPQ permutations in the act_quant kernel's channel orders, rearranged here
    once instead of in every step; the same numbers)."""
    orders = jax.jit(functools.partial(kernel_order_variables, model))(params)
    return {"params": params, "kernel_orders": orders} if orders else {"params": params}


def _as_variables(params) -> dict:
    """``params`` (the model's params tree) or a variables dict of :func:`model_variables`
    (the params tree has no top-level "params" entry) -> the variables dict."""
    return params if "params" in params else {"params": params}


def make_logits_fn(model, pack_tokens: int = 0):
    """The model executable: (params, cache, ModelInputs) -> (logits [B, V] f32 at each row's
    last valid token, cache). ``params``: the params tree or :func:`model_variables`.

    pack_tokens > 0: a prefill call whose [B, T] grid exceeds it runs embedding, projections
    and MLP on ``pack_tokens`` packed rows (the real tokens; `models.llama` "Packed tokens"),
    so the GEMMs do not multiply the grid's padding. The caller guarantees
    sum(num_valid) <= pack_tokens (`ModelRunner.run` checks it)."""

    def logits_step(params, cache, inp: ModelInputs):
        b, t = inp.tokens.shape
        packing = None
        if packs(b, t, pack_tokens):
            packing = packing_from_lengths(inp.num_valid, t, pack_tokens)
        prev = jnp.concatenate([inp.prev_a, inp.prev_b])
        first = jnp.where(inp.src >= 0, prev[jnp.clip(inp.src, 0, prev.shape[0] - 1)], 0)
        tokens = inp.tokens.at[:, 0].set(jnp.where(inp.src >= 0, first, inp.tokens[:, 0]))
        positions = inp.start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        state = PagedState(cache, inp.page_table, inp.start, inp.num_valid, inp.window_slot)
        last = jnp.maximum(inp.num_valid - 1, 0)
        logits, state = model.apply(
            _as_variables(params), tokens, positions, cache=state, logits_at=last, packing=packing
        )
        return logits[:, 0].astype(jnp.float32), state.cache

    return logits_step


def make_step_fn(model, filtered: bool | None = None):
    """One function for the whole step: (params, cache, StepInputs) -> (next_tokens [B] int32,
    cache). The engine runs the two halves as separate executables (module docstring); this
    fused form serves tests and benchmarks that want a single jitted step."""
    logits_step = make_logits_fn(model)

    def step(params, cache, inp: StepInputs):
        none = jnp.zeros((1,), jnp.int32)
        logits, cache = logits_step(params, cache, inp.model_inputs(none, none))
        return sample_tokens(logits, *inp.sampling_inputs(), filtered=filtered), cache

    return step


def _padded_sample(logits, *sampling, size: int, kind: str) -> jax.Array:
    tokens = sample_tokens(
        logits, *sampling, filtered=kind == "filter", greedy_only=kind == "greedy"
    )
    return jnp.pad(tokens, (0, max(size - tokens.shape[0], 0)))


def executable_memory(compiled) -> dict[str, int] | None:
    """XLA's memory analysis of a compiled executable, in bytes: `temp` (scratch live during a
    run, on top of its arguments), `argument`, `output`, `alias` (outputs that reuse a donated
    argument's buffer) and `code`. None when the backend reports none."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return {
        "temp": int(analysis.temp_size_in_bytes),
        "argument": int(analysis.argument_size_in_bytes),
        "output": int(analysis.output_size_in_bytes),
        "alias": int(analysis.alias_size_in_bytes),
        "code": int(analysis.generated_code_size_in_bytes),
    }


# XLA's rematerialization pass is off for the step executables: it estimates a step's peak
# with the donated KV pool counted twice (argument and output), so with a large pool it sees
# a program far over its limit (bf16, 48 GiB pool: "120.04 GiB" against 57.39) and recomputes
# fusions to no avail (80 bytes saved). With it the bf16 engine served 5.1% fewer tokens/s
# and compiled 16% slower (H100, docs/benchmarks.md 2026-11-27, run 42). The engine checks
# the steps' real scratch instead (`LLMEngine.check_step_memory`).
NO_REMAT = {"xla_disable_hlo_passes": "rematerialization"}


def _compiler_options(cuda_graphs: bool, xla_remat: bool = False) -> dict:
    # XLA's default enables command buffers for fusions, cuBLAS and custom calls; an empty
    # list turns them off (kernels are launched one by one). Ignored on CPU.
    options = {} if xla_remat else dict(NO_REMAT)
    if not cuda_graphs:
        options["xla_gpu_enable_command_buffer"] = ""
    return options


def resolve_kernels(kernels: str, interpret: bool) -> tuple[str, str]:
    """EngineConfig.kernels -> (qlinear mode "sim"|"pallas", attention "reference"|"pallas")."""
    if kernels == "auto":
        kernels = "pallas" if interpret or jax.default_backend() == "gpu" else "reference"
    if kernels == "pallas":
        return "pallas", "pallas"
    return "sim", "reference"


def precision_plan(
    model_config,
    precision: str,
    *,
    mode: str = "sim",
    interpret: bool = False,
    int8_fraction: float = 0.25,
    block: int | None = None,
    runtime_perm: tuple[str, ...] = ("attn_in", "o_in", "mlp_in"),
    fuse_swiglu: bool = True,
    fuse_gate_up: bool = False,
    fuse_projections: bool = False,
):
    """Projection backends of a precision preset for random weights (benchmarks, tests).

    'bf16': float weights; 'w8a8', 'w4a16': one backend everywhere; 'w4axkv4': FMPQ W4Ax with
    `int8_fraction` of each input group's channels in INT8 blocks (the paper's worst case is
    25%). Quantized checkpoints bring their own plan (`comet_jax.quant.convert`).
    block: FMPQ block = the kernels' K tile; None: 128 (COMET's block, the tile the GEMM
    tuning table holds) where every layer input's width is a multiple of 128, else 64.
    runtime_perm: the input groups whose FMPQ permutation is gathered at run time (a
    ``perm`` group param), as a calibrated checkpoint has them: `quantize_model` (fold on,
    no rotation) folds down_in's permutation into the gate / up rows, o_in's only when the
    plan moves whole heads (not assumed here), and attn_in / mlp_in (inputs read from the
    residual stream) always gather.
    fuse_swiglu: `W4AxLinear.fuse_swiglu` of the down projection (False: the unfused
    ablation, the layer writing the MLP hidden state).
    fuse_gate_up: `W4AxLinear.fuse_gate_up` (the gate / up GEMMs writing the hidden state
    from one kernel where it runs).
    fuse_projections: `W4AxLinear.fuse_projections` (an input group's projections, q / k /
    v, as one GEMM where the tuning table has the concatenated shape; one device only).
    """
    from models.llama import layer_specs
    from models.projection import GROUPS, FloatLinear, LinearPlan

    if block is None:
        widths = [spec.in_features for spec in layer_specs(model_config, 0).values()]
        block = 128 if all(k % 128 == 0 for k in widths) else 64

    if precision == "bf16":
        return FloatLinear(precision=None)
    from comet_jax.quant import qlinear

    if precision == "w8a8":  # no Pallas kernel: XLA's int8 GEMM
        return qlinear.W8A8Linear(mode="sim")
    interpret = interpret and mode == "pallas"  # the simulation has nothing to interpret
    if precision == "w4a16":
        return qlinear.W4A16Linear(tile=block, mode=mode, interpret=interpret)
    if precision != "w4axkv4":
        raise ValueError(f"precision={precision!r}; expected bf16|w8a8|w4a16|w4axkv4")
    bad = set(runtime_perm) - set(GROUPS)
    if bad:
        raise ValueError(f"runtime_perm: unknown input groups {sorted(bad)}; expected {GROUPS}")
    overrides = {}
    for group, spec in layer_specs(model_config, 0).items():
        k = spec.in_features
        if k % block:
            raise ValueError(f"{group}: K={k} is not a multiple of the FMPQ block={block}")
        k8 = int(round(k * int8_fraction / block)) * block
        overrides[(None, group)] = qlinear.W4AxLinear(
            k4=k - k8,
            k8=k8,
            block=block,
            tile=block,
            mode=mode,
            interpret=interpret,
            permute=group in runtime_perm,
            fuse_swiglu=fuse_swiglu,
            fuse_gate_up=fuse_gate_up,
            fuse_projections=fuse_projections,
        )
    assert set(g for _, g in overrides) == set(GROUPS)
    return LinearPlan.from_mapping(overrides)


def with_kernel_mode(linear, mode: str, interpret: bool = False):
    """A backend/LinearPlan with every integer backend switched to `mode` ("sim"/"pallas")
    where it has a kernel for its format (the others stay as they are)."""
    from models.projection import LinearPlan

    def switch(backend):
        if getattr(backend, "mode", None) in (None, mode):
            return backend
        try:
            return dataclasses.replace(backend, mode=mode, interpret=interpret and mode == "pallas")
        except ValueError:  # no kernel for this format: keep the simulation
            return backend

    if isinstance(linear, LinearPlan):
        return LinearPlan(
            default=switch(linear.default),
            overrides=tuple((k, switch(b)) for k, b in linear.overrides),
        )
    return switch(linear)


class ModelRunner:
    """Owns the model, its params and the KV cache; runs (and AOT-compiles) step buckets.

    `run(inp)` executes the executable compiled for inp's shapes; with `allow_lazy=False` an
    uncompiled shape raises instead of compiling, which is how the engine guarantees that
    steady-state serving never recompiles.
    """

    def __init__(
        self,
        model,
        params,
        cache_config: kv_cache.KVCacheConfig,
        mesh=None,
        *,
        cuda_graphs: bool = True,
        xla_remat: bool = False,
        out_size: int = 0,
        pack_buckets: tuple[int, ...] = (),
        prefill_own_kv: bool = False,
    ):
        # mesh: a `comet_jax.parallel.make_mesh(tp)` mesh runs the steps tensor-parallel
        # (params and KV cache sharded, see comet_jax/parallel); None: one device.
        # cuda_graphs: let XLA run the executables as CUDA graphs (module docstring).
        # xla_remat: keep XLA's rematerialization pass (NO_REMAT says why it is off).
        # out_size: the samplers pad their [B] tokens to [max(B, out_size)] (one shape for the
        # next step's `prev_a`/`prev_b` whatever the bucket); the engine passes its largest
        # batch bucket.
        # pack_buckets: packed row counts, increasing, the last the step's token budget; a
        # multi-sequence prefill call runs its GEMMs on the smallest that holds its tokens
        # instead of the padded grid when that is smaller (`pack_rows`, make_logits_fn).
        # (): off.
        # prefill_own_kv: every prefill shape gets a second executable whose attention reads
        # the chunk's own K/V (`PagedAttention.own_kv`); `run` takes it for calls where no row
        # has a cached prefix (all `start` 0). Needs a PagedAttention model on one device.
        if prefill_own_kv and (mesh is not None or not isinstance(model.attention, PagedAttention)):
            raise ValueError(
                "prefill_own_kv needs one device (tp=1) and a model whose attention is "
                f"PagedAttention (mesh={mesh}, attention={type(model.attention).__name__})"
            )
        self.prefill_own_kv = prefill_own_kv
        self.own_kv_calls = 0  # prefill calls run on the own-K/V executables
        self.mesh = mesh
        self.pack_buckets = tuple(pack_buckets)
        self.compiler_options = _compiler_options(cuda_graphs, xla_remat)
        self.out_size = out_size
        if mesh is not None:
            from comet_jax.parallel import sharded_runner as sr

            model = sr.shard_model(model, mesh)
            params = sr.shard_params(params, model.config, mesh)
        self.model = model
        # one device: the executables take the variables with the kernel orders
        # (model_variables); the sharded path keeps the params tree its rules shard
        self.params = params if mesh is not None else model_variables(model, params)
        self.cache_config = cache_config
        self.num_pages = cache_config.num_pages
        if mesh is None:
            # init_cache gives every leaf its own buffer (the step donates them all), so no
            # copy: a copy of each leaf doubled the pool's peak memory at start-up (a bf16 pool
            # of 80% of free memory ran out of memory, docs/benchmarks.md 2026-11-27).
            self.cache = kv_cache.init_cache(cache_config)
            jit_sampler = jax.jit
        else:
            self.cache = sr.init_sharded_cache(cache_config, mesh)  # distinct buffers
            jit_sampler = sr.jit_replicated(mesh)
        self._jits: dict[tuple[int, bool], Any] = {}  # (packed rows, own_kv) -> jitted step
        self._samplers = {
            kind: jit_sampler(functools.partial(_padded_sample, size=out_size, kind=kind))
            for kind in SAMPLER_KINDS
        }
        # keys: (batch, length, pages, packed rows), see `run`; `_own_kv`: the prefill
        # shapes' own-K/V executables (prefill_own_kv), same keys
        self._compiled: dict[tuple[int, int, int, int], Any] = {}
        self._own_kv: dict[tuple[int, int, int, int], Any] = {}
        self._compiled_samplers: dict[tuple[int, str], Any] = {}  # (batch, kind)
        self._memory: dict[tuple[int, int, int, int], dict[str, int] | None] = {}
        self._own_kv_memory: dict[tuple[int, int, int, int], dict[str, int] | None] = {}
        self._warm: set[tuple[int, int, int, int]] = set()  # shapes warm_up has run
        self.allow_lazy = True
        self.no_tokens = self._replicated(np.zeros(self.token_slots(1), np.int32))

    def token_slots(self, batch: int) -> int:
        """Length of a sampler's output for a batch of `batch` rows."""
        return max(batch, self.out_size)

    def _replicated(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jax.device_put(x)
        from jax.sharding import NamedSharding, PartitionSpec

        return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec()))

    @property
    def num_compilations(self) -> int:
        return len(self._compiled) + len(self._own_kv)

    def _jit_for(self, rows: int, own_kv: bool = False):
        """The jitted model step whose multi-sequence prefill calls run on `rows` packed rows
        (0: the grid); `own_kv`: its prefill attention reads the chunk's own K/V."""
        if (rows, own_kv) not in self._jits:
            model = self.model
            if own_kv:
                model = model.clone(attention=dataclasses.replace(model.attention, own_kv=True))
            fn = make_logits_fn(model, rows)
            if self.mesh is None:
                self._jits[rows, own_kv] = jax.jit(fn, donate_argnums=(1,))
            else:
                from comet_jax.parallel import sharded_runner as sr

                self._jits[rows, own_kv] = sr.jit_step(
                    fn, self.mesh, self.params, self.cache, self.model.config
                )
        return self._jits[rows, own_kv]

    @property
    def pack_tokens(self) -> int:
        """The most packed rows a prefill call runs on (the step's token budget; 0: off)."""
        return self.pack_buckets[-1] if self.pack_buckets else 0

    def step_memory(self) -> dict[tuple[int, int, int, int], dict[str, int] | None]:
        """(batch, length, pages, packed rows) -> XLA's memory analysis of that step
        executable (`executable_memory`; None where the backend gives none)."""
        return dict(self._memory)

    def step_scratch_bytes(self) -> int:
        """The most device memory any compiled step needs beyond its arguments (weights, KV
        pool, inputs): XLA's temporaries plus the outputs that reuse no donated buffer; 0
        when the backend reports no analysis."""
        needs = [
            m["temp"] + max(m["output"] - m["alias"], 0)
            for m in (*self._memory.values(), *self._own_kv_memory.values())
            if m is not None
        ]
        return max(needs, default=0)

    def _lowerings(self, batch: int, length: int, pages: int, rows: int, claimed=None):
        """Yields (store, lowered) for each executable of this shape not compiled yet: the
        model step (and, with `prefill_own_kv`, a prefill shape's own-K/V step) and the
        batch's samplers (`SAMPLER_KINDS`); ``store(compiled)`` files the result.
        claimed: a set of sampler keys already being compiled (skipped; new ones added)."""
        key = (batch, length, pages, rows)
        abstract = StepInputs.zeros(batch, length, pages).abstract()
        prev = jax.ShapeDtypeStruct((self.token_slots(1),), jnp.int32)
        variants = [(False, self._compiled, self._memory)]
        if self.prefill_own_kv and length > 1:
            variants.append((True, self._own_kv, self._own_kv_memory))
        for own_kv, exes, memory in variants:
            if key in exes:
                continue

            def store_step(compiled, key=key, exes=exes, memory=memory):
                exes[key] = compiled
                memory[key] = executable_memory(compiled)

            jitted = self._jit_for(rows, own_kv)
            yield (
                store_step,
                jitted.lower(self.params, self.cache, abstract.model_inputs(prev, prev)),
            )
        vocab = self.model.config.vocab_size
        for f in SAMPLER_KINDS:
            if (batch, f) in self._compiled_samplers or (batch, f) in (claimed or ()):
                continue
            if claimed is not None:
                claimed.add((batch, f))
            args = (jax.ShapeDtypeStruct((batch, vocab), jnp.float32),)
            args += StepInputs.zeros(batch, 1, 1).abstract().sampling_inputs()

            def store_sampler(compiled, sk=(batch, f)):
                self._compiled_samplers[sk] = compiled

            yield store_sampler, self._samplers[f].lower(*args)

    def compile(self, batch: int, length: int, pages: int, rows: int = 0) -> None:
        """Compiles the model executable for this shape (`rows`: packed rows of a
        multi-sequence prefill call, 0 = its grid; with `prefill_own_kv` a prefill shape's
        own-K/V executable too) and the samplers for `batch`."""
        for store, lowered in self._lowerings(batch, length, pages, rows):
            store(lowered.compile(compiler_options=self.compiler_options))

    def compile_many(
        self,
        keys: Sequence[tuple[int, int, int, int]],
        workers: int = 1,
        on_done: Callable[[tuple[int, int, int, int]], None] | None = None,
    ) -> None:
        """Compiles every (batch, length, pages, packed rows) shape of `keys` like `compile`,
        up to `workers` XLA compilations at once: this thread traces and lowers the shapes
        in order (Python, under the GIL) while a thread pool compiles the lowered modules
        (XLA's compiler runs outside the GIL). ``on_done(key)`` after each shape's
        executables are all stored. The results are the executables `compile` builds, one
        per shape; only the wall time differs. A module whose pooled compilation fails with
        an XLA runtime error is compiled again once the pool is idle (with a warning)."""
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"workers={workers!r} must be a positive int")
        if workers == 1:
            for key in keys:
                self.compile(*key)
                if on_done is not None:
                    on_done(key)
            return
        from concurrent.futures import ThreadPoolExecutor, wait

        opts = self.compiler_options
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="xla-compile") as pool:
            pending = []  # (key, [(store, lowered, future)])
            claimed: set[tuple[int, str]] = set()  # samplers shared by shapes: compiled once
            for key in keys:
                jobs = [
                    (store, lowered, pool.submit(lowered.compile, compiler_options=opts))
                    for store, lowered in self._lowerings(*key, claimed=claimed)
                ]
                pending.append((key, jobs))
            for key, jobs in pending:  # stored in order, from this thread
                for store, lowered, future in jobs:
                    try:
                        compiled = future.result()
                    except jax.errors.JaxRuntimeError as e:
                        # Out of resources with several compilations in flight (on the H100
                        # machine XLA's ptxas once failed to launch with 8 workers: run 57 in
                        # docs/benchmarks.md): let the others finish, then compile this one
                        # alone; a second failure raises.
                        wait([f for _, js in pending for _, _, f in js])
                        warnings.warn(
                            f"compiling step shape {key} failed with {workers} compilations in "
                            f"flight ({str(e)[:200]}); compiled again alone",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                        compiled = lowered.compile(compiler_options=opts)
                    store(compiled)
                if on_done is not None:
                    on_done(key)

    def warm_up(self) -> int:
        """Runs each compiled step shape not yet run once, on an all-padding batch, and each
        of its batch's samplers; returns how many shapes it ran.

        A padding row (no tokens: ``num_valid = 0``, page table all 0) is what fills every
        bucket past its real rows in a normal step: it touches only the scratch page 0, so the
        cache's live pages are unchanged. The device's one-time work on an executable's first
        run (loading its kernels, capturing XLA's command buffers) then happens at start-up
        instead of inside the first requests' steps."""
        fresh = [key for key in self._compiled if key not in self._warm]
        out = None
        for key in fresh:
            inp = StepInputs.zeros(*key[:3])
            model_inputs = inp.model_inputs(self.no_tokens, self.no_tokens)
            for exes in (self._compiled, self._own_kv):
                if key in exes:
                    logits, self.cache = exes[key](self.params, self.cache, model_inputs)
            samplers = [self._compiled_samplers[key[0], f] for f in SAMPLER_KINDS]
            out = [sample(logits, *inp.sampling_inputs()) for sample in samplers]
            self._warm.add(key)
        jax.block_until_ready((self.cache, out))
        return len(fresh)

    def run(self, inp: StepInputs, prev: tuple | None = None) -> jax.Array:
        """Dispatches one step; returns next_tokens [token_slots(B)] int32 (a device array, not
        waited on; rows past B are padding). prev: the (decode, prefill) token arrays of the
        step in flight that `inp.src` points into (None: src must be all -1)."""
        b, t = inp.tokens.shape
        total = int(inp.num_valid.sum())
        if packs(b, t, self.pack_tokens) and total > self.pack_tokens:
            raise ValueError(
                f"prefill call holds {total} tokens, more than the {self.pack_tokens} "
                "packed rows it runs on (pack_tokens = the step's token budget)"
            )
        key = (b, t, inp.page_table.shape[1], pack_rows(b, t, total, self.pack_buckets))
        kind = sampler_kind(inp.temperature, inp.top_k, inp.top_p)
        if key not in self._compiled:
            if not self.allow_lazy:
                raise RuntimeError(f"step shape {key} was not compiled at start-up")
            self.compile(*key)
        if prev is None:
            if (inp.src >= 0).any():
                raise ValueError("inp.src points into a previous step's tokens but prev is None")
            prev = (self.no_tokens, self.no_tokens)
        model_inputs = inp.model_inputs(*prev)
        exe = self._compiled[key]
        if t > 1 and self.prefill_own_kv and not inp.start.any():  # no row has a prefix
            exe = self._own_kv[key]
            self.own_kv_calls += 1
        logits, self.cache = exe(self.params, self.cache, model_inputs)
        sampler = self._compiled_samplers[key[0], kind]
        return sampler(logits, *inp.sampling_inputs())


# Random-weight model shapes for tests and benchmarks (name -> ModelConfig kwargs).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        max_position_embeddings=2048,
    ),
    "smollm2-135m": dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    "llama3-8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
    ),
    "llama3-70b": dict(
        vocab_size=128256,
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=8192,
    ),
}


def preset_config(name: str):
    from models.config import ModelConfig

    if name not in MODEL_PRESETS:
        raise ValueError(f"model preset {name!r}; expected one of {tuple(MODEL_PRESETS)}")
    return ModelConfig(**MODEL_PRESETS[name])


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, then BOS 256 and EOS 257 (for random-weight models)."""

    bos_id, eos_id = 256, 257
    chat_template = None

    @property
    def vocab_size(self) -> int:
        return 258

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        return ([self.bos_id] if add_bos else []) + list(text.encode("utf-8"))

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, *, add_generation_prompt: bool = True, **_) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")
