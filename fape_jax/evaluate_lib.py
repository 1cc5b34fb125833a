"""Evaluation of a trained run: metrics tables, planner readout, baselines and the HTML report.

  metrics = evaluate("runs/base", "runs/base/eval")                     # validation + mixes
  metrics = evaluate(run, out, data=[("rain100l", "/data/Rain100L")])   # + real benchmarks

Sets evaluated (each image restored at its native resolution with `restore_lib.Restorer`, tiled
when larger than the working size):

  validation   the run's validation split (the embedded synthetic one by default), prepared with
               `train_data.prepare_data`, plans from the run's plan store
  mixes        the synthetic store's CDD-11-style `mixes` split, zero-shot (never trained on);
               plans from the plan store when it has them, else planned on the fly with the run's
               planner and encoder
  NAME         benchmark folders given as NAME:FOLDER (TFDS builders of `fape_jax.data.builders`,
               split `test`, else the only split), planned on the fly

Per task: PSNR and SSIM on the Y channel (host side, scikit-image; `fape_jax.metrics`), LPIPS when
its weights are configured, for the degraded input, the restored image and every classical
baseline of `fape_jax.baselines` for that task; the planner's task readout against the labels; the
mean per-layer routing weights. Super-resolution inputs stored smaller are upsampled bicubically
to the ground truth's size first, as the executor receives them in training.

Writes OUT/metrics.json and OUT/report.html (`fape_jax.report_lib`: with the run's training curves
when it has a metrics.jsonl, and per task degraded | best classical | restored | clean images with
a zoomed crop) and returns the metrics. A set that fails (a benchmark folder with a corrupt
image, an empty split) is named on stderr and in `metrics["failed"]`; the other sets are still
evaluated and written (`exit_code(metrics)` is 1).
"""

from __future__ import annotations

import collections
import itertools
import json
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from etils import epath

from fape_jax import baselines as baselines_lib
from fape_jax import distributed
from fape_jax.distributed import say
from fape_jax import errors
from fape_jax import metrics as metrics_lib
from fape_jax import report_html
from fape_jax import report_lib
from fape_jax import restore_lib
from fape_jax import tasks as tasks_lib
from fape_jax.errors import FapeError


def parse_data_flag(values: Sequence[str]) -> list[tuple[str, str]]:
  """['rain100l:/data/Rain100L', ...] -> [(name, folder)], checked."""
  from fape_jax.data import builders  # pylint: disable=g-import-not-at-top
  out = []
  for v in values or ():
    name, sep, folder = v.partition(":")
    if not sep or not name or not folder:
      raise FapeError(f"--data={v!r}: expected NAME:FOLDER, e.g. rain100l:/data/Rain100L.")
    if name not in builders.LAYOUTS:
      raise FapeError(f"--data={v!r}: unknown benchmark {name!r}; known: "
                      f"{', '.join(builders.LAYOUTS)}.")
    if not os.path.isdir(folder):
      raise FapeError(f"--data={v!r}: {folder} is not a folder.")
    out.append((name, folder))
  return out


# ----------------------------------------------------------------------------------------------
# Records and plans
# ----------------------------------------------------------------------------------------------

def _upsample_to(img: np.ndarray, h: int, w: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC))


def select_records(source, per_task: int = 0) -> Iterator[dict]:
  """Records of a pairs source in order, at most `per_task` per task label (0 = all)."""
  seen: collections.Counter = collections.Counter()
  for i in range(len(source)):
    rec = source[i]
    if per_task and seen[rec["task"]] >= per_task:
      continue
    seen[rec["task"]] += 1
    deg, clean = rec["degraded"], rec["clean"]
    if deg.shape[:2] != clean.shape[:2]:
      deg = _upsample_to(deg, *clean.shape[:2])
    yield {"id": rec["id"], "task": rec["task"], "degraded": deg, "clean": clean}


def _total(source, per_task: int) -> int | None:
  """How many records `select_records` yields, when known without reading them (for the ETA)."""
  return None if per_task else len(source)


class _StorePlan:
  """A plan read back from a plan store, with the fields evaluation needs."""

  def __init__(self, rec: dict):
    self.task, self.text = rec["task"], rec["text"]


def plans_for(records: Sequence[dict], restorer: restore_lib.Restorer, store=None
              ) -> tuple[list[Any], np.ndarray | None, np.ndarray | None]:
  """Plans and tokens for records: from the plan store when it has their ids, else planned now."""
  if store is not None and all(r["id"] in store for r in records):
    recs = [store.record(r["id"]) for r in records]
    tokens = np.stack([np.asarray(r["tokens"], np.float32) for r in recs])
    mask = np.stack([np.asarray(r["mask"], bool) for r in recs])
    return [_StorePlan(r) for r in recs], tokens, mask
  plans = restorer.plan([r["degraded"] for r in records])
  tokens, mask = restorer.encode(plans)
  return plans, tokens, mask


# ----------------------------------------------------------------------------------------------
# Accumulating one set
# ----------------------------------------------------------------------------------------------

class _SetStats:
  """Per-task sums of metrics, routing and planner readout for one evaluated set."""

  def __init__(self, name: str, kind: str, planner_name: str):
    self.name, self.kind, self.planner_name = name, kind, planner_name
    self.values: dict[str, dict[str, dict[str, list[float]]]] = {}
    self.routing: dict[str, dict[str, np.ndarray]] = {}
    self.routing_n: collections.Counter = collections.Counter()
    self.planned: dict[str, collections.Counter] = {}
    self.confusion = np.zeros((len(tasks_lib.TASKS),) * 2, np.int64)
    self.seconds: list[float] = []

  def add(self, task: str, method: str, scores: dict[str, float]) -> None:
    per = self.values.setdefault(task, {}).setdefault(method, {})
    for k, v in scores.items():
      per.setdefault(k, []).append(float(v))

  def add_plan(self, task: str, planned: str) -> None:
    self.planned.setdefault(task, collections.Counter())[planned] += 1
    if task in tasks_lib.TASK_ID and planned in tasks_lib.TASK_ID:
      self.confusion[tasks_lib.TASK_ID[task], tasks_lib.TASK_ID[planned]] += 1

  def add_routing(self, task: str, routing: dict[str, list[float]]) -> None:
    acc = self.routing.setdefault(task, {})
    for k, v in routing.items():
      acc[k] = acc.get(k, 0.0) + np.asarray(v, np.float64)
    self.routing_n[task] += 1

  def summary(self) -> dict:
    mean = lambda xs: float(np.mean(xs)) if xs else None
    tasks = {}
    order = sorted(self.values, key=lambda t: (tasks_lib.TASK_ID.get(t, len(tasks_lib.TASKS)), t))
    for t in order:
      methods = {m: {k: mean(v) for k, v in s.items()} for m, s in self.values[t].items()}
      # Input and restored first, then the classical methods in their table order.
      methods = {k: methods[k] for k in ("input", "restored") if k in methods} | {
          k: v for k, v in methods.items() if k not in ("input", "restored")}
      n = len(self.values[t]["restored"]["psnr"])
      tasks[t] = {"n": n, "methods": methods, "planned": dict(self.planned.get(t, {})),
                  "routing": {k: (v / self.routing_n[t]).round(6).tolist()
                              for k, v in sorted(self.routing.get(t, {}).items())}}
    overall = {m: {k: mean([tasks[t]["methods"][m][k] for t in tasks
                            if tasks[t]["methods"][m].get(k) is not None])
                   for k in ("psnr", "ssim", "lpips")} for m in ("input", "restored")}
    single = int(self.confusion.sum())
    correct = int(np.trace(self.confusion))
    planner = {"name": self.planner_name, "n": single, "correct": correct,
               "accuracy": correct / single if single else None,
               "per_task_accuracy": {t: float(self.confusion[i, i] / self.confusion[i].sum())
                                     for i, t in enumerate(tasks_lib.TASKS)
                                     if self.confusion[i].sum()},
               "confusion": self.confusion.tolist()}
    return {"kind": self.kind, "n": sum(v["n"] for v in tasks.values()), "tasks": tasks,
            "mean": overall, "planner": planner,
            "seconds_per_image": mean(self.seconds)}


def _lpips_fn(config, vgg16_path: str | None, lin_path: str | None) -> Callable | None:
  """A jitted LPIPS(a, b) on [-1, 1] NHWC batches, or None when no weights are configured."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from fape_jax.models import lpips as lpips_lib  # pylint: disable=g-import-not-at-top
  model = lpips_lib.maybe_load_lpips(vgg16_path or config.lpips.vgg16_path,
                                     lin_path or config.lpips.lin_path)
  if model is None:
    return None
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, a, b: nnx.merge(graphdef, s)(a, b))
  return lambda a, b: float(fn(state, a, b)[0])


def _signed(img8: np.ndarray) -> np.ndarray:
  return (img8.astype(np.float32) / 127.5 - 1.0)[None]


def _scores(out8: np.ndarray, clean8: np.ndarray, lpips: Callable | None) -> dict[str, float]:
  s = {"psnr": metrics_lib.psnr_y(out8, clean8), "ssim": metrics_lib.ssim_y(out8, clean8)}
  if lpips is not None and min(clean8.shape[:2]) >= 16:
    s["lpips"] = lpips(_signed(out8), _signed(clean8))
  return s


def evaluate_set(name: str, kind: str, records: Iterator[dict], restorer, *, store=None,
                 planner_name: str, lpips: Callable | None = None, baselines: bool = True,
                 num_samples: int = 2, chunk: int = 16, total: int | None = None,
                 ) -> tuple[dict, dict[str, list[dict]]]:
  """Restores and scores one set; returns (summary, samples per task). `total` (the number of
  records, when known) gives the progress bar its ETA."""
  stats = _SetStats(name, kind, planner_name)
  samples: dict[str, list[dict]] = {}
  buf: list[dict] = []

  def flush(bar):
    plans, tokens, mask = plans_for(buf, restorer, store)
    rows: dict[str, list[tuple[np.ndarray, np.ndarray, dict]]] = {}  # task -> baseline inputs
    for i, (rec, plan) in enumerate(zip(buf, plans)):
      task, deg8, clean8 = rec["task"], rec["degraded"], rec["clean"]
      t0 = time.perf_counter()
      res = restorer.restore(deg8.astype(np.float32) / 255.0,
                             None if tokens is None else tokens[i],
                             None if mask is None else mask[i])
      stats.seconds.append(time.perf_counter() - t0)
      out8 = np.round(res.image * 255.0).astype(np.uint8)
      stats.add(task, "input", _scores(deg8, clean8, lpips))
      stats.add(task, "restored", _scores(out8, clean8, lpips))
      classical = {}
      if baselines and task in baselines_lib.BASELINES:
        rows.setdefault(task, []).append((deg8, clean8, classical))
      stats.add_plan(task, plan.task)
      stats.add_routing(task, res.routing)
      shots = samples.setdefault(task, [])
      if len(shots) < num_samples:
        shots.append({"id": rec["id"], "plan": plan.text, "degraded": deg8, "restored": out8,
                      "clean": clean8, "baselines": classical})
      bar.update(1)
    # The classical baselines per task and baseline over the chunk, each with its own bar (some
    # are slow); the same scores, in the same order per task and method, as image by image.
    for task, trows in rows.items():
      for bname, fn in baselines_lib.BASELINES[task].items():
        for deg8, clean8, classical in distributed.progress(
            trows, desc=f"baseline {bname}", unit="img", leave=False):
          classical[bname] = fn(deg8)
          stats.add(task, bname, _scores(classical[bname], clean8, lpips))
    buf.clear()

  with distributed.progress(desc=f"evaluate {name}", unit="img", total=total) as bar:
    for rec in records:
      buf.append(rec)
      if len(buf) == chunk:
        flush(bar)
    if buf:
      flush(bar)
  if not stats.values:
    raise FapeError(f"Evaluation set {name!r} is empty.")
  return stats.summary(), samples


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

def _f(x, digits=2, width=7) -> str:
  return f"{x:>{width}.{digits}f}" if x is not None else f"{'-':>{width}}"


def format_set_table(name: str, s: dict) -> str:
  """Per-task input vs restored (PSNR/SSIM/LPIPS), best classical baseline, planner readout."""
  head = (f"[{name}] {s['n']} images{' (zero-shot mixes)' if s['kind'] == 'mixes' else ''}; "
          "PSNR (dB) / SSIM on Y at native resolution")
  lines = [head, f"{'task':<42} {'n':>4} {'in PSNR':>7} {'in SSIM':>7} {'PSNR':>7} {'SSIM':>7} "
                 f"{'LPIPS':>7}  best classical"]
  for t, r in s["tasks"].items():
    m = r["methods"]
    classical = {k: v for k, v in m.items() if k not in ("input", "restored")}
    best = max(classical.items(), key=lambda kv: kv[1]["psnr"]) if classical else None
    lines.append(f"{t:<42} {r['n']:>4} {_f(m['input']['psnr'])} {_f(m['input']['ssim'], 4)} "
                 f"{_f(m['restored']['psnr'])} {_f(m['restored']['ssim'], 4)} "
                 f"{_f(m['restored'].get('lpips'), 4)}  " +
                 (f"{best[0]} {best[1]['psnr']:.2f} / {best[1]['ssim']:.4f}" if best else "-"))
  m = s["mean"]
  lines.append(f"{'mean':<42} {s['n']:>4} {_f(m['input']['psnr'])} {_f(m['input']['ssim'], 4)} "
               f"{_f(m['restored']['psnr'])} {_f(m['restored']['ssim'], 4)} "
               f"{_f(m['restored'].get('lpips'), 4)}")
  p = s["planner"]
  if p["accuracy"] is not None:
    lines.append(f"planner task readout ({p['name']}): {p['accuracy']:.3f} "
                 f"({p['correct']}/{p['n']})")
  if s["kind"] == "mixes":
    lines.append("planned as: " + "; ".join(
        f"{t}: " + ", ".join(f"{k} {v}" for k, v in sorted(r["planned"].items(),
                                                          key=lambda kv: -kv[1]))
        for t, r in s["tasks"].items()))
  return "\n".join(lines)


def format_baseline_table(name: str, s: dict) -> str:
  """Every method on every task: input, restored and the classical baselines."""
  lines = [f"[{name}] methods per task", f"{'task':<20} {'method':<20} {'PSNR':>7} {'SSIM':>7}"]
  for t, r in s["tasks"].items():
    for mname, m in r["methods"].items():
      lines.append(f"{t:<20} {mname:<20} {_f(m['psnr'])} {_f(m['ssim'], 4)}")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The job
# ----------------------------------------------------------------------------------------------

def _benchmark_source(config, name: str, folder: str):
  from fape_jax.data import pairs  # pylint: disable=g-import-not-at-top
  pairs.prepare_folder(config.data.data_dir, name, folder, skip_bad=config.data.skip_bad)
  for split in ("test", "unsplit", "validation", "train"):
    try:
      return pairs.open_pairs(config.data.data_dir, name, split)
    except FapeError:
      continue
  raise FapeError(f"The {name} store built from {folder} has no test split.")


def evaluate(workdir: str | os.PathLike, out_dir: str | os.PathLike, *,
             data: Sequence[tuple[str, str]] = (), step: int | None = None,
             per_task: int = 0, mixes: bool = True, baselines: bool = True,
             num_samples: int = 2, data_dir: str | None = None,
             lpips_vgg16_path: str | None = None, lpips_lin_path: str | None = None,
             restorer: restore_lib.Restorer | None = None, command: str | None = None) -> dict:
  """Evaluates the run in `workdir`; writes OUT/metrics.json and OUT/report.html (see module doc).

  `per_task` caps the images per task (per mix) in every set (0 = all). `command` (the CLI's
  command line) is recorded with the commit and date in metrics.json and the report.
  """
  from fape_jax import train_data  # pylint: disable=g-import-not-at-top
  from fape_jax.data import pairs  # pylint: disable=g-import-not-at-top

  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  restorer = restorer or restore_lib.load_restorer(workdir, step=step)
  config = restorer.config.copy_and_resolve_references()
  if data_dir:
    with config.unlocked():
      config.data.data_dir = data_dir
  lpips = _lpips_fn(config, lpips_vgg16_path, lpips_lin_path)
  sets = {}
  samples = {}
  t0 = time.perf_counter()

  prepared = train_data.prepare_data(config)
  store = prepared.plans
  # Validation plans come from the run's plan store (whatever planner built it); the mixes and
  # benchmarks are planned now by the restorer's planner, unless the store has them.
  store_planner = store.manifest.get("planner", "?") if store is not None else None
  jobs: list[tuple[str, Callable[[], tuple[dict, dict]]]] = [
      ("validation", lambda: evaluate_set(
          "validation", "single", select_records(prepared.val, per_task), restorer, store=store,
          planner_name=store_planner or restorer.planner_kind, lpips=lpips, baselines=baselines,
          num_samples=num_samples, total=_total(prepared.val, per_task)))]
  if mixes:
    def mixes_set():
      pairs.prepare_synthetic(config.data.data_dir, config.data)
      src = pairs.open_pairs(config.data.data_dir, pairs.SYNTHETIC, "mixes", config.data)
      return evaluate_set("mixes", "mixes", select_records(src, per_task), restorer, store=store,
                          planner_name=restorer.planner_kind, lpips=lpips, baselines=False,
                          num_samples=num_samples, total=_total(src, per_task))
    jobs.append(("mixes", mixes_set))
  def benchmark_set(name, folder):
    src = _benchmark_source(config, name, folder)
    return evaluate_set(name, "single", select_records(src, per_task), restorer,
                        planner_name=restorer.planner_kind, lpips=lpips, baselines=baselines,
                        num_samples=num_samples, total=_total(src, per_task))
  for name, folder in data:
    jobs.append((name, lambda name=name, folder=folder: benchmark_set(name, folder)))
  failed = {}
  for name, job in jobs:  # one set that cannot be read does not cost the others
    try:
      sets[name], samples[name] = job()
    except (FapeError, OSError) as e:
      failed[name] = str(e)
      print(f"error: set {name}: {e}", file=sys.stderr)
      continue
    say(format_set_table(name, sets[name]))
  if baselines:
    for name, s in sets.items():
      if s["kind"] != "mixes":
        say(format_baseline_table(name, s))

  metrics = {
      "run": {"workdir": os.path.abspath(os.fspath(workdir)), "step": restorer.step,
              "variant": config.get("variant", "?"), "planner": restorer.planner_kind,
              "tile": restorer.tile, "overlap": restorer.overlap,
              "devices": [str(d) for d in restorer.mesh.devices.flat],
              "lpips": lpips is not None, "per_task": per_task,
              "seconds": round(time.perf_counter() - t0, 2), "command": command,
              "commit": report_html.git_commit(), "date": report_html.now()},
      "sets": sets,
      "failed": failed,
  }
  (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
  # The run's training curves too, when it was trained here (metrics.jsonl beside checkpoints/).
  (out_dir / "report.html").write_text(report_lib.evaluation_report(
      metrics, samples, report_lib.read_metrics(workdir),
      report_lib.read_json(epath.Path(workdir) / "validation.json")))
  say(f"Wrote {out_dir / 'metrics.json'} and {out_dir / 'report.html'}.")
  if failed:
    print(f"error: {len(failed)} of {len(jobs)} set(s) failed ({', '.join(failed)}; exit code "
          f"{errors.PARTIAL_EXIT_CODE}); the others are in {out_dir / 'metrics.json'}.",
          file=sys.stderr)
  return metrics


def exit_code(metrics: dict) -> int:
  """The CLI's exit status: 0 every set evaluated, 1 some failed (the others are written)."""
  return errors.PARTIAL_EXIT_CODE if metrics.get("failed") else 0


def validation_psnr(workdir: str | os.PathLike, *, limit: int = 0,
                    restorer: restore_lib.Restorer | None = None) -> dict:
  """Per-task validation PSNR of a finished run, in `validation.validate`'s table form.

  For a run whose final validation table was lost (e.g. an ablation variant interrupted between
  its last checkpoint and writing its result): {task: {"degraded_psnr", "restored_psnr", "n"}}.
  `limit` takes the first records of the split, as training's `num_eval_images` does.
  """
  from fape_jax import train_data  # pylint: disable=g-import-not-at-top
  restorer = restorer or restore_lib.load_restorer(workdir)
  data = train_data.prepare_data(restorer.config)
  records = select_records(data.val)
  if limit:
    records = itertools.islice(records, limit)
  summary, _ = evaluate_set("validation", "single", records, restorer, store=data.plans,
                            planner_name=restorer.planner_kind, baselines=False, num_samples=0)
  return {t: {"degraded_psnr": r["methods"]["input"]["psnr"],
              "restored_psnr": r["methods"]["restored"]["psnr"], "n": r["n"]}
          for t, r in summary["tasks"].items()}
