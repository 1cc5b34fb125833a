"""The evaluate CLI's library: metrics per set and task, planner readout, baselines, HTML report.

One evaluation of one run is shared by the module: the tiny config at initialisation with the
UNet's last conv zeroed, so the executor is exactly the identity. Then every "restored" score must
equal the degraded input's score on the same image, which checks that each restored image is
scored against its own ground truth at native resolution (no training needed for that).
Y-channel PSNR/SSIM against scikit-image are tested in test_metrics.py.
"""
import base64
import contextlib
import html.parser
import io
import json
import os
import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import base
from fape_jax import baselines as baselines_lib
from fape_jax import evaluate_lib
from fape_jax import metrics as metrics_lib
from fape_jax import restore_lib
from fape_jax import report_lib
from fape_jax.data import degrade
from fape_jax.errors import FapeError
from fape_jax.models import lpips as lpips_lib
from fape_jax.tasks import TASKS
from test_restore import write_identity_run  # pylint: disable=wrong-import-order


def rain_folder(root):
  """A one-pair benchmark in the Rain100L layout (input/ + target/), 40 x 48: not square, and
  larger than the 32-px working size, so it is restored in tiles at native resolution."""
  rng = np.random.default_rng(0)
  for sub in ("input", "target"):
    os.makedirs(root / sub)
  for i in range(1):
    clean = (rng.uniform(0.2, 0.8, (40, 48, 3)) * 255).astype(np.uint8)
    rainy = np.clip(clean.astype(int) + (rng.uniform(size=(40, 48, 1)) > 0.97) * 120, 0, 255)
    Image.fromarray(clean).save(root / "target" / f"{i}.png")
    Image.fromarray(rainy.astype(np.uint8)).save(root / "input" / f"{i}.png")
  return root


class MeanAbsLPIPS(nnx.Module):
  """Stands in for LPIPS, whose VGG16 weights cannot ship with the tests: same call signature
  ([-1, 1] NHWC batches in, (B,) distances out), mean absolute difference."""

  def __init__(self):
    self.scale = nnx.Param(jnp.ones(()))

  def __call__(self, x, y):
    return jnp.mean(jnp.abs(x - y), axis=(1, 2, 3)) * self.scale[...]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  run = tmp_path_factory.mktemp("run")
  write_identity_run(run, tmp_path_factory.getbasetemp() / "tiny_data")
  return run


@pytest.fixture(scope="module")
def restorer(run):
  # Two devices, two 32-px tiles per call: whole 32-px images and tiles share one compilation.
  return restore_lib.load_restorer(run, devices=jax.devices()[:2], batch=2)


TINY_RUN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_run")
COMMAND = "python -m fape_jax.evaluate --workdir=RUN --out=OUT"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, run, restorer):
  bench = rain_folder(tmp_path_factory.mktemp("rain100l"))
  out = tmp_path_factory.mktemp("eval")
  # The training log of a real tiny run (tests/test_report.py says which), as if this run had
  # trained: the report draws the training curves from it.
  for name in ("metrics.jsonl", "validation.json"):
    shutil.copy(os.path.join(TINY_RUN, name), run / name)
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed), pytest.MonkeyPatch.context() as mp:
    mp.setattr(lpips_lib, "maybe_load_lpips", lambda vgg, lin: MeanAbsLPIPS())
    metrics = evaluate_lib.evaluate(run, out, data=[("rain100l", str(bench))], per_task=1,
                                    num_samples=1, restorer=restorer, command=COMMAND)
  return metrics, out, printed.getvalue(), bench


def test_every_set_and_task_is_scored(evaluated):
  metrics, out, _, _ = evaluated
  assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
  sets = metrics["sets"]
  assert list(sets) == ["validation", "mixes", "rain100l"]
  assert list(sets["validation"]["tasks"]) == list(TASKS)
  assert set(sets["mixes"]["tasks"]) == set(degrade.MIX_NAMES)
  assert list(sets["rain100l"]["tasks"]) == ["deraining"]
  assert sets["rain100l"]["n"] == 1 and sets["validation"]["n"] == 7
  for name, s in sets.items():
    for task, t in s["tasks"].items():
      m = t["methods"]
      # The identity executor returns the input: restored scores equal the input's exactly.
      assert m["restored"]["psnr"] == pytest.approx(m["input"]["psnr"], abs=1e-9), (name, task)
      assert m["restored"]["ssim"] == pytest.approx(m["input"]["ssim"], abs=1e-9), (name, task)
      assert np.isfinite(m["input"]["psnr"]) and -1 <= m["input"]["ssim"] <= 1
      assert m["restored"]["lpips"] == pytest.approx(m["input"]["lpips"], abs=1e-6)
      assert all(0 <= v["lpips"] < 2 for v in m.values())
      if s["kind"] == "single":
        assert set(m) == {"input", "restored", *baselines_lib.BASELINES[task]}
      else:
        assert set(m) == {"input", "restored"}
      assert sum(t["planned"].values()) == t["n"]
      assert t["routing"] and all(abs(sum(w) - 1) < 1e-4 for w in t["routing"].values())


def test_scores_are_at_native_resolution(evaluated):
  metrics, _, _, bench = evaluated
  deg = np.asarray(Image.open(bench / "input" / "0.png"))
  clean = np.asarray(Image.open(bench / "target" / "0.png"))
  got = metrics["sets"]["rain100l"]["tasks"]["deraining"]["methods"]["input"]
  assert got["psnr"] == pytest.approx(metrics_lib.psnr_y(deg, clean), abs=1e-9)
  assert got["ssim"] == pytest.approx(metrics_lib.ssim_y(deg, clean), abs=1e-9)
  signed = lambda a: a.astype(np.float64) / 127.5 - 1
  assert got["lpips"] == pytest.approx(np.abs(signed(deg) - signed(clean)).mean(), rel=1e-5)


def test_planner_readout(evaluated):
  metrics, _, printed, _ = evaluated
  p = metrics["sets"]["validation"]["planner"]
  confusion = np.asarray(p["confusion"])
  assert confusion.shape == (7, 7) and confusion.sum() == p["n"] == 7
  assert p["correct"] == np.trace(confusion) and p["accuracy"] == pytest.approx(p["correct"] / 7)
  assert p["name"] == "rule"
  assert f"planner task readout (rule): {p['accuracy']:.3f}" in printed
  # Mixes have no single-task label: no accuracy, but what they were planned as is reported.
  assert metrics["sets"]["mixes"]["planner"]["accuracy"] is None
  assert "planned as:" in printed and "[mixes]" in printed and "[rain100l]" in printed


class StrictHTML(html.parser.HTMLParser):
  """Collects ids and image sources; fails on tags closed out of order."""
  VOID = {"meta", "img", "br", "hr", "link", "input"}

  def __init__(self):
    super().__init__()
    self.stack, self.ids, self.srcs, self.errors = [], set(), [], []

  def handle_starttag(self, tag, attrs):
    attrs = dict(attrs)
    if "id" in attrs:
      self.ids.add(attrs["id"])
    if tag == "img":
      self.srcs.append(attrs["src"])
    if tag not in self.VOID:
      self.stack.append(tag)

  def handle_endtag(self, tag):
    if not self.stack or self.stack[-1] != tag:
      self.errors.append(f"</{tag}> closes {self.stack[-1:]}")
    else:
      self.stack.pop()


def test_report_is_self_contained_html_with_every_task(evaluated):
  metrics, out, _, _ = evaluated
  text = (out / "report.html").read_text()
  parser = StrictHTML()
  parser.feed(text)
  parser.close()
  assert not parser.errors and not parser.stack, (parser.errors, parser.stack)
  for name, s in metrics["sets"].items():
    assert name in parser.ids
    for task in s["tasks"]:
      assert report_id(name, task) in parser.ids, (name, task)
  # Opens with no server and no network: every image is inline, nothing is fetched.
  assert parser.srcs and all(s.startswith("data:image/png;base64,") for s in parser.srcs)
  for s in parser.srcs:
    Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).verify()
  lowered = text.lower()
  assert "http://" not in lowered and "https://" not in lowered
  assert "<script" not in lowered and "<link" not in lowered and "@import" not in lowered
  # Sample grids come with their plan text.
  assert "Task: " in text and "Pipeline: " in text
  # Each set's layer x task routing heatmap, captioned with its summary.
  for name in metrics["sets"]:
    assert f'alt="{name} routing heatmap"' in text
  assert "Routing: " in text and "adapted layers" in text


def test_report_has_provenance_curves_and_a_grid_per_task(evaluated):
  metrics, out, _, _ = evaluated
  text = (out / "report.html").read_text()
  alts = re.findall(r'<img src="[^"]*" alt="([^"]*)"', text)
  run = metrics["run"]
  assert run["command"] == COMMAND and run["date"] and "commit" in run
  for key, value in (("command", COMMAND), ("checkpoint step", "0"), ("date", run["date"])):
    assert f"<dt>{key}</dt><dd>" in text and report_lib.esc(value) in text
  assert "input PSNR (dB)" in text and "PSNR (dB)</th>" in text  # units in the headers
  # The training curves of the run's metrics.jsonl, in the table of contents.
  assert {"training scalars", "validation PSNR per task"} <= set(alts)
  assert '<a href="#training">Training curves</a>' in text
  # Per set and task: degraded | best classical | ours | clean (no baselines for the mixes),
  # whole and cropped, with the plan; the identity executor changes nothing, and the caption
  # says so instead of naming a difference.
  for name, s in metrics["sets"].items():
    for task in s["tasks"]:
      mine = [a for a in alts if a.startswith(f"{name} {task} ")]
      assert len(mine) == (6 if s["kind"] == "mixes" else 8), (name, task, mine)
      assert f'<a href="#{report_lib.anchor(name, task)}">' in text
  assert text.count("ours equals the degraded input here") == sum(
      len(s["tasks"]) for s in metrics["sets"].values())
  assert "best classical" in text and text.count('class="plan"') >= 7


def test_report_screenshot(evaluated, tmp_path):
  """The evaluate report as headless chromium renders it (/tmp/report_screenshot.png)."""
  _, out, _, _ = evaluated
  chromium = "/usr/bin/chromium"
  if not os.path.exists(chromium):
    pytest.skip(f"{chromium} is missing (make browser installs it)")
  png = tmp_path / "report.png"
  proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                         "--hide-scrollbars", f"--screenshot={png}", "--window-size=1280,2000",
                         f"file://{out / 'report.html'}"], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0 and png.exists(), proc.stderr[-2000:]
  shot = np.asarray(Image.open(png).convert("RGB"))
  assert shot.shape[:2] == (2000, 1280) and len(np.unique(shot.reshape(-1, 3), axis=0)) > 200
  assert tuple(shot[10, 640]) == (0x1F, 0x4E, 0x79)  # the header band: the CSS applied
  shutil.copy(png, "/tmp/report_screenshot.png")
  print(f"screenshot: {png} (and /tmp/report_screenshot.png)")


def report_id(name, task):
  return report_lib.anchor(name, task)


def test_data_flag_is_checked(tmp_path):
  assert evaluate_lib.parse_data_flag([f"rain100l:{tmp_path}"]) == [("rain100l", str(tmp_path))]
  with pytest.raises(FapeError, match="NAME:FOLDER"):
    evaluate_lib.parse_data_flag(["rain100l"])
  with pytest.raises(FapeError, match="unknown benchmark"):
    evaluate_lib.parse_data_flag([f"rain999:{tmp_path}"])
  with pytest.raises(FapeError, match="not a folder"):
    evaluate_lib.parse_data_flag([f"rain100l:{tmp_path}/missing"])


def test_a_set_that_fails_is_named_and_the_others_are_written(run, restorer, tmp_path, capsys):
  bad = tmp_path / "snow"  # Snow100K layout, its one degraded image corrupt
  for sub in ("synthetic", "gt"):
    (bad / sub).mkdir(parents=True)
  Image.fromarray(np.full((40, 48, 3), 128, np.uint8)).save(bad / "gt" / "0.png")
  (bad / "synthetic" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
  before = {p: p.read_bytes() for p in bad.rglob("*.png")}
  out = tmp_path / "eval"
  metrics = evaluate_lib.evaluate(run, out, data=[("snow100k_s", str(bad))], per_task=1,
                                  mixes=False, baselines=False, num_samples=0, restorer=restorer)
  assert list(metrics["sets"]) == ["validation"] and list(metrics["failed"]) == ["snow100k_s"]
  assert "Cannot read image" in metrics["failed"]["snow100k_s"]
  assert evaluate_lib.exit_code(metrics) == 1  # the CLI's exit status
  err = capsys.readouterr().err
  assert f"error: set snow100k_s: Cannot read image {bad / 'synthetic' / '0.png'}" in err
  assert "error: 1 of 2 set(s) failed (snow100k_s; exit code 1); the others are in" in err
  saved = json.loads((out / "metrics.json").read_text())  # the validation set is kept
  assert saved["failed"] == metrics["failed"] and list(saved["sets"]) == ["validation"]
  assert "Set snow100k_s failed" in (out / "report.html").read_text()
  assert {p: p.read_bytes() for p in bad.rglob("*.png")} == before  # inputs untouched
