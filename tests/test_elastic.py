"""Elastic resume: a checkpoint written by N processes restores on M, arrays and data position.

The data stream depends on the global example position only, so a run on M processes continues
it from the position saved with the checkpoint (Grain's per-process state is for N = M). Here with
fake hosts (process_index/process_count of the pipeline) and a checkpoint whose position says it
was written by 2 processes; tests/test_cluster_rehearsal.py resumes a real 2-process run on 1.
"""
import json

import jax
import numpy as np
import pytest

from fape_jax import checkpoint as ckpt_lib
from fape_jax import train_data
from fape_jax.data import pipeline
from test_pipeline import FakeSource, _assert_batches_equal, _take

KW = dict(crop=8, seed=4, read_threads=1, prefetch=0)


def _stream(src, start=0, batch_size=4, process_index=0, process_count=1):
  it = pipeline.train_iterator(src, None, batch_size=batch_size, start=start,
                               process_index=process_index, process_count=process_count, **KW)
  return train_data.TrainStream(it, start, batch_size)


def _merge(host_batches):
  """One global batch from the hosts' local batches, ordered by stream position."""
  merged = {k: np.concatenate([b[k] for b in host_batches]) for k in host_batches[0]}
  order = np.argsort(merged["index"])
  return {k: v[order] for k, v in merged.items()}


def test_two_hosts_then_one_continue_the_single_host_stream():
  """3 global batches of 4 on 2 hosts, then 1 host from position 12 with a batch of 6 (per-shard
  batches on fewer devices): exactly the positions, pairs, crops and flips of one host throughout."""
  src = FakeSource(10)  # crosses the epoch boundary (reshuffled) on the way
  hosts = [_stream(src, process_index=h, process_count=2) for h in range(2)]
  first = [_merge([next(h) for h in hosts]) for _ in range(3)]
  assert hosts[0].examples == hosts[1].examples == 12
  later = _take(_stream(src, start=hosts[0].examples, batch_size=6), 3)
  whole = pipeline.train_iterator(src, None, batch_size=2, process_index=0, process_count=1, **KW)
  reference = _merge(_take(whole, 15))  # positions 0..29 in batches of 2
  got = _merge(first + later)
  assert list(got["index"]) == list(range(30))
  for k in got:
    np.testing.assert_array_equal(got[k], reference[k], err_msg=k)


def _state():
  return {"w": jax.numpy.arange(8.0), "step": jax.numpy.asarray(3)}


def test_a_checkpoint_from_two_processes_restores_arrays_and_position_on_one(tmp_path):
  src = FakeSource(10)
  stream = _stream(src)
  _take(stream, 3)
  ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt", save_every=1, keep=2)
  ckpt.save(3, _state(), stream, force=True)
  assert ckpt.position(3) == {"examples": 12, "start": 0, "batch_size": 4, "process_count": 1}
  expected = _take(stream, 2)
  # Same process count: Grain's own state, exact.
  step, state, same = ckpt.restore_stream(jax.eval_shape(_state), lambda s: _stream(src, s))
  assert step == 3 and same.start == 0 and same.examples == 12
  np.testing.assert_array_equal(state["w"], np.arange(8.0))
  _assert_batches_equal(_take(same, 2), expected)
  # Written by 2 processes (Grain's files process_{0,1}-of-2.json do not fit 1): the position.
  position = tmp_path / "ckpt" / "3" / ckpt_lib.POSITION / "metadata"
  saved = json.loads(position.read_text())
  position.write_text(json.dumps(dict(saved, process_count=2)))
  step, state, rebuilt = ckpt.restore_stream(jax.eval_shape(_state), lambda s: _stream(src, s))
  assert step == 3 and rebuilt.start == rebuilt.examples == 12
  np.testing.assert_array_equal(state["w"], np.arange(8.0))
  _assert_batches_equal(_take(rebuilt, 2), expected)
  assert rebuilt.position() == {"examples": 20, "start": 12, "batch_size": 4, "process_count": 1}
  # Its next checkpoint restores exactly again, from the rebuilt stream's start.
  ckpt.save(5, _state(), rebuilt, force=True)
  after = _take(rebuilt, 1)
  step, _, again = ckpt.restore_stream(jax.eval_shape(_state), lambda s: _stream(src, s))
  assert step == 5 and again.start == 12 and again.examples == 20
  _assert_batches_equal(_take(again, 1), after)
  ckpt.close()


def test_an_empty_directory_restores_nothing(tmp_path):
  ckpt = ckpt_lib.Checkpointer(tmp_path / "ckpt", save_every=1, keep=2)
  assert ckpt.restore_stream(jax.eval_shape(_state), pytest.fail) == (None, None, None)
  ckpt.close()
