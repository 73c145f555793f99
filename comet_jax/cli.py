"""`comet-jax` command line: quantize, generate, serve, eval, bench.

Every command builds its configuration from frozen dataclasses (`EngineConfig`,
`QuantRecipe`); `--gin_file` / `--gin_param` are parsed (gin.parse_config_files_and_bindings,
through `comet_jax.gin_config`) before any compute, and explicit command-line flags win over
gin bindings.

Model sources (`--model`):
  smollm2               the default SmolLM2-135M-Instruct GGUF (python -m comet_jax.data.prepare)
  PATH.gguf             any LLaMA-family GGUF file
  DIR                   a Hugging Face checkpoint directory (config.json + safetensors)
  DIR                   a quantized checkpoint written by `comet-jax quantize`
  random:PRESET         random weights in a preset's shapes (tiny, smollm2-135m, llama3-8b,
                        llama3-70b) with a byte-level tokenizer, for tests and benchmarks
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ENGINE_FLAGS = (
    "max_batch",
    "max_tokens_per_step",
    "max_prefill_seqs",
    "schedule",
    "max_prefill_grid",
    "compile_workers",
    "max_model_len",
    "page_size",
    "num_pages",
    "memory_fraction",
    "precision",
    "kv_dtype",
    "kv_group",
    "kv_recent_window",
    "prefill_dequantize",
    "kv_write_kernel",
    "kv_window_kernel",
    "prefill_own_kv",
    "decode_fused_write",
    "decode_qk_int8",
    "compute_dtype",
    "kernels",
    "interpret",
    "seed",
    "gc_freeze",
    "gc_full_every_steps",
)

# The CLI's engines hold Python's full collections off while requests run and collect
# every this many steps at the latest, or when the engine drains
# (EngineConfig.gc_full_every_steps; docs/benchmarks.md, runs 111-112).
GC_FULL_EVERY_STEPS = 1000


# -- configuration ---------------------------------------------------------------------------
def _configure(args):
    """Parses gin files/bindings (before any compute); returns build(cls, **overrides)."""
    if args.gin_file or args.gin_param:
        from comet_jax import gin_config

        gin_config.parse(args.gin_file, args.gin_param)
        return gin_config.build
    return lambda cls, **kw: cls(**kw)


def _engine_config(args, build, **extra):
    from comet_jax.engine.config import EngineConfig

    flags = {k: getattr(args, k) for k in ENGINE_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "lazy_compile", False):
        flags["aot_compile"] = False
    return build(EngineConfig, **{**extra, **flags})


# -- model loading ---------------------------------------------------------------------------
@dataclasses.dataclass
class LoadedModel:
    config: object  # models.config.ModelConfig
    params: object
    tokenizer: object
    name: str
    linear: object = None  # LinearPlan of a quantized checkpoint (None: from precision)
    kv_dtype: str | None = None
    kv_recent_window: int = 0  # a quantized checkpoint's recipe value (served by the engine)


def load_model(
    spec: str, *, precision: str = "bf16", dtype: str = "float32", seed: int = 0
) -> LoadedModel:
    import jax
    import jax.numpy as jnp

    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    if spec.startswith("random:"):
        from comet_jax.engine.runner import ByteTokenizer, precision_plan, preset_config
        from models.llama import LlamaForCausalLM, init_params

        config = preset_config(spec.split(":", 1)[1])
        plan = precision_plan(config, precision)
        model = LlamaForCausalLM(config, linear=plan, param_dtype=jdtype)
        params = init_params(model, jax.random.key(seed))
        return LoadedModel(config, params, ByteTokenizer(), spec, linear=plan)
    path = Path(spec)
    if spec == "smollm2":
        from comet_jax.data import text

        path = text.default_gguf_path()
    from comet_jax.checkpoint import orbax_io

    if orbax_io.is_quantized_dir(path):
        return _load_quantized(path)
    from comet_jax.checkpoint.hf import params_from_hf_tensors
    from comet_jax.tokenizer import Tokenizer
    from models.config import ModelConfig

    if path.suffix == ".gguf":
        from comet_jax.checkpoint.gguf import load_gguf

        hf_config, tensors = load_gguf(path)
        config = ModelConfig.from_hf(hf_config)
        params = params_from_hf_tensors(config, tensors, dtype=jdtype)
        return LoadedModel(config, params, Tokenizer.from_gguf(path), path.stem)
    if path.is_dir():
        from comet_jax.checkpoint.hf import load_hf_model

        config, params = load_hf_model(path, dtype=jdtype)
        return LoadedModel(config, params, Tokenizer.from_hf_dir(path), path.name)
    raise ValueError(
        f"--model={spec!r}: expected smollm2, a .gguf file, a checkpoint directory or random:PRESET"
    )


def _load_quantized(path: Path) -> LoadedModel:
    from comet_jax.checkpoint import orbax_io

    config, recipe, params, plan, _ = orbax_io.load_quantized(path)
    source = orbax_io.read_meta(path).get("source")
    loaded = load_model(source) if source not in (None, "smollm2") else None
    tokenizer = loaded.tokenizer if loaded else _default_tokenizer()
    kv = "int4" if recipe.kv4 else "bf16"
    return LoadedModel(
        config,
        params,
        tokenizer,
        path.name,
        linear=plan,
        kv_dtype=kv,
        kv_recent_window=recipe.kv_recent_window if recipe.kv4 else 0,
    )


def _default_tokenizer():
    from comet_jax.data import text
    from comet_jax.tokenizer import Tokenizer

    return Tokenizer.from_gguf(text.default_gguf_path())


def _build_engine(args, build, **extra):
    from comet_jax.engine import compile_cache
    from comet_jax.engine.engine import LLMEngine

    cache_dir = compile_cache.enable(getattr(args, "compile_cache", None))
    if cache_dir is not None:
        print(f"XLA compilation cache: {cache_dir}", file=sys.stderr)
    t0 = time.perf_counter()
    # The CLI's processes hold one engine: freeze the start-up's objects by default.
    cfg = _engine_config(
        args, build, **{"gc_freeze": True, "gc_full_every_steps": GC_FULL_EVERY_STEPS, **extra}
    )
    lm = load_model(args.model, precision=cfg.precision, dtype=cfg.compute_dtype, seed=cfg.seed)
    if lm.kv_dtype is not None and cfg.kv_dtype is None:
        cfg = dataclasses.replace(cfg, kv_dtype=lm.kv_dtype)
    if lm.kv_recent_window and not cfg.kv_recent_window:  # the recipe's float window
        cfg = dataclasses.replace(cfg, kv_recent_window=lm.kv_recent_window)
    print(f"loaded {lm.name} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    engine = LLMEngine.build(lm.config, lm.params, cfg, tokenizer=lm.tokenizer, linear=lm.linear)
    if engine.capacity is not None:
        print(engine.capacity.describe(), file=sys.stderr)
    return engine, lm


# -- commands --------------------------------------------------------------------------------
def cmd_generate(args) -> int:
    from comet_jax.engine.config import _pow2_buckets, bucket_for

    build = _configure(args)
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [p for p in Path(args.prompt_file).read_text().splitlines() if p.strip()]
    if not prompts:
        raise SystemExit("generate: give at least one prompt (positional or --prompt_file)")
    n = args.max_batch or len(prompts)
    # Limits: command-line flags, else the gin-bound (or default) EngineConfig values.
    base = _engine_config(args, build)
    prefill_seqs = min(n, base.max_prefill_seqs)
    # Few step shapes: generation is one batch, so compile only the buckets it can use.
    extra = dict(
        max_batch=n,
        max_prefill_seqs=prefill_seqs,
        decode_buckets=(bucket_for(n, _pow2_buckets(n), "batch"),),
        prefill_batch_buckets=(prefill_seqs,),
        chunk_buckets=(base.max_tokens_per_step,),
    )
    engine, lm = _build_engine(args, build, **extra)
    try:
        return _generate(args, engine, lm, prompts)
    finally:
        engine.close()  # unfreezes the collector's start-up objects (EngineConfig.gc_freeze)


def _generate(args, engine, lm, prompts: list[str]) -> int:
    """cmd_generate's requests on a built engine: streams one prompt, prints the texts of
    several."""
    from comet_jax.engine.sampling import SamplingParams

    tok = lm.tokenizer
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed_sampling,
        stop=tuple(args.stop or ()),
        ignore_eos=args.ignore_eos,
    )
    ids = []
    for p in prompts:
        if args.chat:
            p = tok.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True
            )
        ids.append(tok.encode(p))
    stream = len(prompts) == 1

    def on_output(out):
        if stream and out.new_text:
            print(out.new_text, end="", flush=True)

    t0 = time.perf_counter()
    rids = [engine.add_request(None, i, params, on_output) for i in ids]
    texts = {r: "" for r in rids}
    gen = 0
    while engine.has_unfinished():
        for out in engine.step():
            texts[out.request_id] += out.new_text
            gen += len(out.new_token_ids)
    dt = time.perf_counter() - t0
    if stream:
        print()
    else:
        for p, r in zip(prompts, rids):
            print(f"### {p}\n{texts[r]}\n")
    print(f"{gen} tokens in {dt:.2f} s ({gen / dt:.1f} tok/s)", file=sys.stderr)
    return 0


def cmd_serve(args) -> int:
    from comet_jax.serving.server import serve

    build = _configure(args)
    engine, lm = _build_engine(args, build)
    name = args.served_model_name or lm.name
    print(
        f"serving {name} on http://{args.host}:{args.port} (/v1/completions, "
        "/v1/chat/completions, /v1/models, /health, /metrics)",
        file=sys.stderr,
    )
    try:
        serve(
            engine, lm.tokenizer, name, host=args.host, port=args.port, max_waiting=args.max_waiting
        )
    finally:
        engine.close()
    return 0


def cmd_eval(args) -> int:
    from comet_jax.data import text
    from comet_jax.eval.perplexity import perplexity
    from models.llama import LlamaForCausalLM

    _configure(args)
    lm = load_model(args.model, precision=args.precision or "bf16")
    kw = {}
    if lm.linear is not None:
        kw["linear"] = lm.linear
    if lm.kv_dtype == "int4":
        from comet_jax.quant.convert import KV4Transform
        from models.attention import DenseAttention

        kw["attention"] = DenseAttention(kv_transform=KV4Transform(args.kv_group or 64))
    model = LlamaForCausalLM(lm.config, **kw)
    docs = text.load_corpus(args.corpus)
    ids = text.corpus_token_ids(docs, lm.tokenizer)
    windows = text.token_windows(ids, args.window, args.max_windows)
    res = perplexity(model, lm.params, windows, batch_size=args.batch_size)
    print(
        json.dumps(dataclasses.asdict(res) if dataclasses.is_dataclass(res) else res, default=float)
    )
    return 0


def cmd_quantize(args) -> int:
    from comet_jax.calibrate.stats import collect_stats
    from comet_jax.data import text
    from comet_jax.quant import recipe as recipes
    from comet_jax.quant.convert import quantize_model

    build = _configure(args)
    recipe = (
        build(recipes.QuantRecipe)
        if (args.gin_file or args.gin_param) and not args.recipe
        else recipes.preset(args.recipe or "fmpq_w4axkv4")
    )
    lm = load_model(args.model)
    stats = None
    if not recipe.is_float and (recipe.act == "fmpq" or recipe.needs_hessian):
        ids = text.corpus_token_ids(text.calibration_corpus(), lm.tokenizer)
        windows = text.token_windows(ids, args.calib_window, args.calib_windows)
        stats = collect_stats(
            lm.config, lm.params, windows, hessian=recipe.needs_hessian, rotated=recipe.rotation
        )
    qparams, plan, report = quantize_model(lm.config, lm.params, recipe, stats)
    from comet_jax.checkpoint import orbax_io

    orbax_io.save_quantized(
        args.out, lm.config, recipe, qparams, plan, report, force=True, source=args.model
    )
    print(f"wrote {args.out} ({recipe.name})", file=sys.stderr)
    return 0


def cmd_bench(args, rest) -> int:
    import runpy

    script = Path(__file__).resolve().parent.parent / "experiments" / "bench_throughput.py"
    if not script.is_file():
        raise SystemExit(f"bench: {script} not found (run from a source checkout)")
    return runpy.run_path(str(script), run_name="bench_throughput")["main"](rest)


# -- argument parsing ------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, engine: bool = True) -> None:
    p.add_argument(
        "--model",
        default="smollm2",
        help="smollm2 | PATH.gguf | HF or quantized checkpoint DIR | random:PRESET "
        "(default: smollm2)",
    )
    p.add_argument(
        "--gin_file",
        action="append",
        default=[],
        help="gin config file (or a name in experiments/configs); repeatable",
    )
    p.add_argument(
        "--gin_param",
        action="append",
        default=[],
        help="gin binding, e.g. 'EngineConfig.max_batch = 32'; repeatable",
    )
    p.add_argument(
        "--precision",
        choices=("bf16", "w8a8", "w4a16", "w4axkv4"),
        help="projection backends (random weights) and KV format; quantized "
        "checkpoints carry their own",
    )
    if not engine:
        return
    g = p.add_argument_group("engine (EngineConfig; unset flags keep gin/default values)")
    g.add_argument(
        "--compile_cache",
        metavar="DIR",
        help="persistent XLA compilation cache: a restart with the same model and settings "
        "loads the compiled steps instead of compiling them (default: $COMET_JAX_COMPILE_CACHE "
        "or ~/.cache/comet_jax/xla; 'none' turns it off)",
    )
    g.add_argument("--max_batch", type=int, help="most sequences running at once")
    g.add_argument(
        "--max_tokens_per_step",
        type=int,
        help="token budget of one step (decode + prefill chunks); largest chunk",
    )
    g.add_argument("--max_prefill_seqs", type=int, help="prompts chunked in one step")
    from comet_jax.engine.config import SCHEDULES

    g.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="mixed (default): decode rows and prompt chunks share each step; prefill_first: "
        "steps run prompt chunks alone while any can run, then the decode rows (offline "
        "throughput; decodes wait out the prefills)",
    )
    g.add_argument(
        "--max_prefill_grid",
        type=int,
        help="most positions (batch bucket x chunk bucket) of a prefill call's attention grid; "
        "longer chunks are cut or wait (default 2 x max_tokens_per_step)",
    )
    g.add_argument(
        "--compile_workers",
        type=int,
        help="XLA compilations run at once by the start-up compile (default min(8, CPUs))",
    )
    g.add_argument("--max_model_len", type=int, help="longest prompt + completion in tokens")
    g.add_argument(
        "--page_size",
        type=int,
        help="tokens per KV page (16, 32, 64 or 128; default 128 with the Pallas kernels on a "
        "GPU, else 16)",
    )
    g.add_argument(
        "--num_pages", type=int, help="KV pool size in pages (default: plan from free memory)"
    )
    g.add_argument(
        "--memory_fraction",
        type=float,
        help="share of free device memory for the KV pool (default 0.9); free = what XLA "
        "preallocated (XLA_PYTHON_CLIENT_MEM_FRACTION, 75%% of the GPU by default) minus the "
        "weights",
    )
    g.add_argument("--kv_dtype", choices=("bf16", "int4"), help="KV cache format override")
    g.add_argument("--kv_group", type=int, help="KV4 group size along head_dim")
    g.add_argument(
        "--kv_recent_window",
        type=int,
        help="keep each sequence's newest W tokens' K/V unquantized beside the INT4 pages "
        "(default: the quantized checkpoint's recipe value, else 0 = off)",
    )
    g.add_argument(
        "--prefill_dequantize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="INT4 cache, Pallas kernels: prefill attention dequantizes the call's pages once "
        "into bf16 (default on; --no-prefill_dequantize unpacks each page in the kernel)",
    )
    g.add_argument(
        "--kv_write_kernel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="INT4 cache, Pallas kernels: quantize and store new K/V with one Pallas kernel "
        "per layer instead of XLA quantize + scatters (default on; "
        "--no-kv_write_kernel uses XLA)",
    )
    g.add_argument(
        "--kv_window_kernel",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="recent window, Pallas kernels: decode attends the bf16 ring inside the decode "
        "kernel (default on, +2.8%% serving on the H100; --no-kv_window_kernel uses XLA's "
        "dots and merge beside it)",
    )
    g.add_argument(
        "--prefill_own_kv",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="prefill calls with no cached prefix attend over the chunk's own K/V as computed "
        "(cuDNN flash attention on a GPU) instead of reading them back from the pages; the "
        "pages (and a recent window's rings) are still written (default off; one device)",
    )
    g.add_argument(
        "--decode_fused_write",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="INT4 cache, Pallas kernels: the decode attention kernel quantizes and stores "
        "the step's new K/V itself instead of a separate write kernel before it (default "
        "off; no recent window)",
    )
    g.add_argument(
        "--decode_qk_int8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="INT4 cache (groups >= 64), Pallas kernels: decode attention takes the logits from "
        "int8 dots of q (two INT8 parts per row) and the K nibbles (default on there; "
        "--no-decode_qk_int8: f16 nibbles, slower, the same accuracy)",
    )
    g.add_argument(
        "--compute_dtype",
        choices=("bfloat16", "float32"),
        help="activation dtype (bfloat16 on GPU; float32 is faster on CPU)",
    )
    g.add_argument(
        "--kernels",
        choices=("auto", "pallas", "reference"),
        help="auto: Pallas on GPU, jnp reference/simulation on CPU",
    )
    g.add_argument(
        "--interpret",
        action="store_true",
        default=None,
        help="run Pallas kernels in interpret mode (CPU, slow)",
    )
    g.add_argument(
        "--lazy_compile",
        action="store_true",
        help="compile step shapes on first use instead of all at start-up",
    )
    g.add_argument("--seed", type=int, help="default sampling seed of requests without one")
    g.add_argument(
        "--gc_freeze",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="gc.freeze() after start-up so Python's full collections skip the compiled "
        "steps and params (default on: collections stalled serving for 0.6 s each on the "
        "H100; --no-gc_freeze keeps them)",
    )
    g.add_argument(
        "--gc_full_every_steps",
        type=int,
        default=None,
        metavar="N",
        help="hold Python's full garbage collections off while requests run; the engine "
        f"runs one when it drains or every N steps at the latest (default {GC_FULL_EVERY_STEPS}; "
        "0: Python's own schedule, whose collections every ~20 decode steps at batch 2222 "
        "stalled the step loop; docs/benchmarks.md runs 111-112)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="comet-jax",
        description="W4AxKV4 LLM serving in JAX/Pallas (a COMET re-implementation)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser(
        "quantize",
        help="checkpoint -> calibration -> FMPQ quantized checkpoint",
        description="Load a float checkpoint, collect calibration statistics on "
        "the calibration corpus (Austen), quantize with a recipe and write an "
        "orbax checkpoint plus its projection plan.",
    )
    _common(q, engine=False)
    q.add_argument(
        "--recipe", help="QuantRecipe preset (default fmpq_w4axkv4; or bind QuantRecipe with gin)"
    )
    q.add_argument("--calib_windows", type=int, default=128, help="calibration windows")
    q.add_argument("--calib_window", type=int, default=2048, help="tokens per window")
    q.add_argument("--out", required=True, help="output directory")

    g = sub.add_parser(
        "generate",
        help="prompt(s) -> text, streamed for a single prompt",
        description="Generate completions with the serving engine.",
    )
    _common(g)
    g.add_argument("prompt", nargs="*", help="prompt text(s)")
    g.add_argument("--prompt_file", help="file with one prompt per line")
    g.add_argument("--chat", action="store_true", help="wrap prompts in the chat template")
    g.add_argument("--max_tokens", type=int, default=64, help="new tokens per prompt")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top_k", type=int, default=0, help="0 = off")
    g.add_argument("--top_p", type=float, default=1.0, help="1 = off")
    g.add_argument("--seed_sampling", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", help="stop string; repeatable")
    g.add_argument("--ignore_eos", action="store_true", help="do not stop at EOS")

    s = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server",
        description="Serve /v1/completions, /v1/chat/completions (SSE streaming), "
        "/v1/models, /health and /metrics.",
    )
    _common(s)
    s.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)"
    )
    s.add_argument("--port", type=int, default=8000, help="TCP port")
    s.add_argument("--served_model_name", help="model id reported by the API")
    s.add_argument(
        "--max_waiting",
        type=int,
        default=1024,
        help="queued requests beyond which new ones get 503",
    )

    e = sub.add_parser(
        "eval",
        help="perplexity on the prepared corpora",
        description="Perplexity of a (quantized) model on non-overlapping windows.",
    )
    _common(e, engine=False)
    e.add_argument("--corpus", default="wikipedia", choices=("wikipedia", "austen"))
    e.add_argument("--window", type=int, default=2048, help="tokens per window")
    e.add_argument("--max_windows", type=int, default=None, help="at most this many windows")
    e.add_argument("--batch_size", type=int, default=1)
    e.add_argument("--kv_group", type=int, default=None, help="KV4 group of simulated KV4")

    sub.add_parser(
        "bench",
        help="offline throughput benchmark (experiments/bench_throughput.py)",
        description="Arguments after 'bench' go to experiments/bench_throughput.py; "
        "see `comet-jax bench --help`.",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv and argv[0] == "bench":
        return cmd_bench(parser.parse_args(["bench"]), argv[1:])
    args = parser.parse_args(argv)
    try:
        return {
            "quantize": cmd_quantize,
            "generate": cmd_generate,
            "serve": cmd_serve,
            "eval": cmd_eval,
        }[args.command](args)
    except ValueError as e:
        parser.exit(2, f"comet-jax {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
