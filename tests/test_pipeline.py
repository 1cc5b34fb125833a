"""Grain pipeline: batch contract, aligned crops, resumable iterators, host sharding, eval."""

import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image
from scipy import ndimage

from fape_jax import sharding as sharding_lib
from fape_jax import tasks as tasks_lib
from fape_jax.data import pairs
from fape_jax.data import pipeline
from fape_jax.errors import FapeError

TASKS = tasks_lib.TASKS + ("light_enhancement+dehazing",)


class FakeSource:
  """In-memory pairs: degraded = 255 - clean (so an aligned crop gives degraded == -clean)."""

  def __init__(self, n, h=24, w=32, scale=1, sizes=None):
    self.recs = []
    for i in range(n):
      hh, ww = sizes[i % len(sizes)] if sizes else (h, w)
      rng = np.random.default_rng(i)
      clean = rng.integers(0, 256, (hh, ww, 3)).astype(np.uint8)
      if scale > 1:  # smooth content, degraded = subsampled clean
        clean = ndimage.gaussian_filter(rng.random((hh, ww, 3)), (3, 3, 0))
        clean = (255 * (clean - clean.min()) / (np.ptp(clean) + 1e-9)).astype(np.uint8)
        deg = clean[::scale, ::scale].copy()
      else:
        deg = 255 - clean
      self.recs.append({"id": f"fake/{i}", "degraded": deg, "clean": clean,
                        "task": TASKS[i % len(TASKS)], "source": "fake", "params": "{}"})

  def __len__(self):
    return len(self.recs)

  def __getitem__(self, i):
    return self.recs[i]


class FakePlans:
  def __init__(self, k=4, d=6):
    self.k, self.d = k, d

  def __getitem__(self, rid):
    if not rid.startswith("fake/"):
      raise KeyError(rid)
    i = int(rid.split("/")[1])
    return {"tokens": np.full((self.k, self.d), i, np.float16),
            "mask": np.arange(self.k) < 1 + i % self.k}


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_batch_contract_aligned_crop_and_plan_join():
  src = FakeSource(20)
  it = pipeline.train_iterator(src, FakePlans(), crop=16, batch_size=4, seed=3,
                               process_index=0, process_count=1)
  for b in _take(it, 5):
    assert b["degraded"].shape == b["clean"].shape == (4, 16, 16, 3)
    assert b["degraded"].dtype == b["clean"].dtype == np.float32
    assert b["clean"].min() >= -1 and b["clean"].max() <= 1
    np.testing.assert_allclose(b["degraded"], -b["clean"], atol=1e-6)  # one box and flip
    assert b["task_id"].dtype == np.int32 and b["index"].dtype == np.int64
    assert b["plan_tokens"].shape == (4, 4, 6) and b["plan_tokens"].dtype == np.float32
    assert b["plan_mask"].shape == (4, 4) and b["plan_mask"].dtype == bool
    for j, r in enumerate(b["record"]):
      rec = src[int(r)]
      assert b["task_id"][j] == tasks_lib.TASK_ID.get(rec["task"], -1)
      np.testing.assert_array_equal(b["plan_tokens"][j], FakePlans()[rec["id"]]["tokens"])
      np.testing.assert_array_equal(b["plan_mask"][j], FakePlans()[rec["id"]]["mask"])
      # The crop is a window of the record's clean image (possibly mirrored).
      clean = rec["clean"].astype(np.float32) * (2 / 255) - 1
      win = b["clean"][j]
      found = any(np.array_equal(win, cand[y:y + 16, x:x + 16])
                  for cand in (clean, clean[:, ::-1]) for y in range(9) for x in range(17))
      assert found
  assert -1 in np.concatenate([b["task_id"] for b in _take(it, 5)])  # mixes get -1


def test_no_plans_and_missing_plans():
  b = next(pipeline.train_iterator(FakeSource(8), None, crop=8, batch_size=2,
                                   process_index=0, process_count=1, prefetch=0))
  assert "plan_tokens" not in b and "plan_mask" not in b

  class Partial(FakePlans):
    def __getitem__(self, rid):
      if rid == "fake/3":
        raise KeyError(rid)
      return super().__getitem__(rid)

  it = pipeline.train_iterator(FakeSource(8), Partial(), crop=8, batch_size=8,
                               process_index=0, process_count=1, read_threads=0, prefetch=0)
  with pytest.raises(FapeError, match="no plan for pair 'fake/3'"):
    next(it)


def test_sr_crop_box_scales_with_the_factor():
  src = FakeSource(6, h=48, w=64, scale=2)
  it = pipeline.train_iterator(src, None, crop=16, batch_size=6, seed=0, process_index=0,
                               process_count=1, hflip=False)
  b = next(it)
  assert b["degraded"].shape == (6, 16, 16, 3)
  err = np.abs(b["degraded"] - b["clean"]).mean(axis=(1, 2, 3))
  assert err.max() < 0.06  # smooth content: the upsampled LR crop matches its HR box
  shifted = np.abs(b["degraded"][:, 4:] - b["clean"][:, :-4]).mean(axis=(1, 2, 3))
  assert shifted.min() > 2 * err.max()  # and a misplaced box would not
  with pytest.raises(FapeError, match="not divisible"):
    next(pipeline.train_iterator(src, None, crop=15, batch_size=2, process_index=0,
                                 process_count=1, read_threads=0, prefetch=0))


def test_crop_larger_than_image_and_bad_batch_sizes():
  with pytest.raises(FapeError, match="smaller than the 64x64 training crop"):
    next(pipeline.train_iterator(FakeSource(4), None, crop=64, batch_size=2, process_index=0,
                                 process_count=1, read_threads=0, prefetch=0))
  with pytest.raises(FapeError, match="multiple of the 2 processes"):
    pipeline.train_dataset(FakeSource(4), None, crop=8, batch_size=3, process_index=0,
                           process_count=2)
  with pytest.raises(FapeError, match="process_index"):
    pipeline.train_dataset(FakeSource(4), None, crop=8, batch_size=2, process_index=2,
                           process_count=2)


def test_resume_from_state_continues_the_exact_sequence():
  kw = dict(crop=16, batch_size=4, seed=11, process_index=0, process_count=1)
  src, plans = FakeSource(10), FakePlans()
  it = pipeline.train_iterator(src, plans, **kw)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 6)  # crosses the epoch boundary (10 pairs, 4 per batch)
  fresh = pipeline.train_iterator(src, plans, **kw)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 6), expected)
  uninterrupted = pipeline.train_iterator(src, plans, **kw)
  _assert_batches_equal(_take(uninterrupted, 9)[3:], expected)


def test_resume_through_an_orbax_checkpoint_manager(tmp_path):
  kw = dict(crop=16, batch_size=4, seed=5, process_index=0, process_count=1)
  src = FakeSource(12)
  it = pipeline.train_iterator(src, None, **kw)
  _take(it, 2)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = _take(it, 4)
  fresh = pipeline.train_iterator(src, None, **kw)
  ocp.CheckpointManager(tmp_path / "ckpt").restore(
      2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_batches_equal(_take(fresh, 4), expected)


def test_two_hosts_get_disjoint_shards_that_cover_the_epoch():
  n, global_batch = 24, 8
  src = FakeSource(n)
  kw = dict(crop=8, batch_size=global_batch, seed=2, process_count=2)
  hosts = [_take(pipeline.train_iterator(src, None, process_index=h, **kw), n // global_batch)
           for h in range(2)]
  records = [np.concatenate([b["record"] for b in host]) for host in hosts]
  assert len(records[0]) == len(records[1]) == n // 2
  assert not set(records[0]) & set(records[1])
  assert sorted(np.concatenate(records)) == list(range(n))
  for b, (b0, b1) in enumerate(zip(*hosts)):  # global batch b = stream positions [8b, 8b + 8)
    assert sorted(np.concatenate([b0["index"], b1["index"]])) == list(
        range(b * global_batch, (b + 1) * global_batch))
  # An example does not depend on the host count: same record, crop and flip at position k.
  single = _take(pipeline.train_iterator(src, None, process_index=0, **(kw | {
      "process_count": 1})), n // global_batch)
  by_index = {int(k): (b["record"][j], b["clean"][j]) for b in single
              for j, k in enumerate(b["index"])}
  for host in hosts:
    for b in host:
      for j, k in enumerate(b["index"]):
        assert b["record"][j] == by_index[int(k)][0]
        np.testing.assert_array_equal(b["clean"][j], by_index[int(k)][1])


def test_epochs_reshuffle_with_the_seed():
  src = FakeSource(16)

  def epochs(seed):
    it = pipeline.train_iterator(src, None, crop=8, batch_size=8, seed=seed, process_index=0,
                                 process_count=1)
    recs = np.concatenate([b["record"] for b in _take(it, 4)])
    return recs[:16], recs[16:]

  e0, e1 = epochs(0)
  assert sorted(e0) == sorted(e1) == list(range(16))
  assert list(e0) != list(e1)
  again = epochs(0)
  np.testing.assert_array_equal(again[0], e0)
  np.testing.assert_array_equal(again[1], e1)
  assert list(epochs(1)[0]) != list(e0)


def test_global_array_per_step():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  batch = next(pipeline.train_iterator(FakeSource(16), FakePlans(), crop=8, batch_size=8,
                                       process_index=0, process_count=1))
  g = sharding_lib.global_batch(batch, sharding)
  assert set(g) == set(batch) & set(sharding_lib.DEVICE_KEYS) and "degraded" in g
  for k in g:
    v = batch[k]
    assert isinstance(g[k], jax.Array) and g[k].shape == v.shape
    assert len(g[k].addressable_shards) == len(jax.devices())
    np.testing.assert_array_equal(np.asarray(g[k]), v)


def test_eval_batches_are_deterministic_padded_and_keep_names():
  src = FakeSource(10)
  ds = pipeline.eval_dataset(src, FakePlans(), batch_size=4, process_index=0, process_count=1)
  batches = list(ds)
  assert len(batches) == 3
  assert all(b["degraded"].shape == (4, 24, 32, 3) for b in batches)
  valid = np.concatenate([b["valid"] for b in batches])
  ids = np.concatenate([b["id"] for b in batches])[valid]
  assert valid.sum() == 10 and list(ids) == [f"fake/{i}" for i in range(10)]
  tasks = np.concatenate([b["task"] for b in batches])[valid]
  assert list(tasks) == [src[i]["task"] for i in range(10)]
  _assert_batches_equal(batches, list(ds))
  np.testing.assert_allclose(batches[0]["degraded"], -batches[0]["clean"], atol=1e-6)
  # Two hosts: the same number of batches each, disjoint valid ids covering the split.
  per_host = [list(pipeline.eval_dataset(src, None, batch_size=2, process_index=h,
                                         process_count=2)) for h in range(2)]
  assert len(per_host[0]) == len(per_host[1]) == 3
  got = [i for host in per_host for b in host for i, v in zip(b["id"], b["valid"]) if v]
  assert sorted(got) == sorted(f"fake/{i}" for i in range(10))


def test_eval_varying_sizes_and_sr():
  mixed = FakeSource(4, sizes=[(16, 16), (20, 24)])
  with pytest.raises(FapeError, match="different sizes"):
    list(pipeline.eval_dataset(mixed, None, batch_size=2, process_index=0, process_count=1))
  shapes = [b["clean"].shape for b in pipeline.eval_dataset(mixed, None, batch_size=1,
                                                             process_index=0, process_count=1)]
  assert shapes == [(1, 16, 16, 3), (1, 20, 24, 3)] * 2
  sr = FakeSource(2, h=32, w=32, scale=4)
  b = next(iter(pipeline.eval_dataset(sr, None, batch_size=1, process_index=0,
                                      process_count=1)))
  assert b["degraded"].shape == b["clean"].shape == (1, 32, 32, 3)


def test_pipeline_over_a_built_store(tmp_path):
  root = tmp_path / "raw"
  for i in range(6):
    img = np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    for rel, arr in ((f"input/{i}.png", 255 - img), (f"target/{i}.png", img)):
      os.makedirs(os.path.dirname(root / rel), exist_ok=True)
      Image.fromarray(arr).save(root / rel)
  pairs.prepare_folder(tmp_path / "data", "rain100l", root)
  src = pairs.open_pairs(tmp_path / "data", "rain100l", "test")
  b = next(pipeline.train_iterator(src, None, crop=16, batch_size=4, process_index=0,
                                   process_count=1))
  np.testing.assert_allclose(b["degraded"], -b["clean"], atol=1e-6)
  assert set(b["task_id"]) == {tasks_lib.TASK_ID["deraining"]}
  e = next(iter(pipeline.eval_dataset(src, None, batch_size=2, process_index=0,
                                      process_count=1)))
  assert all(i.startswith("rain100l/test/input/") for i in e["id"])


def test_task_batches_hold_one_task_cover_every_task_and_resume():
  n_tasks, global_batch = len(TASKS), 4
  src = FakeSource(n_tasks * 5)                      # 5 pairs per task (tasks cycle over ids)
  kw = dict(crop=8, batch_size=global_batch, seed=3, task_batches=True)
  n_batches = 3 * n_tasks
  single = _take(pipeline.train_iterator(src, None, process_index=0, process_count=1, **kw),
                 n_batches)
  task_of = [TASKS[int(r) % n_tasks] for b in single for r in b["record"]]
  per_batch = [set(task_of[i * global_batch:(i + 1) * global_batch]) for i in range(n_batches)]
  assert all(len(s) == 1 for s in per_batch)          # one task per global batch
  for c in range(3):                                  # each cycle of T batches visits all tasks
    assert {next(iter(s)) for s in per_batch[c * n_tasks:(c + 1) * n_tasks]} == set(TASKS)
  # A task's first pass covers its pairs once before any repeats (4 + 1 of its 5 pairs here).
  first = [int(r) for b in single for r in b["record"] if int(r) % n_tasks == 0][:5]
  assert sorted(first) == [i for i in range(len(src)) if i % n_tasks == 0]
  # Two hosts split each one-task global batch; together they are the single-host stream.
  hosts = [_take(pipeline.train_iterator(src, None, process_index=h, process_count=2, **kw),
                 n_batches) for h in range(2)]
  for b, h0, h1 in zip(single, *hosts):
    assert sorted(np.concatenate([h0["record"], h1["record"]])) == sorted(b["record"])
  # Resume mid-stream gives the same batches as the uninterrupted run.
  it = pipeline.train_iterator(src, None, process_index=0, process_count=1, **kw)
  _take(it, 5)
  fresh = pipeline.train_iterator(src, None, process_index=0, process_count=1, **kw)
  fresh.set_state(it.get_state())
  _assert_batches_equal(_take(fresh, 4), single[5:9])


def test_task_slots_weigh_a_cycle_and_still_resume():
  n_tasks, global_batch = len(TASKS), 2
  src = FakeSource(n_tasks * 5)
  # deblur twice per cycle, denoise left out, the others once: cycles of n_tasks batches.
  slots = {"deblur": 2, "denoise": 0}
  kw = dict(crop=8, batch_size=global_batch, seed=3, task_batches=True, task_slots=slots)
  single = _take(pipeline.train_iterator(src, None, process_index=0, process_count=1, **kw),
                 3 * n_tasks)
  per_batch = [{TASKS[int(r) % n_tasks] for r in b["record"]} for b in single]
  assert all(len(s) == 1 for s in per_batch)
  for c in range(3):
    cycle = [next(iter(s)) for s in per_batch[c * n_tasks:(c + 1) * n_tasks]]
    assert {t: cycle.count(t) for t in set(cycle)} == {
        t: slots.get(t, 1) for t in TASKS if slots.get(t, 1)}
  # deblur's first 5 draws are its 5 pairs, once each, though it comes twice per cycle.
  blur = [int(r) for b in single for r in b["record"] if TASKS[int(r) % n_tasks] == "deblur"][:5]
  assert sorted(blur) == [i for i in range(len(src)) if TASKS[i % n_tasks] == "deblur"]
  it = pipeline.train_iterator(src, None, process_index=0, process_count=1, **kw)
  _take(it, 5)
  fresh = pipeline.train_iterator(src, None, process_index=0, process_count=1, **kw)
  fresh.set_state(it.get_state())
  _assert_batches_equal(_take(fresh, 4), single[5:9])
  # Slots of 1 are the default order exactly.
  ones = dict(kw, task_slots={t: 1 for t in tasks_lib.TASKS})
  plain = dict(kw, task_slots=None)
  _assert_batches_equal(
      _take(pipeline.train_iterator(src, None, process_index=0, process_count=1, **ones), 9),
      _take(pipeline.train_iterator(src, None, process_index=0, process_count=1, **plain), 9))
  for bad, message in (({"debluring": 2}, r"names \['debluring'\], which are not tasks"),
                       ({"deblur": -1}, "whole numbers >= 0"),
                       ({t: 0 for t in TASKS}, "at least one > 0")):
    with pytest.raises(FapeError, match=message):
      pipeline.train_dataset(src, None, **dict(kw, task_slots=bad))


def test_batching_config_is_checked():
  from configs import base
  from fape_jax import train_data
  c = base.get_config("tiny")
  c.data.crop = 16
  c.data.batching = "by_task"
  with pytest.raises(FapeError, match="data.batching='by_task': use 'mixed' or 'task'"):
    train_data.TrainData(c, FakeSource(7), None, None).train_iterator()
  c.data.batching, c.optim.per_task_state = "mixed", True
  with pytest.raises(FapeError, match="needs one-task batches: add --config.data.batching=task"):
    train_data.TrainData(c, FakeSource(7), None, None).train_iterator()
  c.data.batching, c.optim.per_task_state = "mixed", False
  c.data.task_slots.deblur = 2
  with pytest.raises(FapeError, match="weighs tasks within one-task batches"):
    train_data.TrainData(c, FakeSource(7), None, None).train_iterator()
  c.data.batching = "task"
  b = next(train_data.TrainData(c, FakeSource(7), None, None).train_iterator())
  assert len(set(b["task_id"].tolist())) == 1
