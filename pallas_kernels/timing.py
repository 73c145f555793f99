"""Device time of a jitted function, free of host dispatch and sync overhead.

Wall-clock timing of ``jit(f)(*args)`` + ``block_until_ready`` counts the host's dispatch of
every argument and the sync: for a call over ~100 array arguments that is tens of
microseconds, as long as a decode-size GEMM itself. :func:`device_time` runs the same jitted
sweep over the argument sets under ``jax.profiler`` and sums the durations of the kernels
recorded on the GPU's streams (CUPTI timestamps): the device-busy time of the calls, every
kernel of the wrapper included (padding, slices, split-K reduction), launch gaps excluded.
Rotating over several argument sets (weights >> L2) keeps decode-size operands out of the
50 MB L2. On a machine without a GPU it falls back to :func:`dispatch_time`.

(An in-jit ``fori_loop`` over the calls does not work: XLA hoists loop-invariant work, such
as an unpack that depends only on the weights, out of the loop, and removes barriers meant
to stop it before it does.)
"""

from __future__ import annotations

import glob
import tempfile
import time


def _sweep_fn(fn):
    import jax

    @jax.jit
    def many(sets):
        return [fn(*a) for a in sets]

    return many


def dispatch_time(fn, arg_sets, *, reps: int = 20) -> float:
    """Wall-clock seconds per call: one synced dispatch of all sets, divided by their number
    (includes host dispatch; the measure used before :func:`device_time`)."""
    import jax

    many = _sweep_fn(fn)
    for _ in range(2):
        jax.block_until_ready(many(arg_sets))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(many(arg_sets))
        ts.append((time.perf_counter() - t0) / len(arg_sets))
    ts.sort()
    return ts[len(ts) // 2]


_DERIVED_LINES = {
    "XLA Ops",
    "XLA Modules",
    "Steps",
    "Framework Ops",
    "Launch Stats",
    "Source code",
    "XLA TraceMe",
    "TensorFlow Name Scope",
    "TensorFlow Ops",
}
_FALLBACK: dict = {}


def gpu_kernel_ns(xplane_path: str, *, by_name: bool = False) -> tuple:
    """``(total kernel ns, kernel count, stream line names)`` over the GPU planes of a trace,
    plus ``{kernel name: total ns}`` with ``by_name``."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(xplane_path)
    # Raw stream lines hold the kernels; derived lines ("XLA Ops", "XLA Modules", "Steps")
    # repeat them and would double count.
    streams = _stream_lines(data)
    total, count, per = 0, 0, {}
    for _, line in streams:
        for ev in line.events:
            total += int(ev.duration_ns)
            count += 1
            per[ev.name] = per.get(ev.name, 0) + int(ev.duration_ns)
    names = [n for n, _ in streams]
    return (total, count, names, per) if by_name else (total, count, names)


def device_time(fn, arg_sets, *, reps: int = 10, info: dict | None = None) -> float:
    """Device seconds of one ``fn(*args)`` call (module docstring); ``info`` receives the
    kernel count per call and the stream lines read."""
    import jax

    if jax.devices()[0].platform != "gpu" or _FALLBACK:
        if info is not None:
            info.update(method="dispatch", **_FALLBACK)
        return dispatch_time(fn, arg_sets, reps=reps)
    many = _sweep_fn(fn)
    for _ in range(2):  # compile and warm up: a config that fails, fails here
        jax.block_until_ready(many(arg_sets))
    try:
        return _profiled(many, arg_sets, reps, info)
    except _ProfilerError as e:  # no usable profiler on this machine: say so, go on
        _FALLBACK["fallback_reason"] = str(e)[:300]
        print(f"device_time: profiler unusable ({e}); falling back to dispatch_time", flush=True)
        return device_time(fn, arg_sets, reps=reps, info=info)


class _ProfilerError(RuntimeError):
    pass


def kernel_counts(xplane_path: str) -> dict[str, int]:
    """``{kernel name: launches}`` over the same GPU stream lines as :func:`gpu_kernel_ns`."""
    from jax.profiler import ProfileData

    counts: dict[str, int] = {}
    for _, line in _stream_lines(ProfileData.from_file(xplane_path)):
        for ev in line.events:
            counts[ev.name] = counts.get(ev.name, 0) + 1
    return counts


def _stream_lines(data) -> list:
    """``[(plane/line name, line)]`` of the GPU lines that hold kernels."""
    lines = [
        (f"{plane.name}/{line.name}", line)
        for plane in data.planes
        if plane.name.startswith("/device:GPU")
        for line in plane.lines
    ]
    streams = [(n, ln) for n, ln in lines if ln.name.startswith("Stream")]
    return streams or [(n, ln) for n, ln in lines if ln.name not in _DERIVED_LINES]


def timeline(xplane_path: str, *, top: int = 12, min_gap_us: float = 5.0) -> dict:
    """Where the GPU is idle in a trace: the span from the first kernel's start to the last
    one's end, the busy time (union of kernel intervals over all streams), the idle gaps of
    at least ``min_gap_us`` (count, sum, the ``top`` longest with the kernels around them),
    and the host events with the largest total duration (name -> [count, total us])."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(xplane_path)
    ivs = sorted(
        (int(ev.start_ns), int(ev.start_ns + ev.duration_ns), ev.name)
        for _, line in _stream_lines(data)
        for ev in line.events
    )
    out: dict = {"kernels": len(ivs)}
    if ivs:
        busy, gaps = 0, []
        cur_s, cur_e, cur_name = ivs[0]
        for s, e, name in ivs[1:]:
            if s > cur_e:
                busy += cur_e - cur_s
                if s - cur_e >= min_gap_us * 1e3:
                    gaps.append(((s - cur_e) / 1e3, cur_name, name))
                cur_s = s
            if e > cur_e:
                cur_e, cur_name = e, name
        busy += cur_e - cur_s
        span = max(e for _, e, _ in ivs) - ivs[0][0]
        gaps.sort(key=lambda g: -g[0])
        out.update(
            span_us=span / 1e3,
            busy_us=busy / 1e3,
            idle_us=(span - busy) / 1e3,
            gaps=len(gaps),
            gap_sum_us=sum(g[0] for g in gaps),
            top_gaps=[[round(g, 1), a, b] for g, a, b in gaps[:top]],
        )
    host: dict[str, list] = {}
    for plane in data.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for ev in line.events:
                h = host.setdefault(ev.name, [0, 0.0])
                h[0] += 1
                h[1] += ev.duration_ns / 1e3
    out["host_top_us"] = dict(sorted(host.items(), key=lambda kv: -kv[1][1])[: 3 * top])
    return out


def traced_kernels(run, *, keep: str | None = None) -> tuple:
    """Runs ``run()`` under ``jax.profiler``; returns ``gpu_kernel_ns(..., by_name=True)`` of
    the trace, ``(0, 0, [], {})`` when the profiler wrote none. ``keep``: also copy the
    trace's ``.xplane.pb`` to this path (for :func:`timeline` or TensorBoard)."""
    import shutil

    import jax

    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        try:
            run()
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(f"{d}/**/*.xplane.pb", recursive=True)
        if paths and keep:
            shutil.copyfile(paths[0], keep)
        return gpu_kernel_ns(paths[0], by_name=True) if paths else (0, 0, [], {})


def _profiled(many, arg_sets, reps, info):
    import jax

    def run():
        for _ in range(reps):
            jax.block_until_ready(many(arg_sets))

    total, count, names, per_kernel = traced_kernels(run)
    if count == 0:
        raise _ProfilerError(f"no GPU kernels found in the trace (lines: {names})")
    calls = reps * len(arg_sets)
    if info is not None:
        info.update(
            method="profiler",
            kernels_per_call=count / calls,
            lines=names,
            kernel_us={k: round(v * 1e-3 / calls, 3) for k, v in per_kernel.items()},
        )
    return total * 1e-9 / calls


__all__ = ["device_time", "dispatch_time", "gpu_kernel_ns", "kernel_counts", "traced_kernels"]
