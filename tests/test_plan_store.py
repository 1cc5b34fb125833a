"""Plan store: round trip, manifest checks, missing ids, shards, interrupted writes."""

import json
import pickle

import ml_dtypes
import numpy as np
import pytest

from fape_jax.errors import FapeError
from fape_jax.planning.planners import RulePlanner
from fape_jax.planning.store import PlanStoreWriter, open_plan_store

K, D = 6, 5
SETTINGS = {"planner": "rule", "model_id": "rule", "encoder": "text", "encoder_model": "m",
            "K": K, "D": D, "dtype": "float16", "config_hash": "abc", "pairs": "synthetic"}


def _plan(seed):
  rng = np.random.default_rng(seed)
  image = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
  return RulePlanner().plan([image])[0]


def _tokens(seed, n, dtype=np.float16):
  rng = np.random.default_rng(seed)
  tokens = np.zeros((K, D), dtype)
  tokens[:n] = rng.normal(size=(n, D)).astype(dtype)
  return tokens, np.arange(K) < n


def _write(path, ids, *, shard_index=0, records_per_file=2, settings=SETTINGS):
  with PlanStoreWriter(path, settings, shard_index=shard_index,
                       records_per_file=records_per_file) as w:
    for i in ids:
      if i not in w.done_ids:
        w.add(i, _plan(int(i[2:])), *_tokens(int(i[2:]), 1 + int(i[2:]) % K))
  return w


def test_round_trip(tmp_path):
  ids = [f"id{i}" for i in range(5)]
  _write(tmp_path, ids)
  store = open_plan_store(tmp_path)
  assert len(store) == 5 and sorted(store.ids) == ids
  assert store.manifest["count"] == 5
  assert json.loads((tmp_path / "manifest.json").read_text())["count"] == 5
  for i in ids:
    n = int(i[2:])
    tokens, mask = _tokens(n, 1 + n % K)
    got = store[i]
    assert set(got) == {"tokens", "mask"}
    np.testing.assert_array_equal(got["tokens"], tokens)
    np.testing.assert_array_equal(got["mask"], mask)
    assert got["tokens"].dtype == np.float16 and got["tokens"].shape == (K, D)
    rec = store.record(i)
    plan = _plan(n)
    assert rec["text"] == plan.text and rec["task"] == plan.task
    assert rec["pipeline"] == plan.pipeline and rec["raw"] == plan.raw
    assert rec["hints"] == plan.hints.to_dict()
    assert rec["fallback"] is False and rec["n_retries"] == 0
  # Picklable for Grain workers, and still readable after a round trip through pickle.
  clone = pickle.loads(pickle.dumps(store))
  np.testing.assert_array_equal(clone["id3"]["tokens"], store["id3"]["tokens"])


def test_bfloat16_tokens(tmp_path):
  settings = {**SETTINGS, "dtype": "bfloat16"}
  with PlanStoreWriter(tmp_path, settings) as w:
    w.add("a", _plan(0), *_tokens(0, 3, ml_dtypes.bfloat16))
  got = open_plan_store(tmp_path)["a"]
  assert got["tokens"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(got["tokens"], _tokens(0, 3, ml_dtypes.bfloat16)[0])


def test_manifest_mismatch_names_keys_and_remedy(tmp_path):
  _write(tmp_path, ["id0"])
  with pytest.raises(FapeError) as e:
    open_plan_store(tmp_path, expect={"encoder": "mllm", "K": K, "D": 3584})
  msg = str(e.value)
  assert "encoder: store has 'text', expected 'mllm'" in msg
  assert "D: store has 5, expected 3584" in msg and "K:" not in msg
  assert "plan_cache" in msg
  open_plan_store(tmp_path, expect={"encoder": "text", "K": K})   # matching keys: fine
  # A writer with other settings refuses to add to the store.
  with pytest.raises(FapeError, match="config_hash: store has 'abc', expected 'zzz'"):
    PlanStoreWriter(tmp_path, {**SETTINGS, "config_hash": "zzz"})


def test_missing_ids_named(tmp_path):
  _write(tmp_path, ["id0", "id1"])
  wanted = ["id0"] + [f"gone{i}" for i in range(8)]
  with pytest.raises(FapeError, match=r"no plan for 8 id\(s\), e.g. \['gone0', 'gone1', 'gone2', "
                                      r"'gone3', 'gone4'\]"):
    open_plan_store(tmp_path, require_ids=wanted)
  store = open_plan_store(tmp_path, require_ids=["id1", "id0"])
  with pytest.raises(FapeError, match="gone0"):
    store["gone0"]
  with pytest.raises(FapeError, match="No plan store"):
    open_plan_store(tmp_path / "nowhere")


def test_shards_read_as_one_store(tmp_path):
  ids = [f"id{i}" for i in range(7)]
  for s in range(2):
    _write(tmp_path, ids[s::2], shard_index=s)
  store = open_plan_store(tmp_path)
  assert sorted(store.ids) == sorted(ids)
  single = tmp_path / "single"
  _write(single, ids, records_per_file=100)
  one = open_plan_store(single)
  for i in ids:
    np.testing.assert_array_equal(store[i]["tokens"], one[i]["tokens"])
    assert store.record(i)["text"] == one.record(i)["text"]


def test_interrupted_write_resumes_without_duplicates(tmp_path):
  ids = [f"id{i}" for i in range(7)]

  class Boom(Exception):
    pass

  with pytest.raises(Boom):
    with PlanStoreWriter(tmp_path, SETTINGS, records_per_file=2) as w:
      for n, i in enumerate(ids):
        if n == 5:
          raise Boom()
        w.add(i, _plan(n), *_tokens(n, 2))
  # Two chunks (4 records) were committed; the fifth record was buffered and is gone.
  assert len(open_plan_store(tmp_path)) == 4
  # A crash in the middle of a commit leaves a stray file; the next writer removes it.
  (tmp_path / "plans-s00000-c00002.array_record.tmp").write_bytes(b"partial")
  w = _write(tmp_path, ids)
  assert w.written == 3
  assert not list(tmp_path.glob("*.tmp"))
  store = open_plan_store(tmp_path)
  assert len(store) == 7 and len(set(store.ids)) == 7
  with pytest.raises(ValueError, match="already in the store"):
    PlanStoreWriter(tmp_path, SETTINGS).add("id0", _plan(0), *_tokens(0, 2))


def test_bad_token_shapes_rejected(tmp_path):
  with PlanStoreWriter(tmp_path, SETTINGS) as w:
    with pytest.raises(ValueError, match="do not match"):
      w.add("a", _plan(0), np.zeros((K + 1, D), np.float16), np.ones(K + 1, bool))
    tokens, mask = _tokens(0, 3)
    mask[0] = False
    with pytest.raises(ValueError, match="prefix"):
      w.add("b", _plan(0), tokens, mask)


def test_a_file_system_without_flock_or_hard_links_still_builds_one_store(tmp_path, monkeypatch,
                                                                          caplog):
  """Lustre without -o flock, GCS FUSE: flock fails with ENOLCK, os.link with EPERM. The manifest
  is then created exclusively, shards still add up, other settings are still refused."""
  import errno  # pylint: disable=g-import-not-at-top
  import fcntl  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  def no_flock(*_):
    raise OSError(errno.ENOLCK, "No locks available")

  def no_link(*_):
    raise OSError(errno.EPERM, "Operation not permitted")

  monkeypatch.setattr(fcntl, "flock", no_flock)
  monkeypatch.setattr(os, "link", no_link)
  _write(tmp_path, ["id0", "id2", "id4"], shard_index=0)
  _write(tmp_path, ["id1", "id3"], shard_index=1)
  store = open_plan_store(tmp_path)
  assert sorted(store.ids) == [f"id{i}" for i in range(5)] and store.manifest["count"] == 5
  assert "no flock on this file system" in caplog.text
  assert not [p.name for p in tmp_path.iterdir() if ".tmp" in p.name]
  with pytest.raises(FapeError, match="built with other settings"):
    _write(tmp_path, ["id9"], settings=dict(SETTINGS, K=K + 1))
