"""Restoring images with a trained run: model loading, planning, tiling, sidecars.

  restorer = load_restorer("runs/base")       # config.json + newest checkpoint, current devices
  result = restorer.restore(rgb01, *restorer.encode([plan]))
  plan, result, meta = restore_image(restorer, images_lib.read_image(path))  # plan, restore
  report = restore_paths("runs/base", "in/", "out/")   # what `python -m fape_jax.restore` runs

The run's `config.json` rebuilds the model; the checkpoint is restored with the abstract train
state whose leaves carry the shardings of a mesh over the *current* devices (the run's mesh when it
fits them, else everything on the data axis), so a run trained on 8 devices restores on 1 CPU.

Each image is planned (the run's planner, or `--planner`, or a hand-written `--plan`), the plan is
encoded with the run's encoder (the one its plan store was built with), and the image is restored
at its native size: padded to the executor's size multiple and cropped back, or, when larger than
the working size (`tile`), cut into overlapping tiles blended without seams (`fape_jax.tiling`).
Grayscale inputs are written back as grayscale (BT.601 luma of the restored RGB), RGBA keeps its
alpha channel untouched, and 16-bit PNG/TIFF inputs are read and written at 16 bits (Pillow reads
16-bit colour PNGs as 8-bit, so those go through imagecodecs); the files are read and written by
`fape_jax.data.images` (`read_image`, `write_image`). Next to each output image a sidecar
`NAME.json` (NAME = the output's file name without its suffix) holds

  {"plan": {"task", "focus", "rationale", "pipeline", "raw"},
   "routing": {layer path: [w_low, w_high]},         # averaged over tiles
   "hints": {...}, "meta": {"input", "checkpoint_step", "size", "tiles", ...}}

Exit codes of the CLI (`restore_paths(...).exit_code`): 0 all images restored, 1 some images
failed (each named on stderr; the others are written), 2 nothing was done (a usage error).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import sys
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from fape_jax import checkpoint as ckpt_lib
from fape_jax import distributed
from fape_jax import errors
from fape_jax import sharding as shard_lib
from fape_jax import tiling
from fape_jax.data import images as images_lib
from fape_jax.errors import FapeError

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, errors.PARTIAL_EXIT_CODE, errors.USAGE_EXIT_CODE
DEFAULT_TILE = 256
PLANNERS = ("rule", "hf")


# ----------------------------------------------------------------------------------------------
# The run: config, mesh, checkpoint
# ----------------------------------------------------------------------------------------------

def _tuples(obj: Any) -> Any:
  """JSON lists back to the tuples the configs use (mesh shapes, axis rules, block types)."""
  if isinstance(obj, dict):
    return {k: _tuples(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return tuple(_tuples(v) for v in obj)
  return obj


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The config a run was trained with, from `WORKDIR/config.json`."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FapeError(f"No config.json in {workdir}: --workdir must be a training run directory "
                    "(python -m fape_jax.train writes config.json and checkpoints/ there).")
  try:
    raw = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise FapeError(f"{path} is not valid JSON ({e}); it was not written by training.") from None
  return ml_collections.ConfigDict(_tuples(raw))


def inference_mesh(config, devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
  """The run's mesh over the current devices, or all of them on one axis when it does not fit.

  Training topologies (e.g. fsdp=8) often do not exist where one restores (1 GPU, a laptop): then
  the parameters are replicated and the devices split the batch of tiles.
  """
  devices = list(jax.devices() if devices is None else devices)
  axes, shape = tuple(config.mesh.axes), tuple(config.mesh.shape)
  try:
    return shard_lib.make_mesh(axes, shape, devices)
  except FapeError:
    fill = shape.index(-1) if -1 in shape else 0
    fitted = tuple(len(devices) if i == fill else 1 for i in range(len(axes)))
    logging.warning("The run's mesh %s does not fit the %d device(s) here; restoring on mesh %s "
                    "(parameters replicated).", dict(zip(axes, shape)), len(devices),
                    dict(zip(axes, fitted)))
    return shard_lib.make_mesh(axes, fitted, devices)


def _restore_state(config, mesh, workdir: epath.Path, step: int | None):
  """(step, generator params, generator frozen, Models) from the run's checkpoint."""
  from fape_jax import model_state  # pylint: disable=g-import-not-at-top (heavy: models, optax)

  abstract, models = model_state.abstract_state(config)
  shardings = model_state.state_shardings(abstract, mesh, config)
  # The checkpointed tree is the train state's checkpoint view: without the frozen base when it
  # comes from `init_from` (then it is loaded from there again, as training does).
  target = model_state.restore_target(abstract, shardings, config)
  ckpt_dir = workdir / "checkpoints"
  if not ckpt_dir.exists():
    raise FapeError(f"No checkpoints/ folder in {workdir}; train first (python -m "
                    "fape_jax.train --workdir=...).")
  ckpt = ckpt_lib.Checkpointer(ckpt_dir, save_every=1, keep=1, read_only=True)
  try:
    got, state = ckpt.restore(target, step=step)
  finally:
    ckpt.close()
  if state is None:
    raise FapeError(f"{ckpt_dir} holds no checkpoint yet; train longer (checkpoints are written "
                    "every config.ckpt_every steps and at the end).")
  if "frozen" not in state["gen"]:
    full, full_sh, _ = model_state.create_state(config, mesh)
    full = model_state.init_from_pretrained(full, full_sh, config)
    state["gen"]["frozen"] = full["gen"]["frozen"]
  return int(got), model_state.inference_params(state), state["gen"]["frozen"], models


# ----------------------------------------------------------------------------------------------
# The restorer
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Restored:
  """One restored image: float32 RGB in [0, 1], per-layer [w_low, w_high], number of tiles."""
  image: np.ndarray
  routing: dict[str, list[float]]
  tiles: int


def tile_count(h: int, w: int, *, tile: int, overlap: int, multiple: int) -> int:
  """How many tiles `tiling.tiled_apply` cuts an H x W image into (1 when it fits)."""
  ph, pw = h + (-h) % multiple, w + (-w) % multiple
  if ph <= tile and pw <= tile:
    return 1
  ph, pw = max(ph, tile), max(pw, tile)
  return len(tiling.tile_starts(ph, tile, overlap)) * len(tiling.tile_starts(pw, tile, overlap))


class Restorer:
  """A trained executor on the current devices, with the run's planner and plan encoder.

  Use `load_restorer` to build one. `restore(rgb01, tokens, mask)` restores one image of any size;
  `plan(images)` / `encode(plans)` give its plan and plan tokens.
  """

  def __init__(self, config, *, step: int, mesh, models, params, frozen, tile: int | None,
               overlap: int | None, batch: int, planner_kind: str, workdir: str = ""):
    from fape_jax import steps  # pylint: disable=g-import-not-at-top (heavy: models, optax)
    self.config = config
    self.workdir = os.fspath(workdir)
    self.step = step
    self.mesh = mesh
    self.params, self.frozen = params, frozen
    self.multiple = int(nnx.merge(models.gen_def, params, frozen).multiple)
    self.dp = shard_lib.data_parallel_size(mesh, config.data_axes)
    self._batch_sharding = shard_lib.batch_sharding(mesh, config.data_axes)
    gen_sh = {"params": jax.tree.map(lambda a: a.sharding, params),
              "frozen": jax.tree.map(lambda a: a.sharding, frozen)}
    self._eval = steps.make_eval_step(models, gen_sh, self._batch_sharding)
    if tile is None:  # the working size the model was trained at
      tile = int(config.data.get("crop", 0) or DEFAULT_TILE)
      tile = math.ceil(tile / self.multiple) * self.multiple
    overlap = tile // 4 if overlap is None else overlap
    if tile % self.multiple:
      raise FapeError(f"--tile={tile} must be a multiple of the model's size multiple "
                      f"{self.multiple}.")
    if not 0 <= overlap < tile:
      raise FapeError(f"--tile_overlap={overlap} must be in [0, tile={tile}).")
    self.tile, self.overlap = tile, overlap
    self.batch = max(self.dp, math.ceil(batch / self.dp) * self.dp)
    if planner_kind not in PLANNERS:
      raise FapeError(f"--planner={planner_kind!r}: use one of {', '.join(PLANNERS)}.")
    self.planner_kind = planner_kind
    self.plans_enabled = bool(config.plans.enabled)
    self._planner = self._encoder = None

  def retiled(self, tile: int, overlap: int) -> "Restorer":
    """The same restorer (model, planner, compiled steps) with another tiling."""
    if tile % self.multiple or not 0 <= overlap < tile:
      raise FapeError(f"tile={tile} must be a multiple of {self.multiple} and overlap={overlap} "
                      "in [0, tile).")
    other = copy.copy(self)
    other.tile, other.overlap = tile, overlap
    return other

  # --- planning --------------------------------------------------------------------------------

  @property
  def planner(self):
    if self._planner is None:
      from fape_jax.planning import planners  # pylint: disable=g-import-not-at-top (torch side)
      cfg = self.config.plans.planner.copy_and_resolve_references()
      with cfg.unlocked():
        cfg.kind = self.planner_kind
      self._planner = planners.build_planner(cfg)
    return self._planner

  @property
  def encoder(self):
    if self._encoder is None:
      from fape_jax.planning import encoders  # pylint: disable=g-import-not-at-top (torch side)
      hf_model = self.planner.model_id if self.planner.name == "hf" else ""
      enc = encoders.build_encoder(self.config.plans.encoder, planner_model=hf_model)
      if enc.dim != self.config.plans.dim:
        raise FapeError(f"The plan encoder gives {enc.dim}-d tokens but the run was trained on "
                        f"{self.config.plans.dim}-d plan tokens (config.plans.dim); the run's "
                        "config.json must name the encoder it was trained with.")
      self._encoder = enc
    return self._encoder

  def plan(self, images: Sequence[np.ndarray]) -> list:
    """Plans for uint8 RGB images, by the planner."""
    return self.planner.plan(list(images))

  def encode(self, plans: Sequence) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Plan tokens (N, K, D) float32 and mask (N, K); (None, None) when the run uses no plans."""
    if not self.plans_enabled:
      return None, None
    tokens, mask = self.encoder.encode([p.text for p in plans])
    return np.asarray(tokens, np.float32), np.asarray(mask, bool)

  # --- the executor ----------------------------------------------------------------------------

  def run_batch(self, degraded: np.ndarray, tokens: np.ndarray | None = None,
                mask: np.ndarray | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(N, h, w, 3) in [-1, 1] (one plan, (K, D) / (K,), for all rows) -> restored, routing.

    Rows are padded to a multiple of the data-parallel device count (the batch is split over the
    devices); the padding is dropped from the results.
    """
    n = degraded.shape[0]
    rows = math.ceil(n / self.dp) * self.dp
    pad = lambda a: np.concatenate([a, np.repeat(a[-1:], rows - n, 0)]) if rows > n else a
    batch = {"degraded": pad(np.asarray(degraded, np.float32))}
    if self.plans_enabled:
      if tokens is None:
        raise FapeError("This run was trained with plans: restoring needs plan tokens.")
      batch["plan_tokens"] = np.broadcast_to(np.asarray(tokens, np.float32),
                                             (rows, *tokens.shape[-2:]))
      batch["plan_mask"] = np.broadcast_to(np.asarray(mask, bool), (rows, mask.shape[-1]))
    batch = jax.device_put(batch, self._batch_sharding)
    out, routing = self._eval(self.params, self.frozen, batch)
    return np.asarray(out)[:n], {k: np.asarray(v)[:n] for k, v in routing.items()}

  def restore(self, rgb01: np.ndarray, tokens: np.ndarray | None = None,
              mask: np.ndarray | None = None) -> Restored:
    """Restores one H x W x 3 float image in [0, 1] of any size with one plan's tokens."""
    if tokens is not None and tokens.ndim == 3:
      tokens, mask = tokens[0], mask[0]
    seen: list[dict[str, np.ndarray]] = []

    def apply(tiles: np.ndarray) -> np.ndarray:
      out, routing = self.run_batch(tiles, tokens, mask)
      seen.append(routing)
      return out

    x = np.asarray(rgb01, np.float32) * 2.0 - 1.0
    out = tiling.tiled_apply(apply, x, tile=self.tile, overlap=self.overlap,
                             multiple=self.multiple, batch=self.batch)
    h, w = x.shape[:2]
    n = tile_count(h, w, tile=self.tile, overlap=self.overlap, multiple=self.multiple)
    # tiled_apply repeats the last tile to fill its last call: only the first n rows are tiles.
    routing = {k: np.concatenate([s[k] for s in seen])[:n].mean(0).tolist() for k in seen[0]}
    return Restored(np.clip((out + 1.0) / 2.0, 0.0, 1.0), routing, n)


def load_restorer(workdir: str | os.PathLike, *, step: int | None = None,
                  planner: str | None = None, tile: int | None = None,
                  overlap: int | None = None, batch: int = 4,
                  devices: Sequence[Any] | None = None) -> Restorer:
  """A `Restorer` for the run in `workdir` (newest checkpoint unless `step`).

  `tile` defaults to the training crop (or 256 when unset), rounded up to the size multiple;
  `overlap` to a quarter of the tile; `planner` to the run's planner kind.
  """
  workdir = epath.Path(workdir)
  config = load_run_config(workdir)
  mesh = inference_mesh(config, devices)
  got, params, frozen, models = _restore_state(config, mesh, workdir, step)
  return Restorer(config, step=got, mesh=mesh, models=models, params=params, frozen=frozen,
                  tile=tile, overlap=overlap, batch=batch,
                  planner_kind=planner or config.plans.planner.kind, workdir=workdir)


def export_adapters(workdir: str | os.PathLike, path: str | os.PathLike, *,
                    step: int | None = None, devices: Sequence[Any] | None = None) -> int:
  """Writes the run's adapters, routers and projector (`adapters_io` format: `path`, a
  .safetensors, and its JSON) from its checkpoint (newest unless `step`); returns the step.

  The checkpoint is restored onto the current devices like `load_restorer` does, so a run trained
  sharded over 8 devices exports on 1 CPU. The file loads with `adapters_io.load_adapters` or as
  `--config.init_from`.
  """
  from fape_jax.models import adapters_io  # pylint: disable=g-import-not-at-top
  workdir = epath.Path(workdir)
  config = load_run_config(workdir)
  got, params, frozen, models = _restore_state(config, inference_mesh(config, devices), workdir,
                                               step)
  adapters_io.save_adapters(nnx.merge(models.gen_def, params, frozen), path)
  return got


# ----------------------------------------------------------------------------------------------
# Plans given by hand, sidecars
# ----------------------------------------------------------------------------------------------

def parse_manual_plan(text: str):
  """`--plan` text -> ParsedPlan, by the strict one-line parser; FapeError says what is wrong."""
  from fape_jax.planning import prompts  # pylint: disable=g-import-not-at-top
  try:
    return prompts.parse_plan(text)
  except prompts.PlanFormatError as e:
    raise FapeError(f"--plan is not a valid plan: {e}. Expected one line: "
                    f"{prompts.FORMAT_LINE}") from None


def manual_plans(parsed, images: Sequence[np.ndarray]) -> list:
  """The hand-written plan for each image (with that image's hints, for the sidecar)."""
  from fape_jax.planning import hints as hints_lib  # pylint: disable=g-import-not-at-top
  from fape_jax.planning import planners  # pylint: disable=g-import-not-at-top
  return [planners.Plan(task=parsed.task, focus=parsed.focus, rationale=parsed.rationale,
                        pipeline=parsed.pipeline, raw=(parsed.text,),
                        hints=hints_lib.compute_hints(im)) for im in images]


def _jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


def sidecar(plan, restored: Restored, meta: dict) -> dict:
  """The sidecar JSON object of one restored image (schema in the module docstring)."""
  return _jsonable({
      "plan": {"task": plan.task, "focus": plan.focus, "rationale": plan.rationale,
               "pipeline": list(plan.pipeline), "raw": list(plan.raw)},
      "routing": {k: [round(float(v), 6) for v in w] for k, w in restored.routing.items()},
      "hints": plan.hints.to_dict(),
      "meta": meta,
  })


def restore_image(restorer: Restorer, image: images_lib.ImageFile,
                  parsed=None) -> tuple[Any, Restored, dict]:
  """(plan, restored, sidecar meta without "input") for one decoded image: planned by the
  restorer's planner, or `parsed` (`parse_manual_plan`) when given; what the CLI and the demo
  page (fape_jax/demo.py) both run per image."""
  plans = (manual_plans(parsed, [image.rgb8]) if parsed is not None
           else restorer.plan([image.rgb8]))
  tokens, mask = restorer.encode(plans)
  result = restorer.restore(image.rgb, tokens, mask)
  h, w = image.rgb.shape[:2]
  meta = {"workdir": os.path.abspath(restorer.workdir), "checkpoint_step": restorer.step,
          "size": [w, h], "tiles": result.tiles, "tile": restorer.tile,
          "overlap": restorer.overlap,
          "planner": "manual" if parsed is not None else restorer.planner_kind,
          "bits": image.bits, "gray": image.gray, "alpha": image.alpha is not None}
  return plans[0], result, meta


# ----------------------------------------------------------------------------------------------
# Files and folders
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Job:
  source: str
  output: str
  sidecar: str


def sidecar_path(output: str) -> str:
  return os.path.splitext(output)[0] + ".json"


def _same(a: str, b: str) -> bool:
  if os.path.exists(a) and os.path.exists(b):
    return os.path.samefile(a, b)
  return os.path.realpath(a) == os.path.realpath(b)


def plan_jobs(input_path: str, output_path: str, *, overwrite: bool = False) -> list[Job]:
  """Input/output pairs for a file or a folder; refuses anything that would overwrite an input.

  A folder input restores its images (not recursive) into the `output_path` folder under the
  same names. Existing outputs are refused unless `overwrite`; an output that is an input is
  always refused.
  """
  if not input_path or not output_path:
    raise FapeError("--input and --output are both required.")
  input_path, output_path = os.fspath(input_path), os.fspath(output_path)
  if not os.path.exists(input_path):
    raise FapeError(f"--input={input_path} does not exist.")
  if os.path.isdir(input_path):
    sources = images_lib.list_images(input_path)
    if not sources:
      raise FapeError(f"--input={input_path} holds no image files "
                      f"({', '.join(images_lib.IMAGE_SUFFIXES)}).")
    if os.path.isfile(output_path):
      raise FapeError(f"--input is a folder, so --output must be a folder; {output_path} is a "
                      "file.")
    if _same(input_path, output_path):
      raise FapeError(f"--output={output_path} is the input folder: restoring would overwrite "
                      "the inputs. Choose another output folder.")
    outputs = [os.path.join(output_path, os.path.basename(s)) for s in sources]
  else:
    sources = [input_path]
    if os.path.isdir(output_path) or output_path.endswith(os.sep):
      outputs = [os.path.join(output_path, os.path.basename(input_path))]
    else:
      outputs = [output_path]
    suffix = os.path.splitext(outputs[0])[1].lower()
    if suffix not in images_lib.IMAGE_SUFFIXES:
      raise FapeError(f"--output={outputs[0]}: {suffix or 'no suffix'} is not an image format; "
                      f"use one of {', '.join(images_lib.IMAGE_SUFFIXES)}.")
  jobs = [Job(s, o, sidecar_path(o)) for s, o in zip(sources, outputs)]
  clobber = [(j.output, s) for j in jobs for s in sources
             if _same(j.output, s) or _same(j.sidecar, s)]
  if clobber:
    raise FapeError(f"Refusing to overwrite input file(s): {clobber[0][1]} would be replaced by "
                    f"an output ({len(clobber)} in all). Choose another --output.")
  sidecars: dict[str, str] = {}
  for j in jobs:
    if j.sidecar in sidecars:
      raise FapeError(f"{os.path.basename(sidecars[j.sidecar])} and {os.path.basename(j.source)} "
                      f"would share the sidecar {j.sidecar}; rename one of them or restore them "
                      "separately.")
    sidecars[j.sidecar] = j.source
  if not overwrite:
    existing = [p for j in jobs for p in (j.output, j.sidecar) if os.path.exists(p)]
    if existing:
      raise FapeError(f"{len(existing)} output file(s) exist already, e.g. {existing[:3]}; pass "
                      "--overwrite to replace them, or choose another --output.")
  return jobs


@dataclasses.dataclass
class RestoreReport:
  done: list[Job]
  failed: dict[str, str]   # input path -> error message

  @property
  def exit_code(self) -> int:
    return EXIT_SOME_FAILED if self.failed else EXIT_OK


def restore_paths(workdir: str | os.PathLike, input_path: str, output_path: str, *,
                  step: int | None = None, planner: str | None = None, plan: str = "",
                  tile: int | None = None, overlap: int | None = None, batch: int = 4,
                  overwrite: bool = False, restorer: Restorer | None = None,
                  say: Callable[[str], None] = print) -> RestoreReport:
  """Restores a file or a folder (what the CLI runs); per-image failures do not stop the rest.

  Usage errors (bad paths, no run, malformed `plan`) raise FapeError before any work; an image
  that cannot be read, planned or written is reported in `failed` and on stderr.
  """
  parsed = parse_manual_plan(plan) if plan else None
  jobs = plan_jobs(input_path, output_path, overwrite=overwrite)
  if restorer is None:
    restorer = load_restorer(workdir, step=step, planner=planner, tile=tile, overlap=overlap,
                             batch=batch)
  # Load the planner and encoder now: a missing model is a usage error, not a per-image one.
  if parsed is None:
    _ = restorer.planner
  if restorer.plans_enabled:
    _ = restorer.encoder
  if os.path.isdir(input_path):
    os.makedirs(output_path, exist_ok=True)
  report = RestoreReport([], {})
  # A bar over the images of a folder (process 0, stderr); lines printed meanwhile clear it first.
  bar = distributed.progress(desc="restore", unit="img", total=len(jobs),
                             disable=not os.path.isdir(input_path))
  for job in jobs:
    try:
      image = images_lib.read_image(job.source)
      images_lib.check_writable_as(job.output, image)
      image_plan, result, meta = restore_image(restorer, image, parsed)
      meta = {"input": os.path.abspath(job.source), **meta}
      os.makedirs(os.path.dirname(os.path.abspath(job.output)), exist_ok=True)
      images_lib.write_image(job.output, result.image, image)
      with open(job.sidecar, "w", encoding="utf-8") as f:
        json.dump(sidecar(image_plan, result, meta), f, indent=2)
      report.done.append(job)
      with distributed.progress_write():
        say(f"{job.source} -> {job.output} ({image_plan.task}, {result.tiles} tile(s))")
    except (FapeError, OSError) as e:
      report.failed[job.source] = str(e)
      with distributed.progress_write():
        print(f"error: {job.source}: {e}", file=sys.stderr)
    bar.update(1)
  bar.close()
  if report.failed:
    print(f"error: {len(report.failed)} of {len(jobs)} image(s) failed (exit code "
          f"{EXIT_SOME_FAILED}); the others were written.", file=sys.stderr)
  return report
