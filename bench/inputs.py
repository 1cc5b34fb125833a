"""Random inputs with the shapes and dtypes of the training pipeline's batches.

Step time does not depend on pixel values or weights, so the benchmarks feed one fixed random
batch (no input pipeline in the loop; `bench/pipeline.py` measures the pipeline on its own).
"""

from __future__ import annotations

import numpy as np


def random_batch(config, *, batch_size: int | None = None, size: int | None = None,
                 seed: int = 0) -> dict[str, np.ndarray]:
  """A batch like `pipeline.train_iterator`'s: NHWC float32 images in [-1, 1], (B, K, D) plans.

  Defaults: `config.data.batch_size`, `config.data.crop`, K = `config.plans.encoder.max_tokens`,
  D = `config.plans.dim`. Without plans (`config.plans.enabled` False) the plan fields are absent.
  """
  b = config.data.batch_size if batch_size is None else batch_size
  s = config.data.crop if size is None else size
  r = np.random.default_rng(seed)
  batch = {
      "degraded": r.uniform(-1, 1, (b, s, s, 3)).astype(np.float32),
      "clean": r.uniform(-1, 1, (b, s, s, 3)).astype(np.float32),
      "task_id": (np.arange(b) % 7).astype(np.int32),
  }
  if config.plans.enabled:
    k, d = config.plans.encoder.max_tokens, config.plans.dim
    batch["plan_tokens"] = r.normal(size=(b, k, d)).astype(np.float32)
    # Valid lengths K, K - 1, K - 2, K - 3, K, ...: some padding, as real plans have.
    batch["plan_mask"] = np.arange(k)[None, :] < (k - np.arange(b) % min(4, k))[:, None]
  return batch
