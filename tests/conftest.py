"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the whole run: the pytest workers and the CLI subprocesses
# the tests start (they inherit this variable) compile the same tiny steps again and again, and
# compiling dominates their time. Keyed by program, jax version and flags, so it is never stale.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax"))

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_platforms", "cpu")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: starts CLI subprocesses or several processes (skipped by `make test-fast`)")


# The longest files first (`make test` runs with --no-loadscope-reorder, so pytest-xdist hands out
# files in this order): a long file started last would leave the other worker idle at the end.
# Measured on the 2-core machine; the rest keep their collection order.
# test_cluster_rehearsal.py (all the multi-process runs): 12 min alone, 2-core AMD VM, 2026-12-07.
_LONGEST_FIRST = ("test_cluster_rehearsal.py", "test_train.py",
                  "test_reshard.py", "test_ablate.py", "test_train_sharding.py", "test_restore.py",
                  "test_demo.py", "test_dry_run.py", "test_evaluate.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
