"""Writes constraints.txt: the exact versions in this venv of every package the project names.

  .venv/bin/python .ci/constraints.py > constraints.txt      (make constraints)

The names are pyproject.toml's dependencies and extras plus a few transitive packages whose version
matters as much (the jaxlib under jax, the Hugging Face libraries the MiniLM loads through);
versions come from `pip freeze` of the running interpreter's environment. A local version label
(torch's `+cpu`) is dropped: `==2.13.0` matches the CPU and the CUDA build alike. A named package
that is not installed here keeps its pin from the current constraints.txt, if it has one.
"""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRANSITIVE = ("jaxlib", "huggingface-hub", "sentence-transformers", "protobuf")


def normalize(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def named_packages() -> list[str]:
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  reqs = list(project["dependencies"])
  for extra in project["optional-dependencies"].values():
    reqs += extra
  names = {normalize(re.match(r"[A-Za-z0-9_.-]+", r).group()) for r in reqs}
  names.discard(normalize(project["name"]))  # dev's self-reference to [planner]
  return sorted(names | set(TRANSITIVE))


def current_pins() -> dict[str, str]:
  path = REPO / "constraints.txt"
  pins = {}
  for line in path.read_text().splitlines() if path.exists() else []:
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)(\s+#.*)?", line.strip())
    if m:
      pins[normalize(m.group(1))] = m.group(2)
  return pins


def main() -> int:
  previous = current_pins()
  freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], check=True,
                          capture_output=True, text=True).stdout
  installed = {}
  for line in freeze.splitlines():
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^+\s]+)(\+\S+)?", line.strip())
    if m:
      installed[normalize(m.group(1))] = m.group(2)
  print("# The versions CI tested: the venv `make test` ran in, filtered to what the project names")
  print("# (.ci/constraints.py; regenerate with `make constraints` after changing the venv).")
  print("# `make setup` installs with them; `pip install -c constraints.txt -e .[dev]` does the same.")
  missing = []
  for name in named_packages():
    if name in installed:
      print(f"{name}=={installed[name]}")
    else:
      missing.append(name)
  for name in missing:  # e.g. the [cuda] / [tpu] jaxlibs on a CPU machine
    if name in previous:
      print(f"{name}=={previous[name]}  # not installed in this venv: kept")
    else:
      print(f"# {name}: not installed here, not pinned")
  return 0


if __name__ == "__main__":
  sys.exit(main())
