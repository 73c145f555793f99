"""Device meshes for tensor parallelism, and multi-host start-up.

comet-jax shards with JAX's own machinery: a 1-D `jax.sharding.Mesh` whose only axis
(``TP_AXIS = "tp"``) is the tensor-parallel degree, `NamedSharding`/`PartitionSpec` for
parameters and the KV cache (`comet_jax.parallel.rules`), `jax.jit` with in/out shardings
(`comet_jax.parallel.sharded_runner`) and `jax.shard_map` around the Pallas kernels. There are
no hand-written collectives: the all-reduces are `jax.lax.psum` inside `shard_map` or the ones
XLA's SPMD partitioner inserts.

Single host (1, 2, 4 or 8 GPUs, or CPU devices simulated with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set before `jax` is imported)::

    mesh = make_mesh(tp=2)                      # the first 2 of jax.devices()

Multi-host clusters: call `initialize_distributed()` once per process, *before* anything
else touches JAX devices (first lines of the launcher script); afterwards `jax.devices()`
lists the devices of every host and `make_mesh(tp=jax.device_count())` spans them. Launch one
process per host (JAX then drives all local GPUs of that host)::

    # SLURM / Open MPI / Cloud TPU: coordinator and ranks are auto-detected.
    srun -N 2 --ntasks-per-node=1 python my_launcher.py

    # Anywhere else: name the coordinator (process 0's host:port) and the process ranks.
    COMET_COORDINATOR=10.0.0.1:1234 COMET_NUM_PROCESSES=2 COMET_PROCESS_ID=0 python my_launcher.py
    COMET_COORDINATOR=10.0.0.1:1234 COMET_NUM_PROCESSES=2 COMET_PROCESS_ID=1 python my_launcher.py

    # my_launcher.py
    from comet_jax.parallel import initialize_distributed, make_mesh
    initialize_distributed()
    mesh = make_mesh()          # every device of every process

Every process must run the same program (same jitted steps in the same order: SPMD); host
inputs (step token arrays) must be identical on all processes, e.g. built by one scheduler
and broadcast, or by a deterministic scheduler on every host. The engine's scheduler is
single-host today (see the TP report): multi-host is wired at the JAX level, not yet in the
serving loop.

Tensor parallelism all-reduces once per row-parallel layer, per token: keep the ``tp`` axis
inside one NVLink domain (one host) and put data parallelism (separate engine replicas)
across hosts. A mesh spanning hosts works, it is just bound by the inter-host network.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

TP_AXIS = "tp"


def make_mesh(tp: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh ``("tp",)`` of `tp` devices (default: all of `devices`).

    Args:
      tp: tensor-parallel degree; None means every device given.
      devices: the devices to use, in mesh order (default `jax.devices()`); the first `tp`
        are taken.

    The axis type is `Auto`: jit's partitioner propagates shardings through the model and
    shard_map regions make the axis manual where the Pallas kernels run.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices is empty; expected at least one jax.Device")
    if tp is None:
        tp = len(devices)
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tp={tp!r} must be a positive int")
    if tp > len(devices):
        raise ValueError(
            f"tp={tp} exceeds the {len(devices)} available devices; on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={tp} before importing jax"
        )
    arr = np.array(devices[:tp], dtype=object).reshape(tp)
    try:
        from jax.sharding import AxisType

        return Mesh(arr, (TP_AXIS,), axis_types=(AxisType.Auto,))
    except (ImportError, TypeError):  # older jax: every axis is Auto
        return Mesh(arr, (TP_AXIS,))


def tp_size(mesh: Mesh | None, axis: str = TP_AXIS) -> int:
    """The size of `axis` in `mesh` (1 for no mesh)."""
    if mesh is None:
        return 1
    if axis not in mesh.shape:
        raise ValueError(f"mesh axes {tuple(mesh.shape)} lack the tensor-parallel axis {axis!r}")
    return int(mesh.shape[axis])


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Multi-host start-up: a thin wrapper around `jax.distributed.initialize`.

    Arguments default to the environment variables ``COMET_COORDINATOR`` (``host:port`` of
    process 0), ``COMET_NUM_PROCESSES``, ``COMET_PROCESS_ID`` and ``COMET_LOCAL_DEVICE_IDS``
    (comma-separated); when none is given, JAX auto-detects SLURM, Open MPI and Cloud TPU
    clusters. With a single process and nothing configured this does nothing.

    Returns True if `jax.distributed.initialize` was called.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("COMET_COORDINATOR")
    if num_processes is None and env.get("COMET_NUM_PROCESSES"):
        num_processes = int(env["COMET_NUM_PROCESSES"])
    if process_id is None and env.get("COMET_PROCESS_ID"):
        process_id = int(env["COMET_PROCESS_ID"])
    if local_device_ids is None and env.get("COMET_LOCAL_DEVICE_IDS"):
        local_device_ids = [int(i) for i in env["COMET_LOCAL_DEVICE_IDS"].split(",")]
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ValueError(
            f"coordinator_address={coordinator_address!r}, num_processes={num_processes!r}, "
            f"process_id={process_id!r}: give all three (or none, for auto-detection)"
        )
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} must be in [0, num_processes={num_processes})")
    auto = any(k in env for k in ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_ID"))
    if coordinator_address is None and not auto:
        return False  # single process
    if num_processes == 1:
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    return True
