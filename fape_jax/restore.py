r"""Restore an image or a folder of images with a trained run.

  python -m fape_jax.restore --workdir=runs/base --input=photo.png --output=restored.png
  python -m fape_jax.restore --workdir=runs/base --input=photos/ --output=restored/
  python -m fape_jax.restore --workdir=runs/base --input=x.png --output=y.png \
      --plan="Task: dehazing, Focus: low, Rationale: grey veil, Pipeline: lift contrast -> tone."

Writes each restored image at its native size (same bit depth, gray/colour and alpha as the input)
and a sidecar NAME.json with the plan, the per-layer routing weights and the hints.
Exit code: 0 all restored, 1 some images failed (the others are written), 2 usage error.
"""

import sys

from absl import app
from absl import flags

from fape_jax import backend
from fape_jax import distributed
from fape_jax import errors
from fape_jax.errors import FapeError

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (config.json, "
                               "checkpoints/).")
_INPUT = flags.DEFINE_string("input", None, "An image file or a folder of images.")
_OUTPUT = flags.DEFINE_string("output", None, "Output file (for a file input) or folder.")
_CHECKPOINT = flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: the newest).")
_PLANNER = flags.DEFINE_enum("planner", None, ["rule", "hf"],
                             "Planner (default: the run's planner kind).")
_PLAN = flags.DEFINE_string("plan", "", "A hand-written plan used for every image instead of the "
                            "planner: 'Task: ..., Focus: ..., Rationale: ..., Pipeline: a -> b.'")
_TILE = flags.DEFINE_integer("tile", None, "Working size: larger images are restored in tiles of "
                             "this size (default: the training crop, or 256).")
_OVERLAP = flags.DEFINE_integer("tile_overlap", None, "Tile overlap in px (default: tile / 4).")
_BATCH = flags.DEFINE_integer("batch", 4, "Tiles per executor call (rounded up to a multiple of "
                              "the device count).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing output files.")

_EXPECT_BACKEND = flags.DEFINE_enum("expect_backend", "any", backend.CHOICES, backend.FLAG_HELP)
_COMPILE_CACHE = flags.DEFINE_string("compilation_cache", distributed.COMPILATION_CACHE,
                                     distributed.COMPILATION_CACHE_HELP)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with errors.exit_on_user_error():
    backend.check(_EXPECT_BACKEND.value)
    distributed.enable_compilation_cache(_COMPILE_CACHE.value)
    from fape_jax import restore_lib  # pylint: disable=g-import-not-at-top
    if not _WORKDIR.value:
      raise FapeError("--workdir is required (the training run directory).")
    report = restore_lib.restore_paths(
        _WORKDIR.value, _INPUT.value, _OUTPUT.value, step=_CHECKPOINT.value,
        planner=_PLANNER.value, plan=_PLAN.value, tile=_TILE.value, overlap=_OVERLAP.value,
        batch=_BATCH.value, overwrite=_OVERWRITE.value)
  sys.exit(report.exit_code)


def cli():
  """`fape-restore` (pyproject.toml's console script) and `python -m fape_jax.restore`."""
  errors.run(main)


if __name__ == "__main__":
  cli()
