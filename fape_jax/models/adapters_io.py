"""Export and import of the trainable part of an executor (adapters, routers, plan projector).

  save_adapters(executor, "run/adapters.safetensors")   # + run/adapters.json
  load_adapters(executor, "run/adapters.safetensors")   # checks names, shapes and config

The safetensors file holds every `AdapterParam` under its executor path, e.g.
`unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.expert0.A.kernel` (expert 0 =
low band, expert 1 = high band; A is the down-projection, B the up-projection),
`...to_q.router.text.kernel`, `projector.fc1.kernel`, `projector.null_token`. The JSON beside it
(same stem) records the adapter config, the plan width and the adapted layers, so the adapters
can be shared without the base model and checked against whatever base they are loaded into.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fape_jax.errors import FapeError
from fape_jax.models import lora_moe
from fape_jax.models.paths import path_str

FORMAT = "fape_jax.adapters/1"


def config_path(path: str | os.PathLike[str]) -> str:
  """The JSON that goes with an adapters file: same folder and stem."""
  return os.path.splitext(os.fspath(path))[0] + ".json"


def adapter_arrays(model: nnx.Module) -> dict[str, np.ndarray]:
  """{dotted path: host array} of every `AdapterParam` of `model`."""
  return {path_str(path): np.asarray(jax.device_get(var.get_value()))
          for path, var in nnx.to_flat_state(nnx.state(model, lora_moe.AdapterParam))}


def describe(executor: nnx.Module) -> dict[str, Any]:
  """What the JSON records: enough to rebuild the adapters and to check a base against them."""
  return {
      "format": FORMAT,
      "lora": executor.lora_config.to_dict(),
      "plan_dim": executor.plan_dim,
      "context_dim": executor.projector.context_dim,
      "adapted_layers": list(executor.adapted),
  }


def save_adapters(executor: nnx.Module, path: str | os.PathLike[str]) -> None:
  """Writes `path` (.safetensors) and its JSON; parent folders are created."""
  path = os.fspath(path)
  if not path.endswith(".safetensors"):
    raise FapeError(f"save_adapters: {path!r} must end in .safetensors.")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file(adapter_arrays(executor), path, metadata={"format": FORMAT})
  with open(config_path(path), "w") as f:
    json.dump(describe(executor), f, indent=2, sort_keys=True, default=list)


def read_adapters(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
  """The arrays of an adapters file, by name."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FapeError(f"Adapters file {path} does not exist; pass the .safetensors written by "
                    "save_adapters (or by training's export).")
  try:
    return load_file(path)
  except (SafetensorError, OSError, ValueError) as e:
    raise FapeError(f"Adapters file {path} cannot be read as safetensors ({e}); is it truncated "
                    "or another format?") from None


def read_adapter_config(path: str | os.PathLike[str]) -> dict[str, Any]:
  """The JSON written beside an adapters file."""
  cpath = config_path(path)
  if not os.path.isfile(cpath):
    raise FapeError(f"Adapters file {os.fspath(path)} has no config {cpath} beside it; copy "
                    "both files together.")
  try:
    with open(cpath) as f:
      meta = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise FapeError(f"Adapter config {cpath} is not valid JSON ({e}).") from None
  if meta.get("format") != FORMAT:
    raise FapeError(f"Adapter config {cpath}: format {meta.get('format')!r}, expected {FORMAT!r}.")
  return meta


def _config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  normalise = lambda v: json.loads(json.dumps(v, default=list))  # tuples -> lists  # noqa: E731
  saved, current = normalise(saved), normalise(current)
  out = []
  for key in sorted(set(saved) | set(current)):
    if key == "format":
      continue
    if key == "lora":
      for field in sorted(set(saved[key]) | set(current[key])):
        if saved[key].get(field) != current[key].get(field):
          out.append(f"lora.{field}: file {saved[key].get(field)!r}, model "
                     f"{current[key].get(field)!r}")
    elif key == "adapted_layers":
      gone = sorted(set(saved[key]) - set(current[key]))
      new = sorted(set(current[key]) - set(saved[key]))
      if gone or new:
        out.append(f"adapted layers: {len(gone)} only in the file {gone[:3]}, {len(new)} only "
                   f"in the model {new[:3]}")
    elif saved.get(key) != current.get(key):
      out.append(f"{key}: file {saved.get(key)!r}, model {current.get(key)!r}")
  return out


def load_adapters(executor: nnx.Module, path: str | os.PathLike[str], *,
                  check_config: bool = True) -> None:
  """Loads an adapters file into `executor` in place.

  Every adapter of the executor must be in the file with its shape, and every tensor of the file
  must be an adapter of the executor; otherwise a FapeError lists the mismatches. With
  `check_config` the JSON's adapter config (band mode, cutoff, routers, ...: settings that change
  the output without changing any shape) must equal the executor's too.
  """
  path = os.fspath(path)
  loaded = read_adapters(path)
  if check_config:
    diffs = _config_differences(read_adapter_config(path), describe(executor))
    if diffs:
      raise FapeError(f"Adapters {path} were exported with another configuration: "
                      + "; ".join(diffs) + ". Build the executor with the config in "
                      f"{config_path(path)} (or pass check_config=False to load anyway).")
  state = nnx.state(executor, lora_moe.AdapterParam)
  flat = nnx.to_flat_state(state)
  names = [path_str(p) for p, _ in flat]
  missing = [n for n in names if n not in loaded]
  unexpected = sorted(set(loaded) - set(names))
  wrong = [f"{n} {tuple(loaded[n].shape)} vs {tuple(np.shape(v.get_value()))}"
           for n, (_, v) in zip(names, flat)
           if n in loaded and tuple(loaded[n].shape) != tuple(np.shape(v.get_value()))]
  if missing or unexpected or wrong:
    parts = []
    for label, items in (("missing from the file", missing),
                         ("in the file but not in the model", unexpected),
                         ("with another shape (file vs model)", wrong)):
      if items:
        parts.append(f"{len(items)} {label}: {', '.join(items[:5])}"
                     + (", ..." if len(items) > 5 else ""))
    raise FapeError(f"Adapters {path} do not fit this executor: " + "; ".join(parts) + ".")
  new = [(p, v.replace(jax.numpy.asarray(loaded[n], dtype=v.get_value().dtype)))
         for n, (p, v) in zip(names, flat)]
  nnx.update(executor, nnx.from_flat_state(new))
