"""The user axis over 8 simulated CPU devices (lego_jax.sharding) gives one device's results."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from lego_jax.errors import LegoError
from lego_jax.sharding import mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Runs in a fresh process: the device count is fixed when JAX starts.
SCRIPT = """
import json, shutil, sys
import jax, numpy as np
sys.path.insert(0, {root!r})
from tests.conftest import tiny_config
from lego_jax.requests import Unlearner
from lego_jax.workdir import Workdir

base = Workdir.create({path!r} + "/one", tiny_config("unlearn.control=none"))
base.train(progress=False)
shutil.copytree({path!r} + "/one", {path!r} + "/eight")
out = {{"devices": len(jax.devices())}}
for name, devices in (("one", 1), ("eight", 8)):
  wd = Workdir.open({path!r} + "/" + name, ["run.devices=%d" % devices])
  u = Unlearner(wd, progress=False)
  table = u.unlearn(["gender", "age"])
  out[name] = {{"table": np.asarray(table).tolist(),
                "bricks": np.asarray(u.table("brick:gender")).tolist(),
                "layout": str(u.target().e0.sharding),
                "eval": {{k: float(v) for k, v in wd.evaluate(table).items() if "@" in k}}}}
from lego_jax import sharding
from lego_jax.errors import LegoError
try:
  sharding.over_users(np.ones((243, 2)), sharding.mesh(8))
except LegoError as e:
  out["uneven"] = str(e)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_calibration_combination_and_evaluation_on_8_devices_equal_one(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  run = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT), path=str(tmp_path))],
                       capture_output=True, text=True, env=env, cwd=ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
  out = json.loads(run.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  import numpy as np
  assert "'users': 8" in out["eight"]["layout"] and "users" not in out["one"]["layout"]
  np.testing.assert_allclose(out["eight"]["bricks"], out["one"]["bricks"], atol=1e-5)
  np.testing.assert_allclose(out["eight"]["table"], out["one"]["table"], atol=1e-5)
  assert out["eight"]["eval"].keys() == out["one"]["eval"].keys()
  for k, v in out["one"]["eval"].items():
    assert abs(out["eight"]["eval"][k] - v) < 1e-6, k
  assert np.abs(np.asarray(out["one"]["bricks"])).max() > 0
  assert out["uneven"] == ("243 users do not split evenly over run.devices = 8 devices; "
                           "counts up to 8 that divide them: 1, 3")


def test_more_devices_than_jax_sees_are_refused():
  with pytest.raises(LegoError, match="xla_force_host_platform_device_count=4096"):
    mesh(4096)
  assert mesh(1) is None
