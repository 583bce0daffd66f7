"""Two processes on localhost, 4 CPU devices each, run `lego-jax unlearn` as one
8-device mesh (docs/scaling.md, "Several hosts") and match one process."""

import json
import os
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from lego_jax import sharding
from lego_jax.errors import LegoError
from lego_jax.requests import Unlearner
from lego_jax.runner import evaluate_workdir
from lego_jax.workdir import Workdir
from tests.test_sharding import ROOT


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(*argv) -> list[str]:
  """`lego-jax ARGV` as two processes of 4 CPU devices on localhost; their stdouts."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
             JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", LEGO_NUM_PROCESSES="2")
  procs = [subprocess.Popen([sys.executable, "-m", "lego_jax.cli", *argv],
                            env={**env, "LEGO_PROCESS_ID": str(i)}, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
           for i in range(2)]
  try:   # a hang (a process left at a barrier) fails here rather than blocking the suite
    outs = [p.communicate(timeout=600) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for i, (p, (_, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i}:\n{err[-3000:]}"
  return [out for out, _ in outs]


@pytest.mark.slow
def test_two_processes_of_4_devices_give_one_process_results(fresh_workdir, tmp_path):
  multi = tmp_path / "multi"
  shutil.copytree(fresh_workdir, multi)
  _launch("unlearn", "--workdir", str(multi), "--set", "run.devices=8",
          "--set", "unlearn.control=none", "--attributes", "gender,age")
  evaluated = [json.loads(out.strip().splitlines()[-1])
               for out in _launch("evaluate", "--workdir", str(multi), "--json")]

  one = Workdir.open(fresh_workdir, ["unlearn.control=none"])
  u = Unlearner(one, progress=False)
  table = u.unlearn(["gender", "age"])
  got = Unlearner(Workdir.open(multi), progress=False)
  assert Workdir.open(multi).config["run"]["devices"] == 8
  np.testing.assert_allclose(got.table("combined"), table, atol=1e-5)
  np.testing.assert_allclose(got.table("brick:gender"), u.table("brick:gender"), atol=1e-5)
  assert np.abs(got.table("brick:gender") - got.table("original")).max() > 0
  want = evaluate_workdir(one)
  for out in evaluated:   # both processes print the same metrics, one process's
    assert out.keys() == want.keys()
    for stage, metrics in want.items():
      for k, v in metrics.items():
        assert abs(out[stage][k] - v) < 1e-6, (stage, k)
  # Process 0 alone wrote: no temporary folder or file of a second writer left
  assert not list(multi.rglob(".*tmp*"))


def test_initialize_without_the_variables_does_nothing(monkeypatch):
  for name in (sharding.COORDINATOR, sharding.NUM_PROCESSES, sharding.PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  assert sharding.initialize() is False
  assert not jax.distributed.is_initialized()
  assert sharding.processes() == 1 and sharding.is_writer()
  with sharding.writer("nothing") as writes:
    assert writes


@pytest.mark.parametrize("env,message", [
    ({"LEGO_PROCESS_ID": "1"}, "LEGO_PROCESS_ID is set but JAX_COORDINATOR_ADDRESS is not"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "LEGO_NUM_PROCESSES": "two"},
     "LEGO_NUM_PROCESSES='two' is not a whole number"),
    ({"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "LEGO_NUM_PROCESSES": "2", "LEGO_PROCESS_ID": "2"},
     r"LEGO_PROCESS_ID=2 is not one of 0..1"),
])
def test_launch_mistakes_are_named(monkeypatch, env, message):
  for name in (sharding.COORDINATOR, sharding.NUM_PROCESSES, sharding.PROCESS_ID):
    monkeypatch.delenv(name, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(LegoError, match=message):
    sharding.initialize()
  assert not jax.distributed.is_initialized()


def test_to_host_on_one_process():
  x = np.arange(12.0).reshape(6, 2)
  assert sharding.to_host(x) is not None
  np.testing.assert_array_equal(sharding.to_host(jax.numpy.asarray(x)), x)
  np.testing.assert_array_equal(sharding.to_host(sharding.over_users(x, None)), x)
