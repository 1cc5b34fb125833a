"""A checkpoint written on an 8-device mesh restores on 1 device and on a 2x2 mesh.

The module trains the tiny config in pretrained mode (frozen base UNet, trainable adapters, as
the SD-2.1-scale config) for 2 steps on the 8 fake devices as a 2 x 4 (data x fsdp) mesh, so the
UNet's kernels are really split over fsdp in the checkpoint. Then, in fresh processes with 1 and 4
fake devices (what a user with one GPU or another cluster has), it

- restores the checkpoint with the abstract state of the *current* mesh (Orbax reshards to those
  shardings): every array equals the saved one bit for bit and carries the target sharding;
- (2 x 2) resumes training from it (`train_and_evaluate`, data iterator included) for one step;
- (1 device) restores the run for inference and reproduces the 8-device run's own validation
  PSNRs, exports the adapters and loads them back into a fresh executor, and runs the `restore`
  CLI on an image.

The children are this file run as a script (`python tests/test_reshard.py CHILD_ARGS_JSON`); they
print one `RESULT {json}` line that the tests read.
"""
import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from configs import base  # noqa: E402
from fape_jax import checkpoint as ckpt_lib  # noqa: E402
from fape_jax import restore_lib  # noqa: E402
from fape_jax import run_log  # noqa: E402
from fape_jax import sharding as shard_lib  # noqa: E402
from fape_jax import model_state  # noqa: E402
from fape_jax import train_lib  # noqa: E402
from fape_jax.models.paths import path_str  # noqa: E402

pytestmark = pytest.mark.slow  # subprocess runs: `make test`, not `make test-fast`

# A conv kernel of the frozen base UNet with 16 output channels: split over fsdp on the 2 x 4 mesh
# (16 % 4 == 0) and on the 2 x 2 mesh.
CONV = ("gen", "frozen", "unet", "conv_in", "kernel")


# ----------------------------------------------------------------------------------------------
# Shared by the test process and the children
# ----------------------------------------------------------------------------------------------

def _key(path) -> str:
  return jax.tree_util.keystr(path)


def _flat(tree) -> dict:
  """{keystr: leaf} of a state tree (nnx States flatten to their arrays)."""
  return {_key(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _conv_key() -> str:
  return "".join(f"[{k!r}]" for k in CONV) + ".value"


def restore_on(workdir: str, mesh):
  """(step, state, target, Models) restored from `workdir` with the shardings of `mesh`."""
  config = restore_lib.load_run_config(workdir)
  abstract, models = model_state.abstract_state(config)
  shardings = model_state.state_shardings(abstract, mesh, config)
  # As training and restore_lib build it: the checkpoint view's tree with the mesh's shardings.
  target = model_state.restore_target(abstract, shardings, config)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1, keep=10,
                               read_only=True)
  try:
    step, state = ckpt.restore(target)
  finally:
    ckpt.close()
  return step, state, target, models


# ----------------------------------------------------------------------------------------------
# The children (fresh processes with 1 or 4 fake devices)
# ----------------------------------------------------------------------------------------------

def child(args: dict) -> dict:
  """Restores `args['workdir']` on this process's devices, compares, resumes; returns a summary."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from fape_jax.models import adapters_io, lora_moe  # pylint: disable=g-import-not-at-top
  out = {"devices": jax.device_count()}
  workdir = args["workdir"]
  config = restore_lib.load_run_config(workdir)
  config.mesh.shape = tuple(args["mesh"])
  mesh = shard_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  out["mesh"] = dict(mesh.shape)

  t = time.time()
  step, state, target, models = restore_on(workdir, mesh)
  out["restore_s"] = time.time() - t
  out["step"] = step
  with open(args["reference"], "rb") as f:
    ref = pickle.load(f)
  got, want_sh = _flat(state), _flat(target)
  out["keys_equal"] = sorted(got) == sorted(ref)
  out["not_bit_equal"] = [k for k, x in got.items()
                          if k in ref and not (np.asarray(x).dtype == ref[k].dtype
                                               and np.array_equal(np.asarray(x), ref[k]))]
  out["wrong_sharding"] = [k for k, x in got.items()
                           if not x.sharding.is_equivalent_to(want_sh[k].sharding, x.ndim)]
  out["devices_per_array"] = sorted({len(x.sharding.device_set) for x in got.values()})
  conv = got[_conv_key()]
  out["conv_spec"] = list(conv.sharding.spec)
  out["conv_shard_shape"] = list(conv.sharding.shard_shape(conv.shape))
  out["n_arrays"] = len(got)

  if args.get("validate"):
    # Inference on this mesh computes what the 8-device run computed: its validation PSNRs.
    from fape_jax import evaluate_lib  # pylint: disable=g-import-not-at-top
    restorer = restore_lib.load_restorer(workdir)
    out["restorer_dp"] = restorer.dp
    out["validation"] = evaluate_lib.validation_psnr(workdir, limit=args["validate"],
                                                     restorer=restorer)

  if args.get("export"):
    # Adapter export from the 8-device checkpoint on this process's devices, then loaded back
    # into an executor of the run's config whose adapters were blanked: the same names, values
    # and config. (Blanking the restored executor's adapters instead of building a fresh one
    # saves an eager init.)
    path = os.path.join(args["export"], "adapters.safetensors")
    out["export_step"] = restore_lib.export_adapters(workdir, path)
    saved = adapters_io.read_adapters(path)
    restored = {path_str(p): np.asarray(v.get_value())
                for p, v in nnx.to_flat_state(state["gen"]["params"])
                if isinstance(v, lora_moe.AdapterParam)}
    fresh = nnx.merge(models.gen_def, state["gen"]["params"], state["gen"]["frozen"])
    blank = [(p, v.replace(jax.numpy.zeros_like(v.get_value())))
             for p, v in nnx.to_flat_state(nnx.state(fresh, lora_moe.AdapterParam))]
    nnx.update(fresh, nnx.from_flat_state(blank))
    before = adapters_io.adapter_arrays(fresh)
    adapters_io.load_adapters(fresh, path)  # checks the JSON's config against the executor's
    loaded = adapters_io.adapter_arrays(fresh)
    out["n_adapters"] = len(saved)
    out["export_names_equal"] = sorted(saved) == sorted(restored) == sorted(loaded)
    out["export_values_equal"] = all(
        np.array_equal(saved[k], restored[k]) and np.array_equal(loaded[k], restored[k])
        for k in saved)
    out["fresh_differed"] = any(not np.array_equal(before[k], restored[k]) for k in restored)

  if args.get("resume"):
    # Training resumes from the 8-device checkpoint on this mesh and runs one more step.
    with config.unlocked():
      config.total_steps = step + 1
      config.eval_every = 10_000
      config.num_eval_images = 4
      config.num_sample_images = 1
    t = time.time()
    train_lib.train_and_evaluate(config, workdir)
    out["resume_s"] = time.time() - t
    lines = [r for r in run_log.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
             if r["split"] == "train"]
    out["resumed_steps"] = [r["step"] for r in lines]
    out["resumed_loss"] = lines[-1]["loss"]
    out["checkpoints"] = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                               save_every=1, keep=10,
                                               read_only=True).all_steps()
  return out


def run_child(args: dict, devices: int, log_prefix: str) -> tuple:
  """Starts a child with `devices` fake CPU devices; its output goes to files (no pipe to fill)."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  out, err = open(log_prefix + ".out", "w"), open(log_prefix + ".err", "w")
  proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), json.dumps(args)],
                          cwd=REPO, env=env, stdout=out, stderr=err)
  return proc, log_prefix


def child_result(child_proc: tuple, timeout: int = 600) -> dict:
  proc, prefix = child_proc
  proc.wait(timeout=timeout)
  out, err = (open(prefix + s).read() for s in (".out", ".err"))
  assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{err[-4000:]}"
  lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
  assert lines, f"no RESULT line:\n{out[-2000:]}\n{err[-2000:]}"
  return json.loads(lines[-1][len("RESULT "):])


# ----------------------------------------------------------------------------------------------
# The tests
# ----------------------------------------------------------------------------------------------

def tiny_config(data_dir):
  c = base.get_config("tiny")
  c.data.data_dir = str(data_dir)
  c.data.batch_size = 8
  c.data.eval_batch_size = 8
  c.mesh.shape = (2, 4)  # data x fsdp over the 8 fake devices
  # Pretrained mode, as the SD-2.1-scale config: a frozen base sharded over fsdp, replicated
  # adapters; the base is saved with them (no init_from). It also compiles a third faster.
  c.train_base_unet = False
  c.allow_random_base = True     # no pretrained weights in tests
  c.model.residual = False
  c.total_steps = 2
  c.ckpt_every = 2
  c.log_every = 1
  c.num_eval_images = 8
  c.num_sample_images = 1
  return c


@pytest.fixture(scope="module")
def run8(tmp_path_factory):
  """The 8-device run, its checkpoint read back on the writing mesh, and the children started."""
  assert jax.device_count() == 8
  data_dir = tmp_path_factory.mktemp("data")
  workdir = str(tmp_path_factory.mktemp("run8"))
  config = tiny_config(data_dir)
  train_lib.train_and_evaluate(config, workdir)

  # The checkpoint as written: read back on the 2 x 4 mesh it was written from.
  mesh = shard_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  step, state, _, _ = restore_on(workdir, mesh)
  ref = {k: np.asarray(jax.device_get(x)) for k, x in _flat(state).items()}
  reference = os.path.join(workdir, "reference.pkl")
  with open(reference, "wb") as f:
    pickle.dump(ref, f)
  conv = _flat(state)[_conv_key()]

  # Each child works on its own copy (resuming writes checkpoints and logs). Two processes at a
  # time on this 2-core machine: the 2 x 2 restore + resume alongside the single-CPU restore +
  # adapter export, then alongside the restore CLI.
  root = str(tmp_path_factory.mktemp("children"))
  copies = {}
  for name in ("one", "two_by_two"):
    copies[name] = os.path.join(root, name)
    shutil.copytree(workdir, copies[name])
  export_dir = os.path.join(root, "export")
  procs = {
      "two_by_two": run_child({"workdir": copies["two_by_two"], "reference": reference,
                               "mesh": [2, 2], "resume": True}, devices=4,
                              log_prefix=os.path.join(root, "two_by_two")),
      "one": run_child({"workdir": copies["one"], "reference": reference, "mesh": [1, 1],
                        "export": export_dir, "validate": config.num_eval_images},
                       devices=1, log_prefix=os.path.join(root, "one")),
  }
  yield {"workdir": workdir, "step": step, "conv_spec": conv.sharding.spec,
         "conv_devices": len(conv.sharding.device_set), "ref": ref, "procs": procs,
         "results": {}, "export_dir": export_dir}
  for proc, _ in procs.values():  # a failed test must not leave a child running
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def result(run8, name):
  if name not in run8["results"]:
    run8["results"][name] = child_result(run8["procs"][name])
  return run8["results"][name]


def check_restored(run8, r):
  assert r["step"] == 2
  assert r["keys_equal"] and r["n_arrays"] == len(run8["ref"])
  assert not r["not_bit_equal"], r["not_bit_equal"][:5]
  assert not r["wrong_sharding"], r["wrong_sharding"][:5]


def test_checkpoint_is_written_sharded_over_fsdp(run8):
  assert run8["step"] == 2
  assert run8["conv_spec"] == P(None, None, None, "fsdp") and run8["conv_devices"] == 8
  keys = set(run8["ref"])
  assert "['step']" in keys  # with the parameters and optimiser states
  assert int(run8["ref"]["['step']"]) == 2


def test_restores_on_one_cpu_bit_exact(run8):
  r = result(run8, "one")
  assert r["devices"] == 1 and r["mesh"] == {"data": 1, "fsdp": 1}
  check_restored(run8, r)
  # Everything whole on the one CPU.
  assert r["devices_per_array"] == [1] and r["conv_spec"] == []
  assert r["conv_shard_shape"] == list(run8["ref"][_conv_key()].shape)


def test_inference_on_one_cpu_reproduces_the_8_device_validation(run8):
  r = result(run8, "one")
  assert r["restorer_dp"] == 1
  trained = json.loads(open(os.path.join(run8["workdir"], "validation.json")).read())
  assert trained["step"] == 2
  assert r["validation"].keys() == trained["tasks"].keys() and r["validation"]
  for task, row in r["validation"].items():
    assert row["n"] == trained["tasks"][task]["n"]
    assert row["restored_psnr"] == pytest.approx(trained["tasks"][task]["restored_psnr"],
                                                 abs=1e-3), task


def test_adapter_export_on_one_cpu_loads_back(run8):
  r = result(run8, "one")
  assert r["export_step"] == 2 and r["n_adapters"] > 10
  assert r["export_names_equal"] and r["export_values_equal"]
  assert r["fresh_differed"]  # loading really replaced the blanked values
  assert os.path.isfile(os.path.join(run8["export_dir"], "adapters.json"))


def test_restore_cli_on_one_cpu(run8, tmp_path):
  result(run8, "one")  # runs beside the 2 x 2 child once the single-CPU one is done
  rng = np.random.default_rng(0)
  y, x = np.mgrid[0:40, 0:52] / 52.0
  img = np.stack([0.5 + 0.3 * np.sin(5 * x + c) * np.cos(3 * y) for c in range(3)], -1)
  img = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1)
  src = tmp_path / "photo.png"
  Image.fromarray(np.round(img * 255).astype(np.uint8)).save(src)
  out = tmp_path / "out" / "photo.png"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  cmd = [sys.executable, "-m", "fape_jax.restore", f"--workdir={run8['workdir']}",
         f"--input={src}", f"--output={out}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "does not fit the 1 device(s)" in proc.stderr  # the run's 2 x 4 mesh, refitted
  restored = np.asarray(Image.open(out))
  assert restored.shape == (40, 52, 3) and restored.dtype == np.uint8
  assert len(np.unique(restored)) > 16  # an image, not a constant
  sidecar = json.loads((tmp_path / "out" / "photo.json").read_text())
  assert sidecar["meta"]["checkpoint_step"] == 2 and sidecar["meta"]["size"] == [52, 40]
  assert sidecar["routing"] and all(abs(sum(w) - 1) < 1e-4 for w in sidecar["routing"].values())


def test_restores_on_a_2x2_mesh_bit_exact_and_resharded(run8):
  r = result(run8, "two_by_two")
  assert r["devices"] == 4 and r["mesh"] == {"data": 2, "fsdp": 2}
  check_restored(run8, r)
  # Resharded: the conv kernel's 16 output channels now over fsdp=2 (they were over fsdp=4).
  full = run8["ref"][_conv_key()].shape
  assert r["conv_spec"] == [None, None, None, "fsdp"]
  assert r["conv_shard_shape"] == [*full[:3], full[3] // 2]


def test_training_resumes_on_the_2x2_mesh(run8):
  r = result(run8, "two_by_two")
  # The copy's metrics.jsonl holds the 8-device run's steps 1-2 and the resumed step 3.
  assert r["resumed_steps"] == [1, 2, 3] and np.isfinite(r["resumed_loss"])
  assert r["checkpoints"] == [2, 3]


if __name__ == "__main__":
  print("RESULT " + json.dumps(child(json.loads(sys.argv[1]))), flush=True)
