r"""Ablations at an equal budget: the full model against its variants, one Table-4-style table.

  python -m fape_jax.ablate --config=configs/base.py --workdir=runs/ablation
  python -m fape_jax.ablate --config=configs/base.py:tiny --workdir=/tmp/abl \
      --variants=full,dense --config.total_steps=20

Variants (fape_jax.ablate_lib.VARIANTS): full, no_plans, no_text_router, no_spectral_router,
no_freq_loss, dense. Each trains in WORKDIR/<variant> (resumable; a finished variant is not
retrained); --config.* overrides apply to all of them. Prints the table and writes
WORKDIR/ablation.json and WORKDIR/ablation.html.
"""


from absl import app
from absl import flags
from ml_collections import config_flags

from fape_jax import distributed
from fape_jax import errors
from fape_jax.errors import FapeError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (the full "
                                          "model); every variant starts from it.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Ablation directory: one sub-workdir per variant.")
_VARIANTS = flags.DEFINE_list("variants", [], "Variants to run (default: all), e.g. full,dense.")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with errors.exit_on_user_error():
    distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
    from fape_jax import ablate_lib  # pylint: disable=g-import-not-at-top (after distributed init)
    if not _WORKDIR.value:
      raise FapeError("--workdir is required (the ablation directory).")
    ablate_lib.run_ablation(_CONFIG.value, _WORKDIR.value, _VARIANTS.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  errors.run(main)
