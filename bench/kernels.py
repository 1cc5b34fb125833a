"""Kernel ceiling: how close to the matmul peak can the UNet's own convolutions run here?

  .venv/bin/python bench/kernels.py [--config=configs/base.py]

Times, one jit'd op at a time, the 3x3 convolution of every UNet level of the config at its
training shape (batch x crop / 2^level, block_out_channels[level] in and out), forward alone and
forward + backward (gradients for input and kernel, as training needs), next to the n^3 matmul
peak, alternating (A B ..., medians over rounds). The fraction of peak a level's convolution
reaches bounds what any step made of such convolutions can reach: if the convolutions
themselves sit far below the 35 % goal, no fusion or scheduling change to the rest of the step
closes the gap; wider channels (or larger batches) do. Wider variants of the deepest level
(x2, x4 channels) show the trend.
"""

from __future__ import annotations

from typing import Any

import measure  # noqa: F401  (puts the repo root on sys.path; import first)

import jax
import jax.numpy as jnp


def conv_case(batch: int, size: int, channels: int, *, backward: bool):
  """(blocking call, flops per call) of a 3x3 same conv NHWC, c -> c, with or without backward."""
  kx, kk = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (batch, size, size, channels), jnp.float32)
  k = jax.random.normal(kk, (3, 3, channels, channels), jnp.float32) * 0.05

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  fwd_flops = 2.0 * batch * size * size * channels * channels * 9
  if backward:
    fn = jax.jit(jax.grad(lambda x, k: jnp.sum(conv(x, k) ** 2), argnums=(0, 1)))
    flops = 3 * fwd_flops  # forward + input gradient + kernel gradient
  else:
    fn = jax.jit(conv)
    flops = fwd_flops
  jax.block_until_ready(fn(x, k))
  return (lambda: jax.block_until_ready(fn(x, k))), flops


def main(argv):
  del argv
  config = FLAGS.config
  machine = measure.machine_info()
  unet = config.model.unet
  b, crop = config.data.batch_size, config.data.crop
  factor = 1
  if config.model.get("vae") is not None:
    factor = 2 ** (len(config.model.vae.block_out_channels) - 1)
  cases: dict[str, Any] = {}
  flops: dict[str, float] = {}
  levels = list(enumerate(unet.block_out_channels))
  last, c_last = levels[-1]
  extra = [(last, c_last * m, f"x{m}") for m in (2, 4)]
  for level, c, tag in [(lv, c, "") for lv, c in levels] + extra:
    size = max(1, crop // factor // 2 ** level)
    for backward in (False, True):
      name = f"L{level}{tag} {b}x{size}x{size}x{c} {'fwd+bwd' if backward else 'fwd'}"
      cases[name], flops[name] = conv_case(b, size, c, backward=backward)
  peak_fn, peak_flops = measure.matmul_peak_fn(FLAGS.peak_n)
  cases["matmul_peak"] = peak_fn
  flops["matmul_peak"] = peak_flops
  timed = measure.alternate(cases, rounds=FLAGS.rounds, calls=FLAGS.calls, log=measure.say)
  peak = peak_flops / timed["matmul_peak"]["median_s"]
  rows = {n: {"s": t["median_s"], "flops": flops[n], "flop_per_s": flops[n] / t["median_s"],
              "of_peak": flops[n] / t["median_s"] / peak} for n, t in timed.items()}
  measure.write_result(FLAGS.name, {
      "benchmark": "kernels",
      "command": measure.command_line(),
      "machine": {**machine, "jax": jax.__version__},
      "config": {"variant": config.get("variant"), "block_out_channels":
                 list(unet.block_out_channels), "batch_size": b, "crop": crop},
      "peak_flop_per_s": peak,
      "cases": rows,
      "load_average_end": measure.load_average(),
      "timings": timed,
  })


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", str(measure.REPO / "configs" / "base.py"),
                                  "Training config whose UNet shapes are measured.")
  flags.DEFINE_integer("rounds", 5, "Alternation rounds.")
  flags.DEFINE_integer("calls", 5, "Timed calls per round and case.")
  flags.DEFINE_integer("peak_n", 2048, "Size n of the n^3 peak matmul.")
  flags.DEFINE_string("name", "kernels", "Result file name under bench/results/.")
  app.run(main)
