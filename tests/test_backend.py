"""--expect_backend: a run started for an accelerator that JAX does not get stops with one line."""
import os
import re
import subprocess
import sys

import jax
import pytest

from fape_jax import backend
from fape_jax.errors import FapeError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_any_checks_nothing_and_the_backend_we_have_passes(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: pytest.fail("any must not ask jax"))
  assert backend.check("any") is None and backend.check(None) is None
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  assert backend.check("cpu") == "cpu"


@pytest.mark.parametrize("plugins, expected", [
    ([], 'no GPU jaxlib is installed for {exe}; install it with pip install "jax[cuda12]=='),
    (["jax-cuda12-pjrt 0.10.2"], "jax-cuda12-pjrt 0.10.2 is installed but found no usable GPU"),
])
def test_a_missing_gpu_says_why_and_what_to_do(monkeypatch, plugins, expected):
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  monkeypatch.setattr(backend, "installed_plugins", lambda kind: plugins)
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  with pytest.raises(FapeError) as e:
    backend.check("gpu")
  message = str(e.value)
  assert message.startswith("--expect_backend=gpu, but JAX runs on cpu: ")
  assert expected.format(exe=sys.executable) in message
  assert "--expect_backend=any" in message and "\n" not in message


def test_jax_platforms_that_leaves_the_accelerator_out_is_named(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  with pytest.raises(FapeError, match="JAX_PLATFORMS=cpu leaves tpu out; unset it"):
    backend.check("tpu")


def test_a_backend_that_fails_to_start_is_one_line(monkeypatch):
  def fail():
    raise RuntimeError("Unable to initialize backend 'cuda': no CUDA devices\nmore detail")
  monkeypatch.setattr(jax, "default_backend", fail)
  with pytest.raises(FapeError, match=r"could not start a backend \(Unable to initialize backend "
                     r"'cuda': no CUDA devices\)\.$"):
    backend.check("gpu")


def test_installed_plugins_reads_package_metadata(tmp_path, monkeypatch):
  for dist in ("jax_cuda12_pjrt-0.10.2", "libtpu-0.0.30", "jax_cuda12_plugin-0.10.2"):
    name, version = dist.rsplit("-", 1)
    info = tmp_path / f"{dist}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  assert backend.installed_plugins("gpu") == ["jax-cuda12-pjrt 0.10.2"]
  assert backend.installed_plugins("tpu") == ["libtpu 0.0.30"]


def test_the_launchers_install_check():
  assert backend.main(["backend", "cpu"]) == 0 and backend.main(["backend", "any"]) == 0
  assert backend.main(["backend", "npu"]) == 2


def _one_error_line(stderr):
  lines = [line for line in stderr.splitlines() if not re.match(r"[IWE]\d{4} ", line)]
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
  return lines[0]


# Every entry point, with the least it needs to get to the check; JAX_PLATFORMS=cpu makes this
# machine's answer certain (a GPU machine with a CUDA jaxlib would otherwise pass).
ENTRY_POINTS = [
    ("fape_jax.train", ["--config=configs/base.py:tiny", "--workdir={tmp}/run"]),
    ("fape_jax.restore", ["--workdir={tmp}/run", "--input={tmp}/in.png", "--output={tmp}/o.png"]),
    ("fape_jax.evaluate", ["--workdir={tmp}/run", "--out={tmp}/eval"]),
    ("fape_jax.plan_cache", ["--config=configs/plan_cache.py"]),
    ("fape_jax.ablate", ["--config=configs/base.py:tiny", "--workdir={tmp}/abl"]),
    ("fape_jax.export", ["--workdir={tmp}/run", "--out={tmp}/a.safetensors"]),
]


@pytest.mark.slow
@pytest.mark.parametrize("module, args", ENTRY_POINTS, ids=[m for m, _ in ENTRY_POINTS])
def test_every_entry_point_refuses_a_missing_gpu(module, args, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", module, *[a.format(tmp=tmp_path) for a in args],
         "--expect_backend=gpu"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  line = _one_error_line(proc.stderr)
  assert line.startswith("error: --expect_backend=gpu, but JAX runs on cpu")
  assert "Traceback" not in proc.stderr
  assert os.listdir(tmp_path) == []  # nothing was started
