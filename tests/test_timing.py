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


def test_device_time_on_cpu_falls_back_to_wall_clock():
    sets = [(jnp.ones((64, 64)) * i,) for i in range(3)]
    info: dict = {}
    t = timing.device_time(lambda a: a @ a, sets, reps=3, info=info)
    assert t > 0 and info["method"] == "dispatch"
