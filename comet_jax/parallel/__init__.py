"""Tensor parallelism with JAX's own machinery (Mesh, NamedSharding, jit shardings, shard_map).

    from comet_jax.parallel import make_mesh, quantize_model_tp, sharded_runner
    mesh = make_mesh(tp=2)
    qparams, plan, _ = quantize_model_tp(cfg, params, recipe, stats, n_chunks=8)
    model = sharded_runner.shard_model(quantized_model(cfg, recipe, plan), mesh)
    logits = sharded_runner.jit_forward(model, mesh, qparams)(qparams, tokens)

Modules: `mesh` (mesh + multi-host start-up), `rules` (param / KV-cache PartitionSpecs),
`tp_quant` (row-parallel FMPQ: per-chunk plans and the chunked W4Ax backend),
`sharded_runner` (mesh-aware model plug-ins, placement, jitted steps).
"""

from comet_jax.parallel.mesh import TP_AXIS, initialize_distributed, make_mesh, tp_size
from comet_jax.parallel.rules import cache_specs, param_specs
from comet_jax.parallel.tp_quant import (
    ChunkedW4AxLinear,
    chunk_row_backends,
    plan_chunks,
    quantize_model_tp,
    with_mesh,
)

__all__ = [
    "TP_AXIS",
    "ChunkedW4AxLinear",
    "cache_specs",
    "chunk_row_backends",
    "initialize_distributed",
    "make_mesh",
    "param_specs",
    "plan_chunks",
    "quantize_model_tp",
    "tp_size",
    "with_mesh",
]
