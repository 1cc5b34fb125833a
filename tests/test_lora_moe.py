"""Band split, routers and adapter surgery, on a toy NNX model named like the diffusers UNet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fape_jax import losses
from fape_jax.errors import FapeError
from fape_jax.models import bands
from fape_jax.models import lora_moe

CTX = 6  # context (projected plan token) width of the toy model


def _rngs(seed):
  # rbg compiles the many small init programs several times faster than threefry on CPU.
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


class _Attention(nnx.Module):
  """diffusers-named attention: to_q/to_k/to_v, to_out = [Linear]; masked single-head softmax."""

  def __init__(self, dim, kv_dim, rngs):
    self.to_q = nnx.Linear(dim, dim, use_bias=False, rngs=rngs)
    self.to_k = nnx.Linear(kv_dim, dim, use_bias=False, rngs=rngs)
    self.to_v = nnx.Linear(kv_dim, dim, use_bias=False, rngs=rngs)
    self.to_out = nnx.List([nnx.Linear(dim, dim, rngs=rngs)])

  def __call__(self, x, context=None, mask=None):
    ctx = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
    mask = None if mask is None else mask[:, None, None, :].astype(bool)
    out = jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None], mask=mask)
    return self.to_out[0](out[:, :, 0])


class _TransformerBlock(nnx.Module):

  def __init__(self, dim, rngs):
    self.attn1 = _Attention(dim, dim, rngs)
    self.attn2 = _Attention(dim, CTX, rngs)

  def __call__(self, x, context, mask):
    x = x + self.attn1(x)
    return x + self.attn2(x, context, mask)


class _Resnet(nnx.Module):

  def __init__(self, dim, rngs):
    self.conv1 = nnx.Conv(dim, dim, (3, 3), padding=1, rngs=rngs)
    self.conv2 = nnx.Conv(dim, dim, (3, 3), padding=1, rngs=rngs)

  def __call__(self, x):
    return x + self.conv2(jax.nn.silu(self.conv1(x)))


class _Transformer(nnx.Module):

  def __init__(self, dim, rngs):
    self.transformer_blocks = nnx.List([_TransformerBlock(dim, rngs)])

  def __call__(self, x, context, mask):
    b, h, w, c = x.shape
    t = x.reshape(b, h * w, c)
    for blk in self.transformer_blocks:
      t = blk(t, context, mask)
    return t.reshape(b, h, w, c)


class _Level(nnx.Module):

  def __init__(self, dim, rngs):
    self.resnets = nnx.List([_Resnet(dim, rngs)])
    self.attentions = nnx.List([_Transformer(dim, rngs)])


# Built once, like a UNet that creates its remat'd block function at import time: a contextvar
# read inside it would be frozen into the cached checkpoint trace; Variables are not.
_REMAT_CALL = nnx.remat(lambda m, *a: m(*a))


class ToyUNet(nnx.Module):
  """Two resolutions (H x W, then ceil(H/2) x ceil(W/2)), resnets, self- and cross-attention."""

  def __init__(self, dim=8, *, remat=False, rngs):
    self.conv_in = nnx.Conv(3, dim, (3, 3), padding=1, rngs=rngs)
    self.down_blocks = nnx.List([_Level(dim, rngs), _Level(dim, rngs)])
    self.remat = remat

  def __call__(self, x, context, mask=None):
    call = _REMAT_CALL if self.remat else (lambda m, *a: m(*a))
    x = self.conv_in(x)
    for i, level in enumerate(self.down_blocks):
      if i:
        h, w = x.shape[1:3]
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        x = x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2, -1).mean((2, 4))
      x = call(level.resnets[0], x)
      x = call(level.attentions[0], x, context, mask)
    return x


def _toy(config=None, *, remat=False, seed=0):
  model = ToyUNet(remat=remat, rngs=_rngs(seed))
  paths = lora_moe.add_adapters(model, config or lora_moe.default_lora_config(), context_dim=CTX,
                                rngs=_rngs(seed + 1))
  return model, paths


def _randomise_adapters(model, seed=3, scale=0.3):
  """Non-zero B (and routers), so adapters actually change the output."""
  state = nnx.state(model, lora_moe.AdapterParam)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      tree, [scale * jax.random.normal(k, np.shape(l)) for k, l in zip(keys, leaves)]))


def _inputs(batch=2, h=7, w=5, k=4, seed=0):
  ks = jax.random.split(jax.random.key(seed), 2)
  x = jax.random.normal(ks[0], (batch, h, w, 3))
  ctx = jax.random.normal(ks[1], (batch, k, CTX))
  mask = jnp.ones((batch, k), bool).at[0, k - 2:].set(False)
  return x, ctx, mask


def _run(model, x, ctx, mask):
  return lora_moe.run_adapted(model, x, ctx, mask, input_hw=x.shape[1:3], context=ctx,
                              context_mask=mask)


# ---------------------------------------------------------------------------------------------
# Band split.


def _sinusoid(h, w, fy, fx, c=2):
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  s = np.cos(2 * np.pi * (fy * yy + fx * xx) + 0.3)
  return jnp.asarray(np.repeat(s[None, :, :, None], c, -1).reshape(1, h * w, c), jnp.float32)


@pytest.mark.parametrize("mode", ["fft2d", "grid2d"])
def test_grid_split_sums_to_input_and_respects_cutoff(mode):
  band = bands.BandFilter(mode, cutoff=0.125)
  h, w = 32, 16
  x = jax.random.normal(jax.random.key(0), (2, h * w, 5))
  low, high = band.split(x, (h, w))
  np.testing.assert_allclose(low + high, x, atol=1e-6)
  # Above the cutoff (0.375 cycles/step): gain 2^-9 ~ 0.002 -> removed from x_low, kept in x_high.
  s = _sinusoid(h, w, 0.375, 0.0)
  low, high = band.split(s, (h, w))
  assert float(jnp.max(jnp.abs(low))) < 2.5e-3
  np.testing.assert_allclose(high, s, atol=2.5e-3)
  # Below it (1/16 cycles/step, gain 2^-0.25 = 0.841) it is kept; at the cutoff exactly half.
  for (fy, fx), gain in (((0.0, 1 / 16), 2 ** -0.25), ((4 / 32, 0.0), 0.5)):
    s = _sinusoid(h, w, fy, fx)
    low, _ = band.split(s, (h, w))
    np.testing.assert_allclose(low, gain * s, atol=1e-5)


@pytest.mark.parametrize("mode", ["fft2d", "grid2d"])  # FFT and its separable matmul twin
def test_grid_lowpass_equals_direct_circular_convolution(mode):
  band = bands.BandFilter(mode, cutoff=0.094)
  h, w = 12, 9  # non-square, odd width: catches axis and rfft-length mix-ups
  x = np.asarray(jax.random.normal(jax.random.key(1), (1, h, w, 3)), np.float64)
  kernel = np.fft.irfft2(bands.gaussian_transfer(h, w, 0.094).astype(np.float64), s=(h, w))
  direct = np.zeros_like(x)
  for m in range(h):  # y[i, j] = sum_mn k[m, n] x[(i - m) % h, (j - n) % w]
    for n in range(w):
      direct += kernel[m, n] * np.roll(x, (m, n), axis=(1, 2))
  fft = band.lowpass(jnp.asarray(x.reshape(1, h * w, 3), jnp.float32), (h, w))
  np.testing.assert_allclose(np.asarray(fft).reshape(x.shape), direct, atol=1e-5)
  assert kernel.sum() == pytest.approx(1.0)  # DC passes unchanged


def test_fir1d_is_the_authors_gaussian_along_tokens():
  taps = bands.fir_taps(9, 2.0)
  assert taps.shape == (9,) and taps.sum() == pytest.approx(1.0)
  assert taps[4] == pytest.approx(1 / np.exp(-np.arange(-4, 5) ** 2 / 8).sum())
  band = bands.BandFilter("fir1d")
  x = np.asarray(jax.random.normal(jax.random.key(2), (2, 30, 3)))
  low, high = band.split(jnp.asarray(x), (5, 6))
  want = np.stack([np.stack([np.convolve(x[b, :, c], taps, "same") for c in range(3)], -1)
                   for b in range(2)])
  np.testing.assert_allclose(low, want, atol=1e-5)
  np.testing.assert_allclose(low + high, x, atol=1e-6)


def test_token_grid_follows_ceil_downsampling():
  assert bands.token_grid(13 * 11, (13, 11)) == (13, 11)
  assert bands.token_grid(7 * 6, (13, 11)) == (7, 6)
  assert bands.token_grid(4 * 3, (13, 11)) == (4, 3)
  assert bands.token_grid(1, (13, 11)) == (1, 1)
  with pytest.raises(FapeError, match="context_patterns"):
    bands.token_grid(77, (13, 11))


# ---------------------------------------------------------------------------------------------
# Routers.


def test_spectral_prior_reads_band_energy():
  band = bands.BandFilter("fft2d")
  h, w = 32, 32
  smooth = _sinusoid(h, w, 0.0, 1 / 32)  # gain 0.926: e_low / e_high = (0.926 / 0.074)^2
  checker = _sinusoid(h, w, 0.5, 0.5)  # gain ~1e-17
  for x, want in ((smooth, 0.926 ** 2 / (0.926 ** 2 + 0.074 ** 2)), (checker, 0.0)):
    logits = lora_moe.spectral_prior_logits(*band.split(x, (h, w)))
    assert float(logits[0, 0]) == pytest.approx(want, abs=2e-3)
    np.testing.assert_allclose(jnp.sum(logits, -1), 1.0, atol=1e-6)


def test_top1_is_one_hot_forward_and_passes_gradient():
  a = jax.nn.softmax(jnp.array([[0.3, -0.2], [-1.0, 0.5]]))
  g = jnp.array([1.0, 3.0])  # the "loss" weighs expert 1 higher

  ste = lora_moe.top1(a, "ste")
  np.testing.assert_array_equal(ste, [[1.0, 0.0], [0.0, 1.0]])
  many = jax.nn.softmax(2 * jax.random.normal(jax.random.key(0), (64, 2)))
  np.testing.assert_array_equal(  # exactly one-hot, not 1 +- rounding
      lora_moe.top1(many, "ste"), jax.nn.one_hot(jnp.argmax(many, -1), 2))
  grad_ste = jax.grad(lambda a: jnp.sum(lora_moe.top1(a, "ste") * g))(a)
  np.testing.assert_allclose(grad_ste, jnp.broadcast_to(g, a.shape))  # straight through

  eps = lora_moe.top1(a, "epsilon", 0.01)
  np.testing.assert_allclose(jnp.sum(eps, -1), 1.0, atol=1e-6)
  want0 = a[0, 0] / (a[0, 0] + 0.01 * a[0, 1])
  assert float(eps[0, 0]) == pytest.approx(float(want0), rel=1e-6)
  assert float(eps[0, 1]) < 0.01
  grad_eps = jax.grad(lambda a: jnp.sum(lora_moe.top1(a, "epsilon") * g))(a)
  assert float(jnp.max(jnp.abs(grad_eps))) > 1e-3


def test_text_router_pooling_ignores_masked_tokens():
  logits = jax.random.normal(jax.random.key(0), (2, 6, 2))
  mask = jnp.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
  w = lora_moe.pooled_token_weights(logits, mask)
  np.testing.assert_allclose(jnp.sum(w, -1), 1.0, atol=1e-6)
  np.testing.assert_allclose(w[0], jnp.mean(jax.nn.softmax(logits[0, :3]), 0), atol=1e-6)
  changed = logits.at[0, 3:].set(100.0)
  np.testing.assert_array_equal(lora_moe.pooled_token_weights(changed, mask), w)
  # Truncation to the layer's token count, and a plan with no valid token -> uniform.
  np.testing.assert_allclose(lora_moe.pooled_token_weights(logits, None, max_tokens=2),
                             jnp.mean(jax.nn.softmax(logits[:, :2]), 1), atol=1e-6)
  np.testing.assert_allclose(lora_moe.pooled_token_weights(logits, jnp.zeros_like(mask)), 0.5)


def test_image_descriptor_separates_smooth_from_noisy_images():
  h, w = 24, 20
  yy = np.cos(2 * np.pi * np.arange(h) / h)[:, None] * np.ones((1, w))  # one cycle: ring 0
  smooth = jnp.asarray(np.repeat(yy[None, :, :, None], 3, -1), jnp.float32)
  noisy = jax.random.normal(jax.random.key(0), (1, h, w, 3))
  d = jax.jit(lambda x: lora_moe.image_frequency_descriptor(x, 4))(
      jnp.concatenate([smooth, noisy]))
  assert d.shape == (2, 4)
  fractions = 10.0 ** (8 * np.asarray(d))
  np.testing.assert_allclose(fractions.sum(-1), 1.0, atol=1e-4)
  assert fractions[0, 0] > 0.999
  assert fractions[1, 2:].sum() > 0.3  # white noise fills the outer rings


# ---------------------------------------------------------------------------------------------
# Surgery, wrappers, remat.


def test_surgery_adapts_attention_projections_and_keeps_base_frozen():
  model, paths = _toy()
  assert len(paths) == 2 * 2 * 4  # 2 levels x (attn1, attn2) x (q, k, v, out.0)
  assert "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0" in paths
  assert not any("resnets" in p for p in paths)
  layers = dict(lora_moe.adapted_layers(model))
  assert layers["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"].context_input
  assert not layers["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"].context_input
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name = ".".join(map(str, path))
    assert isinstance(var, lora_moe.AdapterParam) == (".base." not in name
                                                      and not name.startswith("conv_in")
                                                      and "resnets" not in name), name
  with pytest.raises(FapeError, match="already has adapters"):
    lora_moe.add_adapters(model, lora_moe.default_lora_config(), context_dim=CTX,
                          rngs=_rngs(0))

  cfg = lora_moe.default_lora_config()
  cfg.conv_lora = True
  cfg.ranks = (8, 16)
  conv_model, conv_paths = _toy(cfg)
  assert "down_blocks.0.resnets.0.conv1" in conv_paths and len(conv_paths) == 16 + 4
  conv = dict(lora_moe.adapted_layers(conv_model))["down_blocks.0.resnets.0.conv1"]
  assert conv.expert0.A.kernel.shape == (3, 3, 8, 8)
  assert conv.expert1.A.kernel.shape == (3, 3, 8, 16) and conv.expert1.B.kernel.shape == (16, 8)
  assert conv.expert1.scale == pytest.approx(1 / 16)


def test_zero_init_is_exactly_the_base_model_and_routing_is_reported():
  x, ctx, mask = _inputs()
  cfg = lora_moe.default_lora_config()
  cfg.conv_lora = True  # linear and conv wrappers
  cfg.top1, cfg.top1_mode = "all", "ste"  # exactly one-hot everywhere (the default mixes softly)
  plain = ToyUNet(rngs=_rngs(0))
  model, paths = _toy(cfg)
  out, aux = _run(model, x, ctx, mask)
  np.testing.assert_array_equal(out, plain(x, ctx, mask))
  assert set(aux["routing"]) == set(paths)
  for name, w in aux["routing"].items():
    assert w.shape == (2, 2)
    np.testing.assert_array_equal(jnp.sum(w, -1), 1.0)
    assert set(np.unique(np.asarray(w))) <= {0.0, 1.0}, name  # top-1 'ste': one-hot forward
  spatial = {p for p in paths if not p.endswith(("attn2.to_k", "attn2.to_v"))}
  assert set(aux["freq_terms"]) == spatial
  assert all(float(v) == 0.0 for v in aux["freq_terms"].values())  # B = 0: nothing leaks
  # After the call the model state holds parameters only again.
  assert not nnx.state(model, lora_moe.RoutingInput) and not nnx.state(model, lora_moe.AdapterAux)


def test_wrapper_output_and_freq_term_match_the_formula():
  cfg = lora_moe.default_lora_config()
  cfg.top1 = "none"
  model, _ = _toy(cfg)
  _randomise_adapters(model)
  name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
  layer = dict(lora_moe.adapted_layers(model))[name]
  x = jax.random.normal(jax.random.key(5), (2, 4 * 3, 8))  # level 1 of a 7 x 5 input: 4 x 3
  ctx = jax.random.normal(jax.random.key(6), (2, 3, CTX))
  with lora_moe.bound_routing_inputs(model, batch=2, input_hw=(7, 5), context=ctx):
    out = layer(x)
    routing, freq = layer.aux_routing.get_value(), layer.aux_freq.get_value()
  low, high = layer.band.split(x, (4, 3))
  y0, y1 = layer.expert0(low), layer.expert1(high)
  w_text = lora_moe.pooled_token_weights(layer.router.text(ctx), None, 12)
  w_vis = jax.nn.softmax(lora_moe.spectral_prior_logits(low, high), -1)
  lam = jax.nn.sigmoid(layer.router.lambda_logit.get_value())
  a = lam * w_text + (1 - lam) * w_vis
  np.testing.assert_allclose(routing, a, atol=1e-6)
  want = layer.base(x) + a[:, None, 0:1] * y0 + a[:, None, 1:2] * y1
  np.testing.assert_allclose(out, want, atol=1e-5)
  np.testing.assert_allclose(freq, bands.band_leakage(
      y0, y1, lambda t: layer.band.lowpass(t, (4, 3))), rtol=1e-5)
  assert float(freq) > 0


def test_padded_plan_tokens_change_nothing():
  model, _ = _toy()
  _randomise_adapters(model)
  x, ctx, mask = _inputs()
  out, aux = _run(model, x, ctx, mask)
  ctx2 = ctx.at[0, -2:].set(50.0)  # sample 0's last two tokens are padding
  out2, aux2 = _run(model, x, ctx2, mask)
  np.testing.assert_array_equal(out2, out)
  jax.tree.map(np.testing.assert_array_equal, aux2, aux)
  out3, _ = _run(model, x, ctx.at[0, 0].set(50.0), mask)  # a valid token does matter
  assert float(jnp.max(jnp.abs(out3 - out))) > 1e-3


def test_routing_inputs_reach_wrappers_under_remat_and_jit():
  """Same outputs, aux and gradients with per-block nnx.remat as without, call after call."""
  x, ctx, mask = _inputs()
  cfg = lora_moe.default_lora_config()  # fewer adapted layers: compile time
  cfg.patterns = (r"attn1\.to_q$", r"attn2\.to_(k|out\.0)$")
  models = []
  for remat in (False, True):
    model, _ = _toy(cfg, remat=remat)
    _randomise_adapters(model)
    models.append(model)

  @nnx.jit
  def loss_and_grad(model, x, ctx, mask):
    def loss(model):
      out, aux = _run(model, x, ctx, mask)
      return jnp.mean(out ** 2) + losses.frequency_loss(aux["freq_terms"]), aux
    return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, lora_moe.AdapterParam),
                              has_aux=True)(model)

  losses_by_seed = []
  for seed in (0, 1):  # a second plan must not reuse the first one's trace
    (l0, aux0), g0 = loss_and_grad(models[0], x, ctx + seed, mask)
    (l1, aux1), g1 = loss_and_grad(models[1], x, ctx + seed, mask)
    assert float(l1) == pytest.approx(float(l0), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), aux1, aux0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g1, g0)
    losses_by_seed.append(float(l1))
  assert abs(losses_by_seed[1] - losses_by_seed[0]) > 1e-4
  assert float(jnp.max(jnp.abs(g1["down_blocks"][1]["attentions"][0]["transformer_blocks"][0][
      "attn2"]["to_k"]["router"]["text"]["kernel"].get_value()))) > 0


def test_variants_dense_token_gate_descriptor_and_first_layer_top1():
  x, ctx, mask = _inputs()
  desc = lora_moe.image_frequency_descriptor(x, 8)
  dense = lora_moe.default_lora_config()
  dense.variant = "dense"
  model, paths = _toy(dense)
  plain = ToyUNet(rngs=_rngs(0))
  out, aux = _run(model, x, ctx, mask)
  np.testing.assert_array_equal(out, plain(x, ctx, mask))
  assert aux == {"routing": {}, "freq_terms": {}}
  layer = dict(lora_moe.adapted_layers(model))[paths[0]]
  assert not hasattr(layer, "expert1") and not hasattr(layer, "router")

  cfg = lora_moe.default_lora_config()
  cfg.update(image_descriptor=True)  # default: top-1 in the first layer, loser keeps ~1 %
  model, paths = _toy(cfg)
  _randomise_adapters(model)
  _, aux = lora_moe.run_adapted(model, x, ctx, mask, input_hw=x.shape[1:3], context=ctx,
                                context_mask=mask, descriptor=desc)
  one_hot = lambda w: set(np.unique(np.asarray(w))) <= {0.0, 1.0}  # noqa: E731
  loser = np.min(np.asarray(aux["routing"][paths[0]]), -1)
  assert np.all(loser > 0) and np.all(loser < 0.02)  # near one-hot, and the loser still learns
  assert not any(np.min(np.asarray(aux["routing"][p])) < 0.02 for p in paths[1:])  # soft mixing
  assert all(np.allclose(np.sum(w, -1), 1.0, atol=1e-6) for w in aux["routing"].values())

  cfg.token_gate = True
  cfg.top1, cfg.top1_mode = "all", "ste"
  model, paths = _toy(cfg)
  _randomise_adapters(model)
  _, aux = lora_moe.run_adapted(model, x, ctx, mask, input_hw=x.shape[1:3], context=ctx,
                                context_mask=mask, descriptor=desc)
  # Token-wise one-hot routing, reported pooled over tokens: fractions that still sum to 1.
  assert all(np.allclose(np.sum(w, -1), 1.0, atol=1e-6) for w in aux["routing"].values())
  assert not all(one_hot(w) for w in aux["routing"].values())
  with pytest.raises(FapeError, match="image descriptor"):
    _run(model, x, ctx, mask)


@pytest.mark.parametrize("change, match", [
    (dict(band_mode="wavelet"), "band_mode"),
    (dict(fir_taps=8), "fir_taps"),
    (dict(ranks=(8,)), "ranks"),
    (dict(cutoff=0.7), "cutoff"),
    (dict(text_router=False, spectral_router=False), "every router off"),
    (dict(patterns=("to_q(",)), "not a valid regex"),
    (dict(rank=8), "unknown field"),
])
def test_bad_lora_config_raises(change, match):
  cfg = lora_moe.default_lora_config().to_dict()
  cfg.update(change)
  with pytest.raises(FapeError, match=match):
    lora_moe.check_lora_config(cfg)


def test_surgery_errors_are_fape_errors():
  cfg = lora_moe.default_lora_config()
  cfg.patterns = (r"nothing_like_this$",)
  with pytest.raises(FapeError, match="no layer"):
    _toy(cfg)
  cfg.patterns = (r"resnets\.0$",)
  with pytest.raises(FapeError, match="not an nnx.Linear"):
    _toy(cfg)
  model, _ = _toy()
  x, ctx, mask = _inputs()
  with pytest.raises(FapeError, match="without routing inputs"):
    model(x, ctx, mask)
