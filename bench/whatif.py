"""What-if: how much faster would the train step be with a proposed library change?

  .venv/bin/python bench/whatif.py --change=lowpass_matmul [--config=configs/base.py]

Compiles the library train step twice in one process, once as the library is and once with a
proposed change applied *at trace time by this script* (the library files are not edited; each
change is a candidate patch for their owners, prototyped here), checks that both give the same
losses on the same batch (at step 3: earlier steps cannot see changes behind the zero-initialised
LoRA B matrices and output conv), and times them alternately (A B, B A, ...; medians over rounds).

Changes:
  lowpass_matmul  `bands.BandFilter.lowpass` in 'fft2d' mode computes rfft2 -> Gaussian ->
                  irfft2 on the token grid. The Gaussian transfer 2^(-(fy^2 + fx^2) / c^2) is
                  separable and the filter is circular, so the same operator is
                  L(x) = M_h . x . M_w^T with real circulant M_n = IDFT diag(2^(-f^2 / c^2)) DFT
                  (n x n, n <= 64 here): two small matmuls instead of FFTs, complex multiplies
                  and layout transposes (forward and backward). Exact up to float rounding.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import measure  # noqa: F401  (puts the repo root on sys.path; import first)

import jax
import jax.numpy as jnp
import numpy as np

from fape_jax import sharding as shard_lib
from fape_jax.errors import FapeError
from fape_jax.models import bands


@functools.lru_cache(maxsize=None)
def circulant_lowpass(n: int, cutoff: float) -> np.ndarray:
  """Real (n, n) matrix of the 1-D circular Gaussian low-pass 2^(-(f / cutoff)^2)."""
  gain = np.exp2(-np.fft.fftfreq(n) ** 2 / cutoff ** 2)
  return np.real(np.fft.ifft(gain[:, None] * np.fft.fft(np.eye(n), axis=0), axis=0)).astype(
      np.float32)


def lowpass_matmul(self: bands.BandFilter, tokens: jax.Array, grid: tuple[int, int]
                   ) -> jax.Array:
  """`BandFilter.lowpass` ('fft2d') as two matmuls over the token grid (see module docstring)."""
  if self.mode != "fft2d":
    return _ORIGINAL_LOWPASS(self, tokens, grid)
  x = tokens.astype(jnp.float32)
  b, n, c = x.shape
  h, w = grid
  if h * w != n:
    raise FapeError(f"band split: {n} tokens do not fill a {h} x {w} grid.")
  x = x.reshape(b, h, w, c)
  x = jnp.einsum("ij,bjwc->biwc", circulant_lowpass(h, self.cutoff), x)
  x = jnp.einsum("kw,biwc->bikc", circulant_lowpass(w, self.cutoff), x)
  return x.reshape(b, n, c)


_ORIGINAL_LOWPASS = bands.BandFilter.lowpass
CHANGES = {"lowpass_matmul": (bands.BandFilter, "lowpass", lowpass_matmul)}


@contextlib.contextmanager
def applied(change: str) -> Iterator[None]:
  """Applies a change for the duration of the block (i.e. while a step is traced)."""
  owner, attr, new = CHANGES[change]
  old = getattr(owner, attr)
  setattr(owner, attr, new)
  try:
    yield
  finally:
    setattr(owner, attr, old)


def main(argv):
  del argv
  from train_step import LibraryStep  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  machine = measure.machine_info()  # date and load at the start
  say = measure.say
  mesh = shard_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  say("compiling the library step as it is ...")
  base = LibraryStep(config, mesh)
  say(f"compiling it with {FLAGS.change} ...")
  with applied(FLAGS.change):
    changed = LibraryStep(config, mesh)
  # Same seed, state and batch on both sides. At initialisation the experts' B is zero and the
  # residual executor's output conv is zero, so nothing inside the UNet gets a gradient in step
  # 1 and the band split cannot show before step 3's outputs (the expert inputs have then shaped
  # the updates of B and the spectral prior has chosen the experts): compare step 3.
  metrics = []
  for side in (base, changed):
    for _ in range(3):
      side.state, m = side.compiled(side.state, side.batch, side.step.lpips_state)
    metrics.append(jax.device_get(m))
  agree = {k: [float(metrics[0][k]), float(metrics[1][k])] for k in ("loss", "mse", "freq")}
  say(f"step-3 metrics (as is, changed): {agree}")
  fns: dict[str, Any] = {"as_is": base, FLAGS.change: changed}
  for f in fns.values():
    f()
  timed = measure.alternate(fns, rounds=FLAGS.rounds, calls=FLAGS.steps, log=say)
  a, b = timed["as_is"]["median_s"], timed[FLAGS.change]["median_s"]
  result = {
      "benchmark": "whatif",
      "change": FLAGS.change,
      "description": __doc__.split("Changes:")[1].strip(),
      "command": measure.command_line(),
      "machine": machine,
      "config": {"variant": config.get("variant"), "unet": config.model.unet.to_dict(),
                 "batch_size": config.data.batch_size, "crop": config.data.crop},
      "step3_metrics_as_is_vs_changed": agree,
      "step_s_as_is": a,
      "step_s_changed": b,
      "speedup": a / b,
      "flops_as_is": base.flops,
      "flops_changed": changed.flops,
      "compile_s": {"as_is": base.compile_s, "changed": changed.compile_s},
      "load_average_end": measure.load_average(),
      "timings": timed,
  }
  measure.write_result(FLAGS.name or f"whatif_{FLAGS.change}", result)


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  FLAGS = flags.FLAGS
  config_flags.DEFINE_config_file("config", str(measure.REPO / "configs" / "base.py"),
                                  "Training config.")
  flags.DEFINE_enum("change", "lowpass_matmul", sorted(CHANGES), "The change to try.")
  flags.DEFINE_integer("rounds", 5, "Alternation rounds.")
  flags.DEFINE_integer("steps", 2, "Timed steps per round and side.")
  flags.DEFINE_string("name", "", "Result file name (default whatif_<change>).")
  app.run(main)
