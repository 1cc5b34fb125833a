"""Train-step benchmark: step time, images/s, compile time, FLOPs and the fraction of peak.

  .venv/bin/python bench/train_step.py                         # base config, JAX vs torch, CPU
  .venv/bin/python bench/train_step.py --config=configs/base.py:sd21 \
      --config.data.batch_size=1 --config.data.crop=128 --config.model.dtype=float32 \
      --name=train_step_sd21_cpu                               # SD-2.1-shaped, reduced size
  (bench/gpu.sh runs it at SD-2.1 scale on a GPU, without the torch side.)

The config is read at run time, so whatever `configs/base.py` holds now is what is measured.
Steps timed, one fixed random batch each (step time does not depend on values):
  jax_library   `steps.make_train_step`, the real training step: generator + discriminator
                update, every configured loss, Prodigy; FLOPs from XLA's cost analysis of it.
  jax_matched   the same executor (`model_state.build_generator`: UNet + LoRA-MoE + projector) with
                the objective the PyTorch reference can match: w_mse * MSE + w_freq * L_freq,
                AdamW, the same gradient clipping. No discriminator.
  torch_eager   bench/torch_reference.py: diffusers' UNet + a torch two-expert LoRA, same config,
                same batch, same objective as jax_matched. `torch_compile`: the same under
                torch.compile, when it works here.
  matmul_peak   a jit'd n^3 float32 matmul (the machine's attainable dense peak).
All of them alternate round by round (A B C D, D C B A, ...) in one process, with the load
average recorded per round; reported times are medians over rounds. `speedup` =
torch_eager / jax_matched (like-for-like work); `flop_fraction` = achieved FLOP/s of a step over
the measured matmul peak.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import measure  # noqa: F401  (puts the repo root on sys.path; import first)
from inputs import random_batch

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from fape_jax import losses
from fape_jax import sharding as shard_lib
from fape_jax import model_state
from fape_jax import steps

# Dense bf16 peak of common accelerators (vendor datasheets, no sparsity), for MFU next to the
# measured-peak fraction. Matched by substring of `device_kind`, first match wins.
NOMINAL_BF16_PEAK = (
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("TPU v5p", 459e12), ("TPU v5 lite", 197e12),
    ("TPU v4", 275e12),
)


def nominal_peak(device_kind: str, dtype: str) -> float | None:
  if dtype != "bfloat16":
    return None
  for key, peak in NOMINAL_BF16_PEAK:
    if key.lower() in device_kind.lower():
      return peak
  return None


def device_memory_peak() -> int | None:
  """Peak bytes in use on the first local device (GPU/TPU; None on CPU, which has no stats)."""
  stats = jax.local_devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _block(tree) -> None:
  jax.block_until_ready(tree)


# --------------------------------------------------------------------------------------------
# The JAX steps.


class LibraryStep:
  """`steps.make_train_step` (the library's train step) on a fixed batch; keeps the state."""

  def __init__(self, config, mesh):
    t0 = time.perf_counter()
    self.state, self.shardings, self.models = model_state.create_state(config, mesh)
    _block(self.state)
    self.init_s = time.perf_counter() - t0
    bsh = shard_lib.batch_sharding(mesh, config.data_axes)
    self.batch = jax.device_put(random_batch(config), bsh)
    self.step = steps.make_train_step(self.models, config, self.shardings, bsh)
    t0 = time.perf_counter()
    # The step is compiled exactly once, here; `step.jitted` is never called, so the library's
    # trace-count guard is not tripped by the benchmark.
    self.compiled = self.step.jitted.lower(self.state, self.batch, self.step.lpips_state).compile()
    self.compile_s = time.perf_counter() - t0
    self.flops = measure.compiled_flops(self.compiled)
    self.memory = measure.memory_analysis(self.compiled)

  def __call__(self) -> None:
    self.state, metrics = self.compiled(self.state, self.batch, self.step.lpips_state)
    _block((self.state, metrics))


def matched_train_step(params, opt, frozen, batch, *, gen_def, tx, w_mse: float, w_freq: float):
  """Generator-only step with the PyTorch reference's objective (see the module docstring)."""
  def loss_fn(p):
    gen = nnx.merge(gen_def, p, frozen)
    restored, aux = gen(batch["degraded"], batch.get("plan_tokens"), batch.get("plan_mask"))
    mse = jnp.mean(jnp.square(restored.astype(jnp.float32) - batch["clean"]))
    return w_mse * mse + w_freq * losses.frequency_loss(aux["freq_terms"])

  loss, grads = jax.value_and_grad(loss_fn)(params)
  updates, opt = tx.update(grads, opt, params)
  return optax.apply_updates(params, updates), opt, loss


class MatchedStep:
  """`matched_train_step` over a copy of the library state's trainable generator weights.

  The frozen weights are read from the library step's current state at every call (that state is
  donated by its own step, so a reference kept here would go stale); this step donates only its
  own trainable copy and optimiser state.
  """

  def __init__(self, config, library: LibraryStep):
    self.library = library
    self.params = jax.tree.map(jnp.copy, library.state["gen"]["params"])
    tx = optax.adamw(1e-4, weight_decay=0.01)
    if config.optim.clip_norm:
      tx = optax.chain(optax.clip_by_global_norm(config.optim.clip_norm), tx)
    self.opt = jax.jit(tx.init)(self.params)
    fn = functools.partial(matched_train_step, gen_def=library.models.gen_def, tx=tx,
                           w_mse=float(config.loss.w_mse), w_freq=float(config.loss.w_freq))
    t0 = time.perf_counter()
    self.compiled = jax.jit(fn, donate_argnums=(0, 1)).lower(
        self.params, self.opt, library.state["gen"]["frozen"], library.batch).compile()
    self.compile_s = time.perf_counter() - t0
    self.flops = measure.compiled_flops(self.compiled)
    self.memory = measure.memory_analysis(self.compiled)

  def __call__(self) -> None:
    self.params, self.opt, loss = self.compiled(self.params, self.opt,
                                                self.library.state["gen"]["frozen"],
                                                self.library.batch)
    _block((self.params, self.opt, loss))


# --------------------------------------------------------------------------------------------


def _summary(name: str, timed: dict, flops: float | None, peak: float, batch: int) -> dict:
  step_s = timed[name]["median_s"]
  achieved = flops / step_s if flops else None
  return {"step_s": step_s, "images_per_s": batch / step_s, "flops_per_step": flops,
          "flop_per_s": achieved, "flop_fraction": achieved / peak if achieved else None}


def config_summary(config) -> dict[str, Any]:
  m = config.model
  return {
      "variant": config.get("variant"),
      "unet": m.unet.to_dict(),
      "vae": m.vae.to_dict() if m.get("vae") is not None else None,
      "dtype": m.dtype, "remat": m.remat, "batch_size": config.data.batch_size,
      "crop": config.data.crop, "plan_tokens": [config.plans.encoder.max_tokens, config.plans.dim],
      "lora": {"ranks": list(m.lora.ranks), "band_mode": m.lora.band_mode, "top1": m.lora.top1},
      "train_base_unet": config.train_base_unet, "optim_g": config.optim.g.name,
      "losses": config.loss.to_dict(), "lpips": bool(config.lpips.vgg16_path),
      "disc": {"backbone": config.disc.get("backbone"),
               "conv_widths": list(config.disc.get("conv_widths") or ())},
      "mesh": {"axes": list(config.mesh.axes), "shape": list(config.mesh.shape)},
  }


def main(argv):
  del argv
  config = FLAGS.config
  machine = measure.machine_info()  # date and load at the start
  say = measure.say
  dev = jax.devices()[0]
  say(f"devices: {jax.device_count()} x {dev.device_kind}; load {measure.load_average()}")
  peak_fn, peak_flops = measure.matmul_peak_fn(FLAGS.peak_n, FLAGS.peak_dtype)
  mesh = shard_lib.make_mesh(config.mesh.axes, config.mesh.shape)

  say("building and compiling the library train step ...")
  lib = LibraryStep(config, mesh)
  say(f"  init {lib.init_s:.1f} s, compile {lib.compile_s:.1f} s, {lib.flops or 0:.3e} flops")
  fns: dict[str, Any] = {"jax_library": lib}
  matched = None
  if FLAGS.matched:
    say("compiling the matched (generator-only, MSE + freq, AdamW) step ...")
    matched = MatchedStep(config, lib)
    say(f"  compile {matched.compile_s:.1f} s, {matched.flops or 0:.3e} flops")
    fns["jax_matched"] = matched

  torch_info: dict[str, Any] = {}
  if FLAGS.torch:
    import torch  # pylint: disable=g-import-not-at-top
    import torch_reference  # pylint: disable=g-import-not-at-top
    torch_reference.set_threads(FLAGS.torch_threads)
    say("building the PyTorch reference" + (" (and torch.compile)" if FLAGS.torch_compile
                                            else "") + " ...")
    tsteps = torch_reference.build_steps(config, want_compile=FLAGS.torch_compile, log=say)
    tbatch = torch_reference.torch_batch(random_batch(config))
    fns["torch_eager"] = functools.partial(tsteps["eager"], tbatch)
    if tsteps["compile"] is not None:
      fns["torch_compile"] = functools.partial(tsteps["compile"], tbatch)
    torch_info = {
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "params": tsteps["eager"].num_params(),
        "flops_per_step_torch_counter": tsteps["eager"].forward_flops(tbatch),
        "compile_s": tsteps["compile_s"], "compile_error": tsteps["compile_error"],
    }
  fns["matmul_peak"] = (peak_fn, FLAGS.peak_calls)

  say("warm-up ...")
  for name, f in fns.items():
    (f[0] if isinstance(f, tuple) else f)()
  say(f"timing: {FLAGS.rounds} rounds x {FLAGS.steps} steps, alternating {list(fns)}")
  timed = measure.alternate(fns, rounds=FLAGS.rounds, calls=FLAGS.steps, log=say)
  peak = peak_flops / timed["matmul_peak"]["median_s"]
  batch = config.data.batch_size

  lib_sum = _summary("jax_library", timed, lib.flops, peak, batch)
  lib_sum.update(init_s=lib.init_s, compile_s=lib.compile_s, xla_memory=lib.memory)
  result: dict[str, Any] = {
      "benchmark": "train_step",
      "command": measure.command_line(),
      "machine": {**machine, "jax": jax.__version__, "backend": dev.platform,
                  "device_kind": dev.device_kind, "devices": jax.device_count()},
      "config": config_summary(config),
      "config_digest": measure.config_digest(config_summary(config)),
      "peak_matmul": {"n": FLAGS.peak_n, "dtype": FLAGS.peak_dtype, "flop_per_s": peak,
                      "nominal_flop_per_s": nominal_peak(dev.device_kind, FLAGS.peak_dtype)},
      "library_step": lib_sum,
  }
  if matched is not None:
    m_sum = _summary("jax_matched", timed, matched.flops, peak, batch)
    m_sum.update(compile_s=matched.compile_s, xla_memory=matched.memory)
    result["matched_step"] = m_sum
    # Top-level numbers: the like-for-like comparison with the PyTorch reference.
    result.update(jax_step_s=m_sum["step_s"], images_per_s=m_sum["images_per_s"],
                  flop_fraction=m_sum["flop_fraction"])
  else:
    result.update(jax_step_s=lib_sum["step_s"], images_per_s=lib_sum["images_per_s"],
                  flop_fraction=lib_sum["flop_fraction"])
  nominal = result["peak_matmul"]["nominal_flop_per_s"]
  if nominal and lib_sum["flop_per_s"]:
    result["library_step"]["mfu_nominal"] = lib_sum["flop_per_s"] / nominal
  if FLAGS.torch:
    result["torch_eager_step_s"] = timed["torch_eager"]["median_s"]
    result["torch_compile_step_s"] = timed.get("torch_compile", {}).get("median_s")
    result["speedup"] = (result["torch_eager_step_s"] / result["jax_step_s"]
                         if matched is not None else None)
    result["speedup_compile"] = (result["torch_compile_step_s"] / result["jax_step_s"]
                                 if matched is not None and result["torch_compile_step_s"]
                                 else None)
    if matched is not None:
      result["speedup_stats"] = {"torch_eager/jax_matched": measure.ratio_stats(
          timed, "torch_eager", "jax_matched")}
      if "torch_compile" in timed:
        result["speedup_stats"]["torch_compile/jax_matched"] = measure.ratio_stats(
            timed, "torch_compile", "jax_matched")
    result["torch"] = torch_info
  mem = device_memory_peak()
  result["peak_memory"] = {"device_bytes": mem, "max_rss_bytes": measure.max_rss_bytes()}
  result["load_average_end"] = measure.load_average()
  result["timings"] = timed

  if FLAGS.profile:
    import xla_profile  # pylint: disable=g-import-not-at-top
    say("profiling one library step and one matched step ...")
    result["profile"] = {"library_step": xla_profile.op_breakdown(lib.compiled, lib)}
    if matched is not None:
      result["profile"]["matched_step"] = xla_profile.op_breakdown(matched.compiled, matched)
  measure.write_result(FLAGS.name, result)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", str(measure.REPO / "configs" / "base.py"),
                                  "Training config; dotted overrides work (--config.data.crop=..).")
  flags.DEFINE_integer("rounds", 5, "Alternation rounds (medians are over rounds).")
  flags.DEFINE_integer("steps", 2, "Timed steps per round and contender.")
  flags.DEFINE_bool("matched", True, "Time the generator-only step that matches the torch one.")
  flags.DEFINE_bool("torch", True, "Time the PyTorch reference (bench/torch_reference.py).")
  flags.DEFINE_bool("torch_compile", False, "Also time it under torch.compile.")
  flags.DEFINE_integer("torch_threads", 2, "torch intra-op threads.")
  flags.DEFINE_integer("peak_n", 2048, "Size n of the n^3 peak matmul.")
  flags.DEFINE_string("peak_dtype", "float32", "dtype of the peak matmul (bfloat16 on GPUs).")
  flags.DEFINE_integer("peak_calls", 5, "Peak matmul calls per round.")
  flags.DEFINE_bool("profile", False, "Add a per-op time breakdown (jax.profiler trace).")
  flags.DEFINE_string("name", "train_step", "Result file name under bench/results/.")
  app.run(main)
