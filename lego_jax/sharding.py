"""The user axis laid over a device mesh (`run.devices`).

Every per-user array (the table, the top-T lists, the labels, the bricks and
the calibration state that follows them) is placed with its user axis split
over a one-axis mesh named "users". The programs are the ones a single device
runs: jit compiles them for the sharded layout (GSPMD), so results equal one
device's to float tolerance (tests/test_sharding.py). The attribute axis stays
vmapped. Arrays cross to the host only at the edges (checkpoints, the control
loop's probes), where numpy copies are device-agnostic: a state saved from a
mesh restores onto one device, and the reverse.
"""

from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lego_jax.errors import LegoError

AXIS = "users"


def mesh(devices: int) -> Optional[Mesh]:
  """A mesh of the first `devices` devices, or None for one device."""
  if devices <= 1:
    return None
  available = jax.devices()
  if devices > len(available):
    raise LegoError(f"run.devices = {devices}, but JAX sees {len(available)} "
                    f"{available[0].platform} device(s); on a CPU, "
                    f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} makes {devices}")
  return Mesh(np.asarray(available[:devices]), (AXIS,))


def over_users(x, where: Optional[Mesh], axis: int = 0):
  """`x` with axis `axis` (its users) split over the mesh; unchanged without one."""
  if where is None:
    return x
  n = x.shape[axis]
  if n % where.size:
    fits = [d for d in range(1, where.size + 1) if n % d == 0]
    raise LegoError(f"{n} users do not split evenly over run.devices = {where.size} devices; "
                    f"counts up to {where.size} that divide them: {', '.join(map(str, fits))}")
  spec = [None] * x.ndim
  spec[axis] = AXIS
  return jax.device_put(x, NamedSharding(where, PartitionSpec(*spec)))
