"""AutoencoderKL: parity with diffusers' PyTorch VAE (encode mean, sampling, decode), bf16,
remat, legacy attention names, strict config.

Error = max|ours - ref| / max|ref|, as in test_unet.py.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from fape_jax.errors import FapeError  # noqa: E402
from fape_jax.models import vae  # noqa: E402

# SD-like: two levels, mid-block attention, quant convs.
SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
             latent_channels=4, sample_size=32)
# Three levels, two resnets per block, no mid attention nor quant convs, 3 latent channels.
DEEP = dict(block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=8,
            down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
            latent_channels=3, use_quant_conv=False, use_post_quant_conv=False,
            mid_block_add_attention=False, scaling_factor=0.5, sample_size=16)


def rel_err(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def save_torch_vae(config, folder, seed=0):
  torch.manual_seed(seed)
  model = diffusers.AutoencoderKL(**config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  model.save_pretrained(folder)
  return model


def images(size, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (2, 3, size, size)).astype(np.float32)


nchw_to_nhwc = lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))


@nnx.jit
def encode(model, x):
  return model.encode(x)


@nnx.jit
def encode_sample(model, x, key):
  return model.encode(x, rng=key)


@nnx.jit
def decode(model, z):
  return model.decode(z)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  folder = tmp_path_factory.mktemp("vae_small")
  return folder, save_torch_vae(SMALL, folder)


@pytest.mark.parametrize("name,size", [("small", 32), ("deep", 16)])
def test_parity_with_diffusers(name, size, small, tmp_path):
  if name == "small":
    folder, ref_model = small
    config = SMALL
  else:
    config = DEEP
    folder, ref_model = tmp_path, save_torch_vae(DEEP, tmp_path)
  x = images(size)
  with torch.no_grad():
    post = ref_model.encode(torch.from_numpy(x)).latent_dist
    ref_mean, ref_std = nchw_to_nhwc(post.mean.numpy()), nchw_to_nhwc(post.std.numpy())
    ref_dec = nchw_to_nhwc(ref_model.decode(post.mean).sample.numpy())
  model = vae.from_diffusers(folder)
  mean = encode(model, jnp.asarray(nchw_to_nhwc(x)))
  dec = decode(model, jnp.asarray(ref_mean))
  e_enc, e_dec = rel_err(mean, ref_mean), rel_err(dec, ref_dec)
  print(f"\nVAE parity {name} fp32: encode mean {e_enc:.2e}, decode {e_dec:.2e}")
  lat = size // 2 ** (len(config["block_out_channels"]) - 1)
  assert mean.shape == (2, lat, lat, config["latent_channels"])
  assert min(np.abs(ref_mean).max(), np.abs(ref_dec).max()) > 0.1
  assert e_enc <= 1e-4 and e_dec <= 1e-4
  assert model.config["scaling_factor"] == config.get("scaling_factor", 0.18215)
  # Sampling: z = mean + std * N(0, 1) drawn from the key (documented in `encode`).
  key = jax.random.key(7)
  z = np.asarray(encode_sample(model, jnp.asarray(nchw_to_nhwc(x)), key))
  noise = np.asarray(jax.random.normal(key, z.shape, jnp.float32))
  np.testing.assert_allclose(z, ref_mean + ref_std * noise, rtol=1e-4,
                             atol=1e-4 * np.abs(ref_mean).max())
  assert np.abs(z - ref_mean).max() > 1e-3


def test_bf16_and_remat(small):
  folder, _ = small
  x = jnp.asarray(nchw_to_nhwc(images(32, seed=1)))
  ref = vae.from_diffusers(folder)
  z_ref, y_ref = encode(ref, x), decode(ref, encode(ref, x))
  half = vae.from_diffusers(folder, dtype=jnp.bfloat16)
  z, y = encode(half, x), decode(half, z_ref)
  err_z, err_y = rel_err(z, z_ref), rel_err(y, y_ref)
  print(f"\nVAE bf16 vs fp32: encode {err_z:.2e}, decode {err_y:.2e}")
  assert z.dtype == jnp.bfloat16
  # bf16 rounds at <= 2^-9 relative per op; ~12 layers deep that adds up to ~1 % of the output
  # range. 4 % still catches real bugs (O(1) errors) and > 0 shows bf16 was used.
  assert 0 < err_z <= 4e-2 and 0 < err_y <= 4e-2
  remat = vae.from_diffusers(folder, remat=True)
  np.testing.assert_array_equal(np.asarray(encode(remat, x)), np.asarray(z_ref))
  np.testing.assert_array_equal(np.asarray(decode(remat, z_ref)), np.asarray(y_ref))


def test_legacy_attention_names_load(small, tmp_path):
  folder, _ = small
  tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  legacy = {}
  for name, arr in tensors.items():
    for new, old in renames.items():
      if f"attentions.0.{new}." in name:
        name = name.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        if old != "proj_attn" and arr.ndim == 2:  # the oldest files held 1x1 convs
          arr = arr[:, :, None, None]
    legacy[name] = arr
  assert "decoder.mid_block.attentions.0.query.weight" in legacy
  (tmp_path / "config.json").write_text((folder / "config.json").read_text())
  save_file(legacy, str(tmp_path / "diffusion_pytorch_model.safetensors"))
  x = jnp.asarray(nchw_to_nhwc(images(32)))
  np.testing.assert_array_equal(np.asarray(encode(vae.from_diffusers(tmp_path), x)),
                                np.asarray(encode(vae.from_diffusers(folder), x)))


@pytest.mark.parametrize("override,needle", [
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
     "AttnDownEncoderBlock2D"),
    ({"up_block_types": ["UpDecoderBlock2D"]}, "`up_block_types`"),
    ({"act_fn": "relu"}, "`act_fn`"),
    ({"norm_num_groups": 5}, "`norm_num_groups`"),
    ({"use_tiling": True}, "unknown option `use_tiling`"),
    ({"_class_name": "UNet2DConditionModel"}, "not a `AutoencoderKL`"),
])
def test_unsupported_config_is_a_clear_error(override, needle):
  with pytest.raises(FapeError) as info:
    vae.parse_config({**SMALL, **override})
  assert needle in str(info.value)


def test_input_checks(small):
  model = vae.from_diffusers(small[0])
  with pytest.raises(FapeError, match="NHWC with 3 channels"):
    model.encode(jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(FapeError, match="NHWC with 4 channels"):
    model.decode(jnp.zeros((1, 8, 8, 3)))
