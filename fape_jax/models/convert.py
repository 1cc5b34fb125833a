"""diffusers format <-> Flax NNX: config checking, folder reading, tensor renaming, loading.

Our UNet/VAE modules carry diffusers' attribute names, so a parameter's Flax path joined with
dots is its diffusers state-dict name once the leaf is renamed (`kernel`/`scale` -> `weight`,
`bias` stays). Layouts differ: torch Linear weights are (out, in) and Flax kernels (in, out);
torch conv weights (O, I, kh, kw) and Flax (kh, kw, I, O).

Public API:
  `diffusers_name(path)`: Flax parameter path -> diffusers name; `name_map(module)`: all of a
    module's diffusers names -> Flax paths (the rename both ways).
  `to_flax_layout(arr)` / `to_torch_layout(arr)`: re-lay one tensor either way.
  `load_state_into(module, tensors, strict=True)`: fill a (possibly abstract) module from a flat
    diffusers state dict (numpy arrays), checking names and shapes.
  `module_state_dict(module)`: the inverse, a flat diffusers state dict of numpy arrays.
  `parameter_shapes(module)`: diffusers name -> torch-layout shape, also for abstract modules.
  `read_model_folder(path, subfolder)`: (raw config, tensors, folder) of a local diffusers model
    folder or pipeline folder; reads safetensors with `safetensors.numpy` (no torch needed).
  `parse_config(raw, spec, where)`: strict config checking shared by unet.py and vae.py.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fape_jax.errors import FapeError

WEIGHTS_NAME = "diffusion_pytorch_model"

# ---------------------------------------------------------------------------------------------
# Config checking.


@dataclasses.dataclass(frozen=True)
class ConfigSpec:
  """What a diffusers `config.json` may hold for one model class.

  supported: options we implement, with diffusers' defaults.
  fixed: options we accept only at values that change nothing (a predicate per option, and a
    text naming the accepted values for the error message).
  ignored: options that are no-ops for every layout we accept (e.g. knobs of block types we
    reject anyway); any value is accepted and dropped.
  """
  class_name: str
  supported: Mapping[str, Any]
  fixed: Mapping[str, tuple[Callable[[Any], bool], str]]
  ignored: frozenset[str] = frozenset()


def is_value(*accepted: Any) -> Callable[[Any], bool]:
  """A predicate for `ConfigSpec.fixed`: the value is one of `accepted` (type-strict for bools)."""
  def check(value: Any) -> bool:
    return any(value is a if isinstance(a, bool) or a is None else
               (not isinstance(value, bool) and value == a) for a in accepted)
  return check


def parse_config(raw: Mapping[str, Any], spec: ConfigSpec, where: str) -> dict[str, Any]:
  """Checks a diffusers config against `spec`; returns supported options with defaults filled.

  Keys starting with `_` are diffusers metadata (`_class_name`, `_diffusers_version`,
  `_name_or_path`, ...) and are dropped, except that a `_class_name` naming another class is an
  error (e.g. a VAE folder given to the UNet loader).
  """
  if not isinstance(raw, Mapping):
    raise FapeError(f"{spec.class_name} config ({where}) must be a dict as read from config.json, "
                    f"got {type(raw).__name__}.")
  class_name = raw.get("_class_name", spec.class_name)
  if class_name != spec.class_name:
    raise FapeError(f"{where} holds a `{class_name}` config, not a `{spec.class_name}`: point the "
                    f"loader at the {spec.class_name} folder (or the pipeline folder above it).")
  config = dict(spec.supported)
  for key, value in raw.items():
    if key.startswith("_") or key in spec.ignored:
      continue
    if key in spec.fixed:
      check, accepted = spec.fixed[key]
      if not check(value):
        raise FapeError(
            f"{spec.class_name} config ({where}): option `{key}`={value!r} is not supported; "
            f"fape_jax implements only {accepted} (the Stable Diffusion 1.x/2.x/Turbo layout). "
            f"Use such a checkpoint or drop the option.")
      continue
    if key not in spec.supported:
      raise FapeError(
          f"{spec.class_name} config ({where}): unknown option `{key}`={value!r}. Known options: "
          f"{', '.join(sorted(set(spec.supported) | set(spec.fixed)))}.")
    config[key] = value
  return config


def require(cond: bool, spec_name: str, where: str, option: str, message: str) -> None:
  """Raises a FapeError naming `option` unless `cond`."""
  if not cond:
    raise FapeError(f"{spec_name} config ({where}): option `{option}`: {message}")


# ---------------------------------------------------------------------------------------------
# Names and layouts.

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias"}

# Old diffusers VAE checkpoints name the mid-block attention projections differently.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def diffusers_name(path: tuple[Any, ...]) -> str:
  """Flax parameter path -> diffusers state-dict name, e.g.

  ('down_blocks', 0, 'attentions', 0, 'proj_in', 'kernel')
    -> 'down_blocks.0.attentions.0.proj_in.weight'.
  """
  *parents, leaf = (str(p) for p in path)
  if leaf not in _LEAF_TO_TORCH:
    raise FapeError(f"parameter {'.'.join(parents + [leaf])} has no diffusers counterpart "
                    f"(only kernel/scale/bias leaves map to weight/bias).")
  return ".".join(parents + [_LEAF_TO_TORCH[leaf]])


def to_flax_layout(arr: np.ndarray) -> np.ndarray:
  """torch layout -> Flax: Linear (out, in) -> (in, out); conv (O, I, kh, kw) -> (kh, kw, I, O)."""
  if arr.ndim == 2:
    return arr.T
  if arr.ndim == 4:
    return arr.transpose(2, 3, 1, 0)
  return arr


def to_torch_layout(arr: np.ndarray) -> np.ndarray:
  """Flax layout -> torch, the inverse of `to_flax_layout`."""
  if arr.ndim == 2:
    return arr.T
  if arr.ndim == 4:
    return arr.transpose(3, 2, 0, 1)
  return arr


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  if len(shape) == 2:
    return (shape[1], shape[0])
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def _param_table(module: nnx.Module, variables: Any) -> dict[str, nnx.Variable]:
  state = nnx.state(module, variables)
  return {diffusers_name(path): var for path, var in nnx.to_flat_state(state)}


def _short_list(names: list[str], limit: int = 25) -> str:
  names = sorted(names)
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _rename_legacy(tensors: dict[str, np.ndarray], expected: Mapping[str, Any]) -> None:
  """Renames old VAE attention tensors (`query`/`key`/`value`/`proj_attn`) in place."""
  for name in list(tensors):
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
      new = ".".join(parts[:-2] + [_LEGACY_ATTENTION[parts[-2]], parts[-1]])
      if new in expected and new not in tensors:
        arr = tensors.pop(name)
        # The oldest VAEs stored these projections as 1x1 convs.
        if arr.ndim == 4 and arr.shape[2:] == (1, 1):
          arr = arr[:, :, 0, 0]
        tensors[new] = arr


def load_state_into(module: nnx.Module, tensors: Mapping[str, np.ndarray], *,
                    strict: bool = True, variables: Any = nnx.Param,
                    where: str = "checkpoint") -> nnx.Module:
  """Fills `module`'s parameters in place from a flat diffusers state dict; returns `module`.

  `module` may be abstract (from `nnx.eval_shape`): nothing is randomly initialised first.
  Tensors are converted to float32 (parameters are always float32) in Flax layout.
  `strict`: any tensor left unused or any parameter left unset is a FapeError listing the names.
  Non-strict, unset parameters keep their values (a FapeError if they are still abstract).
  `variables`: nnx filter of the variables to fill (default all `nnx.Param`s).
  Shape mismatches are always a FapeError naming the tensor and both shapes (torch layout).
  """
  table = _param_table(module, variables)
  tensors = dict(tensors)
  _rename_legacy(tensors, table)
  unused = sorted(set(tensors) - set(table))
  missing = sorted(set(table) - set(tensors))
  if strict and (unused or missing):
    parts = []
    if unused:
      parts.append(f"{len(unused)} checkpoint tensor(s) not used by the model: "
                   f"{_short_list(unused)}")
    if missing:
      parts.append(f"{len(missing)} model parameter(s) missing from the checkpoint: "
                   f"{_short_list(missing)}")
    raise FapeError(f"{where} does not match the model ({type(module).__name__}): "
                    + "; ".join(parts) + ". Check that config.json belongs to these weights.")
  for name, var in table.items():
    if name not in tensors:
      if isinstance(var.get_value(), jax.Array):
        continue
      raise FapeError(f"{where}: parameter {name} is missing and the model has no value for it "
                      f"(it was built abstractly); load with strict=True to see all names.")
    arr = np.asarray(tensors[name])
    want = tuple(var.get_value().shape)
    if arr.shape != _torch_shape(want):
      raise FapeError(f"{where}: tensor {name} has shape {tuple(arr.shape)} but the model expects "
                      f"{_torch_shape(want)} (torch layout). Check that config.json belongs to "
                      f"these weights.")
    var.set_value(jnp.asarray(to_flax_layout(arr), dtype=jnp.float32))
  return module


def name_map(module: nnx.Module, variables: Any = nnx.Param) -> dict[str, tuple[Any, ...]]:
  """diffusers state-dict name -> Flax parameter path, for every parameter of `module`."""
  return {diffusers_name(path): tuple(path)
          for path, _ in nnx.to_flat_state(nnx.state(module, variables))}


def parameter_shapes(module: nnx.Module, variables: Any = nnx.Param) -> dict[str, tuple[int, ...]]:
  """diffusers name -> torch-layout shape of every parameter (works on abstract modules)."""
  return {name: _torch_shape(tuple(var.get_value().shape))
          for name, var in _param_table(module, variables).items()}


def module_state_dict(module: nnx.Module, variables: Any = nnx.Param) -> dict[str, np.ndarray]:
  """The module's parameters as a flat diffusers state dict (torch layout, numpy float32).

  Arrays are fresh, writable and C-contiguous: ready for `safetensors.numpy.save_file` or
  `torch.from_numpy`.
  """
  return {name: np.ascontiguousarray(to_torch_layout(np.array(var.get_value())))
          for name, var in _param_table(module, variables).items()}


# ---------------------------------------------------------------------------------------------
# Reading diffusers folders.


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cached_hub_snapshot(path: str) -> str | None:
  """The local snapshot folder of a Hugging Face hub id ("org/name"), or None if `path` is not one.

  Only the local cache is read (`local_files_only`: HF_HOME / HF_HUB_CACHE), never the network:
  a hub id that is not cached is a FapeError saying how to fetch it once.
  """
  if os.path.exists(path) or not _HUB_ID.match(path):
    return None
  try:
    import huggingface_hub  # noqa: PLC0415  (comes with the [planner] extra's transformers)
  except ImportError as e:
    raise FapeError(f"{path!r} is not a local folder, and resolving it as a Hugging Face hub id "
                    "needs huggingface_hub (pip install 'fape_jax[planner]').") from e
  try:
    return huggingface_hub.snapshot_download(path, local_files_only=True)
  except Exception as e:  # noqa: BLE001  (LocalEntryNotFoundError and friends: not cached)
    raise FapeError(
        f"{path!r} is neither a local folder nor a Hugging Face hub id in the local cache "
        f"({huggingface_hub.constants.HF_HUB_CACHE}); nothing is downloaded at run time. Fetch "
        f"it once with `huggingface-cli download {path}` or pass a folder.") from e


def resolve_model_folder(path: str | os.PathLike[str], subfolder: str) -> str:
  """`path` itself when it holds config.json, else `path/subfolder` (a pipeline folder).

  `path` may also be a Hugging Face hub id that is in the local cache (`cached_hub_snapshot`).
  """
  path = os.fspath(path)
  path = cached_hub_snapshot(path) or path
  if not os.path.isdir(path):
    raise FapeError(f"diffusers model folder {path!r} does not exist (or is not a folder). Give a "
                    f"local folder with config.json and {WEIGHTS_NAME}.safetensors, or a "
                    f"pipeline folder with a {subfolder}/ subfolder.")
  for candidate in (path, os.path.join(path, subfolder)):
    if os.path.isfile(os.path.join(candidate, "config.json")):
      return candidate
  raise FapeError(f"no config.json in {path!r} nor in {os.path.join(path, subfolder)!r}: give a "
                  f"diffusers model folder or a pipeline folder with a {subfolder}/ subfolder.")


def _load_safetensors(file: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # noqa: PLC0415  (lazy: only when loading)
  try:
    return load_file(file)
  except Exception as e:  # safetensors raises its own, unexported error types
    raise FapeError(f"cannot read {file!r} as safetensors ({e}); is the file complete?") from e


def _load_torch_bin(file: str) -> dict[str, np.ndarray]:
  try:
    import torch  # noqa: PLC0415  (optional: only to convert .bin checkpoints)
  except ImportError as e:
    raise FapeError(
        f"{file!r} is a PyTorch .bin checkpoint and torch is not installed. Install torch, or "
        f"convert it once elsewhere to safetensors: `python -c \"import diffusers; "
        f"m = diffusers.<ModelClass>.from_pretrained('<folder>'); "
        f"m.save_pretrained('<folder>', safe_serialization=True)\"`.") from e
  state = torch.load(file, map_location="cpu", weights_only=True)
  return {k: v.detach().float().numpy() for k, v in state.items()}


def _load_sharded(index_file: str) -> dict[str, np.ndarray]:
  with open(index_file) as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  out: dict[str, np.ndarray] = {}
  for shard in shards:
    out.update(_load_safetensors(os.path.join(os.path.dirname(index_file), shard)))
  return out


def read_weights(folder: str) -> dict[str, np.ndarray]:
  """The flat state dict of a diffusers model folder, preferring full-precision safetensors."""
  candidates: list[tuple[str, Callable[[str], dict[str, np.ndarray]]]] = [
      (f"{WEIGHTS_NAME}.safetensors", _load_safetensors),
      (f"{WEIGHTS_NAME}.safetensors.index.json", _load_sharded),
      (f"{WEIGHTS_NAME}.fp16.safetensors", _load_safetensors),
      # diffusers inserts the variant before the last suffix (`_add_variant`): the fp16 shards
      # are `...fp16-00001-of-0000N.safetensors`, listed by `...safetensors.index.fp16.json`.
      (f"{WEIGHTS_NAME}.safetensors.index.fp16.json", _load_sharded),
      (f"{WEIGHTS_NAME}.bin", _load_torch_bin),
      (f"{WEIGHTS_NAME}.fp16.bin", _load_torch_bin),
  ]
  for name, loader in candidates:
    file = os.path.join(folder, name)
    if os.path.isfile(file):
      return loader(file)
  raise FapeError(f"no weights in {folder!r}: looked for "
                  f"{', '.join(n for n, _ in candidates)}.")


def read_model_folder(path: str | os.PathLike[str], subfolder: str,
                      ) -> tuple[dict[str, Any], dict[str, np.ndarray], str]:
  """(raw config, flat tensors, resolved folder) of a diffusers model or pipeline folder."""
  folder = resolve_model_folder(path, subfolder)
  config_file = os.path.join(folder, "config.json")
  try:
    with open(config_file) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise FapeError(f"{config_file!r} is not valid JSON: {e}") from e
  return config, read_weights(folder), folder
