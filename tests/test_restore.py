"""The restore CLI and library: run loading, tiling, image formats, sidecars, path safety.

The module shares one run directory written the way training writes it (config.json + an Orbax
checkpoint of the train state) from the tiny config at initialisation, with the UNet's last conv
zeroed so the executor is exactly the identity (residual config: output = input + UNet(input)).
That makes every restored pixel predictable: tiling, padding, cropping, bit depth, gray and alpha
handling are checked for exact equality with the input instead of against a loose tolerance. No
training step is compiled here; restoring a real training checkpoint is covered in
test_ablate.py.
"""
import json
import os
import subprocess
import sys

import imagecodecs
import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import base
from fape_jax import checkpoint as ckpt_lib
from fape_jax import restore_lib
from fape_jax import sharding as shard_lib
from fape_jax import tiling
from fape_jax import model_state
from fape_jax.errors import FapeError
from fape_jax.models import adapters_io
from fape_jax.planning import hints as hints_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_identity_run(workdir, data_dir):
  """A run directory as training leaves it, holding the identity executor at step 0."""
  cfg = base.get_config("tiny")
  cfg.data.data_dir = str(data_dir)
  # Written from one device (compiling the init for 8 fake devices costs a minute on 2 cores);
  # restoring onto 8 and 2 devices below also shows a checkpoint follows the current devices.
  mesh = shard_lib.make_mesh(cfg.mesh.axes, (1, 1), jax.devices()[:1])
  # The run keeps a weight average (optim.ema_decay), which restoring reads: it holds the
  # identity (a zero last conv of the residual executor) while the raw weights do not, so every
  # identity check below also shows that restore, evaluate and the demo use the average.
  cfg.optim.ema_decay = 0.999
  state, _, _ = model_state.create_state(cfg, mesh)
  for part, value in (("params", 0.5), ("ema", 0.0)):
    flat = []
    for path, var in nnx.to_flat_state(state["gen"][part]):
      if path[:2] == ("unet", "conv_out"):
        var = var.replace(var.get_value() * 0 + value)
      flat.append((path, var))
    state["gen"][part] = nnx.from_flat_state(flat)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=1)
  ckpt.save(0, state, force=True)
  ckpt.close()
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
  return cfg


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  write_identity_run(workdir, tmp_path_factory.getbasetemp() / "tiny_data")
  return str(workdir)


@pytest.fixture(scope="module")
def restorer(run):
  # Two of the 8 fake devices: the batch is split over devices (rows padded to a multiple of 2)
  # at a fraction of the compile time of 8. Two 32-px tiles per call: the same shape as a whole
  # 32-px image padded to the 2 devices, so tiled and small images share one compilation.
  return restore_lib.load_restorer(run, devices=jax.devices()[:2], batch=2)


def photo(h, w, seed=0):
  """A smooth colour image with some texture (the planner's hints need structure)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w] / max(h, w)
  base_img = np.stack([0.5 + 0.4 * np.sin(6 * x + c) * np.cos(4 * y - c) for c in (0, 1, 2)], -1)
  return np.clip(base_img + rng.normal(0, 0.03, base_img.shape), 0, 1)


def as8(x):
  return np.round(x * 255).astype(np.uint8)


def test_config_round_trips_with_tuples(run):
  cfg = restore_lib.load_run_config(run)
  assert cfg.mesh.shape == (-1, 1) and isinstance(cfg.mesh.shape, tuple)
  assert isinstance(cfg.model.unet.down_block_types, tuple)
  assert cfg.logical_axis_rules[0] == ("conv_out", "fsdp")
  assert cfg.model.vae is None and cfg.variant == "tiny"


def test_inference_mesh_falls_back_when_the_training_mesh_does_not_fit():
  cfg = base.get_config("tiny")
  cfg.mesh.shape = (-1, 3)  # 8 devices do not divide by fsdp=3
  mesh = restore_lib.inference_mesh(cfg)
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1}
  cfg.mesh.shape = (-1, 2)
  assert dict(restore_lib.inference_mesh(cfg).shape) == {"data": 4, "fsdp": 2}


def test_loads_the_checkpoint_onto_the_current_devices(run, restorer):
  everywhere = restore_lib.load_restorer(run)  # all 8 devices; nothing is compiled here
  # 4 tiles per call by default, rounded up to a multiple of the 8 devices.
  assert everywhere.step == 0 and everywhere.dp == 8 and everywhere.batch == 8
  for r, n in ((everywhere, 8), (restorer, 2)):
    leaves = jax.tree.leaves(r.params) + jax.tree.leaves(r.frozen)
    assert all(len(x.sharding.device_set) == n for x in leaves)
  assert restorer.multiple == 2 and restorer.tile == 32 and restorer.overlap == 8
  assert restorer.batch == 2


def test_tiled_restore_equals_untiled(restorer):
  # 64 x 48 fits one 64-px tile, or 6 overlapping 32-px tiles. The executor is the identity, so
  # both must return the input itself: any misplaced, misblended or mis-cropped tile, or a padded
  # batch row leaking into the result, shows up as a difference. Tolerance 1e-6: float32 rounding
  # of the blend weights (they sum to 1 exactly only up to rounding).
  img = photo(48, 64).astype(np.float32)
  tokens, mask = restorer.encode(restorer.plan([as8(img)]))
  whole = restorer.retiled(64, 16).restore(img, tokens, mask)
  tiled = restorer.retiled(32, 8).restore(img, tokens, mask)
  assert (whole.tiles, tiled.tiles) == (1, 6)
  np.testing.assert_allclose(tiled.image, whole.image, atol=1e-6)
  np.testing.assert_allclose(whole.image, img, atol=1e-6)
  # Routing: one [w_low, w_high] per adapted layer, averaged over the tiles.
  assert whole.routing.keys() == tiled.routing.keys() and len(whole.routing) > 4
  for w in tiled.routing.values():
    assert len(w) == 2 and abs(sum(w) - 1) < 1e-5


def test_tile_count_matches_the_tiler():
  calls = []

  def fn(t):
    calls.append(len(t))
    return t

  for h, w in ((33, 70), (64, 64), (65, 65), (10, 200)):
    calls.clear()
    tiling.tiled_apply(fn, np.zeros((h, w, 3), np.float32), tile=32, overlap=8, multiple=2,
                       batch=1)
    assert restore_lib.tile_count(h, w, tile=32, overlap=8, multiple=2) == len(calls)


def save_png16(path, a):
  with open(path, "wb") as f:
    f.write(imagecodecs.png_encode(a))


@pytest.fixture(scope="module")
def restored_formats(formats, restorer, run, tmp_path_factory):
  d = formats
  out = tmp_path_factory.mktemp("restored_formats")
  report = restore_lib.restore_paths(run, str(d), str(out), restorer=restorer)
  return d, out, report


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
  """An odd-sized RGB, 8-bit gray, RGBA, 16-bit RGB and 16-bit gray PNG, and a JPEG."""
  d = tmp_path_factory.mktemp("formats")
  rng = np.random.default_rng(3)
  Image.fromarray(as8(photo(37, 53))).save(d / "odd.png")
  Image.fromarray(as8(photo(40, 36, 1)).mean(-1).astype(np.uint8)).save(d / "gray.png")
  alpha = rng.integers(0, 256, (30, 45, 1), dtype=np.uint8)
  Image.fromarray(np.concatenate([as8(photo(30, 45, 2)), alpha], -1)).save(d / "rgba.png")
  # 16-bit values with busy low bytes: an 8-bit detour anywhere would change them.
  save_png16(d / "deep.png", np.round(photo(33, 47, 4) * 65535).astype(np.uint16))
  Image.fromarray(np.round(photo(34, 34, 5)[..., 0] * 65535).astype(np.uint16)).save(
      d / "deepgray.png")
  Image.fromarray(as8(photo(40, 40, 6))).save(d / "photo.jpg", quality=95)
  return d


def test_every_format_round_trips_through_the_identity_executor(restored_formats):
  d, out, report = restored_formats
  assert report.exit_code == 0 and not report.failed and len(report.done) == 6
  # Odd size: padded to the multiple (and tiled: 53 px > the 32-px tile), cropped back exactly.
  a = np.asarray(Image.open(d / "odd.png"))
  b = np.asarray(Image.open(out / "odd.png"))
  assert b.shape == a.shape == (37, 53, 3) and np.array_equal(a, b)
  # Grayscale in, grayscale out.
  with Image.open(out / "gray.png") as im:
    assert im.mode == "L"
    assert np.array_equal(np.asarray(im), np.asarray(Image.open(d / "gray.png")))
  # RGBA: colour restored, alpha untouched.
  with Image.open(out / "rgba.png") as im:
    assert im.mode == "RGBA"
    assert np.array_equal(np.asarray(im), np.asarray(Image.open(d / "rgba.png")))
  # 16-bit colour and gray PNGs stay 16-bit, every bit kept.
  for name in ("deep.png", "deepgray.png"):
    src = imagecodecs.png_decode((d / name).read_bytes())
    got = imagecodecs.png_decode((out / name).read_bytes())
    assert got.dtype == np.uint16 and got.shape == src.shape
    assert np.array_equal(got, src), name
  # JPEG: written as JPEG, same size, equal up to JPEG's own loss.
  a = np.asarray(Image.open(d / "photo.jpg"), np.float64)
  b = np.asarray(Image.open(out / "photo.jpg"), np.float64)
  assert a.shape == b.shape and np.abs(a - b).mean() < 2.0


def test_sidecar_schema(restored_formats, restorer):
  _, out, _ = restored_formats
  side = json.loads((out / "odd.json").read_text())
  assert set(side) == {"plan", "routing", "hints", "meta"}
  plan = side["plan"]
  assert set(plan) == {"task", "focus", "rationale", "pipeline", "raw"}
  assert plan["focus"] in ("low", "high") and isinstance(plan["pipeline"], list)
  assert plan["raw"] and plan["raw"][0].startswith(f"Task: {plan['task']}")
  assert set(side["hints"]) == {f.name for f in hints_lib.Hints.__dataclass_fields__.values()}
  assert side["hints"]["width"] == 53 and side["hints"]["height"] == 37
  layers = side["routing"]
  assert len(layers) > 4 and all("attn" in k for k in layers)
  assert all(len(w) == 2 and abs(sum(w) - 1) < 1e-4 for w in layers.values())
  assert side["meta"]["size"] == [53, 37] and side["meta"]["tiles"] == 4
  assert side["meta"]["checkpoint_step"] == 0


def test_manual_plan_is_parsed_strictly(restorer, formats, tmp_path):
  d = formats
  text = ("Task: dehazing, Focus: low, Rationale: grey veil, "
          "Pipeline: estimate airlight -> restore contrast.")
  out = tmp_path / "one.png"
  report = restore_lib.restore_paths(None, str(d / "odd.png"), str(out), plan=text,
                                     restorer=restorer)
  assert report.exit_code == 0
  side = json.loads((tmp_path / "one.json").read_text())
  assert side["plan"]["task"] == "dehazing" and side["plan"]["raw"] == [text]
  assert side["plan"]["pipeline"] == ["estimate airlight", "restore contrast"]
  assert side["meta"]["planner"] == "manual"
  for bad, why in (("Task: dehazing, Focus: high, Rationale: x, Pipeline: a.", "contradicts"),
                   ("Task: unblur, Focus: high, Rationale: x, Pipeline: a.", "unknown task"),
                   ("dehaze it please", "no line starts")):
    with pytest.raises(FapeError, match=why):
      restore_lib.restore_paths(None, str(d / "odd.png"), str(tmp_path / "bad.png"), plan=bad,
                                restorer=restorer)
  assert not (tmp_path / "bad.png").exists()


def test_inputs_are_never_overwritten(formats, restorer, tmp_path):
  d = formats
  with pytest.raises(FapeError, match="input folder"):
    restore_lib.plan_jobs(str(d), str(d))
  with pytest.raises(FapeError, match="input folder"):
    restore_lib.plan_jobs(str(d), str(d) + "/")
  with pytest.raises(FapeError, match="overwrite input"):
    restore_lib.plan_jobs(str(d / "odd.png"), str(d / "odd.png"), overwrite=True)
  # The same file or folder under another name is still the input.
  with pytest.raises(FapeError, match="overwrite input"):
    restore_lib.plan_jobs(str(d / "odd.png"), f"{d}/../{d.name}/./odd.png", overwrite=True)
  (tmp_path / "alias").symlink_to(d)
  with pytest.raises(FapeError, match="input folder"):
    restore_lib.plan_jobs(str(d), str(tmp_path / "alias"), overwrite=True)
  # Existing outputs: refused unless --overwrite, before any work.
  out = tmp_path / "x.png"
  out.write_bytes(b"old")
  with pytest.raises(FapeError, match="--overwrite"):
    restore_lib.restore_paths(None, str(d / "odd.png"), str(out), restorer=restorer)
  assert out.read_bytes() == b"old"
  report = restore_lib.restore_paths(None, str(d / "odd.png"), str(out), restorer=restorer,
                                     overwrite=True)
  assert report.exit_code == 0 and Image.open(out).size == (53, 37)


def test_bad_paths_and_formats_are_clear(formats, restorer, run, tmp_path):
  d = formats
  with pytest.raises(FapeError, match="does not exist"):
    restore_lib.plan_jobs(str(tmp_path / "nope.png"), str(tmp_path / "o.png"))
  with pytest.raises(FapeError, match="not an image format"):
    restore_lib.plan_jobs(str(d / "odd.png"), str(tmp_path / "o.txt"))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FapeError, match="no image files"):
    restore_lib.plan_jobs(str(empty), str(tmp_path / "o"))
  with pytest.raises(FapeError, match="No checkpoint for step 7"):
    restore_lib.load_restorer(run, step=7)
  with pytest.raises(FapeError, match="No config.json"):
    restore_lib.load_restorer(str(tmp_path))
  # A 16-bit input written as JPEG would silently lose 8 bits: refused, the rest goes on.
  report = restore_lib.restore_paths(None, str(d / "deep.png"), str(tmp_path / "deep.jpg"),
                                     restorer=restorer)
  assert report.exit_code == 1 and "16-bit" in report.failed[str(d / "deep.png")]


@pytest.mark.slow
def test_cli_restores_a_folder_with_a_corrupt_file(formats, run, tmp_path):
  d = formats
  src = tmp_path / "in"
  src.mkdir()
  for name in ("odd.png", "gray.png"):
    (src / name).write_bytes((d / name).read_bytes())
  (src / "broken.png").write_bytes((d / "odd.png").read_bytes()[:200])  # truncated
  out = tmp_path / "out"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, like a laptop
  cmd = [sys.executable, "-m", "fape_jax.restore", f"--workdir={run}", f"--input={src}",
         f"--output={out}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert "broken.png" in proc.stderr and "1 of 3 image(s) failed" in proc.stderr
  assert sorted(os.listdir(out)) == ["gray.json", "gray.png", "odd.json", "odd.png"]
  assert np.array_equal(np.asarray(Image.open(out / "odd.png")),
                        np.asarray(Image.open(src / "odd.png")))
  # Output == input is a usage error (exit 2) and touches nothing.
  proc = subprocess.run(cmd[:-1] + [f"--output={src}"], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2 and "overwrite the inputs" in proc.stderr
  assert sorted(os.listdir(src)) == ["broken.png", "gray.png", "odd.png"]


@pytest.mark.slow
def test_export_cli_writes_adapters_that_load_into_the_runs_executor(run, tmp_path):
  out = tmp_path / "adapters.safetensors"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, like a laptop
  cmd = [sys.executable, "-m", "fape_jax.export", f"--workdir={run}", f"--out={out}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert f"exported step 0 of {run}: {out} and {tmp_path / 'adapters.json'}" in proc.stdout
  assert sorted(os.listdir(tmp_path)) == ["adapters.json", "adapters.safetensors"]
  config = restore_lib.load_run_config(run)
  fresh = model_state.build_generator(config, nnx.Rngs(1))
  adapters_io.load_adapters(fresh, out)  # every name, shape and the adapter config agree
  assert adapters_io.read_adapter_config(out)["format"] == adapters_io.FORMAT
  # Usage errors: one line, exit 2, nothing written (they come before the checkpoint is read).
  for args, message in [([f"--out={out}"], "already exist(s); pass --overwrite"),
                        ([f"--out={tmp_path / 'a.bin'}"], "must end in .safetensors"),
                        ([f"--out={run}/config.safetensors"], "over the run's own")]:
    proc = subprocess.run(cmd[:-1] + args, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
  assert sorted(os.listdir(tmp_path)) == ["adapters.json", "adapters.safetensors"]


def test_folder_restore_draws_a_progress_bar_on_stderr(formats, restorer, tmp_path, capfd):
  src = tmp_path / "in"
  src.mkdir()
  for name in ("odd.png", "gray.png"):
    (src / name).write_bytes((formats / name).read_bytes())
  report = restore_lib.restore_paths(None, str(src), str(tmp_path / "out"), restorer=restorer)
  assert report.exit_code == 0
  out, err = capfd.readouterr()
  assert "restore: 100%" in err and "2/2" in err  # tqdm's bar, with its count
  assert "restore:" not in out and out.count(" -> ") == 2  # stdout keeps its lines only
