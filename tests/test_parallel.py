"""The dispatch bound (parallel.InFlight) and the XLA:CPU hang it prevents.

The pattern is the evaluation loop's: per batch, a program with a collective (the in-memory
loader's reduce-scatter) and a program that adds to running totals, dispatched without reading
any result. On 8 fake CPU devices, more than 32 launches in flight make XLA's client block one of
its 8 pool threads in its per-device in-flight limit while a collective needs all 8 threads: the
process hangs until XLA's collective timeout aborts it. Each run below is a fresh process with a
short collective timeout, so a hang ends as a non-zero exit within seconds.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from dks_jax import parallel

SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from dks_jax import parallel

    mesh = parallel.create_mesh()
    assert mesh.devices.size == 8, mesh
    x = jax.device_put(jnp.ones((64, 256)), NamedSharding(mesh, P("data")))
    gather = jax.jit(jax.shard_map(lambda a: jax.lax.psum_scatter(a, "data", tiled=True),
                                   mesh=mesh, in_specs=P("data"), out_specs=P("data")))
    step = jax.jit(lambda a, t: {"s": t["s"] + jnp.sum(a * a), "t": t["t"] + jnp.sum(a)})
    bounded = sys.argv[1] == "bounded"
    for rep in range(REPS):
        in_flight = parallel.InFlight()
        totals = {"s": jnp.zeros(()), "t": jnp.zeros(())}
        for i in range(40):
            totals = step(gather(x), totals)
            if bounded:
                in_flight.add(totals, launches=2)
        in_flight.wait()
        assert float(jax.device_get(totals["t"])) == 40 * 64 * 256, totals
    print("completed")
""")


def _run(mode: str, reps: int, tmp_path):
    script = tmp_path / "dispatch.py"
    script.write_text(SCRIPT.replace("REPS", str(reps)))
    env = dict(os.environ)
    env["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 "
                        "--xla_cpu_collective_timeout_seconds=20 "
                        "--xla_cpu_collective_call_terminate_timeout_seconds=20")
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True,
                          text=True, timeout=240)


def test_bounded_dispatch_never_hangs(tmp_path):
    proc = _run("bounded", 30, tmp_path)
    assert proc.returncode == 0 and "completed" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.slow
def test_unbounded_dispatch_hangs_on_fake_devices(tmp_path):
    """The failure the bound exists for (XLA 0.10's CPU client): if this starts to pass, XLA has
    changed and MAX_LAUNCHES_IN_FLIGHT may be revisited."""
    proc = _run("unbounded", 200, tmp_path)
    assert proc.returncode != 0 and "rendezvous" in proc.stderr, proc.stdout


def test_in_flight_counts_launches():
    import jax.numpy as jnp

    in_flight = parallel.InFlight(max_launches=3)
    for i in range(5):
        in_flight.add(jnp.ones(()) * i, launches=2)
        assert in_flight._count <= 3
    in_flight.wait()
    assert in_flight._count == 0 and not in_flight._pending
    with pytest.raises(ValueError, match="max_launches"):
        parallel.InFlight(0)
