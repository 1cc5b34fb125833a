"""A gs:// workdir against a local GCS emulator (gcp-storage-emulator from PyPI on 127.0.0.1),
through the same client code as a real bucket: etils.epath -> gcsfs and tensorboardX -> the GCS
client (pointed at it by STORAGE_EMULATOR_HOST), Orbax -> TensorStore's own GCS driver (pointed at
it by TENSORSTORE_GCS_HTTP_URL, with GOOGLE_AUTH_TOKEN_FOR_TESTING as its credentials). Skipped
without the `cloud` extra and the emulator (both in the `dev` extra, so `make test` runs them).

What is covered: the metrics log and resumes.jsonl (object stores cannot append: gcsfs silently
overwrites, which lost all but the last line), config.json and the resume check, the shared-dir
sentinel, the run lock's object-store path, and Orbax checkpoints (the project's Checkpointer:
sharded arrays through TensorStore's OCDBT format) written and restored on gs://.
tests/test_cluster_rehearsal.py runs a whole multi-process job on this emulator.

The emulator's gaps: its media downloads carry no `x-goog-generation` header, which every GCS
read has and TensorStore needs (OCDBT re-reads its manifest and rewrites it conditionally on that
generation; without it the write fails with "Malformed StorageGeneration"). `start_emulator` adds
that header. It does not enforce preconditions (ifGenerationMatch) or list offsets
(startOffset/endOffset, which TensorStore's DeleteRange uses): writes are unconditional, so two
writers racing on one object would not be caught here, and nothing here may rely on DeleteRange.
"""
import json
import logging
import os
import socket

import pytest

# gcsfs reads this once, on import: without it every new file system first asks the (absent)
# storage-control API for the bucket's layout (60 s a try with credentials, a warning without).
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
gcsfs = pytest.importorskip("gcsfs")
emulator = pytest.importorskip("gcp_storage_emulator.server")
pytest.importorskip("google.cloud.storage")

from etils import epath  # noqa: E402

from configs import base  # noqa: E402
from fape_jax import preflight  # noqa: E402
from fape_jax import run_dir  # noqa: E402
from fape_jax import run_log  # noqa: E402

BUCKET = "fape-test"


def _add_generation_header() -> None:
  """Media downloads answer with the object's generation, as GCS does (TensorStore reads it)."""
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  if getattr(objects.download, "fape_generation_header", False):
    return
  plain = objects.download

  def download(request, response, storage, *args, **kwargs):
    plain(request, response, storage, *args, **kwargs)
    if response.status.value in (200, 206):
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])

  download.fape_generation_header = True
  objects.download = download  # `objects.get` (?alt=media, TensorStore's reads) calls it by name


def start_emulator(bucket: str = BUCKET):
  """The emulator on a free 127.0.0.1 port, in a thread of this process, holding `bucket` in
  memory. Returns (server, env): `env` points gcsfs, the GCS client and TensorStore at it, in
  this process (set it) or in the processes it starts (pass it). `server.stop()` ends it."""
  _add_generation_header()
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # 404s are expected
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.start()
  # A client that hangs up early (TensorStore after a short read) is no error worth a traceback.
  server._api._httpd.handle_error = lambda request, address: None  # pylint: disable=protected-access
  url = f"http://127.0.0.1:{port}"
  env = {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage
      "TENSORSTORE_GCS_HTTP_URL": url,  # TensorStore's GCS driver (Orbax's arrays)
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",  # TensorStore: this token, no credential search
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # see the top of this file
      "GOOGLE_CLOUD_PROJECT": "test",
      "NO_GCE_CHECK": "true",  # no metadata-server probe for credentials
  }
  return server, env


@pytest.fixture(scope="module")
def bucket():
  server, env = start_emulator()
  mp = pytest.MonkeyPatch()
  for k, v in env.items():
    mp.setenv(k, v)
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


def test_checkpoints_save_and_restore_on_an_object_store(bucket):
  """Orbax through TensorStore's GCS driver: two steps of a sharded state, the newest restored."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from fape_jax import checkpoint  # pylint: disable=g-import-not-at-top

  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  rows = NamedSharding(mesh, P("data"))
  # A sharded matrix and many small replicated leaves, like a train state: with that many,
  # TensorStore commits OCDBT's manifest more than once, each time conditionally on the
  # generation it read back (the emulator's gap, see the docstring).
  def state(step):
    return {"w": jax.device_put(np.arange(256 * 64, dtype=np.float32).reshape(256, 64) * step,
                                rows),
            "small": {f"b{i}": jax.device_put(np.full(16, i + step, np.float32),
                                             NamedSharding(mesh, P())) for i in range(200)},
            "step": jax.device_put(np.int32(step), NamedSharding(mesh, P()))}
  ckpt = checkpoint.Checkpointer(f"{bucket}/run-ckpt/checkpoints", save_every=1, keep=2)
  for step in (1, 2):
    ckpt.save(step, state(step), force=True)
  assert ckpt.all_steps() == [1, 2]
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                        state(0))
  step, got = ckpt.restore(target)
  ckpt.close()
  assert step == 2
  want = state(2)
  assert got["w"].sharding == rows
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert epath.Path(f"{bucket}/run-ckpt/checkpoints/2/commit_success.txt").exists()


def test_validation_sample_grid_on_an_object_store(bucket):
  """The sample grid PNG goes through epath (PIL's own save opens local paths only)."""
  import io  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from fape_jax import validation  # pylint: disable=g-import-not-at-top

  workdir = epath.Path(f"{bucket}/run-samples")
  shot = lambda v: np.full((8, 6, 3), v, np.uint8)
  samples = {"denoise": [(shot(10), shot(20), shot(30), "img-1")],
             "deblur": [(shot(40), shot(50), shot(60), "img-2")]}
  log = run_log.RunLog(workdir)
  path = workdir / "samples" / "step_0000003.png"
  validation._write_sample_grid(path, samples, log, 3)  # pylint: disable=protected-access
  log.close()
  grid = np.asarray(Image.open(io.BytesIO(path.read_bytes())))
  assert grid.shape == (16, 18, 3) and grid[0, 0, 0] == 10 and grid[8, 12, 0] == 60
  rows = json.loads(path.with_suffix(".json").read_text())["rows"]
  assert [r["id"] for r in rows] == ["img-1", "img-2"]


def test_training_report_of_a_run_on_an_object_store(bucket):
  """`fape_jax.report` reads a gs:// run (metrics, sample grid) and writes report.html there."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fape_jax import validation  # pylint: disable=g-import-not-at-top

  workdir = epath.Path(f"{bucket}/run-report")
  log = run_log.RunLog(workdir)
  for step in (1, 2):
    log.scalars(step, {"loss": 1.0 / step, "mse": 0.1, "images_per_s": 8.0})
  shot = lambda v: np.full((8, 6, 3), v, np.uint8)
  samples = {"denoise": [(shot(10), shot(15), shot(19), "img-1")]}
  validation._write_sample_grid(  # pylint: disable=protected-access
      workdir / "samples" / "step_0000002.png", samples, log, 2)
  log.close()
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  report = lambda run: subprocess.run(
      [sys.executable, "-m", "fape_jax.report", f"--workdir={run}"], cwd=repo,
      capture_output=True, text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  proc = report(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  html = (workdir / "report.html").read_text()
  assert "Validation samples (step_0000002)" in html and str(workdir) in html
  # Not a run at all: one clear error, nothing written.
  empty = epath.Path(f"{bucket}/not-a-run")
  proc = report(empty)
  assert proc.returncode == 2 and "not a training run" in proc.stderr
  assert not (empty / "report.html").exists()
