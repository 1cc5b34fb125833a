r"""The report of a training run, from its files alone (nothing is loaded or evaluated).

  python -m fape_jax.report --workdir=runs/base                 # writes runs/base/report.html
  python -m fape_jax.report --workdir=runs/base --out=/tmp/base.html

One self-contained HTML file (images inline, no scripts; `fape_jax.report_lib.training_report`):
the training curves from WORKDIR/metrics.jsonl (loss terms and the other logged scalars, the
validation PSNR per task over steps), the last validation table and routing heatmap
(validation.json), and the newest validation samples (samples/step_N.png with its .json) as
degraded | best classical baseline | ours | clean with a zoomed crop and each image's plan.
A run in progress can be reported at any time. `fape-evaluate` writes the full report of a
checkpoint (benchmarks, baselines over whole sets) and includes the same training curves.
Exit code: 0 written, 2 usage error (no such run).
"""

from absl import app
from absl import flags
from etils import epath

from fape_jax import backend
from fape_jax import errors
from fape_jax.distributed import say
from fape_jax.errors import FapeError

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (metrics.jsonl, "
                               "validation.json, samples/).")
_OUT = flags.DEFINE_string("out", None, "The HTML file to write (default: WORKDIR/report.html).")
# Taken by every entry point; a report computes nothing on the accelerator, so this only checks.
_EXPECT_BACKEND = flags.DEFINE_enum("expect_backend", "any", backend.CHOICES, backend.FLAG_HELP)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with errors.exit_on_user_error():
    backend.check(_EXPECT_BACKEND.value)
    workdir = _WORKDIR.value
    if not workdir:
      raise FapeError("--workdir (the training run) is required.")
    run = epath.Path(workdir)  # a local folder or a gs:// (any fsspec) run directory
    if not any((run / f).exists() for f in ("metrics.jsonl", "validation.json")):
      raise FapeError(f"{workdir} holds no metrics.jsonl or validation.json: not a training run "
                      "(or one that has not logged a step yet).")
    from fape_jax import report_html  # pylint: disable=g-import-not-at-top
    from fape_jax import report_lib  # pylint: disable=g-import-not-at-top
    out = epath.Path(_OUT.value) if _OUT.value else run / "report.html"
    text = report_lib.training_report(run, report_html.command_line("fape_jax.report"))
    out.write_text(text, encoding="utf-8")
  say(f"Wrote {out} ({len(text) / 1e6:.1f} MB).")


def cli():
  """`fape-report` (pyproject.toml's console script) and `python -m fape_jax.report`."""
  errors.run(main)


if __name__ == "__main__":
  cli()
