r"""Train FAPE-IR.

  python -m fape_jax.train --config=configs/base.py --workdir=runs/base
  python -m fape_jax.train --config=configs/base.py:tiny --workdir=/tmp/t --config.total_steps=50
  python -m fape_jax.train --config=configs/base.py:sd21 --workdir=/tmp/x --dry_run

Multi-process: `jax.distributed` is initialised from the environment (TPU pods, SLURM,
Kubernetes-style variables) or from --coordinator_address/--num_processes/--process_id.
Restarting with the same --workdir resumes from its newest checkpoint.
"""


from absl import flags
from ml_collections import config_flags

from fape_jax import backend
from fape_jax import distributed
from fape_jax import errors
from fape_jax.errors import FapeError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, samples).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False,
                             "Build the train state abstractly and print the per-device memory "
                             "table for the config's mesh; allocates nothing.")
_COMPILE_CACHE = flags.DEFINE_string("compilation_cache", distributed.COMPILATION_CACHE,
                                     distributed.COMPILATION_CACHE_HELP)
_EXPECT_BACKEND = flags.DEFINE_enum("expect_backend", "any", backend.CHOICES, backend.FLAG_HELP)
_EXPECT_DEVICES = flags.DEFINE_integer("expect_devices", 0, backend.DEVICES_HELP)
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  del argv
  with errors.exit_on_user_error():
    distributed.initialize(_COORD.value, _NPROC.value, _PID.value)
    backend.check(_EXPECT_BACKEND.value)
    if not _DRY_RUN.value:  # a dry run sizes the config's mesh, whatever devices are here
      backend.check_devices(_EXPECT_DEVICES.value)
    distributed.enable_compilation_cache(_COMPILE_CACHE.value)
    # pylint: disable=g-import-not-at-top (after distributed init)
    from fape_jax import dry_run
    from fape_jax import train_lib
    if _DRY_RUN.value:
      print(dry_run.dry_run(_CONFIG.value))
      return
    if not _WORKDIR.value:
      raise FapeError("--workdir is required (the run directory for checkpoints and logs).")
    train_lib.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def cli():
  """`fape-train` (pyproject.toml's console script) and `python -m fape_jax.train`."""
  flags.mark_flags_as_required(["config"])
  errors.run(main)


if __name__ == "__main__":
  cli()
