"""The user axis laid over a device mesh (`run.devices`), on one host or several.

Every per-user array (the table, the top-T lists, the labels, the bricks and
the calibration state that follows them) is placed with its user axis split
over a one-axis mesh named "users". The programs are the ones a single device
runs: jit compiles them for the sharded layout (GSPMD), so results equal one
device's to float tolerance (tests/test_sharding.py). The attribute axis stays
vmapped. Arrays cross to the host only at the edges (checkpoints, the control
loop's probes), where numpy copies are device-agnostic: a state saved from a
mesh restores onto one device, and the reverse.

Several hosts (`initialize`): one process per host, started with the same
command and workdir; the mesh spans every process's devices. Each process
loads the same data and backbone, so each holds the full host arrays and
places only its own shards; host copies of sharded arrays are gathered from
all processes (`to_host`). Process 0 alone writes the workdir (`writer`).
"""

import contextlib
import os
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lego_jax.errors import LegoError

AXIS = "users"
# JAX reads the coordinator's address itself; it has no variables for the
# process count and id (it reads SLURM's or Open MPI's where those launch).
COORDINATOR = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "LEGO_NUM_PROCESSES"
PROCESS_ID = "LEGO_PROCESS_ID"


def _env_int(name: str) -> Optional[int]:
  text = os.environ.get(name)
  if text is None:
    return None
  try:
    return int(text)
  except ValueError:
    raise LegoError(f"{name}={text!r} is not a whole number") from None


def initialize() -> bool:
  """Joins a multi-process run where JAX_COORDINATOR_ADDRESS is set; a no-op otherwise.

  Call it before any JAX computation (the CLI does). Every process needs the
  coordinator's `host:port` (process 0 listens there), LEGO_NUM_PROCESSES and
  its own LEGO_PROCESS_ID (0 on the coordinator's host); under SLURM or Open
  MPI, JAX reads the last two from the launcher. Returns whether this process
  is one of several.
  """
  if jax.distributed.is_initialized():
    return processes() > 1
  address = os.environ.get(COORDINATOR)
  if not address:
    for name in (NUM_PROCESSES, PROCESS_ID):
      if name in os.environ:
        raise LegoError(f"{name} is set but {COORDINATOR} is not; set it to the host:port "
                        "of process 0 on every process")
    return False
  count, index = _env_int(NUM_PROCESSES), _env_int(PROCESS_ID)
  if count is not None and count < 1:
    raise LegoError(f"{NUM_PROCESSES}={count}: needs at least 1")
  if count is not None and index is not None and not 0 <= index < count:
    raise LegoError(f"{PROCESS_ID}={index} is not one of 0..{count - 1} "
                    f"({NUM_PROCESSES}={count})")
  # Gloo carries the collectives between CPU processes (JAX 0.10's default,
  # not older versions'); accelerators bring their own.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(address, num_processes=count, process_id=index)
  except ValueError as e:  # neither our variables nor a launcher JAX recognises
    raise LegoError(f"{COORDINATOR} is set, but {e} (set {NUM_PROCESSES} and {PROCESS_ID} "
                    "on every process)") from None
  return processes() > 1


def processes() -> int:
  """How many processes run this computation (1 without `initialize`)."""
  return jax.process_count() if jax.distributed.is_initialized() else 1


def is_writer() -> bool:
  """Whether this process writes the workdir: process 0, or the only one."""
  return processes() == 1 or jax.process_index() == 0


def sync(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing on one process)."""
  if processes() > 1:
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def writer(what: str):
  """Yields whether this process performs the write `what`; all processes call it.

  Process 0 writes while the others wait on both sides: a write never races a
  read, so every process sees the same workdir between writes and takes the
  same branches (a process that did not would leave the others at a barrier).
  """
  sync(f"lego-jax: before {what}")
  try:
    yield is_writer()
  finally:
    sync(f"lego-jax: after {what}")


def mesh(devices: int) -> Optional[Mesh]:
  """A mesh of the first `devices` devices (all processes'), or None for one device."""
  if devices <= 1:
    return None
  available = jax.devices()
  if devices > len(available):
    raise LegoError(f"run.devices = {devices}, but JAX sees {len(available)} "
                    f"{available[0].platform} device(s); on a CPU, "
                    f"XLA_FLAGS=--xla_force_host_platform_device_count={devices} makes {devices}")
  if processes() > 1 and devices != len(available):
    # A process with no device in the mesh could not place or gather its part.
    raise LegoError(f"run.devices = {devices}, but the {processes()} processes hold "
                    f"{len(available)} devices together; a multi-process run uses all of them "
                    f"(--set run.devices={len(available)})")
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
  layout = NamedSharding(where, PartitionSpec(*spec))
  if layout.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
    return jax.device_put(x, layout)
  # Across processes each holds the whole host array and places its own
  # shards; device_put would first compare the whole array between processes.
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, layout, lambda index: host[index])


def to_host(x) -> np.ndarray:
  """A numpy copy of `x`. Where `x` is split over several processes, every
  process must call this at the same point: the parts are gathered from all."""
  if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
