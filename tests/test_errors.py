"""Command-line mistakes end in one line on stderr and exit status 2, never a traceback."""
import os
import re
import subprocess
import sys

import pytest

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
