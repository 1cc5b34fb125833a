"""The dry run prints the memory table for the SD-2.1-scale config on a named mesh.

`python -m fape_jax.train --config=configs/base.py:sd21 --dry_run` on the 8 fake devices as a
1 x 8 (data x fsdp) mesh builds the whole train state and the backward passes abstractly (no
weights, nothing compiled) and prints per-device bytes. The numbers are checked against what they
must be: the SD-2.1 UNet and VAE parameter counts (diffusers'), fsdp-sharded frozen weights at
1/8 of their bytes per device, replicated adapters and optimiser state, and activations that
remat cuts by a large factor.
"""
import os
import re
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # subprocess runs: `make test`, not `make test-fast`

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30
# diffusers' stabilityai/stable-diffusion-2-1: UNet2DConditionModel 865,910,724 parameters,
# AutoencoderKL 83,653,863.
SD21_UNET_VAE = 865_910_724 + 83_653_863


@pytest.fixture(scope="module")
def dry_run():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  # With a weight average (optim.ema_decay), so the table shows its row too.
  cmd = [sys.executable, "-m", "fape_jax.train", "--config=configs/base.py:sd21", "--dry_run",
         "--config.mesh.shape=(-1,8)", "--config.optim.ema_decay=0.9999"]
  start = time.monotonic()
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  elapsed = time.monotonic() - start
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, elapsed


def parse(stdout: str) -> tuple[str, dict]:
  """(header line, {row name: (elements or None, GiB/device)})."""
  lines = stdout.splitlines()
  header = next(line for line in lines if line.startswith("dry run:"))
  rows = {}
  for line in lines[lines.index(header) + 1:]:
    m = re.match(r"^(\S.*?|  => .*?)\s{2,}(?:([\d,]+)\s+)?([\d.]+)$", line)
    if m:
      rows[m.group(1).strip()] = (int(m.group(2).replace(",", "")) if m.group(2) else None,
                                  float(m.group(3)))
  return header, rows


def test_table_is_printed_for_the_named_mesh(dry_run):
  stdout, elapsed = dry_run
  header, rows = parse(stdout)
  assert "config sd21" in header
  assert "mesh {'data': 1, 'fsdp': 8} (8 devices)" in header
  assert "global batch 8 (1/device)" in header and "512x512 px" in header
  assert "compute bfloat16" in header
  assert set(rows) >= {
      "generator trainable params", "generator frozen params", "generator optimiser state",
      "generator weight average (EMA)", "discriminator params + state",
      "discriminator optimiser state", "params + optimiser (total)", "activations, discriminator update",
      "activations, remat off", "=> estimated peak, remat off",
      "activations, remat on", "=> estimated peak, remat on"}, stdout
  assert "not counted" in stdout  # says what the estimate leaves out
  # It used to take 4-8 minutes (the model traced 3 times, quadratically); now well under one.
  # Generous for a loaded 2-core CI machine.
  assert elapsed < 240, f"dry run took {elapsed:.0f} s"


def test_parameter_and_optimiser_bytes_follow_the_shardings(dry_run):
  _, rows = parse(dry_run[0])
  trainable, trainable_gib = rows["generator trainable params"]
  frozen, frozen_gib = rows["generator frozen params"]
  opt, opt_gib = rows["generator optimiser state"]
  # The frozen base is exactly SD-2.1's UNet + VAE.
  assert frozen == SD21_UNET_VAE
  # float32 and split 8 ways over fsdp; a few vectors that do not divide stay whole.
  assert frozen * 4 / 8 / GIB <= frozen_gib <= frozen * 4 / 8 / GIB * 1.02
  # Adapters, routers and projector: a few million, replicated (whole on every device).
  assert 1e6 < trainable < 0.02 * frozen
  assert trainable_gib == pytest.approx(trainable * 4 / GIB, abs=1e-3)
  # Prodigy keeps ~4 float32 copies of the trainable parameters, replicated like them.
  assert 3.9 * trainable < opt < 4.1 * trainable
  assert opt_gib == pytest.approx(opt * 4 / GIB, abs=1e-3)
  # The weight average is one more copy of the trainable weights, sharded like them.
  assert rows["generator weight average (EMA)"] == (trainable, trainable_gib)
  static = sum(rows[k][1] for k in ("generator trainable params", "generator frozen params",
                                    "generator optimiser state", "generator weight average (EMA)",
                                    "discriminator params + state",
                                    "discriminator optimiser state"))
  assert rows["params + optimiser (total)"][1] == pytest.approx(static, abs=2e-3)
  assert 0.4 < static < 1.0


def test_activations_and_peaks(dry_run):
  _, rows = parse(dry_run[0])
  off = rows["activations, remat off"][1]
  on = rows["activations, remat on"][1]
  disc = rows["activations, discriminator update"][1]
  static = rows["params + optimiser (total)"][1]
  # One 512^2 example through the SD-2.1 UNet + VAE at bf16 keeps >10 GiB without remat;
  # per-block remat keeps the block inputs only.
  assert 8 < off < 30 and 0.5 < on < 4 and off > 5 * on
  assert 0 < disc < on
  for remat, act in (("off", off), ("on", on)):
    assert rows[f"=> estimated peak, remat {remat}"][1] == pytest.approx(
        static + max(act, disc), abs=2e-3)
