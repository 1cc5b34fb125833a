"""The one-step executor on a tiny real UNet (and VAE): identity at init, adapter-only training,
masking, any input size, adapter export/import."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fape_jax import losses
from fape_jax.errors import FapeError
from fape_jax.models import adapters_io, lora_moe
from fape_jax.models.executor import Executor, build_executor
from fape_jax.models.unet import UNet2DConditionModel
from fape_jax.models.vae import AutoencoderKL

PLAN_DIM = 10


def _rngs(seed):
  # rbg compiles the many small init programs several times faster than threefry on CPU.
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))
TINY_UNET = dict(
    in_channels=3, out_channels=3, block_out_channels=[8, 16], layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], mid_block_type=None,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=2,
    cross_attention_dim=12, norm_num_groups=4, sample_size=8)
TINY_VAE = dict(block_out_channels=[8, 8], down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=4,
                layers_per_block=1, sample_size=8)


# A spatial projection (attn1.to_q), a context one (attn2.to_k) and an output one per transformer:
# every kind of wrapper, at a third of the default's compile time. The default patterns are
# checked on the same UNet in test_default_patterns_adapt_every_attention_projection.
PATTERNS = (r"attn1\.to_q$", r"attn2\.to_(k|out\.0)$")


def _config(**lora):
  cfg = lora_moe.default_lora_config()
  cfg.patterns = PATTERNS
  cfg.update(lora)
  return dict(unet=TINY_UNET, vae=None, lora=cfg, plan_dim=PLAN_DIM, remat=True)


def _batch(h=8, w=8, k=5, seed=0):
  ks = jax.random.split(jax.random.key(seed), 2)
  x = jax.random.uniform(ks[0], (2, h, w, 3), minval=-1.0, maxval=1.0)
  plan = jax.random.normal(ks[1], (2, k, PLAN_DIM))
  mask = jnp.ones((2, k), bool).at[0, 3:].set(False)
  return x, plan, mask


def _randomise_adapters(model, seed, scale=0.2):
  state = nnx.state(model, lora_moe.AdapterParam)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      tree, [scale * jax.random.normal(k, np.shape(v)) for k, v in zip(keys, leaves)]))


@nnx.jit
def _forward(model, x, plan, mask):
  return model(x, plan, mask)


def _base_state(model):
  return nnx.state(model, nnx.All(nnx.Param, nnx.Not(lora_moe.AdapterParam)))


@pytest.fixture(scope="module")
def executor():
  return build_executor(_config(top1_mode="epsilon"), rngs=_rngs(0))


def test_zero_init_equals_the_plain_unet_exactly(executor):
  plain = UNet2DConditionModel(TINY_UNET, remat=True, rngs=_rngs(0))
  x, plan, mask = _batch()
  restored, aux = _forward(executor, x, plan, mask)

  @nnx.jit
  def reference(plain, projector, x, plan, mask):
    return plain(x, jnp.full((2,), 300), projector(plan, mask), encoder_attention_mask=mask)

  np.testing.assert_array_equal(restored, reference(plain, executor.projector, x, plan, mask))
  assert len(aux["routing"]) == 3 * 3  # 3 transformers x (attn1.to_q, attn2.to_k, attn2.to_out)
  assert len(aux["freq_terms"]) == 3 * 2  # cross-attention k sees the plan, not the grid
  assert float(losses.frequency_loss(aux["freq_terms"])) == 0.0


def test_default_patterns_adapt_every_attention_projection():
  unet = UNet2DConditionModel(TINY_UNET, rngs=_rngs(0))
  paths = lora_moe.add_adapters(unet, lora_moe.default_lora_config(), context_dim=12,
                                rngs=_rngs(1))
  assert len(paths) == 3 * 8  # 3 transformers x (attn1, attn2) x (q, k, v, out.0)
  assert {p.rsplit(".", 2)[-2] + "." + p.rsplit(".", 2)[-1] for p in paths} >= {
      "attn1.to_q", "to_out.0"}
  contexts = [p for p, m in lora_moe.adapted_layers(unet) if m.context_input]
  assert sorted(contexts) == sorted(p for p in paths if p.endswith(("attn2.to_k", "attn2.to_v")))
  cfg = lora_moe.default_lora_config()
  cfg.conv_lora = True
  unet = UNet2DConditionModel(TINY_UNET, rngs=_rngs(0))
  paths = lora_moe.add_adapters(unet, cfg, context_dim=12, rngs=_rngs(1))
  # + conv1/conv2 of 2 down and 2 + 2 up resnets (shortcuts, samplers and conv_in/out stay plain)
  assert len([p for p in paths if ".resnets." in p]) == 2 * 6


def test_training_step_moves_only_adapters(executor):
  """The functional step training uses: jax.grad over the AdapterParam split, per-block remat."""
  graphdef, params, frozen = nnx.split(executor, lora_moe.AdapterParam, ...)
  assert executor.unet.remat
  tx = optax.adam(1e-2)
  x, plan, mask = _batch()
  target = jnp.flip(x, axis=1)

  @jax.jit
  def step(params, opt_state, frozen):
    def loss_fn(params):
      restored, aux = nnx.merge(graphdef, params, frozen)(x, plan, mask)
      return jnp.mean(jnp.square(restored - target)) + 1e-3 * losses.frequency_loss(
          aux["freq_terms"])
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  new, opt_state, losses_seen = params, tx.init(params), []
  for _ in range(3):
    new, opt_state, loss = step(new, opt_state, frozen)
    losses_seen.append(float(loss))
  assert losses_seen[-1] < losses_seen[0]
  model = nnx.merge(graphdef, new, frozen)
  # Every base weight bit-identical (a base weight typed as adapter by mistake would have moved).
  jax.tree.map(np.testing.assert_array_equal, _base_state(model), _base_state(executor))
  before = dict(nnx.to_flat_state(params))
  unchanged = [".".join(map(str, p)) for p, v in nnx.to_flat_state(new)
               if np.array_equal(v.get_value(), before[p].get_value())]
  # B = 0 at init zeroes A's and the routers' first gradients; three steps move everything
  # except the null context token, which is only used when a batch has no plan.
  assert unchanged == ["projector.null_token"]


def test_padded_plan_tokens_and_missing_plans(executor):
  model = nnx.clone(executor)
  _randomise_adapters(model, seed=1)
  forward = jax.jit(lambda x, plan, mask: model(x, plan, mask))  # the module closed over
  x, plan, mask = _batch()
  out, aux = forward(x, plan, mask)
  out2, aux2 = forward(x, plan.at[0, 3:].set(30.0), mask)  # sample 0: tokens 3, 4 are padding
  np.testing.assert_array_equal(out2, out)
  jax.tree.map(np.testing.assert_array_equal, aux2, aux)
  out3, _ = forward(x, plan.at[0, 1].set(30.0), mask)
  assert float(jnp.max(jnp.abs(out3[0] - out[0]))) > 1e-4  # a real token matters
  np.testing.assert_array_equal(out3[1], out[1])  # ... only for its own sample
  for w in aux["routing"].values():
    np.testing.assert_allclose(jnp.sum(w, -1), 1.0, atol=1e-6)
  with pytest.raises(FapeError, match="plan tokens"):
    model(x, plan[..., :4], mask)
  with pytest.raises(FapeError, match="plan_mask"):
    model(x, plan, mask[:, :2])
  with pytest.raises(FapeError, match="NHWC RGB"):
    model(x[..., :1], plan, mask)


def test_adapter_export_import_round_trip(executor, tmp_path):
  source = nnx.clone(executor)
  _randomise_adapters(source, seed=2)
  path = tmp_path / "adapters.safetensors"
  adapters_io.save_adapters(source, path)
  names = set(adapters_io.read_adapters(path))
  assert ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.expert0.A.kernel"
          in names)
  assert {"projector.fc1.kernel", "projector.null_token"} <= names
  assert adapters_io.read_adapter_config(path)["lora"]["ranks"] == [8, 8]

  target = nnx.clone(executor)
  _randomise_adapters(target, seed=3)
  x, plan, mask = _batch()
  assert not np.array_equal(_forward(target, x, plan, mask)[0], _forward(source, x, plan, mask)[0])
  adapters_io.load_adapters(target, path)
  out_t, aux_t = _forward(target, x, plan, mask)
  out_s, aux_s = _forward(source, x, plan, mask)
  np.testing.assert_array_equal(out_t, out_s)
  jax.tree.map(np.testing.assert_array_equal, aux_t, aux_s)

  other = build_executor(_config(ranks=(8, 16)), rngs=_rngs(0))
  with pytest.raises(FapeError, match="lora.ranks"):
    adapters_io.load_adapters(other, path)
  with pytest.raises(FapeError, match=r"another shape .*expert1\.A\.kernel \(8, 8\) vs \(8, 16\)"):
    adapters_io.load_adapters(other, path, check_config=False)
  with pytest.raises(FapeError, match="lora.top1_mode"):
    adapters_io.load_adapters(build_executor(_config(top1_mode="ste"), rngs=_rngs(0)), path)


def test_latent_executor_pads_any_size_and_matches_vae_unet_vae():
  unet_cfg = dict(TINY_UNET, in_channels=4, out_channels=4)
  cfg = dict(_config(), unet=unet_cfg, vae=TINY_VAE, residual=True, remat=False)
  model = build_executor(cfg, rngs=_rngs(0))
  assert model.multiple == 4  # 2 ** (2 UNet levels - 1) x VAE factor 2
  unet = UNet2DConditionModel(unet_cfg, rngs=_rngs(0))
  vae = AutoencoderKL(TINY_VAE, rngs=_rngs(0))
  # Same initial weights as the executor's, drawn from the same key in the same order.
  nnx.update(vae, nnx.state(model.vae))
  x, plan, mask = _batch(h=13, w=10)
  restored, _ = _forward(model, x, plan, mask)
  assert restored.shape == x.shape

  @nnx.jit
  def reference(unet, vae, projector, x, plan, mask):
    padded = jnp.pad(x, ((0, 0), (0, 3), (0, 2), (0, 0)), mode="reflect")  # to 16 x 12
    sf = vae.config["scaling_factor"]
    z = vae.encode(padded) * sf
    return vae.decode((z + unet(z, 300, projector(plan, mask), mask)) / sf)[:, :13, :10]

  np.testing.assert_allclose(restored, reference(unet, vae, model.projector, x, plan, mask),
                             atol=1e-6)


def test_parameter_counts_abstract_and_concrete(executor):
  abstract = nnx.eval_shape(lambda: build_executor(_config(top1_mode="epsilon"),
                                                   rngs=_rngs(0)))
  assert isinstance(nnx.state(abstract, lora_moe.AdapterParam)["projector"]["fc1"]["kernel"]
                    .get_value(), jax.ShapeDtypeStruct)
  counts = lora_moe.parameter_counts(abstract)
  assert counts == lora_moe.parameter_counts(executor)
  # Per adapted layer: two rank-8 experts, a text router (ctx 12 -> 2), lambda_s where a spatial
  # prior exists; projector 10 -> 12 -> 12 plus the null token.
  want = 0
  for name, layer in lora_moe.adapted_layers(executor):
    fan_in, fan_out = layer.base.in_features, layer.base.out_features
    want += 2 * 8 * (fan_in + fan_out) + (12 * 2 + 2) + (0 if layer.context_input else 1)
  want += (10 * 12 + 12) + (12 * 12 + 12) + 12
  assert counts["trainable"] == want
  plain = UNet2DConditionModel(TINY_UNET, rngs=_rngs(0))
  assert counts["base"] == sum(np.size(v.get_value())
                               for _, v in nnx.to_flat_state(nnx.state(plain, nnx.Param)))


def test_bad_executor_configs_raise():
  with pytest.raises(FapeError, match="3 input and output channels"):
    build_executor(dict(_config(), unet=dict(TINY_UNET, in_channels=4, out_channels=4)),
                   rngs=_rngs(0))
  with pytest.raises(FapeError, match="unknown field"):
    build_executor(dict(_config(), learning_rate=1.0), rngs=_rngs(0))
  with pytest.raises(FapeError, match="lora config.band_mode"):
    build_executor(_config(band_mode="dct"), rngs=_rngs(0))
  no_plan = build_executor(dict(_config(), plan_dim=None), rngs=_rngs(0))
  x, plan, mask = _batch()
  with pytest.raises(FapeError, match="without plan context"):
    no_plan(x, plan, mask)
  out, aux = nnx.jit(lambda m, x: m(x))(no_plan, x)  # the learned null token is the context
  assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
  assert all(w.shape == (2, 2) for w in aux["routing"].values())


def test_wrapping_a_pretrained_unet_in_place():
  unet = UNet2DConditionModel(TINY_UNET, rngs=_rngs(7))
  kernel = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.kernel.get_value()
  model = Executor(unet, None, lora_config=lora_moe.default_lora_config(), plan_dim=PLAN_DIM,
                   rngs=_rngs(1))
  wrapped = model.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
  assert isinstance(wrapped, lora_moe.LoRAMoE)
  np.testing.assert_array_equal(wrapped.base.kernel.get_value(), kernel)
  assert model.timestep == 300 and not model.residual
