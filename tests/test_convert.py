"""diffusers <-> Flax conversion: renames, layouts, folder reading and every loader error.

Most checkpoints here are written directly with `safetensors.numpy` from the abstract model's
parameter shapes (no torch, no random init), so the error paths are cheap to exercise.
"""
import json
import os
import sys

import numpy as np
import pytest

import jax.numpy as jnp
from flax import nnx
from safetensors.numpy import save_file

from fape_jax.errors import FapeError
from fape_jax.models import convert, unet, vae

TINY_UNET = dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=8,
                 attention_head_dim=2, sample_size=8)
TINY_VAE = dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2,
                latent_channels=4, sample_size=16)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def abstract_unet(config=TINY_UNET):
  return nnx.eval_shape(lambda: unet.UNet2DConditionModel(config, rngs=nnx.Rngs(0)))


def random_tensors(module, seed=0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {name: rng.standard_normal(shape).astype(np.float32)
          for name, shape in convert.parameter_shapes(module).items()}


def write_folder(folder, config, tensors, weights_name=WEIGHTS, class_name="UNet2DConditionModel"):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"_class_name": class_name, "_diffusers_version": "0.42.1", **config}, f)
  if tensors is not None:
    save_file(tensors, os.path.join(folder, weights_name))
  return folder


@pytest.fixture(scope="module")
def tiny():
  module = abstract_unet()
  return module, random_tensors(module)


def test_layouts_and_names_round_trip():
  lin, cnv = np.arange(6.).reshape(3, 2), np.arange(120.).reshape(5, 4, 3, 2)
  assert convert.to_flax_layout(lin).shape == (2, 3)
  assert convert.to_flax_layout(cnv).shape == (3, 2, 4, 5)  # (O,I,kh,kw) -> (kh,kw,I,O)
  np.testing.assert_array_equal(convert.to_torch_layout(convert.to_flax_layout(cnv)), cnv)
  np.testing.assert_array_equal(convert.to_torch_layout(convert.to_flax_layout(lin)), lin)
  path = ("down_blocks", 0, "attentions", 0, "transformer_blocks", 0, "attn1", "to_out", 0,
          "kernel")
  assert convert.diffusers_name(path) == \
      "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"
  assert convert.diffusers_name(("conv_norm_out", "scale")) == "conv_norm_out.weight"
  names = convert.name_map(abstract_unet())
  assert names["mid_block.attentions.0.transformer_blocks.0.ff.net.2.weight"] == (
      "mid_block", "attentions", 0, "transformer_blocks", 0, "ff", "net", 2, "kernel")
  assert names["time_embedding.linear_1.bias"] == ("time_embedding", "linear_1", "bias")


def test_state_dict_names_and_shapes_equal_diffusers():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  for ours, theirs in ((abstract_unet(), diffusers.UNet2DConditionModel(**TINY_UNET)),
                       (nnx.eval_shape(lambda: vae.AutoencoderKL(TINY_VAE, rngs=nnx.Rngs(0))),
                        diffusers.AutoencoderKL(**TINY_VAE))):
    ref = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert convert.parameter_shapes(ours) == ref
  del torch


def test_export_is_loadable_by_diffusers_and_gives_same_output(tmp_path):
  """The inverse rename: our exported state dict drives a fresh torch model to the same output."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  source = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
  source.save_pretrained(tmp_path)
  model = unet.from_diffusers(tmp_path)
  exported = convert.module_state_dict(model)
  target = diffusers.UNet2DConditionModel(**TINY_UNET).eval()  # different random weights
  target.load_state_dict({k: torch.from_numpy(v)
                          for k, v in exported.items()}, strict=True)
  args = (torch.randn(2, 4, 8, 8), torch.tensor([5, 600]), torch.randn(2, 3, 8))
  with torch.no_grad():
    np.testing.assert_array_equal(source(*args).sample.numpy(), target(*args).sample.numpy())


def test_pipeline_folder_fp16_variant_and_sharded(tmp_path, tiny):
  module, tensors = tiny
  # Pipeline layout with only the fp16 variant present.
  half = {k: v.astype(np.float16) for k, v in tensors.items()}
  write_folder(tmp_path / "pipe" / "unet", TINY_UNET, half,
               weights_name="diffusion_pytorch_model.fp16.safetensors")
  model = unet.from_diffusers(tmp_path / "pipe", dtype=jnp.bfloat16)
  assert model.dtype == jnp.bfloat16
  kernel = model.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.kernel.get_value()
  assert kernel.dtype == jnp.float32  # params always fp32
  np.testing.assert_array_equal(
      np.asarray(kernel),
      half["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"].astype(
          np.float32).T)
  # Sharded safetensors with an index file.
  folder = write_folder(tmp_path / "sharded", TINY_UNET, None)
  names = sorted(tensors)
  shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
  for shard, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, os.path.join(folder, shard))
  with open(os.path.join(folder, WEIGHTS + ".index.json"), "w") as f:
    json.dump({"weight_map": {k: s for s, keys in shards.items() for k in keys}}, f)
  loaded = convert.module_state_dict(unet.from_diffusers(folder))
  assert all(np.array_equal(loaded[k], tensors[k]) for k in tensors)
  # The fp16 variant, sharded, under diffusers' own names (as `save_pretrained(variant="fp16",
  # max_shard_size=...)` writes them).
  folder = write_folder(tmp_path / "sharded16", TINY_UNET, None)
  shards16 = {f"diffusion_pytorch_model.fp16-0000{i + 1}-of-00002.safetensors": keys
              for i, keys in enumerate(shards.values())}
  for shard, keys in shards16.items():
    save_file({k: half[k] for k in keys}, os.path.join(folder, shard))
  with open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.fp16.json"), "w") as f:
    json.dump({"weight_map": {k: s for s, keys in shards16.items() for k in keys}}, f)
  loaded = convert.module_state_dict(unet.from_diffusers(folder))
  assert all(np.array_equal(loaded[k], half[k].astype(np.float32)) for k in tensors)


def test_hub_id_resolves_from_the_local_cache_only(tmp_path, tiny, monkeypatch):
  import huggingface_hub
  _, tensors = tiny
  cache = tmp_path / "hub"
  # The cache layout huggingface_hub writes: refs/main names the snapshot of the pipeline.
  repo = cache / "models--someorg--tiny-pipe"
  write_folder(repo / "snapshots" / "abc123" / "unet", TINY_UNET, tensors)
  (repo / "refs").mkdir(parents=True)
  (repo / "refs" / "main").write_text("abc123")
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
  monkeypatch.chdir(tmp_path)  # "someorg/tiny-pipe" is no local folder here
  loaded = convert.module_state_dict(unet.from_diffusers("someorg/tiny-pipe"))
  assert all(np.array_equal(loaded[k], tensors[k]) for k in tensors)
  # Not cached: one error that says nothing is downloaded and how to fetch it; no network call.
  with pytest.raises(FapeError, match=r"nothing is downloaded at run time.*huggingface-cli "
                     r"download someorg/other"):
    unet.from_diffusers("someorg/other")


def test_missing_folder_config_and_weights(tmp_path):
  with pytest.raises(FapeError, match="does not exist"):
    unet.from_diffusers(tmp_path / "nope")
  with pytest.raises(FapeError, match="no config.json"):
    unet.from_diffusers(tmp_path)
  write_folder(tmp_path / "empty", TINY_UNET, None)
  with pytest.raises(FapeError, match=r"no weights in .*diffusion_pytorch_model\.safetensors"):
    unet.from_diffusers(tmp_path / "empty")
  (tmp_path / "badjson").mkdir()
  (tmp_path / "badjson" / "config.json").write_text("{not json")
  with pytest.raises(FapeError, match="not valid JSON"):
    unet.from_diffusers(tmp_path / "badjson")
  folder = write_folder(tmp_path / "corrupt", TINY_UNET, None)
  with open(os.path.join(folder, WEIGHTS), "wb") as f:
    f.write(b"garbage")
  with pytest.raises(FapeError, match="cannot read .* as safetensors"):
    unet.from_diffusers(folder)


def test_unexpected_and_missing_tensors_are_listed(tmp_path, tiny):
  _, tensors = tiny
  extra = {**tensors, "down_blocks.0.attentions.0.lora_up.weight": np.zeros((2, 2), np.float32)}
  write_folder(tmp_path / "extra", TINY_UNET, extra)
  with pytest.raises(FapeError, match=r"1 checkpoint tensor\(s\) not used by the model: "
                     r"down_blocks\.0\.attentions\.0\.lora_up\.weight"):
    unet.from_diffusers(tmp_path / "extra")
  partial = dict(tensors)
  del partial["conv_out.bias"], partial["mid_block.resnets.1.norm2.weight"]
  write_folder(tmp_path / "partial", TINY_UNET, partial)
  with pytest.raises(FapeError, match=r"2 model parameter\(s\) missing from the checkpoint: "
                     r"conv_out\.bias, mid_block\.resnets\.1\.norm2\.weight"):
    unet.from_diffusers(tmp_path / "partial")


def test_wrong_shape_names_tensor_and_both_shapes(tmp_path, tiny):
  _, tensors = tiny
  bad = {**tensors, "conv_in.weight": np.zeros((8, 4, 5, 5), np.float32)}
  write_folder(tmp_path, TINY_UNET, bad)
  with pytest.raises(FapeError, match=r"tensor conv_in\.weight has shape \(8, 4, 5, 5\) but the "
                     r"model expects \(8, 4, 3, 3\)"):
    unet.from_diffusers(tmp_path)


def test_unsupported_option_in_config_json(tmp_path, tiny):
  _, tensors = tiny
  write_folder(tmp_path, {**TINY_UNET, "addition_embed_type": "text_time"}, tensors)
  with pytest.raises(FapeError, match=r"config\.json\): option `addition_embed_type`="
                     r"'text_time' is not supported"):
    unet.from_diffusers(tmp_path)
  write_folder(tmp_path / "vae", TINY_VAE, tensors, class_name="AutoencoderKL")
  with pytest.raises(FapeError, match="holds a `AutoencoderKL` config, not a "
                     "`UNet2DConditionModel`"):
    unet.from_diffusers(tmp_path / "vae")


def test_bin_checkpoint_needs_torch(tmp_path, tiny, monkeypatch):
  torch = pytest.importorskip("torch")
  _, tensors = tiny
  folder = write_folder(tmp_path, TINY_UNET, None)
  torch.save({k: torch.from_numpy(v) for k, v in tensors.items()},
             os.path.join(folder, "diffusion_pytorch_model.bin"))
  loaded = convert.module_state_dict(unet.from_diffusers(folder))
  assert np.array_equal(loaded["conv_in.weight"], tensors["conv_in.weight"])
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
  with pytest.raises(FapeError, match="torch is not installed.*safe_serialization=True"):
    unet.from_diffusers(folder)


def test_load_state_into_non_strict(tiny):
  module, tensors = tiny
  partial = {k: v for k, v in tensors.items() if k != "conv_out.bias"}
  with pytest.raises(FapeError, match="conv_out.bias is missing and the model has no value"):
    convert.load_state_into(abstract_unet(), partial, strict=False)
  # A concrete module keeps its value for what the checkpoint lacks; unused names are ignored.
  full = convert.load_state_into(abstract_unet(), tensors)
  again = convert.load_state_into(full, {**partial, "extra.weight": np.zeros(1, np.float32)},
                                  strict=False)
  np.testing.assert_array_equal(np.asarray(again.conv_out.bias.get_value()),
                                tensors["conv_out.bias"])
  del module
