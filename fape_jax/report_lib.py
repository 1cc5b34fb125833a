"""Self-contained HTML reports: tables, image grids and plots embedded in one file.

Everything a report shows is inside the file: images are base64 PNG data URIs, plots are
matplotlib PNGs (`report_figures`), the CSS is inline, and there is no JavaScript, so a report
opens from disk in any browser with no server and no network, and can be mailed or copied alone.

  evaluation_report(metrics, samples, train_rows, validation)
                                      the `evaluate` report: provenance, the run's training
                                      curves, per-set tables, the routing heatmap, and per task
                                      degraded | best classical | ours | clean grids with a
                                      zoomed crop and each image's plan text
  training_report(workdir, command)   a training run from its files (`python -m fape_jax.report`):
                                      curves from metrics.jsonl, the last validation table and
                                      routing heatmap (validation.json), its sample grids
  ablation_report(result, note)       the `ablate` page: mean gain per variant with the seeds'
                                      range as error bars, the per-task tables
"""

from __future__ import annotations

import datetime
import json
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

from fape_jax import report_figures as figs
from fape_jax import tasks as tasks_lib
from fape_jax.report_html import (
    NA, Toc, anchor, esc, figure, fmt, git_commit, img, meta, now, page, table)

# Shown size of one grid cell (the browser enlarges small images, pixelated) and stored size.
_CELL_PX = 208
_THUMB_PX = 224


# ----------------------------------------------------------------------------------------------
# Sections shared by the reports
# ----------------------------------------------------------------------------------------------

def routing_heatmap_section(routing: Mapping[str, Mapping[str, Sequence[float]]],
                            name: str) -> str:
  """The heatmap as a figure, captioned with `validation.routing_summary` of the same routing."""
  from fape_jax import validation  # pylint: disable=g-import-not-at-top  (pulls in jax)
  summary = validation.routing_summary(routing)
  dead = summary["single_expert_layer_names"]
  listed = (": " + ", ".join(f"<code>{esc(figs.short_layer(l))}</code>" for l in dead[:12]) +
            (" ..." if len(dead) > 12 else "")) if dead else ""
  return figure(figs.routing_heatmap_figure(routing, f"{name}: weight on the high-frequency "
                                            "expert"), f"{name} routing heatmap",
                f"{esc(validation.format_routing_summary(summary))}. Layers where every task "
                f"has the same dominant expert{listed or ': none'}.")


def training_section(toc: Toc, rows: Sequence[Mapping], validation: Mapping | None,
                     where: str) -> str:
  """Training curves from metrics.jsonl rows: the logged scalars, validation PSNR per task."""
  train = figs.last_per_step(rows, "train")
  val = figs.last_per_step(rows, "val")
  out = [toc.h(2, "training", "Training curves")]
  if not train and not val:
    return out[0] + f"<p>{esc(where)} holds no logged steps yet.</p>"
  out.append(f"<p class=\"caption\">From <code>{esc(where)}</code>: {len(train)} logged "
             f"training steps (up to step {train[-1]['step'] if train else NA}), {len(val)} "
             "validations. A step logged twice (replayed after a resume) shows its last value. "
             "The same scalars are TensorBoard events: <code>tensorboard --logdir "
             f"{esc(os.path.join(os.path.dirname(where), 'tb'))}</code>.</p>")
  if train:
    names, zero = figs.scalar_names(train)
    if names:
      out.append(toc.h(3, "training-scalars", "Loss terms and training scalars"))
      out.append(figure(figs.training_scalars_figure(train, names), "training scalars",
                        "Per logged step (unitless losses unless marked): <code>loss</code> the "
                        "optimised total, <code>rec</code> its reconstruction term, "
                        "<code>mse</code> the plain batch MSE, <code>adv</code> / "
                        "<code>d_loss</code> generator / discriminator adversarial losses, "
                        "<code>freq</code> the frequency regulariser. " +
                        (f"Zero on every step (off): {esc(', '.join(zero))}." if zero else "")))
  if val:
    degraded = {t: r["degraded_psnr"] for t, r in (validation or {}).get("tasks", {}).items()}
    out.append(toc.h(3, "validation-curves", "Validation PSNR over steps"))
    out.append(figure(figs.validation_psnr_figure(val, degraded), "validation PSNR per task",
                      "Restored PSNR on the Y channel (dB) per task at each validation, and the "
                      "mean over tasks of restored minus degraded PSNR (dB)."))
  return "\n".join(out)


def comparison_grid(shots: Sequence[Mapping[str, Any]], label: str) -> str:
  """Per sample: degraded | best classical baseline | ours | clean, whole images above, a zoomed
  crop below. `shots`: [{"id", "plan", "degraded", "restored", "clean": uint8 HxWx3,
  "baselines": {name: uint8 HxWx3} (optional)}], all at the clean image's size."""
  from fape_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top (jax)
  ncol = 4 if any(s.get("baselines") for s in shots) else 3
  heads = ["degraded", "best classical", "ours", "clean"] if ncol == 4 else [
      "degraded", "ours", "clean"]
  out = [f'<div class="head">{h}</div>' for h in heads]
  widest = 0
  for s in shots:
    clean = np.asarray(s["clean"], np.uint8)
    psnr = lambda x: metrics_lib.psnr_y(x, clean)  # noqa: E731
    cols = [("degraded", s["degraded"], f"{psnr(s['degraded']):.2f} dB")]
    if ncol == 4:
      scored = {k: psnr(v) for k, v in (s.get("baselines") or {}).items()}
      if scored:
        best = max(scored, key=scored.get)
        cols.append((best, s["baselines"][best], f"{best}: {scored[best]:.2f} dB"))
      else:
        cols.append(("none", None, "no baseline"))
    cols += [("ours", s["restored"], f"{psnr(s['restored']):.2f} dB"),
             ("clean", clean, "ground truth")]
    h, w = clean.shape[:2]
    side = figs.crop_side(h, w)
    y, x, diff = figs.crop_window(np.asarray(s["restored"]), np.asarray(s["degraded"]), side)
    if diff == 0:  # nothing changed: show where the degradation is instead
      y, x, _ = figs.crop_window(np.asarray(s["degraded"]), clean, side)
    thumbs, crops = [], []
    for name, image, cap in cols:
      if image is None:
        thumbs.append(f'<div class="cap">{esc(cap)}</div>')
        crops.append("<div></div>")
        continue
      t = figs.thumbnail(image, _THUMB_PX)
      k = t.shape[1] / w
      boxed = figs.with_box(t, (y * k, x * k, (y + side) * k, (x + side) * k))
      shown = t.shape[1] * max(1, _CELL_PX // t.shape[1])  # small images: whole multiples
      widest = max(widest, shown)
      alt = f"{label} {s['id']} {name}"
      thumbs.append(f"<div>{img(figs.png_data_uri(boxed), alt=alt, width=shown)}"
                    f'<div class="cap">{esc(cap)}</div></div>')
      zoom = figs.png_data_uri(figs.crop(image, y, x, side))
      crops.append(f"<div>{img(zoom, alt=alt + ' crop', width=shown)}</div>")
    where = (f"the {side}&times;{side} px crop at x={x}, y={y} is where ours differs most from "
             f"the degraded input (mean |ours &minus; degraded| {diff:.1f}/255)" if diff > 0 else
             f"ours equals the degraded input here, so the {side}&times;{side} px crop at x={x}, "
             f"y={y} is where the degraded input differs most from the clean image")
    out += thumbs + crops
    out.append(f'<div class="wide"><span class="cap">{esc(s["id"])}: {where}.</span>'
               f'<span class="plan">{esc(s.get("plan") or "(no plan)")}</span></div>')
  # Fixed column widths: the plan text, spanning the row, must wrap rather than widen them.
  return "\n".join([f'<div class="cmp" style="grid-template-columns: repeat({ncol}, '
                    f'{widest}px)">', *out, "</div>"])


_GRID_NOTE = ("Each sample: whole images above (the red box marks the crop), the crop below, "
              "enlarged with nearest-neighbour pixels. PSNR on Y (dB) against the clean image; "
              "the classical column is the baseline of <code>fape_jax.baselines</code> with the "
              "highest PSNR on that image. Below each sample, the plan it was restored with.")


# ----------------------------------------------------------------------------------------------
# The evaluation report
# ----------------------------------------------------------------------------------------------

def _method_rows(task_metrics: Mapping[str, Any]) -> tuple[list[list[str]], list[bool]]:
  methods = task_metrics["methods"]
  best = max(methods, key=lambda m: methods[m]["psnr"])
  rows, marks = [], []
  for name, m in methods.items():
    rows.append([esc(name), fmt(m["psnr"]), fmt(m["ssim"], 4), fmt(m.get("lpips"), 4)])
    marks.append(name == best)
  return rows, marks


def _set_summary(toc: Toc, name: str, s: Mapping[str, Any]) -> str:
  zero_shot = ", zero-shot" if s["kind"] == "mixes" else ""
  out = [toc.h(2, anchor(name), name, f" <small>({s['n']} images{zero_shot})</small>")]
  rows = []
  for task, t in s["tasks"].items():
    m = t["methods"]
    best_classical = {k: v for k, v in m.items() if k not in ("input", "restored")}
    bc = max(best_classical.items(), key=lambda kv: kv[1]["psnr"]) if best_classical else None
    planned = ", ".join(f"{k} {v}" for k, v in sorted(t["planned"].items(),
                                                       key=lambda kv: -kv[1]))
    rows.append([f'<a href="#{anchor(name, task)}">{esc(task)}</a>', str(t["n"]),
                 fmt(m["input"]["psnr"]), fmt(m["input"]["ssim"], 4),
                 fmt(m["restored"]["psnr"]), fmt(m["restored"]["ssim"], 4),
                 fmt(m["restored"].get("lpips"), 4),
                 (f"{esc(bc[0])} {fmt(bc[1]['psnr'])} / {fmt(bc[1]['ssim'], 4)}" if bc else NA),
                 esc(planned)])
  mean = s["mean"]
  rows.append(["<b>mean</b>", str(s["n"]), fmt(mean["input"]["psnr"]),
               fmt(mean["input"]["ssim"], 4), fmt(mean["restored"]["psnr"]),
               fmt(mean["restored"]["ssim"], 4), fmt(mean["restored"].get("lpips"), 4), "", ""])
  out.append(table(["task", "n", "input PSNR (dB)", "input SSIM", "restored PSNR (dB)",
                    "restored SSIM", "LPIPS", "best classical (PSNR dB / SSIM)", "planned as"],
                   rows, left=1))
  p = s.get("planner")
  if p and p.get("accuracy") is not None:
    out.append(f"<p>Planner task readout ({esc(p['name'])}): <b>{p['accuracy']:.3f}</b> "
               f"({p['correct']}/{p['n']}).</p>")
    short = [t[:8] for t in tasks_lib.TASKS]
    conf_rows = [[esc(t)] + [str(v) for v in row] for t, row in zip(tasks_lib.TASKS,
                                                                      p["confusion"])]
    out.append("<details><summary>confusion (rows: true task, columns: planned)</summary>" +
               table(["true \\ planned"] + short, conf_rows, left=1) + "</details>")
  return "\n".join(out)


def evaluation_report(metrics: Mapping[str, Any],
                      samples: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]],
                      train_rows: Sequence[Mapping] = (),
                      validation: Mapping | None = None) -> str:
  """The whole evaluation report as an HTML string.

  `samples[set][task]` = [{"degraded", "restored", "clean": uint8 HxWx3, "baselines": {name:
  uint8 HxWx3}, "plan": str, "id": str}]; `train_rows` the run's metrics.jsonl rows (training
  curves, when there are any) and `validation` its validation.json.
  """
  run = metrics["run"]
  toc = Toc()
  body = [toc.h(2, "about", "About this report"),
          meta({"command": run.get("command"), "commit": run.get("commit"),
                "date": run.get("date"), "run": run["workdir"],
                "checkpoint step": run["step"], "config variant": run.get("variant", "?"),
                "planner": run.get("planner", "?"),
                "devices": ", ".join(run.get("devices", [])) or None,
                "images per task": run.get("per_task") or "all",
                "took": f"{run['seconds']:.1f} s" if "seconds" in run else None}),
          "<p class=\"caption\">PSNR (dB) and SSIM on the Y channel (BT.601) at native "
          "resolution; LPIPS where weights were configured. Rows in bold are the best PSNR per "
          "task.</p>"]
  for name, why in metrics.get("failed", {}).items():
    body.append(f"<p class=\"warn\"><b>Set {esc(name)} failed</b>: {esc(why)}</p>")
  if train_rows:
    body.append(training_section(toc, train_rows, validation,
                                 os.path.join(run["workdir"], "metrics.jsonl")))
  for name, s in metrics["sets"].items():
    body.append(_set_summary(toc, name, s))
    routing = {t: v["routing"] for t, v in s["tasks"].items() if v.get("routing")}
    if routing and s["kind"] != "mixes":
      body.append(figure(figs.routing_band_figure(routing, f"{name}: per-layer routing by band"),
                         f"{name} routing by band",
                         "Mean weight on the high-frequency expert per adapted layer, low-band "
                         "tasks (left) and high-band tasks (right)."))
    if routing:
      body.append(routing_heatmap_section(routing, name))
    for task, t in s["tasks"].items():
      body.append("<section>")
      band = tasks_lib.FOCUS.get(task, "mixed")
      body.append(toc.h(3, anchor(name, task), task,
                        f" <small>({esc(name)}, {esc(band)} band, n = {t['n']})</small>"))
      rows, marks = _method_rows(t)
      body.append(table(["method", "PSNR (dB)", "SSIM", "LPIPS"], rows, left=1,
                        highlight=marks))
      shots = samples.get(name, {}).get(task, [])
      if shots:
        body.append(comparison_grid(shots, f"{name} {task}"))
      if t.get("routing"):
        body.append(figure(figs.routing_task_figure(t["routing"], f"{task}: routing per layer"),
                           f"{task} routing"))
      body.append("</section>")
  if any(samples.get(n) for n in metrics["sets"]):
    body.insert(3, f"<p class=\"caption\">{_GRID_NOTE}</p>")
  return page("FAPE-IR evaluation", "\n".join(body), toc=toc,
              subtitle=f"{esc(run['workdir'])} &middot; checkpoint step {esc(run['step'])} "
                       f"&middot; {esc(', '.join(metrics['sets']))}")


# ----------------------------------------------------------------------------------------------
# The training report
# ----------------------------------------------------------------------------------------------

def read_json(path: epath.Path) -> Any:
  return json.loads(path.read_text()) if path.exists() else None


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """The run's metrics.jsonl rows ([] when it has none)."""
  from fape_jax import run_log  # pylint: disable=g-import-not-at-top (jax, via distributed)
  return run_log.read_jsonl(epath.Path(workdir) / "metrics.jsonl")


def sample_shots(png: epath.Path) -> dict[str, list[dict]] | None:
  """Validation's sample grid (samples/step_N.png, rows of degraded | restored | clean) cut back
  into per-task shots with its sidecar (step_N.json: task, id, plan, size of each row), with the
  classical baselines of each degraded image; None without a sidecar (runs from before it)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from fape_jax import baselines as baselines_lib  # pylint: disable=g-import-not-at-top
  side = read_json(png.with_suffix(".json"))
  if not side:
    return None
  with png.open("rb") as f:  # through epath: the run may live on gs://
    grid = np.asarray(Image.open(f).convert("RGB"))
  shots, top = {}, 0
  for r in side["rows"]:
    h, w = r["height"], r["width"]
    deg, out, clean = (grid[top:top + h, i * w:(i + 1) * w] for i in range(3))
    top += h
    fns = baselines_lib.BASELINES.get(r["task"], {})
    shots.setdefault(r["task"], []).append(
        {"id": r["id"], "plan": r.get("plan"), "degraded": deg, "restored": out, "clean": clean,
         "baselines": {k: fn(deg) for k, fn in fns.items()}})
  order = lambda t: (tasks_lib.TASK_ID.get(t, len(tasks_lib.TASKS)), t)  # noqa: E731
  return {t: shots[t] for t in sorted(shots, key=order)}


def training_report(workdir: str | os.PathLike, command: str | None = None) -> str:
  """A training run's report from its files alone: metrics.jsonl, validation.json, config.json
  and the newest samples/step_N.png (no checkpoint is loaded, nothing is evaluated)."""
  from fape_jax import validation as validation_lib  # pylint: disable=g-import-not-at-top
  workdir = epath.Path(workdir)
  rows = read_metrics(workdir)
  val = read_json(workdir / "validation.json")
  config = read_json(workdir / "config.json") or {}
  train = figs.last_per_step(rows, "train")
  toc = Toc()
  when = lambda rs: (datetime.datetime.fromtimestamp(rs["time"], datetime.timezone.utc)  # noqa
                     .isoformat(timespec="seconds") if rs and "time" in rs else None)
  body = [toc.h(2, "about", "About this report"),
          meta({"command": command, "commit": git_commit(), "date": now(),
                "run": os.fspath(workdir), "config variant": config.get("variant"),
                "steps": f"{train[-1]['step']} of {config.get('total_steps', '?')}"
                         if train else None,
                "first logged step": when(train[0] if train else None),
                "last logged step": when(train[-1] if train else None)})]
  body.append(training_section(toc, rows, val, os.fspath(workdir / "metrics.jsonl")))
  if val:
    step = val["step"]
    body.append(toc.h(2, "validation", f"Validation at step {step}"))
    table_rows = [[esc(t), str(r["n"]), fmt(r["degraded_psnr"]), fmt(r["restored_psnr"]),
                   f"{r['restored_psnr'] - r['degraded_psnr']:+.2f}"]
                  for t, r in val["tasks"].items()]
    if val["tasks"]:
      mean = lambda k: float(np.mean([r[k] for r in val["tasks"].values()]))  # noqa: E731
      table_rows.append(["<b>mean</b>", str(sum(r["n"] for r in val["tasks"].values())),
                         fmt(mean("degraded_psnr")), fmt(mean("restored_psnr")),
                         f"{mean('restored_psnr') - mean('degraded_psnr'):+.2f}"])
    body.append(table(["task", "n", "degraded PSNR (dB)", "restored PSNR (dB)", "gain (dB)"],
                      table_rows, left=1))
    body.append("<p class=\"caption\">PSNR on the Y channel of the run's validation split, from "
                "<code>validation.json</code>.</p>")
    if val.get("routing"):
      body.append(toc.h(3, "routing", "Routing"))
      body.append(routing_heatmap_section(val["routing"], "validation"))
    elif "routing_summary" in val:
      body.append(f"<p>{esc(validation_lib.format_routing_summary(val['routing_summary']))}</p>")
  pngs = sorted((workdir / "samples").glob("step_*.png")) if (workdir / "samples").exists() \
      else []
  if pngs:
    body.append(toc.h(2, "samples", f"Validation samples ({pngs[-1].stem})"))
    shots = sample_shots(pngs[-1])
    if shots is None:
      body.append(figure_png(pngs[-1], "Each row: degraded | restored | clean."))
    else:
      body.append(f"<p class=\"caption\">{_GRID_NOTE}</p>")
      for task, ss in shots.items():
        body.append(toc.h(3, anchor("samples", task), task,
                          f" <small>({esc(tasks_lib.FOCUS.get(task, 'mixed'))} band)</small>"))
        body.append(comparison_grid(ss, task))
  return page("FAPE-IR training run", "\n".join(body), toc=toc, subtitle=esc(workdir))


def figure_png(path: epath.Path, caption: str) -> str:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with path.open("rb") as f:
    image = np.asarray(Image.open(f).convert("RGB"))
  return (f"<figure>{img(figs.png_data_uri(image), alt=path.name, width=image.shape[1] * 2)}"
          f"<figcaption>{esc(caption)}</figcaption></figure>")


# ----------------------------------------------------------------------------------------------
# The ablation report
# ----------------------------------------------------------------------------------------------

def _gain(mean: float | None, spread: float | None) -> str:
  return NA if mean is None else f"{mean:+.2f} <small>({spread:.2f})</small>"


def ablation_report(result: Mapping[str, Any], spread_note: str = "") -> str:
  """The ablation page: a bar chart of the mean gain per variant (error bars: the seeds' range),
  the per-task gain table, the restored PSNR table, and how it was produced.

  `result` is `ablate_lib.build_table`'s summary (rows with `seed_mean_gains` for the error
  bars) plus `command`, `machine` and `date` when known.
  """
  tasks, rows = result["tasks"], result["rows"]
  names = [r["variant"] for r in rows]
  toc = Toc()
  seeds = ", ".join(str(s) for s in result["seeds"])
  body = [toc.h(2, "chart", "Mean gain per variant"),
          figure(figs.ablation_gain_figure(rows), "mean gain per variant",
                 f"Mean over seeds {esc(seeds)} of each run's mean PSNR gain over the degraded "
                 "validation images (Y channel, dB); the error bar spans the lowest to the "
                 "highest seed, the dots are the seeds, the dashed line is the full model.")]
  if spread_note:  # Markdown's `name` as <code>
    body.append("<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", esc(spread_note)) + "</p>")
  body.append(toc.h(2, "gains", "Gain per task"))
  by = {r["variant"]: r for r in rows}
  trs = [[esc(t), fmt(result["input"].get(t))] +
         [_gain(by[n]["gain"].get(t), by[n]["gain_spread"].get(t)) for n in names]
         for t in tasks]
  trs.append(["<b>mean</b>", fmt(result.get("input_mean"))] +
             [_gain(by[n]["mean_gain"], by[n]["mean_gain_spread"]) for n in names])
  trs.append(["Δ mean vs full", ""] + [
      NA if n == "full" or by[n]["delta_vs_full"] is None else f"{by[n]['delta_vs_full']:+.2f}"
      for n in names])
  body.append(table(["task", "input PSNR (dB)"] + names, trs, left=1))
  body.append(f"<p class=\"caption\">Gain of the restored over the degraded PSNR (dB), mean "
              f"over seeds, in brackets the spread ({esc(result.get('spread', ''))}).</p>")
  body.append(toc.h(2, "psnr", "Restored PSNR per task"))
  prs = [[esc(n)] + [fmt(by[n]["psnr"].get(t)) for t in tasks] + [fmt(by[n]["mean"])]
         for n in names]
  body.append(table(["variant"] + list(tasks) + ["mean"], prs, left=1))
  body.append("<p class=\"caption\">Restored PSNR on Y (dB), mean over seeds.</p>")
  body.append(toc.h(2, "variants", "Variants"))
  body.append(meta({n: by[n]["description"] for n in names}))
  m = result.get("machine") or {}
  body.append(toc.h(2, "about", "How it was produced"))
  body.append(meta({
      "command": result.get("command") or "(not recorded)", "commit": m.get("commit"),
      "date": result.get("date"),
      "machine": (f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('backend', '?')} "
                  f"x{m.get('devices', '?')} ({m.get('device_kind', '?')})") if m else None,
      "steps": f"{result['steps']} per run (config.total_steps {result['total_steps']})",
      "runs": f"{len(result.get('runs', []))} ({len(names)} variant(s) x "
              f"{len(result['seeds'])} seed(s): {seeds})"}))
  return page("FAPE-IR ablation", "\n".join(body), toc=toc,
              subtitle=f"equal budget: {esc(result['steps'])} steps per run, seeds {esc(seeds)}")
