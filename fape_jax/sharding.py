"""Device mesh and parameter/batch shardings, all driven by the config.

Topology lives in the config (`config.mesh`): axis names and sizes, one of them -1 = "fill with the
remaining devices". Parameters get *logical* axis names from what they are (a conv kernel is
(conv_h, conv_w, conv_in, conv_out), a dense kernel (embed_in, embed_out), ...), and the config's
`logical_axis_rules` map logical names to mesh axes, maxtext-style. A dimension that does not divide
by its mesh axis stays replicated, so one rule set serves a tiny test model and SD-2.1 alike.
Adapter/router/projector parameters are small and replicated (their logical axes are all "adapter").
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from fape_jax.errors import FapeError


# Logical axes by parameter rank, for the base model's parameters.
_LOGICAL_BY_RANK = {
    4: ("conv_h", "conv_w", "conv_in", "conv_out"),
    2: ("embed_in", "embed_out"),
    1: ("channels",),
}
BATCH = "batch"


def fill_mesh_shape(axes: Sequence[str], shape: Sequence[int], n_devices: int) -> tuple[int, ...]:
  """`shape` with its -1 entry (at most one) filled so the mesh spans exactly `n_devices`."""
  axes, shape = tuple(axes), list(shape)
  if len(axes) != len(shape):
    raise FapeError(f"config.mesh: {len(axes)} axis names {axes} but {len(shape)} sizes {shape}; "
                    "give one size per axis.")
  if shape.count(-1) > 1:
    raise FapeError(f"config.mesh.shape={tuple(shape)}: at most one axis may be -1 (fill).")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if n_devices % known:
      raise FapeError(f"config.mesh.shape={tuple(shape)}: {n_devices} devices do not divide by "
                      f"the fixed axes' product {known}.")
    shape[shape.index(-1)] = n_devices // known
  if math.prod(shape) != n_devices:
    raise FapeError(f"config.mesh.shape={tuple(shape)} needs {math.prod(shape)} devices but "
                    f"{n_devices} are available; use -1 on one axis to fill.")
  return tuple(shape)


def make_mesh(axes: Sequence[str], shape: Sequence[int], devices=None) -> Mesh:
  """Builds the mesh; one entry of `shape` may be -1 (fill with the remaining devices).

  `jax.make_mesh` orders the devices by the hardware's topology (rings on TPU pods); the axes are
  `Auto`, so shardings follow the in/out shardings given to jit rather than explicit types.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = fill_mesh_shape(axes, shape, len(devices))
  return jax.make_mesh(shape, tuple(axes), axis_types=(AxisType.Auto,) * len(shape),
                       devices=devices)


def _mesh_axes_for(logical: str | None, rules: dict[str, Any]):
  if logical is None:
    return None
  return rules.get(logical)


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  if isinstance(axes, str):
    axes = (axes,)
  return math.prod(mesh.shape[a] for a in axes)


def logical_to_spec(logical: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]]) -> P:
  """PartitionSpec for one array; dims that do not divide by their mesh axes are replicated."""
  rules = dict(rules)
  spec, used = [], set()
  for name, size in zip(logical, shape):
    axes = _mesh_axes_for(name, rules)
    flat = (axes,) if isinstance(axes, str) else tuple(axes or ())
    # A mesh axis may shard one dimension only; size-1 axes add nothing.
    flat = tuple(a for a in flat if a not in used and mesh.shape[a] > 1)
    if not flat or size % _axis_size(mesh, flat):
      spec.append(None)
      continue
    used.update(flat)
    spec.append(flat[0] if len(flat) == 1 else flat)
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Sequence[tuple[str, Any]],
                    is_adapter: Callable[[Any], bool] = lambda v: False) -> nnx.State:
  """Same tree as `state` (abstract or concrete) with a NamedSharding per variable."""
  flat = []
  for path, var in nnx.to_flat_state(state):
    shape = np.shape(var.get_value())
    if is_adapter(var):
      logical = ("adapter",) * len(shape)
    else:
      logical = _LOGICAL_BY_RANK.get(len(shape), (None,) * len(shape))
    spec = logical_to_spec(logical, shape, mesh, rules)
    flat.append((path, var.replace(NamedSharding(mesh, spec))))
  return nnx.from_flat_state(flat)


def tree_shardings_like(tree: Any, reference: nnx.State, reference_shardings: nnx.State,
                        mesh: Mesh) -> Any:
  """Shardings for an optimiser state: leaves shaped like a parameter follow that parameter.

  Optax states hold parameter-shaped subtrees (moments, Prodigy's z and s) whose paths end in the
  parameter's path. Everything else (counts, scalars) is replicated.
  """
  by_path = {}
  for (path, var), (_, sh) in zip(nnx.to_flat_state(reference),
                                  nnx.to_flat_state(reference_shardings)):
    by_path[tuple(str(p) for p in path)] = (np.shape(var.get_value()), sh.get_value())
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    keys = tuple(_key_str(k) for k in path)
    keys = keys[:-1] if keys and keys[-1] == "value" else keys
    shape = np.shape(leaf)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit is not None and hit[0] == shape:
        return hit[1]
    return replicated

  return jax.tree_util.tree_map_with_path(pick, tree)


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def batch_sharding(mesh: Mesh, data_axes: Sequence[str]) -> NamedSharding:
  """The leading (batch) dimension is split over all data-parallel axes (data and fsdp)."""
  axes = tuple(a for a in data_axes if a in mesh.axis_names)
  return NamedSharding(mesh, P(axes))


def data_parallel_size(mesh: Mesh, data_axes: Sequence[str]) -> int:
  return _axis_size(mesh, tuple(a for a in data_axes if a in mesh.axis_names))


# Batch fields that go to the devices (strings, ids and host-only fields stay numpy).
DEVICE_KEYS = ("degraded", "clean", "plan_tokens", "plan_mask", "task_id", "index")


def global_batch(batch: Mapping[str, np.ndarray], sharding: NamedSharding,
                 keys: Sequence[str] = DEVICE_KEYS) -> dict:
  """This process's rows of a batch -> global jax.Arrays split along the batch axis.

  Only the fields named in `keys` are sent to the devices; every process passes its own rows.
  """
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items() if k in keys}
