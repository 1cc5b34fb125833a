"""The plan-cache job end to end on the synthetic pairs store: the rule planner's task readout on
the validation split, 1 shard == 2 shards, resume after an interruption, and the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import plan_cache as plan_cache_config
from fape_jax.data import pairs
from fape_jax.errors import FapeError
from fape_jax.planning import job
from fape_jax.planning.store import open_plan_store
from fape_jax.planning.tiny_mllm import write_tiny_mllm
from fape_jax.tasks import TASKS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny train split (1 variant at 32 px); the validation split's settings are the defaults
# (128 px, 3 variants, seed 0), and its samples are seeded per image/task/variant, so it is the
# same validation split the embedded default trains against.
PAIRS = dict(variants_per_image=1, train_max_side=32, val_size=128, val_variants=3, seed=0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("data")
  pairs.prepare_synthetic(d, PAIRS)
  return str(d)


def _config(data_dir, store, splits, **overrides):
  c = plan_cache_config.get_config()
  c.pairs.update(PAIRS)
  c.pairs.data_dir = data_dir
  c.pairs.splits = splits
  c.store.path = str(store)
  c.progress = False
  c.update_from_flattened_dict(overrides)
  return c


def test_rule_planner_task_readout_on_validation(data_dir, tmp_path):
  summary = job.run(_config(data_dir, tmp_path / "plans", ("validation", "mixes")),
                    shard_index=0, num_shards=1)
  val = summary["splits"]["validation"]
  print(job.format_summary(summary))
  assert val["n"] == val["n_single"] == 63 and val["n_mixed"] == 0
  confusion = np.array(val["confusion"])
  assert confusion.shape == (7, 7) and confusion.sum() == 63
  assert list(confusion.sum(1)) == [9] * 7                 # 3 images x 3 variants per task
  assert val["accuracy"] == pytest.approx(np.trace(confusion) / 63)
  assert val["accuracy"] >= 0.85                            # the paper's Qwen planner: 0.794
  assert set(val["focus_agreement"]) == set(TASKS)
  assert min(val["focus_agreement"].values()) >= 0.5
  assert summary["splits"]["mixes"]["n_mixed"] == 63
  assert summary["splits"]["mixes"]["accuracy"] is None
  assert summary["written"] == 126 and summary["n"] == 126
  k = summary["manifest"]["K"]
  assert 10 < summary["tokens_per_plan"] <= k
  # At least the stored tokens (float16) plus the text; zstd shrinks little of it.
  assert summary["bytes_per_record"] > 10 * 384 * 2
  assert summary["disk_bytes_per_record"] > 0
  # The store reads back with the training side's expectations, and the summary was saved.
  store = open_plan_store(summary["store"], expect={"planner": "rule", "encoder": "text",
                                                    "K": k, "D": 384, "dtype": "float16"})
  assert len(store) == 126
  rid = "synthetic/validation/coffee/denoise/0"
  rec = store.record(rid)
  assert rec["text"].startswith("Task: ") and rec["hints"]["height"] == 128
  assert store[rid]["tokens"].shape == (k, 384)
  saved = json.loads(open(os.path.join(summary["store"], "summary-s00000.json")).read())
  assert saved["splits"]["validation"]["accuracy"] == val["accuracy"]


def _read_all(path):
  store = open_plan_store(path)
  return {i: (store.record(i)["text"], store[i]["tokens"], store[i]["mask"]) for i in store.ids}


def _assert_same_store(a, b):
  assert sorted(a) == sorted(b)
  for i in a:
    assert a[i][0] == b[i][0]
    np.testing.assert_array_equal(a[i][1], b[i][1])
    np.testing.assert_array_equal(a[i][2], b[i][2])


def test_two_shards_equal_one_shard(data_dir, tmp_path):
  one = job.run(_config(data_dir, tmp_path / "one", ("train",), batch_size=8),
                shard_index=0, num_shards=1)
  summaries = [job.run(_config(data_dir, tmp_path / "two", ("train",), batch_size=5),
                       shard_index=s, num_shards=2) for s in range(2)]
  assert [s["written"] for s in summaries] == [28, 28] and one["written"] == 56
  _assert_same_store(_read_all(tmp_path / "one"), _read_all(tmp_path / "two"))
  assert json.loads((tmp_path / "two" / "manifest.json").read_text())["count"] == 56
  # Both shards' files are there; a rerun of a finished shard plans nothing.
  assert {p.name[:12] for p in (tmp_path / "two").glob("*.array_record")} == {
      "plans-s00000", "plans-s00001"}
  again = job.run(_config(data_dir, tmp_path / "two", ("train",)), shard_index=1, num_shards=2)
  assert again["written"] == 0 and again["splits"]["train"]["n"] == 28


class _Interrupted(Exception):
  pass


class _FailingSource:
  """A pairs source that dies at record `fail_at` (a preempted job)."""

  def __init__(self, source, fail_at):
    self.source, self.fail_at = source, fail_at

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    if i == self.fail_at:
      raise _Interrupted(i)
    return self.source[i]


def test_resume_after_interruption_writes_no_duplicates(data_dir, tmp_path):
  config = _config(data_dir, tmp_path / "resumed", ("train",), batch_size=4,
                   **{"store.records_per_file": 8})
  train = pairs.open_pairs(data_dir, "synthetic", "train", config.pairs)
  with pytest.raises(_Interrupted):
    job.run(config, shard_index=0, num_shards=1, sources={"train": _FailingSource(train, 30)})
  partial = open_plan_store(tmp_path / "resumed")
  assert len(partial) == 24                   # three committed chunks of 8; the rest was lost
  summary = job.run(config, shard_index=0, num_shards=1)
  assert summary["written"] == 56 - 24
  resumed = _read_all(tmp_path / "resumed")
  assert len(resumed) == 56 == len(set(open_plan_store(tmp_path / "resumed").ids))
  fresh = job.run(_config(data_dir, tmp_path / "fresh", ("train",)), shard_index=0, num_shards=1)
  assert fresh["written"] == 56
  _assert_same_store(resumed, _read_all(tmp_path / "fresh"))
  # Other settings into the same store are refused, naming the difference.
  with pytest.raises(FapeError, match="K: store has 32, expected 16"):
    job.run(_config(data_dir, tmp_path / "resumed", ("train",), **{"encoder.max_tokens": 16}),
            shard_index=0, num_shards=1)


@pytest.mark.slow
def test_cli(data_dir, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  base = [sys.executable, "-m", "fape_jax.plan_cache", "--config=configs/plan_cache.py",
          f"--config.pairs.data_dir={data_dir}", "--config.pairs.variants_per_image=1",
          "--config.pairs.train_max_side=32", "--config.pairs.splits=('validation',)",
          f"--config.store.path={tmp_path / 'cli'}", "--config.limit=10", "--config.progress=False"]
  out = subprocess.run(base + ["--shard_index=1", "--num_shards=2",
                               f"--summary_json={tmp_path / 's.json'}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "task-readout accuracy" in out.stdout and "confusion" in out.stdout
  summary = json.loads((tmp_path / "s.json").read_text())
  assert summary["written"] == 5 and summary["shard"] == [1, 2]
  assert len(open_plan_store(tmp_path / "cli")) == 5
  bad = subprocess.run(base + ["--shard_index=2", "--num_shards=2"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2
  assert "outside [0, 2)" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_two_processes_of_the_job_plan_different_shards(data_dir, tmp_path):
  """launch/local.sh starts 2 processes with coordinator flags: each joins the process group and
  plans the shard of its process index (before, both planned shard 0 of 1)."""
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_COMPILATION_CACHE_DIR")}
  env.update(MODULE="fape_jax.plan_cache", NUM_PROCESSES="2", DEVICES_PER_PROCESS="1",
             PYTHON=sys.executable, PYTHONPATH=REPO)
  store = tmp_path / "two"
  out = subprocess.run(
      [os.path.join(REPO, "launch", "local.sh"), f"--config.pairs.data_dir={data_dir}",
       "--config.pairs.variants_per_image=1", "--config.pairs.train_max_side=32",
       "--config.pairs.splits=('validation',)", f"--config.store.path={store}",
       "--config.limit=10", "--config.progress=False"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  for i in range(2):
    summary = json.loads((store / f"summary-s{i:05d}.json").read_text())
    assert summary["shard"] == [i, 2] and summary["written"] == 5
  assert len(open_plan_store(store)) == 10


def test_job_with_hf_planner_and_mllm_encoder(data_dir, tmp_path):
  tiny = write_tiny_mllm(tmp_path / "tiny_mllm")
  config = _config(data_dir, tmp_path / "hf", ("validation",), limit=4, batch_size=3,
                   **{"planner.kind": "hf", "planner.model": tiny, "planner.max_new_tokens": 8,
                      "encoder.kind": "mllm", "encoder.dtype": "bfloat16"})
  summary = job.run(config, shard_index=0, num_shards=1)
  m = summary["manifest"]
  assert (m["planner"], m["model_id"], m["encoder"], m["encoder_model"]) == (
      "hf", tiny, "mllm", tiny)
  assert (m["K"], m["D"], m["dtype"], m["count"]) == (32, 32, "bfloat16", 4)
  # The random model never writes a usable line: every plan is the rule fallback after 2 retries.
  assert summary["fallback_rate"] == 1.0 and summary["mean_retries"] == 2.0
  store = open_plan_store(tmp_path / "hf")
  rec = store.record(store.ids[0])
  assert len(rec["raw"]) == 3 and rec["fallback"]
  assert store[store.ids[0]]["mask"].all()        # the conversation is longer than K = 32


def test_plan_store_path_follows_the_pairs_and_the_planner(monkeypatch):
  """Plans of other images (another synthesis recipe or pairs config) or of another planner
  version are never reused: each gets its own store."""
  from configs import base
  from fape_jax.planning import planners
  c = base.get_config("tiny")
  path = job.store_path(c.plans, c.data)
  assert path == job.store_path(c.plans, c.data) and path.startswith(c.data.data_dir)
  other = base.get_config("tiny")
  other.data.variants_per_image = 2
  assert job.store_path(other.plans, other.data) != path
  monkeypatch.setattr(planners, "RULE_VERSION", planners.RULE_VERSION + 1)
  assert job.store_path(c.plans, c.data) != path
