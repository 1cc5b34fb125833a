"""Config of the offline plan-cache job (`python -m fape_jax.plan_cache`).

  --config=configs/plan_cache.py         the embedded default: rule planner + bundled MiniLM
                                         (384-d) over the synthetic pairs, K = 32, float16.
  --config=configs/plan_cache.py:hf      the paper's planner: Qwen2.5-VL-7B-Instruct (local files)
                                         plans and encodes (3584-d last hidden states), K = 64,
                                         bfloat16.
Override anything with dotted flags, e.g. `--config.pairs.data_dir=/data --config.limit=100`.
Shard with `--shard_index=I --num_shards=N` (default: the JAX process index and count).
"""

import ml_collections

from fape_jax.planning import job


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "rule"
  if arg not in ("rule", "hf"):
    raise ValueError(f"Unknown plan_cache config variant {arg!r}; choose rule or hf.")
  # planner, encoder, store, batch_size, limit, progress: the same block as configs/base.py's
  # `plans` (one definition, `job.plans_config`).
  c = job.plans_config(arg)
  # Which pairs to plan: a pairs store written by fape_jax.data, all listed splits into one store.
  # For the synthetic store, the knobs below pick its variant (the same as configs/base.py data).
  c.pairs = ml_collections.ConfigDict(dict(
      data_dir="data", name="synthetic", splits=("train", "validation", "mixes"),
      variants_per_image=6, train_max_side=256, val_size=128, val_variants=3, seed=0))
  return c
