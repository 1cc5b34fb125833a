"""A gs:// workdir against a local GCS emulator (gcp-storage-emulator from PyPI on 127.0.0.1),
through the same client code as a real bucket (etils.epath -> gcsfs; tensorboardX -> the GCS
client), both pointed at it by STORAGE_EMULATOR_HOST. Skipped without the `cloud` extra and the
emulator (`pip install -e ".[cloud]" gcp-storage-emulator`).

What is covered: the metrics log and resumes.jsonl (object stores cannot append: gcsfs silently
overwrites, which lost all but the last line), config.json and the resume check, the shared-dir
sentinel, the run lock's object-store path. Not covered here: Orbax checkpoints on gs:// (written
by TensorStore's own GCS driver, which this emulator set-up does not reach).
"""
import json
import socket

import pytest

gcsfs = pytest.importorskip("gcsfs")
emulator = pytest.importorskip("gcp_storage_emulator.server")
pytest.importorskip("google.cloud.storage")

from etils import epath  # noqa: E402

from configs import base  # noqa: E402
from fape_jax import preflight  # noqa: E402
from fape_jax import run_dir  # noqa: E402
from fape_jax import run_log  # noqa: E402

BUCKET = "fape-test"


@pytest.fixture(scope="module")
def bucket():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  mp = pytest.MonkeyPatch()
  mp.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
  # gcsfs would first ask the (absent) storage-control API for the bucket's layout, 60 s per try.
  mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  mp.setenv("GOOGLE_CLOUD_PROJECT", "test")
  mp.setenv("NO_GCE_CHECK", "true")  # no metadata-server probe for credentials
  gcsfs.GCSFileSystem.clear_instance_cache()
  yield f"gs://{BUCKET}"
  # tensorboardX's gs:// writer uploads its whole buffer again when collected (its __del__, after
  # close() did): at interpreter exit the emulator is gone, and the client would retry for 2
  # minutes. Closed writers have nothing new to say.
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top
  record_writer.GCSRecordWriter.__del__ = lambda self: None
  mp.undo()
  server.stop()


def test_the_metrics_log_keeps_every_line_on_an_object_store(bucket):
  workdir = epath.Path(f"{bucket}/run-metrics")
  log = run_log.RunLog(workdir)
  for step in (1, 2, 3):
    log.scalars(step, {"loss": 1.0 / step})
  log.close()
  assert [r["step"] for r in run_log.read_jsonl(workdir / "metrics.jsonl")] == [1, 2, 3]
  resumed = run_log.RunLog(workdir)  # a resumed run keeps the earlier lines
  resumed.scalars(4, {"loss": 0.25})
  resumed.close()
  rows = run_log.read_jsonl(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[-1]["loss"] == 0.25
  assert list((workdir / "tb").iterdir())  # TensorBoard events in the bucket too


def test_config_record_and_resume_check_on_an_object_store(bucket):
  workdir = epath.Path(f"{bucket}/run-config")
  c = base.get_config("tiny")
  with run_dir.RunLock(workdir):  # no flock on a bucket: a warning, not an error
    assert run_dir.check_resume(workdir, c) == {}
    run_dir.record_config(workdir, c, {}, step=0)
    for step, total in ((6, 12), (12, 18)):
      new = base.get_config("tiny")
      new.total_steps = total
      changes = run_dir.check_resume(workdir, new)
      run_dir.record_config(workdir, new, changes, step=step)
  assert json.loads((workdir / run_dir.CONFIG_FILE).read_text())["total_steps"] == 18
  resumes = run_log.read_jsonl(workdir / run_dir.RESUMES_FILE)
  assert [r["step"] for r in resumes] == [6, 12]  # two lines: nothing overwritten


def test_the_shared_dir_sentinel_and_url_check_on_an_object_store(bucket):
  workdir = epath.Path(f"{bucket}/run-sentinel")
  preflight.check_url(workdir, "--workdir")
  assert preflight.read_sentinel(workdir).startswith("no .fape_shared_check")
  (workdir / preflight.SENTINEL).write_text(preflight.sentinel_text("token"))
  assert preflight.read_sentinel(workdir).startswith("token written by process 0 on host ")
