"""UNet2DConditionModel: parity with diffusers' PyTorch model, bf16, remat, masks, module paths.

Parity: a tiny random diffusers UNet (weights perturbed so no norm is the identity) is saved
with `save_pretrained`, loaded with `unet.from_diffusers`, and both run on the same random
inputs with batch 2 and different timesteps per sample. Error = max|ours - ref| / max|ref|.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from fape_jax.errors import FapeError  # noqa: E402
from fape_jax.models import unet  # noqa: E402

# SD-1.x style: int head count, 1x1-conv projections, the default cross-attention mid block.
SD1 = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
           cross_attention_dim=32, attention_head_dim=8, sample_size=16)
# SD-2.x style: linear projections, per-block head counts, upcast_attention, 2 transformer
# layers in the second block.
SD2 = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
           cross_attention_dim=48, attention_head_dim=[2, 4], use_linear_projection=True,
           upcast_attention=True, transformer_layers_per_block=[1, 2], sample_size=16)
# Three levels, layers_per_block=2, mid block with a scale factor, and the rarer knobs.
DEEP = dict(block_out_channels=(32, 32, 64), layers_per_block=2, norm_num_groups=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=4, mid_block_scale_factor=1.5,
            flip_sin_to_cos=False, freq_shift=1, downsample_padding=0, center_input_sample=True,
            sample_size=16)
# For the 64x64 jit/remat check: attention only at the lower resolution keeps it quick.
REMAT = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
             cross_attention_dim=32, attention_head_dim=4, sample_size=64)

CONTEXT_LEN = 7


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def save_torch_unet(config: dict, folder, seed: int = 0):
  """A diffusers UNet with every weight perturbed (norm scales/biases are not 1/0)."""
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(**config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(folder)
  return model


def make_inputs(config: dict, size: tuple[int, int], seed: int = 0, mask: bool = False):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((2, 4, *size)).astype(np.float32)
  ctx = rng.standard_normal((2, CONTEXT_LEN, config["cross_attention_dim"])).astype(np.float32)
  t = np.array([3, 901])
  m = None
  if mask:
    m = np.ones((2, CONTEXT_LEN), bool)
    m[0, 4:] = False
    m[1, ::2] = False
  return x, t, ctx, m


def torch_forward(model, x, t, ctx, mask=None) -> np.ndarray:
  with torch.no_grad():
    out = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx),
                encoder_attention_mask=None if mask is None else torch.from_numpy(mask)).sample
  return out.numpy().transpose(0, 2, 3, 1)


@nnx.jit
def jax_forward(model, x_nhwc, t, ctx, mask):
  return model(x_nhwc, t, ctx, encoder_attention_mask=mask)


def ours(model, x, t, ctx, mask=None) -> jax.Array:
  return jax_forward(model, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx),
                     None if mask is None else jnp.asarray(mask))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
  folder = tmp_path_factory.mktemp("sd1")
  ref_model = save_torch_unet(SD1, folder)
  return folder, ref_model


@pytest.mark.parametrize("name,config,size,mask", [
    ("sd1", SD1, (16, 16), True),
    ("sd2", SD2, (16, 16), False),
    ("deep", DEEP, (18, 14), True),  # 18x14: not a multiple of 4, upsamples to skip sizes
])
def test_parity_with_diffusers(name, config, size, mask, tmp_path, sd1):
  if name == "sd1":
    folder, ref_model = sd1
  else:
    folder, ref_model = tmp_path, save_torch_unet(config, tmp_path)
  x, t, ctx, m = make_inputs(config, size, mask=mask)
  ref = torch_forward(ref_model, x, t, ctx, m)
  model = unet.from_diffusers(folder)
  out = ours(model, x, t, ctx, m)
  err = rel_err(out, ref)
  print(f"\nUNet parity {name} fp32: worst relative error {err:.2e} (max|ref| "
        f"{np.abs(ref).max():.2f})")
  assert out.shape == ref.shape and out.dtype == jnp.float32
  assert np.abs(ref).max() > 0.1  # a meaningful, non-vanishing output
  assert err <= 1e-4
  assert model.config["cross_attention_dim"] == config["cross_attention_dim"]


def test_bf16_compute_close_to_fp32(sd1):
  folder, ref_model = sd1
  x, t, ctx, _ = make_inputs(SD1, (16, 16), seed=1)
  ref = torch_forward(ref_model, x, t, ctx)
  model = unet.from_diffusers(folder, dtype=jnp.bfloat16)
  out = ours(model, x, t, ctx)
  err = rel_err(out, ref)
  print(f"\nUNet bf16 vs torch fp32: worst relative error {err:.2e}")
  assert out.dtype == jnp.bfloat16
  # Parameters stay float32; only compute is bf16.
  assert model.conv_in.kernel.get_value().dtype == jnp.float32
  # bf16 keeps 8 mantissa bits: each rounding is <= 2^-9 ~ 0.2 % relative. About 30 layers deep
  # (convs, norms, attention, residual sums) the errors add up, largely at random, to roughly
  # 0.5-2 % of the output range; 4 % bounds that while still catching a real bug (a wrong
  # op gives O(1) errors). It must not be exactly fp32 either, or bf16 was not used.
  assert 0 < err <= 4e-2


def test_remat_jit_64x64_identical(tmp_path):
  save_torch_unet(REMAT, tmp_path)
  plain = unet.from_diffusers(tmp_path, remat=False)
  remat = unet.from_diffusers(tmp_path, remat=True)
  x, t, ctx, _ = make_inputs(REMAT, (64, 64))
  a = ours(plain, x, t, ctx)
  b = ours(remat, x, t, ctx)
  assert a.shape == (2, 64, 64, 4)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # remat really wraps the blocks: its forward has checkpoint (remat) regions, the plain one not.
  args = (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(ctx))

  def jaxpr(m):
    graphdef, state = nnx.split(m)
    return str(jax.make_jaxpr(lambda s, *a: nnx.merge(graphdef, s)(*a))(state, *args))

  assert "checkpoint" in jaxpr(remat) or "remat" in jaxpr(remat)
  assert "checkpoint" not in jaxpr(plain) and "remat" not in jaxpr(plain)


def test_masked_context_tokens_do_not_influence_output(sd1):
  folder, _ = sd1
  model = unet.from_diffusers(folder)
  x, t, ctx, _ = make_inputs(SD1, (16, 16), seed=2)
  mask = np.ones((2, CONTEXT_LEN), bool)
  mask[:, 3:] = False
  mask[1, :] = False  # a sample with no context at all
  base = np.asarray(ours(model, x, t, ctx, mask))
  changed = ctx.copy()
  changed[:, 3:] = 100.0 * np.random.default_rng(3).standard_normal(changed[:, 3:].shape)
  changed[1] = -50.0
  np.testing.assert_array_equal(base, np.asarray(ours(model, x, t, changed, mask)))
  # ...while a kept token does change it (so the check above can fail).
  kept = ctx.copy()
  kept[0, 0] += 1.0
  assert np.abs(base - np.asarray(ours(model, x, t, kept, mask))).max() > 1e-4


def test_scalar_timestep_equals_broadcast(sd1):
  model = unet.from_diffusers(sd1[0])
  x, _, ctx, _ = make_inputs(SD1, (16, 16))
  a = ours(model, x, np.array(250), ctx)
  b = ours(model, x, np.array([250, 250]), ctx)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)


def test_module_paths_mirror_diffusers_and_projections_are_swappable(sd1):
  folder, ref_model = sd1
  model = unet.from_diffusers(folder)
  block = model.down_blocks[0].attentions[0].transformer_blocks[0]
  for proj in (block.attn1.to_q, block.attn1.to_k, block.attn1.to_v, block.attn1.to_out[0],
               block.attn2.to_q, block.ff.net[2]):
    assert isinstance(proj, nnx.Linear)
  assert isinstance(model.down_blocks[0].attentions[0].proj_in, nnx.Conv)  # SD-1.x: conv
  assert isinstance(model.mid_block.resnets[1].conv2, nnx.Conv)
  assert model.up_blocks[1].upsamplers is None and model.down_blocks[1].downsamplers is None
  # Module surgery (what the LoRA-MoE adapters do): a wrapper replacing to_q is really called.
  x, t, ctx, _ = make_inputs(SD1, (16, 16))
  before = np.asarray(ours(model, x, t, ctx))

  class Doubled(nnx.Module):
    def __init__(self, base):
      self.base = base

    def __call__(self, h):
      return 2.0 * self.base(h)

  block.attn2.to_q = Doubled(block.attn2.to_q)
  model.mid_block.resnets[0].conv1 = Doubled(model.mid_block.resnets[0].conv1)
  after = np.asarray(ours(model, x, t, ctx))
  assert np.abs(after - before).max() > 1e-3


@pytest.mark.parametrize("override,needle", [
    ({"class_embed_type": "timestep"}, "`class_embed_type`"),
    ({"addition_embed_type": "text_time"}, "`addition_embed_type`"),
    ({"time_cond_proj_dim": 256}, "`time_cond_proj_dim`"),
    ({"attention_type": "gated"}, "`attention_type`"),
    ({"resnet_time_scale_shift": "scale_shift"}, "`resnet_time_scale_shift`"),
    ({"num_class_embeds": 10}, "`num_class_embeds`"),
    ({"only_cross_attention": [False, True]}, "`only_cross_attention`"),
    ({"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]},
     "SimpleCrossAttnDownBlock2D"),
    ({"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}, "`mid_block_type`"),
    ({"act_fn": "gelu"}, "`act_fn`"),
    ({"attention_head_dim": [8, 8, 8]}, "`attention_head_dim`"),
    ({"attention_head_dim": 5}, "`attention_head_dim`"),
    ({"norm_num_groups": 12}, "`norm_num_groups`"),
    ({"transformer_layers_per_block": [[1, 1], [1, 1]]}, "`transformer_layers_per_block`"),
    ({"frobnicate": 1}, "unknown option `frobnicate`"),
    ({"_class_name": "AutoencoderKL"}, "AutoencoderKL"),
])
def test_unsupported_config_is_a_clear_error(override, needle):
  with pytest.raises(FapeError, match=None) as info:
    unet.parse_config({**SD1, **override})
  assert needle in str(info.value)


def test_default_and_noop_config_values_are_accepted():
  config = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1",
            "_name_or_path": "x", **SD1, "class_embed_type": None, "addition_embed_type": None,
            "time_cond_proj_dim": None, "attention_type": "default", "dropout": 0.0,
            "resnet_time_scale_shift": "default", "only_cross_attention": [False, False],
            "dual_cross_attention": False, "resnet_skip_time_act": True,
            "addition_embed_type_num_heads": 64, "num_attention_heads": None}
  parsed = unet.parse_config(config)
  assert parsed["attention_head_dim"] == 8 and "_class_name" not in parsed
  assert "class_embed_type" not in parsed  # fixed at its no-op value, not a model option


# ------------------------------------------------------------------------------------------------
# Attention on CPU (a train-step speed-up, BENCHMARKS.md): the same numbers and gradients as
# `jax.nn.dot_product_attention`, which it replaced there.

from fape_jax.models import layers  # noqa: E402


@pytest.mark.parametrize("s_len,masked", [(36, False), (7, True)])
def test_deferred_attention_matches_dot_product_attention(s_len, masked):
  rng = np.random.default_rng(s_len)
  q, k, v = (jnp.asarray(rng.normal(size=(3, 36 if i == 0 else s_len, 2, 8)).astype(np.float32))
             for i in range(3))
  mask = None
  if masked:  # sample 1 keeps 3 tokens, sample 2 none (a uniform row, zeroed by `Attention`)
    mask = jnp.asarray(np.arange(s_len)[None, :] < np.array([[s_len], [3], [0]]))
  cot = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))

  def ref(q, k, v):
    m = None if mask is None else mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=m, implementation="xla")

  def new(q, k, v):
    return layers._attention_deferred(q, k, v, mask)

  np.testing.assert_allclose(new(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-6)
  g_ref = jax.grad(lambda *a: jnp.sum(ref(*a) * cot), argnums=(0, 1, 2))(q, k, v)
  g_new = jax.grad(lambda *a: jnp.sum(new(*a) * cot), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_new, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  if jax.default_backend() == "cpu":
    assert layers.attend(q, k, v, mask) is not None
    np.testing.assert_array_equal(layers.attend(q, k, v, mask), new(q, k, v))


@pytest.mark.parametrize("t_len,masked", [(1027, True), (1024, False)])
def test_long_query_sequences_attend_in_blocks_with_the_same_result(t_len, masked):
  """Whole-image restoration: from `_BLOCKED_FROM` queries on, blocks of queries (padded to equal
  sizes: 1027 = 5 x 206 - 3) give the single-block result to float32 rounding: each row's
  softmax is the same math, but the CPU matmul kernels may split a 206-row and a 1027-row
  product differently (seen: 5e-7 apart), and dk, dv sum over the blocks in another order."""
  assert t_len >= layers._BLOCKED_FROM
  rng = np.random.default_rng(t_len)
  s_len = 40
  q = jnp.asarray(rng.normal(size=(2, t_len, 2, 8)).astype(np.float32))
  k, v = (jnp.asarray(rng.normal(size=(2, s_len, 2, 8)).astype(np.float32)) for _ in range(2))
  mask = jnp.asarray(np.arange(s_len)[None, :] < np.array([[s_len], [5]])) if masked else None
  cot = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))
  blocked = jax.jit(lambda q, k, v: layers._attention_deferred(q, k, v, mask))
  whole = jax.jit(lambda q, k, v: layers._attention_block(q, k, v, mask))
  assert "while" in blocked.lower(q, k, v).as_text()  # the blocked program is the one tested
  np.testing.assert_allclose(blocked(q, k, v), whole(q, k, v), rtol=1e-5, atol=1e-6)
  g_blocked = jax.grad(lambda *a: jnp.sum(blocked(*a) * cot), argnums=(0, 1, 2))(q, k, v)
  g_whole = jax.grad(lambda *a: jnp.sum(whole(*a) * cot), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_blocked, g_whole):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
