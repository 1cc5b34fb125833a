"""The pictures of the HTML reports (`report_lib`): matplotlib plots and image crops, as PNGs.

Plots use matplotlib's Agg backend and come back as figures; `figure_data_uri` rasterises one to
a PNG data URI (no fonts are needed to view it) and closes it. Images are uint8 H x W x 3 arrays.

  routing_band_figure, routing_heatmap_figure, routing_task_figure   expert routing per layer
  training_scalars_figure(train_rows)     one panel per logged training scalar over steps
  validation_psnr_figure(val_rows, ...)   restored PSNR per task over steps, gain over steps
  ablation_gain_figure(rows)              mean gain per variant, seed range as error bars
  thumbnail, crop_window, crop, with_box  the zoomed crops of the comparison grids
"""

from __future__ import annotations

import base64
import io
from typing import Mapping, Sequence

import numpy as np

from fape_jax import tasks as tasks_lib

# Training scalars in panel order; any other numeric field of a train row follows them.
SCALAR_ORDER = ("loss", "rec", "mse", "adv", "freq", "lpips", "d_loss", "d_real", "d_fake",
                "g_grad_norm", "images_per_s")
# Fields of a metrics.jsonl row that are not curves.
NOT_CURVES = ("step", "split", "time", "data_index_sum")
_UNITS = {"images_per_s": "images/s"}
# One colour per task, the same in every plot (matplotlib's tab10).
_TASK_COLOURS = {t: f"C{i}" for i, t in enumerate(tasks_lib.TASKS)}


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


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
  plt = _pyplot()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
  plt.close(fig)
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------------------------
# Routing
# ----------------------------------------------------------------------------------------------

def short_layer(name: str) -> str:
  """'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q' -> 'd0.a0.t0.attn1.q'."""
  rep = (("down_blocks.", "d"), ("up_blocks.", "u"), ("mid_block.", "m."), ("attentions.", "a"),
         ("transformer_blocks.", "t"), ("to_out.0", "out"), ("to_", ""), ("resnets.", "r"))
  for a, b in rep:
    name = name.replace(a, b)
  return name


def routing_band_figure(routing: Mapping[str, Mapping[str, Sequence[float]]], title: str):
  """Per-layer weight on the high-frequency expert, one panel per band, one line per task."""
  plt = _pyplot()
  layers = sorted({l for r in routing.values() for l in r})
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharey=True)
  for ax, band in zip(axes, tasks_lib.BANDS):
    names = [t for t in routing if tasks_lib.FOCUS.get(t) == band]
    for t in names:
      ax.plot(range(len(layers)), [routing[t].get(l, [np.nan, np.nan])[1] for l in layers],
              marker="o", ms=3, lw=1, label=t, color=_TASK_COLOURS.get(t))
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
    ax.set_xticklabels([short_layer(layers[i]) for i in ticks], rotation=60, ha="right",
                       fontsize=6)
  fig.suptitle(title, fontsize=10)
  return fig


def routing_heatmap_figure(routing: Mapping[str, Mapping[str, Sequence[float]]],
                           title: str = "weight on the high-frequency expert"):
  """Layers (y) x tasks (x), colour = mean w_high: a row of one colour is a layer where every
  task prefers the same expert (issue 14, no dead experts)."""
  plt = _pyplot()
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
  ax.set_yticklabels([short_layer(l) for l in layers], fontsize=5)
  fig.colorbar(im, ax=ax, fraction=0.08, pad=0.03).set_label("w_high", fontsize=7)
  ax.set_title(title, fontsize=8)
  return fig


def routing_task_figure(routing: Mapping[str, Sequence[float]], title: str):
  """Stacked bars of [w_low, w_high] per adapted layer for one task."""
  plt = _pyplot()
  layers = sorted(routing)
  low = np.asarray([routing[l][0] for l in layers])
  high = np.asarray([routing[l][1] for l in layers])
  fig, ax = plt.subplots(figsize=(max(4.0, 0.18 * len(layers) + 1.5), 2.6))
  x = np.arange(len(layers))
  ax.bar(x, low, color="#4477aa", label="low expert")
  ax.bar(x, high, bottom=low, color="#ee6677", label="high expert")
  ax.set_ylim(0, 1.0)
  ax.set_xticks(x)
  ax.set_xticklabels([short_layer(l) for l in layers], rotation=90, fontsize=5)
  ax.set_ylabel("routing weight", fontsize=8)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7, loc="upper right")
  return fig


# ----------------------------------------------------------------------------------------------
# Training curves
# ----------------------------------------------------------------------------------------------

def last_per_step(rows: Sequence[Mapping], split: str) -> list[Mapping]:
  """The rows of one split by step; a step logged twice (replayed after a resume) keeps its last
  line, which is the one the run went on from."""
  by_step = {}
  for r in rows:
    if r.get("split") == split:
      by_step[int(r["step"])] = r
  return [by_step[s] for s in sorted(by_step)]


def scalar_names(train_rows: Sequence[Mapping]) -> tuple[list[str], list[str]]:
  """(names with a curve, names that are 0 on every row), in panel order."""
  names = {k for r in train_rows for k, v in r.items()
           if k not in NOT_CURVES and isinstance(v, (int, float))}
  ordered = [k for k in SCALAR_ORDER if k in names] + sorted(names - set(SCALAR_ORDER))
  zero = [k for k in ordered if all(r.get(k, 0) == 0 for r in train_rows)]
  return [k for k in ordered if k not in zero], zero


def _smooth(y: np.ndarray, n: int) -> np.ndarray:
  """Centred running mean over n points (edges use what they have): the trend under noisy steps."""
  ok = np.isfinite(y)
  k = np.ones(n)
  num = np.convolve(np.where(ok, y, 0.0), k, "same")
  den = np.convolve(ok.astype(float), k, "same")
  return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def training_scalars_figure(train_rows: Sequence[Mapping], names: Sequence[str]):
  """One small panel per training scalar over steps: the logged values, and their running mean
  when there are many; a log y axis where a positive series spans more than two decades."""
  plt = _pyplot()
  cols = min(4, len(names))
  nrows = -(-len(names) // cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols, 2.2 * nrows), squeeze=False)
  steps = np.asarray([r["step"] for r in train_rows], np.float64)
  window = max(1, len(steps) // 25)
  for ax, name in zip(axes.flat, names):
    y = np.asarray([r.get(name, np.nan) for r in train_rows], np.float64)
    if window > 1:
      ax.plot(steps, y, lw=0.6, color="#9bb7d4", label="logged")
      ax.plot(steps, _smooth(y, window), lw=1.4, color="#1f4e79",
              label=f"running mean ({window})")
    else:
      ax.plot(steps, y, lw=1.2, marker="o", ms=2.5, color="#1f4e79")
    fin = y[np.isfinite(y)]
    pos = fin[fin > 0]
    if fin.size and fin.min() >= 0 and pos.size and pos.max() / pos.min() > 100:
      ax.set_yscale("log")  # e.g. the frequency loss: 0 at step 1, then 1e-14 to 1e-11
    ax.set_title(name + (f" ({_UNITS[name]})" if name in _UNITS else ""), fontsize=9)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("step", fontsize=7)
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  if window > 1:
    axes.flat[0].legend(fontsize=6)
  fig.tight_layout()
  return fig


def validation_psnr_figure(val_rows: Sequence[Mapping],
                           degraded: Mapping[str, float] | None = None):
  """Left: restored PSNR per task over steps (dashed: the degraded input's PSNR of the same
  images, from validation.json). Right: the mean gain over the degraded input."""
  plt = _pyplot()
  fig, (ax, axg) = plt.subplots(1, 2, figsize=(12, 3.6),
                                gridspec_kw={"width_ratios": [2.2, 1]})
  steps = [r["step"] for r in val_rows]
  tasks = [t for t in tasks_lib.TASKS if any(f"psnr/{t}" in r for r in val_rows)]
  tasks += sorted({k[5:] for r in val_rows for k in r if k.startswith("psnr/")} - set(tasks) -
                  {"mean_gain"})
  for t in tasks:
    c = _TASK_COLOURS.get(t)
    ax.plot(steps, [r.get(f"psnr/{t}", np.nan) for r in val_rows], marker="o", ms=3, lw=1.2,
            color=c, label=t)
    if degraded and t in degraded:
      ax.axhline(degraded[t], color=c, lw=0.8, ls="--", alpha=0.7)
  ax.set_xlabel("step")
  ax.set_ylabel("restored PSNR (dB, Y)")
  ax.set_title("validation PSNR per task" + (" (dashed: degraded input)" if degraded else ""),
               fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  gains = [r.get("psnr/mean_gain", np.nan) for r in val_rows]
  axg.plot(steps, gains, marker="o", ms=3, lw=1.4, color="#1f4e79")
  axg.axhline(0.0, color="#999", lw=0.8)
  axg.set_xlabel("step")
  axg.set_ylabel("dB")
  axg.set_title("mean gain over the degraded input", fontsize=10)
  axg.grid(alpha=0.3)
  fig.tight_layout()
  return fig


# ----------------------------------------------------------------------------------------------
# Ablation
# ----------------------------------------------------------------------------------------------

def ablation_gain_figure(rows: Sequence[Mapping]):
  """Mean PSNR gain per variant (mean over seeds), error bars from the lowest to the highest seed,
  each seed as a dot; the full model's bar in a darker colour with its level as a line."""
  plt = _pyplot()
  names = [r["variant"] for r in rows]
  means = np.asarray([r["mean_gain"] for r in rows], np.float64)
  seeds = [np.asarray(r.get("seed_mean_gains") or [r["mean_gain"]], np.float64) for r in rows]
  lo = means - np.asarray([s.min() for s in seeds])
  hi = np.asarray([s.max() for s in seeds]) - means
  fig, ax = plt.subplots(figsize=(max(5.0, 1.0 + 0.9 * len(rows)), 3.6))
  x = np.arange(len(rows))
  colours = ["#1f4e79" if n == "full" else "#7fa7cf" for n in names]
  ax.bar(x, means, color=colours, yerr=[lo, hi], capsize=5, ecolor="#333", width=0.65)
  for i, s in enumerate(seeds):
    if s.size > 1:
      ax.scatter(np.full(s.size, x[i]), s, s=10, color="#333", zorder=3)
  if "full" in names:
    ax.axhline(means[names.index("full")], color="#1f4e79", lw=0.8, ls="--")
  ax.axhline(0.0, color="#999", lw=0.8)
  ax.set_xticks(x)
  ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
  ax.set_ylabel("mean PSNR gain (dB)")
  ax.set_title("mean gain over the degraded input; bars: seed range, dots: seeds", fontsize=9)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  return fig


# ----------------------------------------------------------------------------------------------
# Image crops
# ----------------------------------------------------------------------------------------------

def thumbnail(image: np.ndarray, max_side: int) -> np.ndarray:
  """Shrinks (area averaging) so the long side is <= max_side: benchmark photos would make the
  report tens of MB; small images stay as they are and the browser enlarges them instead."""
  image = np.asarray(image, np.uint8)
  h, w = image.shape[:2]
  if max(h, w) <= max_side:
    return image
  from PIL import Image  # pylint: disable=g-import-not-at-top
  s = max_side / max(h, w)
  size = (max(1, round(w * s)), max(1, round(h * s)))
  return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def crop_side(h: int, w: int) -> int:
  """A quarter of the short side, 8 to 128 px: small enough to show what the thumbnail hides."""
  return int(min(min(h, w), max(8, min(128, min(h, w) // 4))))


def crop_window(a: np.ndarray, b: np.ndarray, side: int) -> tuple[int, int, float]:
  """(y, x, mean |a - b|) of the side x side window where a and b differ most (summed absolute
  difference over the channels, via an integral image); the top-left window when they are equal.
  """
  d = np.abs(a.astype(np.int32) - b.astype(np.int32)).sum(-1).astype(np.float64)
  s = np.pad(d.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
  sums = s[side:, side:] - s[:-side, side:] - s[side:, :-side] + s[:-side, :-side]
  y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
  return int(y), int(x), float(sums[y, x] / (side * side * a.shape[-1]))


def crop(image: np.ndarray, y: int, x: int, side: int) -> np.ndarray:
  return np.asarray(image)[y:y + side, x:x + side]


def with_box(image: np.ndarray, box: tuple[float, float, float, float],
             colour=(230, 30, 30)) -> np.ndarray:
  """A copy of `image` with the rectangle (y0, x0, y1, x1) outlined (PIL's ImageDraw)."""
  from PIL import Image, ImageDraw  # pylint: disable=g-import-not-at-top
  pil = Image.fromarray(np.asarray(image, np.uint8))
  y0, x0, y1, x1 = box
  width = max(1, round(min(pil.size) / 100))
  ImageDraw.Draw(pil).rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=colour,
                                width=width)
  return np.asarray(pil)
