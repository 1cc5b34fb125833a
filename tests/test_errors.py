"""Command-line mistakes end in one line on stderr and exit status 2, never a traceback."""
import os
import re
import subprocess
import sys

import pytest

from fape_jax import errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.parametrize("module, args, message", [
    ("fape_jax.train", ["--config=configs/base.py:tiny", "--config.totl_steps=3"],
     "'totl_steps' Did you mean \"total_steps\""),
    ("fape_jax.train", ["--config=configs/base.py:tiny", "--config.optim.g.lr=fast"],
     "--config.optim.g.lr=fast: could not convert string to float"),
    ("fape_jax.train", ["--config=configs/missing.py"], "configs/missing.py"),
    ("fape_jax.train", ["--config=configs/base.py:huge"], "Unknown config variant 'huge'"),
    ("fape_jax.plan_cache", ["--config=configs/plan_cache.py", "--config.limt=3"],
     "'limt' Did you mean \"limit\""),
    ("fape_jax.restore", ["--bogus=1"], "Unknown command line flag 'bogus'"),
])
def test_bad_flags_are_one_line_and_exit_2(module, args, message, tmp_path):
  workdir = [f"--workdir={tmp_path}"] if module != "fape_jax.plan_cache" else []
  proc = subprocess.run([sys.executable, "-m", module, *workdir, *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if not re.match(r"[IWE]\d{4} ", line)]
  assert len(lines) == 1 and lines[0].startswith("error: bad command line"), proc.stderr[-2000:]
  assert message in lines[0]
  assert "Traceback" not in proc.stderr
  assert os.listdir(tmp_path) == []  # nothing was started


def test_config_paths_fall_back_to_the_shipped_configs(tmp_path, monkeypatch):
  shipped = os.path.join(REPO, "configs", "base.py")
  args = ["prog", "--config=configs/base.py:tiny", "--config.total_steps=3", "--workdir=configs"]
  monkeypatch.chdir(REPO)  # a checkout's root: the file is where it is named, nothing changes
  assert errors.resolve_config_paths(args) == args
  monkeypatch.chdir(tmp_path)  # anywhere else (an installed package): the shipped file
  assert errors.resolve_config_paths(args) == ["prog", f"--config={shipped}:tiny", *args[2:]]
  assert errors.resolve_config_paths(["p", "--config=./configs/base.py"]) == [
      "p", f"--config={shipped}"]
  for unknown in ("--config=configs/missing.py", "--config=other/base.py"):
    assert errors.resolve_config_paths(["p", unknown]) == ["p", unknown]  # its own error later
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "base.py").write_text("")  # a local file always wins
  assert errors.resolve_config_paths(args) == args
