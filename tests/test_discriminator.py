"""Discriminator: level structure, variable types, spectral norm, a pure D step, the losses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from fape_jax.errors import FapeError
from fape_jax.models import discriminator as dmod
from fape_jax.models import lpips


def _tiny(**overrides):
  c = dmod.default_discriminator_config()
  c.conv_widths = (8, 8, 8, 8)  # few distinct shapes: fewer eager compiles on CPU
  c.head_width = 8
  c.update(overrides)
  return c


@pytest.fixture(scope="module")
def vgg_npz(tmp_path_factory):
  """Random weights in torchvision's VGG16 key layout (no download, no torch needed)."""
  rng = np.random.default_rng(0)
  sd = {}
  for idx, cin, cout in lpips.VGG16_CONVS:
    sd[f"features.{idx}.weight"] = (rng.normal(size=(cout, cin, 3, 3)) *
                                    np.sqrt(2 / (9 * cin))).astype(np.float32)
    sd[f"features.{idx}.bias"] = np.zeros(cout, np.float32)
  path = tmp_path_factory.mktemp("vgg") / "vgg16.npz"
  np.savez(path, **sd)
  return str(path)


def _images(seed, n=4, size=16):
  return jax.random.uniform(jax.random.key(seed), (n, size, size, 3), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def tiny_disc():
  return dmod.Discriminator(_tiny(), rngs=nnx.Rngs(0))


def test_conv_backbone_levels_and_variable_types(tiny_disc):
  d = tiny_disc
  # 4 stages at depth 1/4, 2/4, 3/4, 4/4: the 25/50/100 % levels are stages 0, 1, 3.
  assert d.levels == (0, 1, 3)
  assert len(d.heads) == 3
  logits = d(_images(0), update_stats=False)
  assert logits.shape == (4,) and bool(jnp.all(jnp.isfinite(logits)))
  # 4 backbone convs + 2 per head + 2 pooled = 12 SN layers, each with a (u, sigma) BatchStat.
  stats = jax.tree.leaves(nnx.state(d, dmod.POWER_ITERATION_STATE))
  assert len(stats) == 12 * 2
  head_kernel = d.heads[0].conv.layer_instance.kernel
  assert isinstance(head_kernel, nnx.Param) and head_kernel.shape == (3, 3, 8, 8)
  assert not jax.tree.leaves(nnx.state(d, dmod.FROZEN))


def test_vgg16_backbone_is_frozen_but_passes_gradients(vgg_npz):
  d = dmod.Discriminator(_tiny(backbone="vgg16", vgg16_path=vgg_npz), rngs=nnx.Rngs(0))
  assert d.levels == (1, 2, 4)  # relu2_2, relu3_3, relu5_3 (depths 4/13, 7/13, 13/13)
  frozen = nnx.state(d, dmod.FROZEN)
  assert len(jax.tree.leaves(frozen)) == 26
  # The trainable filter holds the heads only: 3 heads x 2 convs x (kernel, bias) + 2 linears x 2.
  params = nnx.state(d, dmod.TRAINABLE)
  assert len(jax.tree.leaves(params)) == 3 * 2 * 2 + 2 * 2
  assert "backbone" not in params
  graphdef, params, stats, rest = nnx.split(d, dmod.TRAINABLE, dmod.POWER_ITERATION_STATE, ...)
  x = _images(1, n=2, size=16)

  def score(params, x):
    logits = nnx.merge(graphdef, params, stats, rest, copy=True)(x, update_stats=False)
    return jnp.sum(logits), logits

  (_, logits), (g_params, g_x) = jax.jit(jax.value_and_grad(score, argnums=(0, 1),
                                                            has_aux=True))(params, x)
  assert logits.shape == (2,) and bool(jnp.all(jnp.isfinite(logits)))
  assert float(jnp.abs(g_x).max()) > 0  # the generator's adversarial gradient reaches the image
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_params))
  with pytest.raises(FapeError, match="too small"):
    d(jnp.zeros((1, 8, 8, 3)))


def test_spectral_norm_divides_by_the_top_singular_value_and_keeps_the_raw_kernel():
  rngs = nnx.Rngs(0)
  layer = dmod._sn(nnx.Conv(6, 5, (3, 3), rngs=rngs), 1, rngs)
  raw = np.asarray(layer.layer_instance.kernel[...])
  sigma_true = np.linalg.svd(raw.reshape(-1, 5), compute_uv=False)[0]
  x = jax.random.normal(jax.random.key(1), (2, 7, 7, 6))
  u0 = np.asarray(layer.batch_stats[("kernel", "u")][...])
  layer(x, update_stats=False)
  np.testing.assert_array_equal(layer.batch_stats[("kernel", "u")][...], u0)
  for _ in range(50):  # one power iteration per call, state carried in the BatchStat
    y = layer(x, update_stats=True)
  assert not np.allclose(layer.batch_stats[("kernel", "u")][...], u0)
  np.testing.assert_array_equal(layer.layer_instance.kernel[...], raw)  # flax#5576 undone
  np.testing.assert_allclose(float(layer.batch_stats[("kernel", "sigma")][...]), sigma_true,
                             rtol=1e-4)
  want = jax.lax.conv_general_dilated(x, raw / sigma_true, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  want = want + layer.layer_instance.bias[...]
  np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_pure_discriminator_step_updates_params_and_power_iteration_state_and_learns(tiny_disc):
  graphdef, params, stats, rest = nnx.split(tiny_disc, dmod.TRAINABLE, dmod.POWER_ITERATION_STATE,
                                          ...)
  tx = optax.adamw(1e-2)
  opt_state = tx.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1, 2))
  def step(params, stats, opt_state, real, fake):
    def loss_fn(params, stats):
      m = nnx.merge(graphdef, params, stats, rest, copy=True)
      logits = m(jnp.concatenate([real, fake]), update_stats=True)
      loss = dmod.discriminator_loss(logits[:len(real)], logits[len(real):])
      return loss, (nnx.state(m, dmod.POWER_ITERATION_STATE), logits)
    (loss, (stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss, logits

  # "real": smooth images; "fake": the same plus high-frequency noise.
  real = jax.image.resize(_images(2, n=8, size=4), (8, 16, 16, 3), "linear")
  fake = jnp.clip(real + 0.3 * jax.random.normal(jax.random.key(3), real.shape), -1, 1)
  u_before = np.asarray(jax.tree.leaves(stats)[1])
  first_kernel = np.asarray(params["heads"][0]["conv"]["layer_instance"]["kernel"][...])
  losses = []
  for _ in range(20):
    params, stats, opt_state, loss, logits = step(params, stats, opt_state, real, fake)
    losses.append(float(loss))
  assert step._cache_size() == 1  # no recompilation after the first step
  assert not np.allclose(jax.tree.leaves(stats)[1], u_before)
  assert not np.allclose(params["heads"][0]["conv"]["layer_instance"]["kernel"][...],
                         first_kernel)
  assert losses[-1] < losses[0] - 0.1, losses
  assert bool(jnp.all(logits[:len(real)] > logits[len(real):].max()))  # D separates them


def test_losses_match_torch_bce_with_logits():
  rng = np.random.default_rng(0)
  real, fake = rng.normal(size=6).astype(np.float32), rng.normal(size=6).astype(np.float32)
  bce = torch.nn.functional.binary_cross_entropy_with_logits
  tr, tf = torch.from_numpy(real), torch.from_numpy(fake)
  want_d = bce(tr, torch.full_like(tr, 0.8)) + bce(tf, torch.zeros_like(tf))
  want_g = bce(tf, torch.full_like(tf, 0.8))
  np.testing.assert_allclose(float(dmod.discriminator_loss(real, fake)), float(want_d), rtol=1e-6)
  np.testing.assert_allclose(float(dmod.generator_adversarial_loss(fake)), float(want_g),
                             rtol=1e-6)
  # One-sided smoothing: the generator's loss is smallest at D(x_hat) = logit(0.8), not at +inf.
  best = np.log(0.8 / 0.2)
  g = lambda z: float(dmod.generator_adversarial_loss(jnp.full((1,), z)))
  assert g(best) < g(best + 1.0) and g(best) < g(best - 1.0)


@pytest.mark.parametrize("widths, fractions, levels", [
    ((8, 8, 8), (0.25, 0.5, 1.0), (0, 1, 2)),  # depths 1/3, 2/3, 1: no tie at 0.5
    ((8, 8, 8, 8, 8, 8, 8, 8), (0.25, 0.5, 1.0), (1, 3, 7)),
    ((8, 8), (0.5, 1.0), (0, 1)),
])
def test_levels_are_the_shallowest_maps_at_least_that_deep(widths, fractions, levels):
  depths = tuple((i + 1) / len(widths) for i in range(len(widths)))
  assert dmod._pick_levels(depths, fractions, "config.disc") == levels


@pytest.mark.parametrize("overrides, match", [
    (dict(backbone="siglip"), "choose one of"),
    (dict(backbone="vgg16"), "vgg16_path"),
    (dict(backbone="vgg16", vgg16_path="/nonexistent/vgg16.pth"), "does not exist"),
    (dict(conv_widths=(8, 16)), "map to the same backbone layers"),
    (dict(level_fractions=(0.0, 1.0)), r"in \(0, 1\]"),
])
def test_bad_configs_raise_fape_error(overrides, match):
  with pytest.raises(FapeError, match=match):
    dmod.Discriminator(_tiny(**overrides), rngs=nnx.Rngs(0))


def test_bad_input_raises_fape_error(tiny_disc):
  with pytest.raises(FapeError, match="NHWC RGB"):
    tiny_disc(jnp.zeros((2, 3, 16, 16)))
