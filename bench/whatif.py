"""What-if: how much faster would the train step be with a proposed library change?

  .venv/bin/python bench/whatif.py --change=lowpass_matmul [--config=configs/base.py]

Compiles the library train step (and the matched step of bench/train_step.py) twice in one
process, once as the library is and once with a change applied *at trace time by this script*
(library files are not edited), checks that both give the same losses on the same batch (at step
3: earlier steps cannot see changes behind the zero-initialised LoRA B matrices and output conv),
and times them alternately (A B, B A, ...; medians over rounds).

Two kinds of change: a *proposal* patches in new code (before = the library, after = patched);
a *landed* change patches the previous code back in (before = patched, after = the library), so
every speed-up the library has taken keeps its own reproducible before/after row.

Changes:
  lowpass_matmul  `bands.BandFilter.lowpass` in 'fft2d' mode computes rfft2 -> Gaussian ->
                  irfft2 on the token grid. The Gaussian transfer 2^(-(fy^2 + fx^2) / c^2) is
                  separable and the filter is circular, so the same operator is
                  L(x) = M_h . x . M_w^T with real circulant M_n = IDFT diag(2^(-f^2 / c^2)) DFT
                  (n x n, n <= 64 here): two small matmuls instead of FFTs, complex multiplies
                  and layout transposes (forward and backward). Exact up to float rounding.
  group_norm_fused `layers.group_norm` (flax's `nnx.GroupNorm`, then `jax.nn.silu`, under
                  autodiff) as one custom-VJP op whose backward works from the saved statistics.
                  Measured slower; not adopted.
  band_grid2d (landed) `lora.band_mode='grid2d'` (the default): the band split as two circulant
                  matmuls; before = the same filter through rfft2/irfft2 ('fft2d').
  attention_deferred (landed) `layers.attend` on CPU: softmax attention that divides by the row
                  sums after the value matmul; before = `jax.nn.dot_product_attention` (XLA).
  optim_flatten (landed) `optim.flatten=True` (the default): both optimisers (with the gradient
                  clip) update one raveled vector (`optax.flatten`); before = the same optimisers
                  per parameter leaf. The same arithmetic in a program less than half the size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Iterator

import measure  # noqa: F401  (puts the repo root on sys.path; import first)

import jax
import jax.numpy as jnp
import numpy as np

from fape_jax import sharding as shard_lib
from fape_jax import model_state
from fape_jax.errors import FapeError
from fape_jax.models import bands
from fape_jax.models import layers
from fape_jax.models import unet


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


def _group_stats(xg: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
  # Two-pass variance, as flax with use_fast_variance=False (and torch).
  mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
  return mean, jax.lax.rsqrt(var + eps)


def _gn_forward(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float, silu: bool):
  b, c = x.shape[0], x.shape[-1]
  xg = x.astype(jnp.float32).reshape(b, -1, groups, c // groups)
  mean, rstd = _group_stats(xg, eps)
  y = (xg - mean) * rstd * scale.reshape(groups, -1) + bias.reshape(groups, -1)
  if silu:
    y = y * jax.nn.sigmoid(y)
  return y.reshape(x.shape), (x, scale, bias, mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm_act(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float,
                    silu: bool) -> jax.Array:
  return _gn_forward(x, scale, bias, groups, eps, silu)[0]


def _group_norm_act_fwd(x, scale, bias, groups, eps, silu):
  return _gn_forward(x, scale, bias, groups, eps, silu)


def _group_norm_act_bwd(groups, eps, silu, res, g):
  # The textbook GroupNorm backward from the saved statistics: per (sample, channel) sums of dy and
  # dy * xhat in one pass, then dx in one more, instead of autodiff's chain through every forward
  # intermediate (several more passes over the activations on XLA:CPU).
  del eps
  x, scale, bias, mean, rstd = res
  b, c = x.shape[0], x.shape[-1]
  xg = x.astype(jnp.float32).reshape(b, -1, groups, c // groups)
  xhat = (xg - mean) * rstd
  s = scale.astype(jnp.float32).reshape(groups, -1)
  dy = g.astype(jnp.float32).reshape(xg.shape)
  if silu:
    y = xhat * s + bias.astype(jnp.float32).reshape(groups, -1)
    sig = jax.nn.sigmoid(y)
    dy = dy * sig * (1.0 + y * (1.0 - sig))
  s1 = jnp.sum(dy, axis=1, keepdims=True)             # (b, 1, groups, c / groups)
  s2 = jnp.sum(dy * xhat, axis=1, keepdims=True)
  n = xg.shape[1] * xg.shape[3]
  m1 = jnp.sum(s1 * s, axis=3, keepdims=True) / n     # mean over the group of dxhat
  m2 = jnp.sum(s2 * s, axis=3, keepdims=True) / n     # mean over the group of dxhat * xhat
  dx = rstd * (dy * s - m1 - xhat * m2)
  return (dx.reshape(x.shape).astype(x.dtype),
          jnp.sum(s2, axis=(0, 1)).reshape(scale.shape).astype(scale.dtype),
          jnp.sum(s1, axis=(0, 1)).reshape(bias.shape).astype(bias.dtype))


_group_norm_act.defvjp(_group_norm_act_fwd, _group_norm_act_bwd)


def group_norm_fused(norm, x, *, silu: bool = False):
  """`layers.group_norm` (then SiLU when `silu`) as one op with a hand-written backward pass.

  The same numbers as the flax module (float32 statistics, two-pass variance) to rounding. The
  autodiff of GroupNorm + SiLU is the largest elementwise cost of the step on XLA:CPU; this
  backward reads the activations twice, but as a custom VJP it also stops XLA fusing the norm
  with its neighbours (the skip concat, the conv bias), and measured slower (BENCHMARKS.md).
  """
  if norm.scale is None or norm.bias is None:  # not used by these models; keep flax's path
    y = norm(x)
    return jax.nn.silu(y) if silu else y
  out = _group_norm_act(x, norm.scale.get_value(), norm.bias.get_value(), norm.num_groups,
                        float(norm.epsilon), silu)
  return out.astype(norm.dtype or jnp.result_type(x, norm.scale.get_value()))



def attend_dot_product(q, k, v, kv_mask, implementation=None):
  """The path `layers.attend` replaced on CPU: `jax.nn.dot_product_attention`."""
  mask = None if kv_mask is None else kv_mask[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def lowpass_fft2d(self: bands.BandFilter, tokens: jax.Array, grid: tuple[int, int]
                  ) -> jax.Array:
  """The path 'grid2d' replaced as the default: the same filter through FFTs."""
  if self.mode == "grid2d":
    self = dataclasses.replace(self, mode="fft2d")
  return _ORIGINAL_LOWPASS(self, tokens, grid)


_ORIGINAL_LOWPASS = bands.BandFilter.lowpass
_ORIGINAL_MAKE_OPTIMIZER = model_state.make_optimizer


def make_optimizer_per_leaf(cfg, clip_norm: float, total_steps: int, flatten: bool = False):
  """The optimisers before `optim.flatten`: one update per parameter leaf."""
  del flatten
  return _ORIGINAL_MAKE_OPTIMIZER(cfg, clip_norm, total_steps, False)


# name -> (landed, [(owner, attribute, replacement), ...]).
CHANGES = {
    "lowpass_matmul": (False, [(bands.BandFilter, "lowpass", lowpass_matmul)]),
    "group_norm_fused": (False, [(layers, "group_norm", group_norm_fused),
                                 (unet, "group_norm", group_norm_fused)]),
    "band_grid2d": (True, [(bands.BandFilter, "lowpass", lowpass_fft2d)]),
    "attention_deferred": (True, [(layers, "attend", attend_dot_product)]),
    "optim_flatten": (True, [(model_state, "make_optimizer", make_optimizer_per_leaf)]),
}


@contextlib.contextmanager
def applied(change: str) -> Iterator[None]:
  """Applies a change for the duration of the block (i.e. while a step is traced)."""
  _, patches = CHANGES[change]
  saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in patches]
  for owner, attr, new in patches:
    setattr(owner, attr, new)
  try:
    yield
  finally:
    for owner, attr, old in saved:
      setattr(owner, attr, old)


def main(argv):
  del argv
  from train_step import LibraryStep, MatchedStep  # pylint: disable=g-import-not-at-top
  config = FLAGS.config
  machine = measure.machine_info()  # date and load at the start
  say = measure.say
  mesh = shard_lib.make_mesh(config.mesh.axes, config.mesh.shape)
  landed, _ = CHANGES[FLAGS.change]
  say("compiling the library step as it is ...")
  as_is = LibraryStep(config, mesh)
  say(f"compiling it with {FLAGS.change} ...")
  with applied(FLAGS.change):
    changed = LibraryStep(config, mesh)
  before, after = (changed, as_is) if landed else (as_is, changed)
  # Same seed, state and batch on both sides. At initialisation the experts' B is zero and the
  # residual executor's output conv is zero, so nothing inside the UNet gets a gradient in step
  # 1 and the band split cannot show before step 3's outputs (the expert inputs have then shaped
  # the updates of B and the spectral prior has chosen the experts): compare step 3.
  metrics = []
  for side in (before, after):
    for _ in range(3):
      side.state, m = side.compiled(side.state, side.batch, side.step.lpips_state)
    metrics.append(jax.device_get(m))
  agree = {k: [float(metrics[0][k]), float(metrics[1][k])] for k in ("loss", "mse", "freq")}
  say(f"step-3 metrics (before, after): {agree}")
  fns: dict[str, Any] = {"before": before, "after": after}
  if FLAGS.matched:
    say("compiling the matched step both ways ...")
    if landed:
      with applied(FLAGS.change):
        fns["matched_before"] = MatchedStep(config, before)
      fns["matched_after"] = MatchedStep(config, after)
    else:
      fns["matched_before"] = MatchedStep(config, before)
      with applied(FLAGS.change):
        fns["matched_after"] = MatchedStep(config, after)
  for f in fns.values():
    f()
  timed = measure.alternate(fns, rounds=FLAGS.rounds, calls=FLAGS.steps, log=say)
  a, b = timed["before"]["median_s"], timed["after"]["median_s"]
  result = {
      "benchmark": "whatif",
      "change": FLAGS.change,
      "landed": landed,
      "description": __doc__.split("Changes:")[1].strip(),
      "command": measure.command_line(),
      "machine": machine,
      "config": {"variant": config.get("variant"), "unet": config.model.unet.to_dict(),
                 "batch_size": config.data.batch_size, "crop": config.data.crop},
      "step3_metrics_before_vs_after": agree,
      "step_s_before": a,
      "step_s_after": b,
      "speedup": a / b,
      "speedup_stats": measure.ratio_stats(timed, "before", "after"),
      "flops_before": before.flops,
      "flops_after": after.flops,
      "compile_s": {"before": before.compile_s, "after": after.compile_s},
      "load_average_end": measure.load_average(),
      "timings": timed,
  }
  if FLAGS.matched:
    result.update(
        matched_step_s_before=timed["matched_before"]["median_s"],
        matched_step_s_after=timed["matched_after"]["median_s"],
        matched_speedup=timed["matched_before"]["median_s"] / timed["matched_after"]["median_s"],
        matched_speedup_stats=measure.ratio_stats(timed, "matched_before", "matched_after"))
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
  flags.DEFINE_bool("matched", True, "Also time the matched step (bench/train_step.py) both ways.")
  app.run(main)
