r"""Offline plan caching: plan and encode every degraded image of a pairs store.

  python -m fape_jax.plan_cache --config=configs/plan_cache.py
  python -m fape_jax.plan_cache --config=configs/plan_cache.py:hf \
      --config.pairs.data_dir=/data --config.planner.model=/models/Qwen2.5-VL-7B-Instruct
  python -m fape_jax.plan_cache --config=configs/plan_cache.py --shard_index=0 --num_shards=4

Sharding: --shard_index/--num_shards, or else the process index/count: the job joins the process
group as `train` does (`fape_jax.distributed`: SLURM's `srun -n N`, launch/local.sh's coordinator
flags, launcher variables or a TPU pod), so N processes plan N disjoint shards. Re-running with the
same settings resumes (ids already in the store are skipped).
"""

import json

from absl import flags
from ml_collections import config_flags

from fape_jax import backend
from fape_jax import distributed
from fape_jax import errors

# No default file: a default config is loaded (with its --config.KEY overrides) while the flags
# are defined, where a mistyped key could only end in a traceback.
_CONFIG = config_flags.DEFINE_config_file("config", None, "Plan-cache config file, e.g. "
                                          "configs/plan_cache.py.", lock_config=True)
_SHARD_INDEX = flags.DEFINE_integer("shard_index", None, "This process's shard (default: JAX "
                                    "process index).")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", None, "Number of shards (default: JAX process "
                                   "count).")
_SUMMARY_JSON = flags.DEFINE_string("summary_json", None, "Also write the summary dict here.")
# JAX only shards the job here; the planner and encoder run in PyTorch (their own
# --config.planner.device / --config.encoder.device: cuda fails when torch sees no GPU).
_EXPECT_BACKEND = flags.DEFINE_enum("expect_backend", "any", backend.CHOICES, backend.FLAG_HELP)
_SHUTDOWN_WAIT_S = 24 * 3600
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PID = flags.DEFINE_integer("process_id", None, "This process's index.")


def main(argv):
  del argv
  with errors.exit_on_user_error():
    # Joined to learn this process's place (its shard); no collective runs after this. Shards
    # take unequal time (an MLLM's answers differ in length): the first done waits for the last.
    distributed.initialize(_COORD.value, _NPROC.value, _PID.value,
                           shutdown_timeout=_SHUTDOWN_WAIT_S)
    backend.check(_EXPECT_BACKEND.value)
    from fape_jax.planning import job  # pylint: disable=g-import-not-at-top (after flag parsing)
    summary = job.run(_CONFIG.value, shard_index=_SHARD_INDEX.value, num_shards=_NUM_SHARDS.value)
  print(job.format_summary(summary))
  if _SUMMARY_JSON.value:
    with open(_SUMMARY_JSON.value, "w") as f:
      json.dump(summary, f, indent=2)


def cli():
  """`fape-plan-cache` (pyproject.toml's console script) and `python -m fape_jax.plan_cache`."""
  flags.mark_flags_as_required(["config"])
  errors.run(main)


if __name__ == "__main__":
  cli()
