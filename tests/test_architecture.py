"""The pure core imports nothing from the stateful shell."""

import ast
import pathlib

import lego_jax

ROOT = pathlib.Path(lego_jax.__file__).parent
# The core: data -> backbone -> training -> unlearning -> evaluation, pure functions.
CORE = ["data", "models", "unlearning", "evaluation", "training.py", "nn.py", "sharding.py"]
# The shell: workdirs, requests, the experiment runner, reports and the CLI.
SHELL = {"workdir", "requests", "methods", "experiment", "runner", "report", "cli", "sweep"}


def _imports(path: pathlib.Path) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out |= {f"{node.module}.{a.name}" for a in node.names}
  return out


def test_core_modules_import_nothing_from_the_shell():
  files = [p for c in CORE for p in ([ROOT / c] if c.endswith(".py") else (ROOT / c).rglob("*.py"))]
  assert len(files) > 15
  bad = {}
  for path in files:
    hits = {m for m in _imports(path)
            if m.startswith("lego_jax.") and m.split(".")[1] in SHELL}
    if hits:
      bad[str(path.relative_to(ROOT))] = sorted(hits)
  assert not bad, bad


def test_the_shell_modules_exist():
  # A renamed shell module would make the test above pass vacuously.
  assert all((ROOT / f"{m}.py").is_file() for m in SHELL)
