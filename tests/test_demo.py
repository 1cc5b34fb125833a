"""The demo page (fape_jax/demo.py): its HTTP API through urllib, the page in headless chromium.

Served in-process on a free port from one run written like test_restore's (the tiny config with
the UNet's last conv zeroed, so the executor is the identity and a restored upload equals the
upload; no training step is compiled). The browser test drives Debian's `chromium` through the
system `chromedriver` (`make browser` installs both); Selenium Manager is never asked to download
one. `fape-demo` itself (start-up, the printed URL, Ctrl-C/SIGTERM) is the one `slow` test.
"""
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest
from PIL import Image

from fape_jax import demo as demo_lib
from fape_jax import restore_lib
from test_restore import as8, photo, write_identity_run  # pylint: disable=wrong-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
MAX_BYTES = 100_000
H, W = 40, 56  # more than one 32-px tile: the tiled path


def png_bytes(a):
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format="PNG")
  return buf.getvalue()


GOOD = as8(photo(H, W))
BAD_UPLOADS = {  # name: (bytes, HTTP status, what the message must say)
    "notes.png": (b"shopping list: milk, eggs\n" * 4, 400, "not an image"),
    "cut.png": (png_bytes(GOOD)[:300], 400, "truncated"),
    "anim.gif": (b"GIF89a" + b"\0" * 64, 400, ".gif is not an image format fape_jax reads"),
    "empty.png": (b"", 400, "empty.png is empty"),
    "huge.png": (png_bytes(np.random.default_rng(0).integers(0, 256, (200, 200, 3), np.uint8)),
                 413, "uploads up to 0.1 MB"),
    "wide.png": (png_bytes(np.zeros((2, 3000, 3), np.uint8)), 400, "megapixels"),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("demo_run")
  write_identity_run(workdir, tmp_path_factory.getbasetemp() / "tiny_data")
  return str(workdir)


@pytest.fixture(scope="module")
def server(run):
  # Two devices and two tiles per call, as test_restore: the compilation cache serves both.
  restorer = restore_lib.load_restorer(run, devices=jax.devices()[:2], batch=2)
  demo = demo_lib.Demo(restorer, max_bytes=MAX_BYTES, max_pixels=5000)
  srv = demo_lib.DemoServer(demo, "127.0.0.1", 0)
  thread = threading.Thread(target=srv.serve_forever, daemon=True)
  thread.start()
  yield srv
  srv.shutdown()
  srv.server_close()
  demo.close()
  assert not os.path.exists(demo.folder)


def request(url, data=None):
  """(status, body bytes, content type) of a GET, or a POST of `data`."""
  try:
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=120) as r:
      return r.status, r.read(), r.headers["Content-Type"]
  except urllib.error.HTTPError as e:
    return e.code, e.read(), e.headers["Content-Type"]


def post(url, name, data):
  status, body, ctype = request(f"{url}api/restore?name={urllib.parse.quote(name)}", data)
  assert ctype == "application/json"
  return status, json.loads(body)


def test_serves_the_page_and_the_run(server, run):
  status, page, ctype = request(server.url)
  assert status == 200 and ctype.startswith("text/html") and b'src="demo.js"' in page
  status, js, ctype = request(server.url + "demo.js")
  assert status == 200 and ctype.startswith("text/javascript") and b"api/restore" in js
  status, info, _ = request(server.url + "api/info")
  info = json.loads(info)
  assert info["workdir"] == os.path.abspath(run) and info["checkpoint_step"] == 0
  assert ".png" in info["suffixes"] and info["max_bytes"] == MAX_BYTES
  assert request(server.url + "nothing")[0] == 404
  assert request(server.url + "result/0123/input.png")[0] == 404


def test_restores_an_upload(server):
  status, body = post(server.url, "my photo.png", png_bytes(GOOD))
  assert status == 200, body
  assert body["text"].startswith("Task: ") and body["plan"]["task"] in body["text"]
  assert body["meta"]["size"] == [W, H] and body["meta"]["tiles"] > 1
  assert body["meta"]["input"] == "my photo.png" and body["download_name"] == "my_photo_restored.png"
  # One [w_low, w_high] per adapted layer, the same in `routing` (the sidecar's) and `layers`.
  assert len(body["layers"]) > 4
  assert [l["name"] for l in body["layers"]] == list(body["routing"])
  for l in body["layers"]:
    assert abs(l["low"] + l["high"] - 1) < 1e-4
  assert any(l["context"] for l in body["layers"]) and not all(l["context"] for l in body["layers"])
  for url in (body["input_url"], body["output_url"]):
    status, png, ctype = request(server.url + url)
    assert status == 200 and ctype == "image/png"
    # The identity executor: the restored image is the upload (8-bit round trip).
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png))), GOOD)


@pytest.mark.parametrize("name", sorted(BAD_UPLOADS))
def test_a_bad_upload_gets_a_clear_message_and_the_server_keeps_serving(server, name):
  data, want_status, want = BAD_UPLOADS[name]
  status, body = post(server.url, name, data)
  assert status == want_status and list(body) == ["error"]
  assert want in body["error"] and name in body["error"]
  assert server.demo.folder not in body["error"]  # names the upload, not the temporary file
  assert post(server.url, "again.png", png_bytes(GOOD))[0] == 200


# ----------------------------------------------------------------------------------------------
# The page in a real browser
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
  if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    if shutil.which("apt-get") is None:
      pytest.skip(f"{CHROMIUM} and {CHROMEDRIVER} are missing and there is no apt-get to install "
                  "them (Debian packages chromium, chromium-driver)")
    pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing: run `make browser` (apt-get install "
                "chromium chromium-driver), which `make test` runs first")
  os.environ["SE_OFFLINE"] = "true"  # never let Selenium Manager fetch a driver or a browser
  from selenium import webdriver  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  downloads = tmp_path_factory.mktemp("downloads")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1100,900"):
    options.add_argument(arg)
  options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                            "download.prompt_for_download": False})
  driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
  driver.downloads = downloads
  yield driver
  driver.quit()


def wait_for_state(driver, *states, timeout=120):
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=import-outside-toplevel
  WebDriverWait(driver, timeout).until(
      lambda d: d.find_element("tag name", "body").get_attribute("data-state") in states)
  return driver.find_element("tag name", "body").get_attribute("data-state")


def screenshot(driver, path):
  """The whole page: the window resized to the page's height, scrolled to the top."""
  driver.set_window_size(1100, 900)
  height = driver.execute_script("return document.documentElement.scrollHeight")
  driver.set_window_size(1100, height + 140)  # + the window's own frame in headless chromium
  driver.execute_script("window.scrollTo(0, 0)")
  driver.save_screenshot(str(path))
  print(f"screenshot: {path}")


def test_the_page_in_a_browser(server, browser, tmp_path):
  good, bad = tmp_path / "street.png", tmp_path / "notes.png"
  good.write_bytes(png_bytes(GOOD))
  bad.write_bytes(BAD_UPLOADS["notes.png"][0])
  by_id = lambda i: browser.find_element("id", i)  # noqa: E731
  browser.get(server.url)
  assert wait_for_state(browser, "idle", "error") == "idle", by_id("error").text
  assert "checkpoint step 0" in by_id("run").text

  by_id("file").send_keys(str(good))
  assert wait_for_state(browser, "done", "error") == "done", by_id("error").text
  assert by_id("result").is_displayed() and not by_id("error").is_displayed()
  _, body = post(server.url, "street.png", png_bytes(GOOD))  # what the page was given
  assert by_id("plan").text == body["text"]
  fields = [e.text for e in browser.find_elements("css selector", "#plan-fields dt, #plan-fields dd")]
  assert fields[:2] == ["Task", body["plan"]["task"]] and len(fields) == 8
  rows = browser.find_elements("css selector", "#routing tbody tr")
  assert len(rows) == len(body["layers"])
  low, high = rows[0].find_elements("css selector", ".bar > div")
  assert low.size["width"] > 0 and high.size["width"] > 0
  for img in ("before", "after"):
    assert browser.execute_script(f"return document.getElementById('{img}').naturalWidth") == W
    assert by_id(img).is_displayed() and by_id(img).size["width"] > W  # small: shown enlarged
  by_id("split").send_keys("\ue012" * 20)  # arrow left: the slider moves the split
  assert "30%" in by_id("compare").get_attribute("style")

  link = by_id("download")
  assert link.get_attribute("download") == "street_restored.png"
  status, served, _ = request(link.get_attribute("href"))
  assert status == 200
  link.click()
  saved = browser.downloads / "street_restored.png"
  deadline = time.monotonic() + 30
  while not saved.exists() and time.monotonic() < deadline:
    time.sleep(0.2)
  assert saved.exists() and saved.read_bytes() == served
  screenshot(browser, tmp_path / "demo.png")
  shutil.copy(tmp_path / "demo.png", "/tmp/demo_screenshot.png")

  by_id("file").send_keys(str(bad))
  assert wait_for_state(browser, "done", "error") == "error"
  message = by_id("error").text
  assert message.startswith("Cannot read image notes.png") and "not an image" in message
  assert not by_id("result").is_displayed()
  screenshot(browser, tmp_path / "demo_error.png")

  # A file dropped on the drop zone goes the same way (a synthetic drop: WebDriver cannot drag
  # files from the desktop).
  browser.execute_script("""
      const files = new DataTransfer();
      files.items.add(new File([arguments[0]], arguments[1], {type: "text/plain"}));
      document.getElementById("drop").dispatchEvent(
          new DragEvent("drop", {dataTransfer: files, bubbles: true, cancelable: true}));
      """, "not a picture", "dropped.txt")
  assert wait_for_state(browser, "done", "error") == "error"
  assert by_id("error").text.startswith("dropped.txt: .txt is not an image format")

  by_id("file").send_keys(str(good))  # the page and the server both carry on
  assert wait_for_state(browser, "done", "error") == "done"
  assert not by_id("error").is_displayed()


# ----------------------------------------------------------------------------------------------
# fape-demo
# ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_cli_prints_the_url_serves_and_stops_on_sigterm(run):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.Popen(
      [sys.executable, "-m", "fape_jax.demo", f"--workdir={run}", "--port=0", "--batch=1"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  lines = queue.Queue()
  reader = threading.Thread(target=lambda: [lines.put(l) for l in proc.stdout], daemon=True)
  reader.start()
  out, url = [], None
  try:
    deadline = time.monotonic() + 240
    while url is None and time.monotonic() < deadline and proc.poll() is None:
      try:
        out.append(lines.get(timeout=1))
      except queue.Empty:
        continue
      if " at http://127.0.0.1:" in out[-1]:
        url = out[-1].split(" at ")[1].split()[0]
    assert url, "".join(out)
    status, body = post(url, "x.png", png_bytes(GOOD))
    assert status == 200 and body["meta"]["tiles"] > 1
  finally:
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
  reader.join(timeout=10)
  while not lines.empty():
    out.append(lines.get())
  assert rc == 0 and "Stopped.\n" in out, "".join(out)
