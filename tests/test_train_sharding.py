"""The sharded train step on 8 fake CPU devices (data x fsdp mesh), pretrained (frozen-base) mode."""
import jax
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from configs import base
from fape_jax import model_state
from fape_jax import sharding as shard_lib
from fape_jax import steps
from fape_jax.models.paths import path_str

TASK = 3  # the task of every row of the test batch


@pytest.fixture(scope="module")
def setup():
  assert jax.device_count() == 8
  c = base.get_config("tiny")
  c.mesh.shape = (2, 4)          # data x fsdp
  c.train_base_unet = False      # pretrained mode: only adapters, routers, projector train
  c.allow_random_base = True     # no pretrained weights in tests
  c.model.residual = False
  c.data.batch_size = 8
  c.optim.per_task_state = True  # one optimiser state per task; the batch below is one task's
  c.optim.ema_decay = 0.999      # the state keeps a moving average of the trainable weights
  mesh = shard_lib.make_mesh(c.mesh.axes, c.mesh.shape)
  state, shardings, models = model_state.create_state(c, mesh)
  bsh = shard_lib.batch_sharding(mesh, c.data_axes)
  step = steps.make_train_step(models, c, shardings, bsh)
  rng = np.random.default_rng(0)
  k, d = c.plans.encoder.max_tokens, c.plans.dim
  mask = np.arange(k)[None] < rng.integers(1, k + 1, (8, 1))
  host = {"degraded": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
          "clean": rng.uniform(-1, 1, (8, 32, 32, 3)).astype(np.float32),
          "plan_tokens": rng.normal(size=(8, k, d)).astype(np.float32),
          "plan_mask": mask, "task_id": np.full(8, TASK, np.int32)}
  batch = {key: jax.device_put(v, bsh) for key, v in host.items()}
  return c, mesh, state, step, batch


def specs(tree):
  return {path_str(p): v.get_value().sharding.spec for p, v in nnx.to_flat_state(tree)}


def test_partition_specs_of_named_parameters(setup):
  _, _, state, _, _ = setup
  frozen, trainable = specs(state["gen"]["frozen"]), specs(state["gen"]["params"])
  attn = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1"
  # Frozen base: dense and conv kernels sharded over fsdp on their output dim (32, 16 % 4 == 0).
  assert frozen[f"{attn}.to_q.base.kernel"] == P(None, "fsdp")
  assert frozen["unet.down_blocks.0.resnets.0.conv1.kernel"] == P(None, None, None, "fsdp")
  assert frozen["unet.time_embedding.linear_1.kernel"] == P(None, "fsdp")
  # conv_out has 3 output channels: not divisible by 4, so it stays replicated.
  assert frozen["unet.conv_out.kernel"] == P()
  assert frozen["unet.conv_norm_out.scale"] == P()
  # Adapters, routers and the projector are small and replicated; nothing else trains.
  assert trainable and all(spec == P() for spec in trainable.values())
  assert any(name.startswith(f"{attn}.to_q.") for name in trainable)
  assert any(name.startswith("projector.") for name in trainable)
  assert not any(name in frozen for name in trainable)


def test_one_step_runs_without_recompiling_and_keeps_the_base_frozen(setup):
  _, _, state, step, batch = setup
  frozen_before = jax.device_get(state["gen"]["frozen"])
  opt_before = jax.device_get(state["gen"]["opt"])
  params_before = jax.device_get(state["gen"]["params"])
  assert all(np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(params_before), jax.tree.leaves(jax.device_get(state["gen"]["ema"]))))
  state, metrics = step(state, batch)
  params_mid = jax.device_get(state["gen"]["params"])
  state, metrics = step(state, batch)  # compiled ahead of time: never traced again
  assert step.compiled is not None and step.compile_seconds > 0
  # The moving average after steps 0 and 1, with the ramped decays min(0.999, (1 + s) / (10 + s)):
  # 0.1, then 2/11 (the early weights fade fast) ...
  params_after = jax.device_get(state["gen"]["params"])
  for p0, p1, p2, e in zip(*map(jax.tree.leaves, (params_before, params_mid, params_after,
                                                   jax.device_get(state["gen"]["ema"])))):
    want = 2 / 11 * (0.1 * p0 + 0.9 * p1) + 9 / 11 * p2
    np.testing.assert_allclose(e, want, rtol=1e-6, atol=1e-7)
  # ... and it is what validation, restore and export read.
  assert model_state.inference_params(state) is state["gen"]["ema"]
  assert np.isfinite(float(metrics["loss"]))
  assert int(state["step"]) == 2
  frozen_after = jax.device_get(state["gen"]["frozen"])
  for a, b in zip(jax.tree.leaves(frozen_before), jax.tree.leaves(frozen_after)):
    assert a.dtype == b.dtype and np.array_equal(a, b)  # bit-identical
  changed = [not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(params_before), jax.tree.leaves(jax.device_get(
                 state["gen"]["params"])))]
  assert any(changed)
  # Per-task optimiser state: only the batch's task's slot moved.
  moved = np.zeros(model_state.TASK_SLOTS, bool)
  for a, b in zip(jax.tree.leaves(opt_before), jax.tree.leaves(jax.device_get(
      state["gen"]["opt"]))):
    assert a.shape[0] == model_state.TASK_SLOTS
    moved |= [not np.array_equal(a[i], b[i]) for i in range(model_state.TASK_SLOTS)]
  assert moved.tolist() == [i == TASK for i in range(model_state.TASK_SLOTS)]
  # The state keeps its shardings through the donated step.
  assert state["gen"]["frozen"]["unet"]["conv_in"]["kernel"].get_value().sharding.spec == \
      P(None, None, None, "fsdp")
  assert specs(state["gen"]["ema"]) == specs(state["gen"]["params"])
  # A batch of another shape is refused by the compiled step instead of silently recompiling.
  with pytest.raises((TypeError, ValueError)):
    step(state, {k: v[:, :16, :16] if v.ndim == 4 else v for k, v in batch.items()})


def test_init_from_exported_adapters_loads_them_and_rejects_other_shapes(tmp_path):
  from fape_jax.errors import FapeError
  from fape_jax.models import adapters_io
  from safetensors import numpy as st_np
  c = base.get_config("tiny")
  c.train_base_unet = False
  c.allow_random_base = True     # no pretrained weights in tests
  c.optim.ema_decay = 0.999
  mesh = shard_lib.make_mesh(("data", "fsdp"), (2, 4))
  state, shardings, models = model_state.create_state(c, mesh)
  gen = nnx.merge(models.gen_def, state["gen"]["params"], state["gen"]["frozen"])
  path = tmp_path / "adapters.safetensors"
  adapters_io.save_adapters(gen, path)
  saved = adapters_io.read_adapters(path)
  shifted = {k: np.asarray(v + 1.0, v.dtype) for k, v in saved.items()}
  st_np.save_file(shifted, str(path))
  c.init_from = str(path)
  loaded = model_state.init_from_pretrained(state, shardings, c)
  got = {path_str(p): np.asarray(v.get_value())
         for p, v in nnx.to_flat_state(loaded["gen"]["params"])}
  assert got.keys() >= shifted.keys()
  averaged = {path_str(p): np.asarray(v.get_value())
              for p, v in nnx.to_flat_state(loaded["gen"]["ema"])}
  for k, v in shifted.items():
    np.testing.assert_array_equal(got[k], v)
    np.testing.assert_array_equal(averaged[k], v)  # the average starts from the loaded weights
  # A tensor of another shape is named in a FapeError, not left to fail inside jit.
  name = sorted(shifted)[0]
  shifted[name] = np.zeros(shifted[name].shape + (2,), np.float32)
  st_np.save_file(shifted, str(path))
  with pytest.raises(FapeError, match="another shape"):
    model_state.init_from_pretrained(state, shardings, c)


@pytest.mark.parametrize("block", ["g", "d"])
def test_flattened_optimiser_takes_the_same_steps(block):
  """`optim.flatten` changes how the update is computed (one raveled vector), not what it is."""
  c = base.get_config("tiny")
  rng = np.random.default_rng(0)
  params = {"conv": {"kernel": rng.normal(size=(3, 3, 4, 8)), "bias": rng.normal(size=8)},
            "dense": {"kernel": rng.normal(size=(8, 5))}}
  params = jax.tree.map(lambda a: jax.numpy.asarray(a, np.float32), params)
  grads = [jax.tree.map(lambda a: jax.numpy.asarray(rng.normal(size=a.shape), np.float32), params)
           for _ in range(4)]
  out = {}
  for flatten in (False, True):
    tx = model_state.make_optimizer(c.optim[block], c.optim.clip_norm, 10, flatten)
    p, s = params, tx.init(params)
    for g in grads:  # large gradients: the global-norm clip acts at every step
      u, s = jax.jit(tx.update)(g, s, p)
      p = optax.apply_updates(p, u)
    out[flatten] = p
  assert jax.tree.structure(out[True]) == jax.tree.structure(params)
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), out[False], params)
  assert min(jax.tree.leaves(moved)) > 0
  # Sums over all parameters (the clip's norm, Prodigy's estimate) add in another order: float32
  # rounding apart, the same parameters.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               out[False], out[True])
