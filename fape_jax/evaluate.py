r"""Evaluate a trained run: metrics tables, planner readout, baselines and an HTML report.

  python -m fape_jax.evaluate --workdir=runs/base --out=runs/base/eval
  python -m fape_jax.evaluate --workdir=runs/base --out=/tmp/ev --per_task=4 \
      --data=rain100l:/data/Rain100L --data=sots_outdoor:/data/SOTS/outdoor

Evaluates the run's validation split (the embedded synthetic one by default), the zero-shot
CDD-11-style mixes and any benchmark folders given with --data=NAME:FOLDER; prints the tables and
writes OUT/metrics.json and OUT/report.html (self-contained: opens from disk, no network).
Exit code: 0 every set evaluated, 1 some sets failed (each named on stderr; the others are
written), 2 usage error.
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
_OUT = flags.DEFINE_string("out", None, "Output folder for metrics.json and report.html.")
_DATA = flags.DEFINE_multi_string("data", [], "A benchmark as NAME:FOLDER (repeatable), NAME one "
                                  "of fape_jax.data.builders.LAYOUTS.")
_CHECKPOINT = flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: the newest).")
_PER_TASK = flags.DEFINE_integer("per_task", 0, "At most this many images per task in each set "
                                 "(0 = all).")
_MIXES = flags.DEFINE_bool("mixes", True, "Evaluate the zero-shot CDD-11-style mixes.")
_BASELINES = flags.DEFINE_bool("baselines", True, "Score the classical baselines too.")
_SAMPLES = flags.DEFINE_integer("samples", 2, "Sample images per task in the report.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the pairs/plan stores live (default: the "
                                "run's config.data.data_dir).")
_LPIPS_VGG = flags.DEFINE_string("lpips_vgg16", None, "torchvision VGG16 weights for LPIPS "
                                 "(default: the run's config.lpips.vgg16_path).")
_LPIPS_LIN = flags.DEFINE_string("lpips_lin", None, "lpips' vgg.pth linear weights (default: the "
                                 "run's config.lpips.lin_path).")

_EXPECT_BACKEND = flags.DEFINE_enum("expect_backend", "any", backend.CHOICES, backend.FLAG_HELP)
_COMPILE_CACHE = flags.DEFINE_string("compilation_cache", distributed.COMPILATION_CACHE,
                                     distributed.COMPILATION_CACHE_HELP)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with errors.exit_on_user_error():
    backend.check(_EXPECT_BACKEND.value)
    distributed.enable_compilation_cache(_COMPILE_CACHE.value)
    from fape_jax import evaluate_lib  # pylint: disable=g-import-not-at-top
    from fape_jax import report_html  # pylint: disable=g-import-not-at-top
    if not _WORKDIR.value or not _OUT.value:
      raise FapeError("--workdir (the training run) and --out (the report folder) are required.")
    data = evaluate_lib.parse_data_flag(_DATA.value)
    metrics = evaluate_lib.evaluate(
        _WORKDIR.value, _OUT.value, data=data, step=_CHECKPOINT.value, per_task=_PER_TASK.value,
        mixes=_MIXES.value, baselines=_BASELINES.value, num_samples=_SAMPLES.value,
        data_dir=_DATA_DIR.value, lpips_vgg16_path=_LPIPS_VGG.value,
        lpips_lin_path=_LPIPS_LIN.value,
        command=report_html.command_line("fape_jax.evaluate"))
  sys.exit(evaluate_lib.exit_code(metrics))


def cli():
  """`fape-evaluate` (pyproject.toml's console script) and `python -m fape_jax.evaluate`."""
  errors.run(main)


if __name__ == "__main__":
  cli()
