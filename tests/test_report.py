"""The HTML reports (fape_jax/report_lib.py, report_figures.py, report.py): the training report of
a real tiny run's files, the comparison grids and their crops, and the ablation page.

tests/data/tiny_run/ holds what a real training run of the tiny config left behind
(`python -m fape_jax.train --config=configs/base.py:tiny --config.allow_random_base=True
--config.total_steps=100 --config.eval_every=25 --config.num_eval_images=0`): metrics.jsonl,
validation.json, config.json and the last validation's samples/step_N.png with its JSON sidecar,
so these tests train nothing. The evaluate report (an evaluated run) is tested in test_evaluate.py.
"""
import base64
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.container import BarContainer
from PIL import Image

from fape_jax import ablate_lib
from fape_jax import report_figures
from fape_jax import report_lib
from fape_jax import run_log
from fape_jax.tasks import TASKS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = os.path.join(REPO, "tests", "data", "tiny_run")
CHROMIUM = "/usr/bin/chromium"


def images(text):
  """{alt: decoded PIL image} of every inline image of a page; every one is a base64 PNG."""
  import re
  out = {}
  for src, alt in re.findall(r'<img src="([^"]*)" alt="([^"]*)"', text):
    assert src.startswith("data:image/png;base64,"), src[:40]
    image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    image.load()
    out[alt] = image
  return out


def screenshot(html_path, png_path, height=2000):
  """Headless chromium's rendering of a page (Debian's chromium, `make browser`)."""
  if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (make browser installs it)")
  proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                         "--hide-scrollbars", f"--screenshot={png_path}",
                         f"--window-size=1280,{height}", f"file://{html_path}"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and os.path.exists(png_path), proc.stderr[-2000:]
  shot = np.asarray(Image.open(png_path).convert("RGB"))
  assert shot.shape[:2] == (height, 1280)
  # Not a blank page: the header band, text and figures give many distinct colours.
  assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 200
  print(f"screenshot: {png_path}")
  return shot


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  run = tmp_path_factory.mktemp("tiny_run")
  shutil.copytree(TINY_RUN, run, dirs_exist_ok=True)
  return run


@pytest.fixture(scope="module")
def training_page(tiny_run):
  return report_lib.training_report(tiny_run, "python -m fape_jax.report --workdir=RUN")


def test_training_report_has_curves_table_heatmap_and_grids(tiny_run, training_page):
  text = training_page
  rows = run_log.read_jsonl(tiny_run / "metrics.jsonl")
  val = json.loads((tiny_run / "validation.json").read_text())
  shown = images(text)
  # The curves: every logged training scalar that is not 0 throughout gets a panel.
  train = report_figures.last_per_step(rows, "train")
  names, zero = report_figures.scalar_names(train)
  assert {"loss", "rec", "mse", "adv", "d_loss", "images_per_s"} <= set(names)
  assert "lpips" in zero and "Zero on every step (off): lpips" in text
  assert shown["training scalars"].size[0] > 600
  assert shown["validation PSNR per task"].size[0] > 600
  assert f"{len(train)} logged training steps (up to step {train[-1]['step']})" in text
  assert f"{len(report_figures.last_per_step(rows, 'val'))} validations" in text
  assert "tensorboard --logdir" in text
  # The last validation's table (units in the header), the heatmap, provenance.
  assert f"Validation at step {val['step']}" in text and "restored PSNR (dB)" in text
  assert "validation routing heatmap" in shown and "Routing: 32 adapted layers" in text
  for key in ("command", "commit", "date", "config variant"):
    assert f"<dt>{key}</dt>" in text
  assert "python -m fape_jax.report --workdir=RUN" in text
  # One grid per task: degraded | best classical | ours | clean, each with its crop and plan.
  side = json.loads((tiny_run / "samples" / f"step_{val['step']:07d}.json").read_text())
  assert {r["task"] for r in side["rows"]} == set(TASKS)
  for r in side["rows"]:
    assert f'id="{report_lib.anchor("samples", r["task"])}"' in text
    for col in ("degraded", "ours", "clean"):
      assert shown[f"{r['task']} {r['id']} {col}"].size == (r["width"], r["height"])
      assert shown[f"{r['task']} {r['id']} {col} crop"].size[0] < r["width"]
    assert sum(1 for alt in shown if alt.startswith(f"{r['task']} {r['id']} ")) == 8
    assert report_lib.esc(r["plan"]) in text and r["plan"].startswith("Task: ")
  assert "differs most from the degraded input" in text
  # A table of contents linking every section.
  for ident in ("about", "training", "training-scalars", "validation-curves", "validation",
                "routing", "samples"):
    assert f'<a href="#{ident}">' in text and f'id="{ident}"' in text


def test_training_report_without_sample_sidecar_or_validation(tmp_path):
  """Runs from before the sidecar show their sample grid whole; a run that has only logged
  training steps gets its curves and nothing else."""
  shutil.copytree(TINY_RUN, tmp_path, dirs_exist_ok=True)
  for p in (tmp_path / "samples").glob("*.json"):
    p.unlink()
  text = report_lib.training_report(tmp_path)
  assert "Each row: degraded | restored | clean." in text
  (tmp_path / "validation.json").unlink()
  shutil.rmtree(tmp_path / "samples")
  rows = [r for r in run_log.read_jsonl(tmp_path / "metrics.jsonl") if r["split"] == "train"]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  text = report_lib.training_report(tmp_path)
  assert "training scalars" in images(text) and 'id="validation"' not in text


def test_training_report_screenshot(tiny_run, training_page, tmp_path):
  page = tmp_path / "report.html"
  page.write_text(training_page)
  shot = screenshot(page, tmp_path / "training_report.png", height=3000)
  shutil.copy(tmp_path / "training_report.png", "/tmp/report_training_screenshot.png")
  # The header band is the accent colour (#1f4e79), the CSS applied.
  assert tuple(shot[10, 640]) == (0x1F, 0x4E, 0x79)


def test_steps_logged_twice_keep_the_last_line():
  rows = [{"step": 1, "split": "train", "loss": 3.0}, {"step": 2, "split": "train", "loss": 2.0},
          {"step": 2, "split": "train", "loss": 1.5}, {"step": 2, "split": "val", "psnr/x": 1.0}]
  got = report_figures.last_per_step(rows, "train")
  assert [(r["step"], r["loss"]) for r in got] == [(1, 3.0), (2, 1.5)]


def test_crop_is_where_ours_differs_most_from_degraded():
  rng = np.random.default_rng(0)
  deg = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
  ours = deg.copy()
  ours[22:30, 41:49] = 255 - ours[22:30, 41:49]  # an 8 x 8 block changed
  side = report_figures.crop_side(40, 60)
  assert side == 10
  y, x, diff = report_figures.crop_window(ours, deg, side)
  assert 20 <= y <= 22 and 39 <= x <= 41 and diff > 0
  assert report_figures.crop(ours, y, x, side).shape == (side, side, 3)
  assert report_figures.crop_window(deg, deg, side) == (0, 0, 0.0)
  boxed = report_figures.with_box(np.zeros((40, 60, 3), np.uint8), (y, x, y + side, x + side))
  assert boxed[y, x + 3].tolist() == [230, 30, 30] and not boxed[y + 5, x + 5].any()


def test_comparison_grid_picks_the_best_baseline_and_says_where_the_crop_is():
  rng = np.random.default_rng(1)
  clean = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
  noisy = np.clip(clean + rng.normal(0, 40, clean.shape), 0, 255).astype(np.uint8)
  better = np.clip(clean + rng.normal(0, 5, clean.shape), 0, 255).astype(np.uint8)
  shot = {"id": "img0", "plan": "Task: denoise <b>", "degraded": noisy, "restored": better,
          "clean": clean, "baselines": {"worse": noisy, "good": better}}
  text = report_lib.comparison_grid([shot], "denoise")
  shown = images(text)
  assert set(shown) == {f"denoise img0 {c}{s}" for c in ("degraded", "good", "ours", "clean")
                        for s in ("", " crop")}
  assert "good: " in text and "worse" not in text  # the baseline with the higher PSNR
  assert "Task: denoise &lt;b&gt;" in text  # plan text escaped
  assert "8&times;8 px crop at x=" in text and "differs most" in text
  # Ours = the input: the crop shows where the degradation is, and the caption says so.
  spoiled = clean.copy()
  spoiled[20:28, 18:26] = 0
  same = report_lib.comparison_grid(
      [{**shot, "degraded": spoiled, "restored": spoiled, "baselines": {}}], "denoise")
  assert ("ours equals the degraded input here, so the 8&times;8 px crop at x=18, y=20 is where "
          "the degraded input differs most from the clean image") in same
  assert "best classical" not in same
  assert len(images(same)) == 6  # degraded, ours, clean: no baseline column


def synthetic_ablation():
  """Three variants x two seeds; per-seed mean gains full (1.0, 1.2), no_plans (0.2, 0.6),
  dense (0.9, 1.0)."""
  gains = {"full": (1.0, 1.2), "no_plans": (0.2, 0.6), "dense": (0.9, 1.0)}
  runs = [{"variant": v, "seed": s, "steps": 50,
           "table": {t: {"degraded_psnr": 20.0 + i, "restored_psnr": 20.0 + i + g, "n": 3}
                     for i, t in enumerate(TASKS)}}
          for v, gs in gains.items() for s, g in zip((0, 1), gs)]
  return {"total_steps": 50, "runs": runs, "command": "python -m fape_jax.ablate --seeds=0,1",
          "machine": {"cpu": "Test CPU", "cores": 2, "backend": "cpu", "devices": 1,
                      "device_kind": "cpu", "commit": "abc123"},
          "date": "2026-12-01T00:00:00+00:00"}


def test_ablation_page_from_a_synthetic_json(tmp_path):
  results, md = tmp_path / "ablation.json", tmp_path / "ABLATION.md"
  results.write_text(json.dumps(synthetic_ablation()))
  ablate_lib.render_file(results, md)  # what --render_only runs
  page = ablate_lib.html_path(md)
  assert page == tmp_path / "ABLATION.html" and md.exists()
  text = page.read_text()
  assert "mean gain per variant" in images(text)
  # The per-task table: gain (spread) per variant, the mean row, the change against full.
  assert "<th>full</th><th>no_plans</th><th>dense</th>" in text
  assert "<td>+1.10 <small>(0.20)</small></td>" in text  # full: mean of 1.0 and 1.2
  assert "<td>+0.40 <small>(0.40)</small></td>" in text  # no_plans
  assert "<td>-0.70</td>" in text and "<td>-0.15</td>" in text  # Δ mean vs full
  assert "input PSNR (dB)" in text and "Restored PSNR per task" in text
  for s in ("python -m fape_jax.ablate --seeds=0,1", "abc123", "2026-12-01T00:00:00+00:00",
            "Test CPU, 2 cores", "50 per run"):
    assert s in text, s
  assert "beyond it: <code>no_plans</code>" in text  # the spread note
  assert ablate_lib.check_file(results, md)  # the Markdown check is unchanged by the page


def test_ablation_bars_show_the_seed_range():
  s = ablate_lib.build_table(synthetic_ablation()["runs"], 50)
  fig = report_figures.ablation_gain_figure(s["rows"])
  ax = fig.axes[0]
  (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
  assert [b.get_height() for b in bars] == pytest.approx([1.1, 0.4, 0.95])
  # The error bars run from the lowest to the highest seed's mean gain.
  (segments,) = [c.get_segments() for c in bars.errorbar.lines[2]]
  assert [(round(a[1], 6), round(b[1], 6)) for a, b in segments] == [
      (1.0, 1.2), (0.2, 0.6), (0.9, 1.0)]
  assert [t.get_text() for t in ax.get_xticklabels()] == ["full", "no_plans", "dense"]
  report_figures.figure_data_uri(fig)


@pytest.mark.slow
def test_report_cli(tiny_run, tmp_path):
  cli = [sys.executable, "-m", "fape_jax.report"]
  run = lambda *a: subprocess.run([*cli, *a], cwd=REPO, capture_output=True, text=True,
                                  timeout=300)
  proc = run(f"--workdir={tiny_run}", f"--out={tmp_path / 'r.html'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Wrote {tmp_path / 'r.html'}" in proc.stdout
  assert "training scalars" in images((tmp_path / "r.html").read_text())
  proc = run(f"--workdir={tmp_path}")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      f"error: {tmp_path} holds no metrics.jsonl or validation.json: not a training run (or one "
      "that has not logged a step yet)."]
