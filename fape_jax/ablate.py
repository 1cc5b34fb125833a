r"""Ablations at an equal, fixed step budget over seeds: the full model against its variants.

  python -m fape_jax.ablate --config=configs/base.py --workdir=runs/ablation \
      --config.total_steps=3000 --seeds=0,1 \
      --results=bench/results/ablation.json --out=ABLATION.md
  python -m fape_jax.ablate --config=configs/base.py:tiny --workdir=/tmp/abl \
      --variants=full,dense --seeds=0 --config.total_steps=20
  python -m fape_jax.ablate --render_only     # ABLATION.md (+ .html) from bench/results/...json
  python -m fape_jax.ablate --check           # exit 1 if ABLATION.md is out of date

Variants (fape_jax.ablate_lib.VARIANTS): full, no_plans, no_text_router, no_spectral_router,
no_freq_loss, dense. Each (variant, seed) trains exactly config.total_steps steps (the wall-clock
budget max_wall_minutes is forced off) in WORKDIR/<variant>/seed_<seed>, resumably: a finished run
is not retrained, one stopped early (--config.stop_after=N splits a long run over invocations,
or a preemption) resumes from its checkpoints. --config.* overrides apply to all runs; --seeds sets
config.seed per run. Prints the table (runs with unequal step counts are refused) and writes
WORKDIR/ablation.json and WORKDIR/ablation.html (bar chart and tables); --results also writes
the JSON there and --out renders it into Markdown (ABLATION.md) and the HTML page beside it
(ABLATION.html; so does --render_only).
Exit code: 0 every run trained, 1 some runs failed (each named on stderr; the table holds the
others, and --results/--out are not written), 2 usage error (or every run failed).
"""

import shlex
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from fape_jax import backend
from fape_jax import distributed
from fape_jax import errors
from fape_jax.errors import FapeError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (the full "
                                          "model); every variant starts from it.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Ablation directory: one sub-workdir per "
                               "(variant, seed).")
_VARIANTS = flags.DEFINE_list("variants", [], "Variants to run (default: all), e.g. full,dense.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds (config.seed), one run per variant each.")
_RESULTS = flags.DEFINE_string("results", "", "Also write the ablation JSON here (the repo's: "
                               "bench/results/ablation.json); with --render_only/--check, the "
                               "JSON to read (default bench/results/ablation.json).")
_OUT = flags.DEFINE_string("out", "", "Render the JSON into this Markdown file (the repo's: "
                           "ABLATION.md; the default with --render_only/--check).")
_RENDER_ONLY = flags.DEFINE_bool("render_only", False, "Only render --results into --out and its "
                                 "HTML page beside it (.html); no training.")
_CHECK = flags.DEFINE_bool("check", False, "Only check that --out is what --results renders to; "
                           "exit 1 if not.")
_EXPECT_BACKEND = flags.DEFINE_enum("expect_backend", "any", backend.CHOICES, backend.FLAG_HELP)
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with errors.exit_on_user_error():
    if _RENDER_ONLY.value or _CHECK.value:
      from fape_jax import ablate_lib  # pylint: disable=g-import-not-at-top
      results = _RESULTS.value or ablate_lib.DEFAULT_RESULTS
      out = _OUT.value or ablate_lib.DEFAULT_MARKDOWN
      if _CHECK.value:
        if not ablate_lib.check_file(results, out):
          print(f"{out} is out of date with {results}: run python -m fape_jax.ablate "
                f"--render_only --results={results} --out={out}", file=sys.stderr)
          sys.exit(1)
        return
      ablate_lib.render_file(results, out)
      return
    distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
    backend.check(_EXPECT_BACKEND.value)
    from fape_jax import ablate_lib  # pylint: disable=g-import-not-at-top (after distributed init)
    if _CONFIG.value is None:
      raise FapeError("--config is required to train (e.g. --config=configs/base.py); only "
                      "--render_only and --check work without it.")
    if not _WORKDIR.value:
      raise FapeError("--workdir is required (the ablation directory).")
    if _OUT.value and not _RESULTS.value:  # refused now, not after hours of training
      raise FapeError("--out needs --results: the Markdown is rendered from a stored JSON, so "
                      "that --check can verify it; add e.g. --results=bench/results/ablation.json.")
    command = shlex.join([".venv/bin/python", "-m", "fape_jax.ablate", *sys.argv[1:]])
    result = ablate_lib.run_ablation(_CONFIG.value, _WORKDIR.value, _VARIANTS.value,
                                     _SEEDS.value, command=command)
    if ablate_lib.exit_code(result):
      if _RESULTS.value or _OUT.value:
        print("error: not writing --results/--out: the ablation is incomplete.", file=sys.stderr)
      sys.exit(ablate_lib.exit_code(result))
    if distributed.is_main_process():
      ablate_lib.publish(result, _RESULTS.value, _OUT.value)


def cli():
  """`fape-ablate` (pyproject.toml's console script) and `python -m fape_jax.ablate`."""
  errors.run(main)


if __name__ == "__main__":
  cli()
