"""Self-contained HTML reports: tables, image grids and plots embedded in one file.

Everything a report shows is inside the file: images are base64 PNG data URIs, plots are
matplotlib (Agg backend) PNGs, the CSS is inline, and there is no
JavaScript, so the report opens from disk in any browser with no server and no network.

  evaluation_report(metrics, samples)   the `evaluate` report (per-set tables, per-task sections
                                         with before / after / ground-truth grids, plan texts and
                                         routing plots per task and band, a layer x task
                                         routing heatmap per set)
  ablation_report(result)               the `ablate` report (Table-4-style comparison)
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any, Mapping, Sequence

import numpy as np

from fape_jax import tasks as tasks_lib

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif;
       margin: 2em auto; max-width: 1200px; color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; }
h3 { margin-top: 1.6em; }
table { border-collapse: collapse; margin: .8em 0; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
tr.best td { font-weight: bold; }
figure { margin: .6em 0; display: inline-block; vertical-align: top; }
figcaption { font-size: .8em; color: #555; max-width: 720px; }
img.grid { image-rendering: pixelated; border: 1px solid #ccc; }
code, .plan { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: .85em; }
.plan { background: #f7f7f7; padding: .3em .5em; display: block; white-space: pre-wrap; }
nav a { margin-right: .8em; }
"""

_NA = "&ndash;"


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

def esc(x: Any) -> str:
  return html.escape(str(x), quote=True)


def png_data_uri(image: np.ndarray) -> str:
  """uint8 H x W (x 3) array -> 'data:image/png;base64,...'."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG", optimize=True)
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure_data_uri(fig, dpi: int = 110) -> str:
  """A matplotlib figure as a PNG data URI (rasterised: no fonts needed to view it), closed.

  PNG rather than SVG: with glyphs drawn as paths (so no font is needed) a routing plot's SVG is
  ~115 KB, its PNG ~30 KB.
  """
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def img(uri: str, *, alt: str, width: int | None = None, cls: str = "") -> str:
  w = f' width="{int(width)}"' if width else ""
  c = f' class="{esc(cls)}"' if cls else ""
  return f'<img src="{uri}" alt="{esc(alt)}"{w}{c}>'


def fmt(x: Any, digits: int = 2) -> str:
  if x is None or (isinstance(x, float) and not np.isfinite(x)):
    return _NA if x is None else esc(f"{x}")
  if isinstance(x, float):
    return f"{x:.{digits}f}"
  return esc(x)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, left: int = 1,
          highlight: Sequence[bool] | None = None) -> str:
  """An HTML table; the first `left` columns are left-aligned text, cells already formatted."""
  cls = lambda i: ' class="l"' if i < left else ""
  out = ["<table>", "<tr>" + "".join(f"<th{cls(i)}>{esc(h)}</th>"
                                      for i, h in enumerate(header)) + "</tr>"]
  for r, row in enumerate(rows):
    tr = '<tr class="best">' if highlight is not None and highlight[r] else "<tr>"
    out.append(tr + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>")
  out.append("</table>")
  return "\n".join(out)


def page(title: str, body: str) -> str:
  return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
          f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
          f"<h1>{esc(title)}</h1>\n{body}\n</body>\n</html>\n")


def anchor(*parts: str) -> str:
  """An HTML id from names ('validation', 'light_enhancement+dehazing' -> 'validation-...')."""
  return "-".join("".join(c if c.isalnum() or c in "_-" else "_" for c in p) for p in parts)


# ----------------------------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------------------------

def _short_layer(name: str) -> str:
  """'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q' -> 'd0.a0.t0.attn1.q'."""
  rep = (("down_blocks.", "d"), ("up_blocks.", "u"), ("mid_block.", "m."), ("attentions.", "a"),
         ("transformer_blocks.", "t"), ("to_out.0", "out"), ("to_", ""), ("resnets.", "r"))
  for a, b in rep:
    name = name.replace(a, b)
  return name


def routing_band_figure(routing: Mapping[str, Mapping[str, Sequence[float]]], title: str):
  """Per-layer weight on the high-frequency expert, one panel per band, one line per task."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  layers = sorted({l for r in routing.values() for l in r})
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
  for ax, band in zip(axes, tasks_lib.BANDS):
    names = [t for t in routing if tasks_lib.FOCUS.get(t) == band]
    for t in names:
      ax.plot(range(len(layers)), [routing[t].get(l, [np.nan, np.nan])[1] for l in layers],
              marker="o", ms=3, lw=1, label=t)
    ax.set_title(f"{band}-frequency tasks")
    ax.set_xlabel("adapted layer")
    ax.set_ylim(-0.05, 1.05)
    ax.axhline(0.5, color="#999", lw=0.5, ls="--")
    if names:
      ax.legend(fontsize=7, loc="best")
  axes[0].set_ylabel("weight on high-frequency expert")
  ticks = range(0, len(layers), max(1, len(layers) // 12))
  for ax in axes:
    ax.set_xticks(list(ticks))
    ax.set_xticklabels([_short_layer(layers[i]) for i in ticks], rotation=60, ha="right",
                       fontsize=6)
  fig.suptitle(title, fontsize=10)
  return fig


def routing_heatmap_figure(routing: Mapping[str, Mapping[str, Sequence[float]]],
                           title: str = "weight on the high-frequency expert"):
  """Layers (y) x tasks (x), colour = mean w_high: a row of one colour is a layer where every
  task prefers the same expert (issue 14, no dead experts)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  tasks = sorted(routing, key=lambda t: (tasks_lib.TASK_ID.get(t, len(tasks_lib.TASKS)), t))
  layers = sorted({l for r in routing.values() for l in r})
  grid = np.asarray([[routing[t].get(l, [np.nan, np.nan])[1] for t in tasks] for l in layers],
                    np.float32).reshape(len(layers), len(tasks))
  fig, ax = plt.subplots(figsize=(2.0 + 0.45 * len(tasks), 1.2 + 0.14 * max(len(layers), 4)))
  im = ax.imshow(grid, cmap="coolwarm", vmin=0.0, vmax=1.0, aspect="auto",
                 interpolation="nearest")
  ax.set_xticks(range(len(tasks)))
  ax.set_xticklabels([f"{t} ({tasks_lib.FOCUS[t]})" if t in tasks_lib.FOCUS else t
                      for t in tasks], rotation=60, ha="right", fontsize=6)
  ax.set_yticks(range(len(layers)))
  ax.set_yticklabels([_short_layer(l) for l in layers], fontsize=5)
  fig.colorbar(im, ax=ax, fraction=0.08, pad=0.03).set_label("w_high", fontsize=7)
  ax.set_title(title, fontsize=8)
  return fig


def routing_task_figure(routing: Mapping[str, Sequence[float]], title: str):
  """Stacked bars of [w_low, w_high] per adapted layer for one task."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  layers = sorted(routing)
  low = np.asarray([routing[l][0] for l in layers])
  high = np.asarray([routing[l][1] for l in layers])
  fig, ax = plt.subplots(figsize=(max(4.0, 0.18 * len(layers) + 1.5), 2.6))
  x = np.arange(len(layers))
  ax.bar(x, low, color="#4477aa", label="low expert")
  ax.bar(x, high, bottom=low, color="#ee6677", label="high expert")
  ax.set_ylim(0, 1.0)
  ax.set_xticks(x)
  ax.set_xticklabels([_short_layer(l) for l in layers], rotation=90, fontsize=5)
  ax.set_ylabel("routing weight", fontsize=8)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7, loc="upper right")
  return fig


def routing_heatmap_section(routing: Mapping[str, Mapping[str, Sequence[float]]],
                            name: str) -> str:
  """The heatmap as a figure, captioned with `validation.routing_summary` of the same routing."""
  from fape_jax import validation  # pylint: disable=g-import-not-at-top  (pulls in jax)
  summary = validation.routing_summary(routing)
  dead = summary["single_expert_layer_names"]
  listed = (": " + ", ".join(f"<code>{esc(_short_layer(l))}</code>" for l in dead[:12]) +
            (" ..." if len(dead) > 12 else "")) if dead else ""
  return ("<figure>" + img(figure_data_uri(routing_heatmap_figure(
      routing, f"{name}: weight on the high-frequency expert")), alt=f"{name} routing heatmap") +
          f"<figcaption>{esc(validation.format_routing_summary(summary))}. Layers where every "
          f"task has the same dominant expert{listed or ': none'}.</figcaption></figure>")


# ----------------------------------------------------------------------------------------------
# The evaluation report
# ----------------------------------------------------------------------------------------------

def _thumbnail(image: np.ndarray, max_side: int) -> np.ndarray:
  """Shrinks (area averaging) so the long side is <= max_side: benchmark photos would make the
  report tens of MB; tiny images stay as they are and are enlarged by the browser instead."""
  h, w = image.shape[:2]
  if max(h, w) <= max_side:
    return image
  from PIL import Image  # pylint: disable=g-import-not-at-top
  s = max_side / max(h, w)
  size = (max(1, round(w * s)), max(1, round(h * s)))
  return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def _grid(triples: Sequence[Sequence[np.ndarray]], gap: int = 4,
          max_side: int = 256) -> np.ndarray:
  """Rows of (degraded, restored, clean) uint8 images side by side, white gaps between."""
  rows = []
  for triple in triples:
    triple = [_thumbnail(np.asarray(t, np.uint8), max_side) for t in triple]
    h = max(t.shape[0] for t in triple)
    cells = []
    for t in triple:
      t = np.pad(t, ((0, h - t.shape[0]), (0, 0), (0, 0)), constant_values=255)
      cells += [t, np.full((h, gap, 3), 255, np.uint8)]
    rows.append(np.concatenate(cells[:-1], axis=1))
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0)), constant_values=255)
          for r in rows]
  return np.concatenate(rows, axis=0)[:-gap]


def _method_rows(task_metrics: Mapping[str, Any]) -> tuple[list[list[str]], list[bool]]:
  methods = task_metrics["methods"]
  best = max(methods, key=lambda m: methods[m]["psnr"])
  rows, marks = [], []
  for name, m in methods.items():
    rows.append([esc(name), fmt(m["psnr"]), fmt(m["ssim"], 4), fmt(m.get("lpips"), 4)])
    marks.append(name == best)
  return rows, marks


def _set_summary(name: str, s: Mapping[str, Any]) -> str:
  zero_shot = ", zero-shot" if s["kind"] == "mixes" else ""
  out = [f'<h2 id="{anchor(name)}">{esc(name)} ({s["n"]} images{zero_shot})</h2>']
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
                 (f"{esc(bc[0])} {fmt(bc[1]['psnr'])} / {fmt(bc[1]['ssim'], 4)}" if bc else _NA),
                 esc(planned)])
  mean = s["mean"]
  rows.append(["<b>mean</b>", str(s["n"]), fmt(mean["input"]["psnr"]),
               fmt(mean["input"]["ssim"], 4), fmt(mean["restored"]["psnr"]),
               fmt(mean["restored"]["ssim"], 4), fmt(mean["restored"].get("lpips"), 4), "", ""])
  out.append(table(["task", "n", "input PSNR", "input SSIM", "restored PSNR", "restored SSIM",
                    "LPIPS", "best classical (PSNR / SSIM)", "planned as"], rows, left=1))
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
                      samples: Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]]) -> str:
  """The whole evaluation report as an HTML string.

  `samples[set][task]` = [{"degraded", "restored", "clean": uint8 HxWx3, "plan": str, "id": str}].
  """
  run = metrics["run"]
  body = [f"<p>Run <code>{esc(run['workdir'])}</code>, checkpoint step {esc(run['step'])}, "
          f"config variant <code>{esc(run.get('variant', '?'))}</code>, planner "
          f"<code>{esc(run.get('planner', '?'))}</code>. PSNR and SSIM on the Y channel (BT.601) "
          "at native resolution; LPIPS where weights were configured. Rows in bold are the best "
          "PSNR per task.</p>"]
  body.append("<nav>" + "".join(f'<a href="#{anchor(n)}">{esc(n)}</a>'
                                for n in metrics["sets"]) + "</nav>")
  for name, why in metrics.get("failed", {}).items():
    body.append(f"<p><b>Set {esc(name)} failed</b>: {esc(why)}</p>")
  for name, s in metrics["sets"].items():
    body.append(_set_summary(name, s))
    routing = {t: v["routing"] for t, v in s["tasks"].items() if v.get("routing")}
    if routing and s["kind"] != "mixes":
      body.append("<figure>" + img(figure_data_uri(routing_band_figure(
          routing, f"{name}: per-layer routing by band")), alt=f"{name} routing by band") +
                  "<figcaption>Mean weight on the high-frequency expert per adapted layer, "
                  "low-band tasks (left) and high-band tasks (right).</figcaption></figure>")
    if routing:
      body.append(routing_heatmap_section(routing, name))
    for task, t in s["tasks"].items():
      body.append(f"<section id=\"{anchor(name, task)}\">")
      band = tasks_lib.FOCUS.get(task, "mixed")
      body.append(f"<h3>{esc(name)} / {esc(task)} <small>({esc(band)} band)</small></h3>")
      rows, marks = _method_rows(t)
      body.append(table(["method", "PSNR", "SSIM", "LPIPS"], rows, left=1, highlight=marks))
      shots = samples.get(name, {}).get(task, [])
      if shots:
        grid = _grid([(x["degraded"], x["restored"], x["clean"]) for x in shots])
        scale = max(1, 384 // max(grid.shape[1], 1))
        body.append("<figure>" + img(png_data_uri(grid), alt=f"{task} samples", cls="grid",
                                     width=grid.shape[1] * scale) +
                    "<figcaption>Each row: degraded input | restored | ground truth.</figcaption>"
                    "</figure>")
        body.append("".join(f'<span class="plan">{esc(x["id"])}: {esc(x["plan"])}</span>'
                            for x in shots))
      if t.get("routing"):
        body.append("<figure>" + img(figure_data_uri(routing_task_figure(
            t["routing"], f"{task}: routing per layer")), alt=f"{task} routing") + "</figure>")
      body.append("</section>")
  return page("FAPE-IR evaluation", "\n".join(body))


# ----------------------------------------------------------------------------------------------
# The ablation report
# ----------------------------------------------------------------------------------------------

def ablation_report(result: Mapping[str, Any]) -> str:
  """Table-4 form: rows = variants, columns = per-task PSNR, mean, and the change vs full."""
  tasks = result["tasks"]
  rows = []
  for v in result["rows"]:
    cells = [esc(v["variant"]), esc(v["description"])]
    cells += [fmt(v["psnr"].get(t)) for t in tasks]
    cells += [fmt(v["mean"]), _NA if v["delta_vs_full"] is None else f"{v['delta_vs_full']:+.2f}"]
    rows.append(cells)
  if result.get("input"):
    rows.append(["input", "degraded input, no restoration"] +
                [fmt(result["input"].get(t)) for t in tasks] +
                [fmt(result["input_mean"]), ""])
  body = [f"<p>Equal budget: {esc(result['total_steps'])} steps per variant, validation PSNR "
          "(Y channel, dB) on the run's validation split.</p>",
          table(["variant", "what changes"] + list(tasks) + ["mean", "Δ vs full"], rows, left=2)]
  return page("FAPE-IR ablation", "\n".join(body))
