r"""A local demo page: drop an image, see its plan, the routing per layer and a before/after.

  fape-demo --workdir=runs/base                          # http://127.0.0.1:8000/
  python -m fape_jax.demo --workdir=runs/base --port=0   # any free port; the URL is printed

The run is loaded once, through the library `fape-restore` runs: `restore_lib.load_restorer`, then
for each upload `images.read_image` (the same decoding and checks as a file given to
`fape-restore`) and `restore_lib.restore_image` (the run's planner and plan encoder, tiles for
large images). The page (`fape_jax/static/demo.html` + `demo.js`, package data) takes a dropped or
chosen file and shows the plan, each adapted layer's weights on the low- and high-frequency
expert, the image before and after (a slider over the two), and a link to the restored PNG.

  GET  /, /demo.js            the page
  GET  /api/info              the run (workdir, checkpoint step, planner) and the upload limits
  POST /api/restore?name=F    body: the file's bytes (F: its name, whose suffix says the format).
                              200 {"name", "plan", "text", "routing", "layers", "hints", "meta",
                              "input_url", "output_url", "download_name"}; 400 {"error"} for a
                              file that is not an image, is truncated or corrupt, has a format
                              fape_jax does not read or too many pixels; 413 {"error"} over
                              --max_upload_mb. The server keeps serving after any of them.
  GET  /result/ID/FILE        the input as PNG (input.png) and the restored PNG of an upload

The HTTP server is the standard library's ThreadingHTTPServer; restores run one at a time (one
executor, one planner). Results are kept in a temporary folder (the newest `KEEP_RESULTS`), which
is removed on exit. It listens on 127.0.0.1 unless --host says otherwise: there is no
authentication.
"""

from __future__ import annotations

import collections
import http
import http.server
import importlib.resources
import json
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import urllib.parse
import uuid

from absl import app
from absl import flags

from fape_jax import backend
from fape_jax import distributed
from fape_jax import errors
from fape_jax.errors import FapeError

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (config.json, "
                               "checkpoints/).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (the page has no "
                            "authentication: keep it local unless you mean to share it).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on; 0 = any free port (the URL is "
                             "printed).")
_CHECKPOINT = flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: the newest).")
_BATCH = flags.DEFINE_integer("batch", 8, "Tiles per executor call (rounded up to a multiple of "
                              "the device count).")
_MAX_UPLOAD_MB = flags.DEFINE_float("max_upload_mb", 20.0, "Largest upload accepted, in MB.")
_MAX_MEGAPIXELS = flags.DEFINE_float("max_megapixels", 4.0, "Largest image restored, in "
                                     "megapixels (fape-restore takes any size).")
_EXPECT_BACKEND = flags.DEFINE_enum("expect_backend", "any", backend.CHOICES, backend.FLAG_HELP)
_COMPILE_CACHE = flags.DEFINE_string("compilation_cache", distributed.COMPILATION_CACHE,
                                     distributed.COMPILATION_CACHE_HELP)

STATIC = {"/": ("demo.html", "text/html; charset=utf-8"),
          "/demo.js": ("demo.js", "text/javascript; charset=utf-8")}
KEEP_RESULTS = 32
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


class UploadTooLarge(FapeError):
  """An upload over the size limit (HTTP 413)."""


def static_file(name: str) -> bytes:
  """A file of the page, from the package's `static/` folder (pyproject.toml's package data)."""
  path = importlib.resources.files("fape_jax").joinpath("static", name)
  if not path.is_file():
    raise FapeError(f"fape_jax/static/{name} is missing from the installed package; reinstall "
                    "it (pip install -e .) so its package data is installed.")
  return path.read_bytes()


class Demo:
  """A loaded run and its recent results; `restore_upload` is the page's one action.

  Builds on a `restore_lib.Restorer`; `max_bytes` and `max_pixels` bound what an upload may be.
  """

  def __init__(self, restorer, *, max_bytes: int, max_pixels: int):
    from fape_jax.models import lora_moe  # pylint: disable=g-import-not-at-top
    self.restorer = restorer
    self.max_bytes, self.max_pixels = int(max_bytes), int(max_pixels)
    lora = restorer.config.model.lora
    patterns = lora.get("context_patterns", lora_moe.default_lora_config().context_patterns)
    self._is_context = lambda name: lora_moe.is_context_layer(name, patterns)
    self.folder = tempfile.mkdtemp(prefix="fape-demo-")
    self._results: collections.OrderedDict[str, str] = collections.OrderedDict()
    self._lock = threading.Lock()  # one restore at a time: one executor, one planner

  def info(self) -> dict:
    from fape_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
    r = self.restorer
    return {"workdir": os.path.abspath(r.workdir), "checkpoint_step": r.step,
            "planner": r.planner_kind if r.plans_enabled else "none (the run uses no plans)",
            "suffixes": list(images_lib.IMAGE_SUFFIXES), "max_bytes": self.max_bytes,
            "max_megapixels": round(self.max_pixels / 1e6, 2), "tile": r.tile}

  def warm_up(self) -> None:
    """Loads the planner and encoder and compiles the executor for tiled images, so that a
    missing planner model fails at start-up and the first upload does not wait for XLA."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from fape_jax import restore_lib  # pylint: disable=g-import-not-at-top
    from fape_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
    side = self.restorer.tile + self.restorer.multiple  # one past the tile: the tiled path
    y, x = np.mgrid[0:side, 0:side] / side
    rgb = np.stack([x, y, 0.5 + 0.4 * np.sin(8 * x * y)], -1).astype(np.float32)
    image = images_lib.ImageFile(rgb=rgb, alpha=None, gray=False, bits=8)
    restore_lib.restore_image(self.restorer, image)

  def restore_upload(self, data: bytes, name: str) -> dict:
    """Decodes, checks and restores one uploaded file; FapeError says what is wrong with it."""
    from fape_jax import restore_lib  # pylint: disable=g-import-not-at-top
    from fape_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top
    name = os.path.basename((name or "").replace("\\", "/")) or "upload"
    suffix = os.path.splitext(name)[1].lower()
    if suffix not in images_lib.IMAGE_SUFFIXES:
      raise FapeError(f"{name}: {suffix or 'a name without a suffix'} is not an image format "
                      f"fape_jax reads; upload one of {', '.join(images_lib.IMAGE_SUFFIXES)}.")
    if len(data) > self.max_bytes:
      raise UploadTooLarge(too_large_message(name, len(data), self.max_bytes))
    if not data:
      raise FapeError(f"{name} is empty (0 bytes).")
    rid = uuid.uuid4().hex[:16]
    folder = os.path.join(self.folder, rid)
    os.makedirs(folder)
    try:
      upload = os.path.join(folder, "upload" + suffix)
      with open(upload, "wb") as f:
        f.write(data)
      image = images_lib.read_image(upload, name=name)
      os.remove(upload)
      h, w = image.rgb.shape[:2]
      if h * w > self.max_pixels:
        raise FapeError(f"{name} is {w}x{h} ({h * w / 1e6:.3g} megapixels); this demo restores "
                        f"up to {self.max_pixels / 1e6:.3g} (restart it with a larger "
                        "--max_megapixels, or use fape-restore, which takes any size).")
      start = time.monotonic()
      with self._lock:
        plan, result, meta = restore_lib.restore_image(self.restorer, image)
      meta = {"input": name, **meta, "seconds": round(time.monotonic() - start, 3)}
      out_name = _SAFE_NAME.sub("_", os.path.splitext(name)[0]).strip("._")[:80] or "image"
      out_name += "_restored.png"
      images_lib.write_image(os.path.join(folder, "input.png"), image.rgb, image)
      images_lib.write_image(os.path.join(folder, out_name), result.image, image)
    except BaseException:
      shutil.rmtree(folder, ignore_errors=True)
      raise
    self._keep(rid, folder)
    body = restore_lib.sidecar(plan, result, meta)
    body.update(
        name=name, text=plan.text,
        layers=[{"name": k, "low": lh[0], "high": lh[1], "context": self._is_context(k)}
                for k, lh in body["routing"].items()],
        input_url=f"result/{rid}/input.png", output_url=f"result/{rid}/{out_name}",
        download_name=out_name)
    distributed.say(f"{name}: {w}x{h}, {plan.task}, {result.tiles} tile(s), "
                    f"{meta['seconds']:.1f} s")
    return body

  def _keep(self, rid: str, folder: str) -> None:
    with self._lock:
      self._results[rid] = folder
      while len(self._results) > KEEP_RESULTS:
        shutil.rmtree(self._results.popitem(last=False)[1], ignore_errors=True)

  def result_file(self, rid: str, name: str) -> str | None:
    """The path of a result's file, or None (unknown or expired result, any other name)."""
    with self._lock:
      folder = self._results.get(rid)
    if folder is None or name != os.path.basename(name) or not name.endswith(".png"):
      return None
    path = os.path.join(folder, name)
    return path if os.path.isfile(path) else None

  def close(self) -> None:
    shutil.rmtree(self.folder, ignore_errors=True)


def too_large_message(name: str, size: int, limit: int) -> str:
  return (f"{name} is {size / 1e6:.3g} MB; this demo takes uploads up to {limit / 1e6:.3g} MB "
          "(restart it with a larger --max_upload_mb, or use fape-restore).")


class Handler(http.server.BaseHTTPRequestHandler):
  """The page, its API and the result files; every error is a JSON {"error": message}."""

  server: "DemoServer"

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    logging.info("%s %s", self.address_string(), format % args)  # not to stderr per request

  def _send(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Cache-Control", "no-store")
    for k, v in headers.items():
      self.send_header(k.replace("_", "-"), v)
    self.end_headers()
    if self.command != "HEAD":
      self.wfile.write(body)

  def _json(self, status: int, obj: dict) -> None:
    self._send(status, json.dumps(obj).encode(), "application/json")

  def _error(self, status: int, message: str) -> None:
    self._json(status, {"error": message})

  def do_GET(self):  # pylint: disable=invalid-name
    path = urllib.parse.urlsplit(self.path).path
    demo = self.server.demo
    if path in STATIC:
      name, content_type = STATIC[path]
      self._send(http.HTTPStatus.OK, self.server.static[name], content_type)
    elif path == "/api/info":
      self._json(http.HTTPStatus.OK, demo.info())
    elif path.startswith("/result/") and path.count("/") == 3:
      _, _, rid, name = path.split("/")
      found = demo.result_file(rid, urllib.parse.unquote(name))
      if found is None:
        self._error(http.HTTPStatus.NOT_FOUND, f"{path}: no such result (the demo keeps the "
                    f"newest {KEEP_RESULTS}, and none from before a restart).")
        return
      with open(found, "rb") as f:
        self._send(http.HTTPStatus.OK, f.read(), "image/png")
    else:
      self._error(http.HTTPStatus.NOT_FOUND, f"{path}: not found.")

  do_HEAD = do_GET  # noqa: N815

  def do_POST(self):  # pylint: disable=invalid-name
    url = urllib.parse.urlsplit(self.path)
    if url.path != "/api/restore":
      self._error(http.HTTPStatus.NOT_FOUND, f"{url.path}: not found.")
      return
    name = urllib.parse.parse_qs(url.query).get("name", [""])[0]
    demo = self.server.demo
    try:
      length = int(self.headers.get("Content-Length", ""))
      if length < 0:
        raise ValueError(length)
    except ValueError:
      self._error(http.HTTPStatus.LENGTH_REQUIRED, "Send the image file as the request body, "
                  "with a Content-Length.")
      return
    if length > demo.max_bytes:
      # Read it all the same: a browser whose upload is cut off shows a network error, not this.
      left = length
      while left > 0 and (chunk := self.rfile.read(min(1 << 20, left))):
        left -= len(chunk)
      self._error(http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                  too_large_message(name or "the upload", length, demo.max_bytes))
      return
    data = self.rfile.read(length)
    try:
      body = demo.restore_upload(data, name)
    except UploadTooLarge as e:
      self._error(http.HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(e))
    except FapeError as e:
      logging.warning("refused %s: %s", name, e)
      self._error(http.HTTPStatus.BAD_REQUEST, str(e))
    except Exception as e:  # noqa: BLE001 (the server outlives a failed restore; it is logged)
      logging.exception("restoring %s failed", name)
      self._error(http.HTTPStatus.INTERNAL_SERVER_ERROR,
                  f"Restoring {name} failed: {type(e).__name__}: {e}")
    else:
      self._json(http.HTTPStatus.OK, body)


class DemoServer(http.server.ThreadingHTTPServer):
  """The HTTP server of a `Demo`; `url` is where the page is. `demo` may be set after the port is
  bound and before serving (`main` binds first, so a port in use fails before the run loads)."""

  daemon_threads = True

  def __init__(self, demo: Demo | None, host: str = "127.0.0.1", port: int = 0):
    self.demo = demo
    self.static = {name: static_file(name) for name, _ in STATIC.values()}
    try:
      super().__init__((host, port), Handler)
    except OSError as e:
      raise FapeError(f"Cannot listen on {host}:{port} ({e.strerror}); pick another --port, or "
                      "--port=0 for any free one.") from None

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with errors.exit_on_user_error():
    if not _WORKDIR.value:
      raise FapeError("--workdir is required (the training run directory).")
    if not 0 <= _PORT.value < 65536:
      raise FapeError(f"--port={_PORT.value}: use 0 (any free port) to 65535.")
    if _MAX_UPLOAD_MB.value <= 0 or _MAX_MEGAPIXELS.value <= 0:
      raise FapeError("--max_upload_mb and --max_megapixels must be positive.")
    backend.check(_EXPECT_BACKEND.value)
    distributed.enable_compilation_cache(_COMPILE_CACHE.value)
    from fape_jax import restore_lib  # pylint: disable=g-import-not-at-top
    server = DemoServer(None, _HOST.value, _PORT.value)
    try:
      distributed.say(f"Loading {_WORKDIR.value} ...")
      restorer = restore_lib.load_restorer(_WORKDIR.value, step=_CHECKPOINT.value,
                                           batch=_BATCH.value)
      server.demo = Demo(restorer, max_bytes=int(_MAX_UPLOAD_MB.value * 1e6),
                         max_pixels=int(_MAX_MEGAPIXELS.value * 1e6))
      distributed.say(f"Loading the planner and compiling the executor (step {restorer.step}, "
                      f"{restorer.tile}-px tiles) ...")
      server.demo.warm_up()
      distributed.say(f"fape demo of {_WORKDIR.value} at {server.url} (Ctrl-C stops it)")
      signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop as on Ctrl-C: clean up
      server.serve_forever()
    except KeyboardInterrupt:
      distributed.say("Stopped.")
    finally:
      server.server_close()
      if server.demo is not None:
        server.demo.close()


def cli():
  """`fape-demo` (pyproject.toml's console script) and `python -m fape_jax.demo`."""
  errors.run(main)


if __name__ == "__main__":
  cli()
