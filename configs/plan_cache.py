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

from fape_jax.planning.encoders import MLLM_TEMPLATE
from fape_jax.planning.planners import DEFAULT_MODEL


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "rule"
  if arg not in ("rule", "hf"):
    raise ValueError(f"Unknown plan_cache config variant {arg!r}; choose rule or hf.")
  c = ml_collections.ConfigDict()

  # Which pairs to plan: a pairs store written by fape_jax.data, all listed splits into one store.
  # For the synthetic store, the knobs below pick its variant (the same as configs/base.py data).
  c.pairs = ml_collections.ConfigDict(dict(
      data_dir="data", name="synthetic", splits=("train", "validation", "mixes"),
      variants_per_image=6, train_max_side=256, val_size=128, val_variants=3, seed=0))

  c.planner = ml_collections.ConfigDict(dict(
      kind="rule",              # rule | hf
      model="",                 # hf: local folder or HF id in the local cache ("" = Qwen2.5-VL-7B)
      device="auto",            # auto | cpu | cuda[:i]
      batch_size=4,             # images per generate() call
      max_new_tokens=512,
      temperature=0.7,
      top_p=0.9,
      retry_temperatures=(0.2, 0.5),   # re-prompts of unusable answers, then the rule fallback
      seed=0,
      image_max_side=1024,      # the image the MLLM sees is downscaled to this long side
  ))

  c.encoder = ml_collections.ConfigDict(dict(
      kind="text",              # text (sentence encoder, default bundled MiniLM) | mllm
      model="",                 # text: local HF folder ("" = MiniLM); mllm: "" = the planner's
      max_tokens=32,            # K: longer plans are truncated, shorter ones padded + masked
      dtype="float16",          # float16 | bfloat16
      device="auto",
      batch_size=64,
      template=MLLM_TEMPLATE,   # mllm: the conversation the plan is wrapped in
  ))

  # Output: "" = <data_dir>/plans/<name>-<planner>-<encoder>-K<K> (where training looks).
  c.store = ml_collections.ConfigDict(dict(path="", records_per_file=1024))

  c.batch_size = 32             # records planned and encoded per step
  c.limit = 0                   # >0: only the first `limit` records of each split (quick runs)
  c.progress = True             # tqdm progress bar

  if arg == "hf":
    c.planner.kind = "hf"
    c.planner.model = DEFAULT_MODEL
    c.encoder.kind = "mllm"
    c.encoder.max_tokens = 64
    c.encoder.dtype = "bfloat16"
    c.encoder.batch_size = 8
    c.batch_size = 16
  return c
