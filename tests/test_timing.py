"""Benchmark timer: kernel time is read from the GPU stream lines of a profiler trace only
(derived lines repeat the kernels), and on a CPU the timer falls back to wall clock."""

from __future__ import annotations

import jax.numpy as jnp
from jax.profiler import ProfileData

from pallas_kernels import timing

_XSPACE = """
planes {
  name: "/device:GPU:0"
  lines {
    name: "Stream #13(Compute)"
    events { metadata_id: 1 offset_ps: 0 duration_ps: 5000000 }
    events { metadata_id: 2 offset_ps: 9000000 duration_ps: 2000000 }
  }
  lines {
    name: "XLA Ops"
    events { metadata_id: 1 offset_ps: 0 duration_ps: 5000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "w4ax_k4_3072_k8_1024" } }
  event_metadata { key: 2 value { id: 2 name: "loop_reduce_fusion" } }
}
planes {
  name: "/host:CPU"
  lines {
    name: "python"
    events { metadata_id: 1 offset_ps: 0 duration_ps: 99000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "PjitFunction" } }
}
"""


def test_gpu_kernel_ns_reads_stream_lines_only(tmp_path):
    path = tmp_path / "t.xplane.pb"
    path.write_bytes(ProfileData.text_proto_to_serialized_xspace(_XSPACE))
    total, count, names = timing.gpu_kernel_ns(str(path))
    assert (total, count) == (7000, 2)  # 5 us + 2 us; "XLA Ops" and the host not counted
    assert names == ["/device:GPU:0/Stream #13(Compute)"]
    *_, per = timing.gpu_kernel_ns(str(path), by_name=True)
    assert per == {"w4ax_k4_3072_k8_1024": 5000, "loop_reduce_fusion": 2000}
    assert timing.kernel_counts(str(path)) == {"w4ax_k4_3072_k8_1024": 1, "loop_reduce_fusion": 1}


def test_device_time_on_cpu_falls_back_to_wall_clock():
    sets = [(jnp.ones((64, 64)) * i,) for i in range(3)]
    info: dict = {}
    t = timing.device_time(lambda a: a @ a, sets, reps=3, info=info)
    assert t > 0 and info["method"] == "dispatch"


_TIMELINE = """
planes {
  name: "/device:GPU:0"
  lines {
    name: "Stream #13(Compute)"
    events { metadata_id: 1 offset_ps: 0 duration_ps: 5000000 }
    events { metadata_id: 2 offset_ps: 20000000 duration_ps: 2000000 }
    events { metadata_id: 1 offset_ps: 24000000 duration_ps: 1000000 }
  }
  lines {
    name: "Stream #14(Compute)"
    events { metadata_id: 2 offset_ps: 3000000 duration_ps: 4000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "w4ax" } }
  event_metadata { key: 2 value { id: 2 name: "act_quant" } }
}
planes {
  name: "/host:CPU"
  lines {
    name: "python"
    events { metadata_id: 1 offset_ps: 0 duration_ps: 30000000 }
    events { metadata_id: 1 offset_ps: 40000000 duration_ps: 10000000 }
  }
  event_metadata { key: 1 value { id: 1 name: "PjitFunction(step)" } }
}
"""


def test_timeline_busy_span_and_gaps(tmp_path):
    # Kernels [0, 5), [3, 7) on another stream, [20, 22), [24, 25) us: busy is the union,
    # 7 + 2 + 1 = 10 us of a 25 us span; gaps of 13 us (after act_quant) and 2 us.
    path = tmp_path / "t.xplane.pb"
    path.write_bytes(ProfileData.text_proto_to_serialized_xspace(_TIMELINE))
    t = timing.timeline(str(path), min_gap_us=1.0)
    assert t["kernels"] == 4
    assert (t["span_us"], t["busy_us"], t["idle_us"]) == (25.0, 10.0, 15.0)
    assert t["gaps"] == 2 and t["gap_sum_us"] == 15.0
    assert t["top_gaps"][0] == [13.0, "act_quant", "act_quant"]
    assert t["top_gaps"][1] == [2.0, "act_quant", "w4ax"]
    assert timing.timeline(str(path), min_gap_us=5.0)["gaps"] == 1
    assert t["host_top_us"] == {"PjitFunction(step)": [2, 40.0]}
    # launches by name over both streams (the host plane's events are not kernels)
    assert timing.kernel_counts(str(path)) == {"w4ax": 2, "act_quant": 2}
