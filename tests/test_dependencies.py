"""Every third-party package that exrl and experiments import is a direct dependency of `pip install -e .`.

CI installs the test extra too (torch, which pulls jinja2 and more in), so a missing main-job dependency would
pass there and fail for a user; this reads the imports and checks them against pyproject's `dependencies`.
"""
import ast
import importlib.metadata as md
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCAL = {"exrl", "experiments", "tests"}
# Imported lazily by a declared dependency's feature that exrl uses: transformers' chat templates need jinja2.
REQUIRED_EXTRA = {"jinja2"}
# Benchmarks against PyTorch implementations need the test extra (torch), and say so.
OPTIONAL = {"torch", "wandb", "mlflow"}  # trackers: optional extras, imported only when asked for


def _norm(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> set[str]:
  deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
  return {_norm(re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0]) for d in deps}


def _imported_modules() -> set[str]:
  mods = set()
  for folder in ("exrl", "experiments"):
    for path in (ROOT / folder).rglob("*.py"):
      for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
          mods |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
          mods.add(node.module.split(".")[0])
  return {m for m in mods if m not in LOCAL | OPTIONAL and m not in sys.stdlib_module_names and m != "__future__"}


def test_main_job_imports_are_declared_dependencies():
  declared = _declared()
  dists = md.packages_distributions()
  missing = {}
  for mod in sorted(_imported_modules()):
    names = {_norm(d) for d in dists.get(mod, [mod])}
    if not names & declared:
      missing[mod] = sorted(names)
  assert not missing, f"imported but not in [project].dependencies: {missing}"
  assert REQUIRED_EXTRA <= declared, REQUIRED_EXTRA - declared
