"""Renders the result tables of BENCHMARKS.md from bench/results/*.json.

  .venv/bin/python bench/report.py            # rewrites the generated blocks in BENCHMARKS.md
  .venv/bin/python bench/report.py --check    # exit 1 if BENCHMARKS.md is out of date

Each generated block sits between `<!-- results:NAME -->` and `<!-- /results -->` (NAME = a
result file's stem, e.g. train_step); everything outside the blocks is hand-written analysis and
left alone. Numbers therefore reach BENCHMARKS.md only from the JSON the benchmarks wrote.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, Callable

import measure

DOC = measure.REPO / "BENCHMARKS.md"
_BLOCK = re.compile(r"(<!-- results:([\w\-]+) -->\n)(.*?)(<!-- /results -->)", re.S)


def _f(x: Any, digits: int = 3) -> str:
  if x is None:
    return "—"
  if isinstance(x, int) and not isinstance(x, bool) and abs(x) >= 1e5:
    x = float(x)
  if isinstance(x, float):
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 1e-3):
      return f"{x:.3g}"
    return f"{x:.{digits}g}"
  return str(x)


def _mib(b: Any) -> str:
  return "—" if not b else f"{b / 2 ** 20:,.0f}"


# Benchmarks whose results record a config summary, and the module that computes that summary.
_SUMMARY_MODULES = {"train_step": "train_step", "restore": "restore"}


def current_config(command: str):
  """The config a recorded command would build from `configs/` today (None if it cannot tell).

  Understands `--config=configs/base.py[:variant]` and dotted overrides `--config.a.b=value`.
  """
  import ast  # pylint: disable=g-import-not-at-top
  import shlex  # pylint: disable=g-import-not-at-top
  from configs import base  # pylint: disable=g-import-not-at-top
  variant, overrides = None, []
  args = []
  for tok in shlex.split(command)[2:]:
    # Older results recorded `--config.mesh.shape=(-1, 1)` unquoted: glue such pieces back.
    if args and not tok.startswith("-"):
      args[-1] += " " + tok
    else:
      args.append(tok)
  for arg in args:
    if arg.startswith("--config="):
      path, _, variant = arg.split("=", 1)[1].partition(":")
      if not path.endswith("configs/base.py"):
        return None
      variant = variant or None
    elif arg.startswith("--config."):
      key, _, value = arg[len("--config."):].partition("=")
      overrides.append((key, value))
  config = base.get_config(variant)
  for key, value in overrides:
    *parents, leaf = key.split(".")
    node = config
    for p in parents:
      node = node[p]
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass  # a plain string
    try:
      node[leaf] = value
    except (TypeError, KeyError, AttributeError):
      return None
  return config


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(d, dict):
    return {prefix: d}
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def config_status(r: dict) -> dict[str, Any] | None:
  """Digest of the config a result measured, the same config's digest now, and what differs.

  None for benchmarks that record no comparable config summary.
  """
  module = _SUMMARY_MODULES.get(r.get("benchmark"))
  if module is None or "config" not in r:
    return None
  recorded = json.loads(json.dumps(r["config"], default=list))
  status = {"measured": measure.config_digest(recorded), "now": None, "changed": []}
  config = current_config(r["command"])
  if config is None:
    return status
  summary_fn = getattr(__import__(module), "config_summary")
  now = json.loads(json.dumps(summary_fn(config), default=list))
  status["now"] = measure.config_digest(now)
  a, b = _flat(recorded), _flat(now)
  status["changed"] = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k,
                                                                                         "<absent>"))
  return status


def _stale_lines(r: dict) -> list[str]:
  st = config_status(r)
  if st is None:
    return []
  if st["now"] is None:
    return [f"Config digest `{st['measured']}` (could not rebuild this command's config from "
            "configs/ to compare).", ""]
  if st["now"] == st["measured"]:
    return [f"Config digest `{st['measured']}`: the same as configs/ builds it today.", ""]
  changed = ", ".join(st["changed"][:8]) + (" ..." if len(st["changed"]) > 8 else "")
  return [f"**STALE: measured on config digest `{st['measured']}`; configs/ now gives "
          f"`{st['now']}` (changed: {changed}). Re-run the command below, then "
          "bench/report.py.**", ""]


def _header(r: dict) -> list[str]:
  m = r["machine"]
  load_end = r.get("load_average_end")
  where = f"{m.get('device_kind', 'cpu')}" if m.get("backend", "cpu") != "cpu" else m["cpu"]
  cores = m["cores"] if m.get("usable_cores") in (None, m["cores"]) else \
      f"{m['usable_cores']} of {m['cores']}"
  lines = [f"Machine: {where}, {cores} cores"
           + (f" ({m['backend']}, {m.get('devices', 1)} device(s))" if m.get("backend") else "")
           + f"; {m['date']}; commit `{m['commit']}`; load average "
           f"{m['load_average_start']} at start" + (f", {load_end} at end" if load_end else ""),
           "", f"Command: `{r['command']}`", ""]
  return _stale_lines(r) + lines


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
  out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
  out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in row) + " |"
          for row in rows]
  return out


def train_step(r: dict) -> list[str]:
  c = r["config"]
  unet = c["unet"]
  lines = _header(r)
  lines.append(f"Config `{c['variant']}`: UNet blocks {unet['block_out_channels']}, "
               f"{'VAE + ' if c['vae'] else 'pixel space, '}{c['dtype']}, batch {c['batch_size']} "
               f"x {c['crop']}^2, plan tokens {c['plan_tokens']}, LoRA ranks {c['lora']['ranks']} "
               f"({c['lora']['band_mode']}), train_base_unet={c['train_base_unet']}, "
               f"generator optimiser {c['optim_g']}, LPIPS {'on' if c['lpips'] else 'off'}.")
  lines.append("")
  peak = r["peak_matmul"]
  rows = []
  lib = r["library_step"]
  rows.append(["JAX library step (gen + disc, all losses)", lib["step_s"], lib["images_per_s"],
               lib["flops_per_step"], lib["flop_per_s"], lib["flop_fraction"], lib["compile_s"]])
  if "matched_step" in r:
    m = r["matched_step"]
    rows.append(["JAX matched step (gen, MSE + freq, AdamW)", m["step_s"], m["images_per_s"],
                 m["flops_per_step"], m["flop_per_s"], m["flop_fraction"], m["compile_s"]])
  t = r.get("torch")
  if t:
    b = c["batch_size"]
    te = r["torch_eager_step_s"]
    tf = t["flops_per_step_torch_counter"]
    rows.append(["PyTorch eager reference (same work as matched)", te, b / te, tf, None, None,
                 None])
    if r.get("torch_compile_step_s"):
      tc = r["torch_compile_step_s"]
      rows.append(["PyTorch torch.compile reference", tc, b / tc, tf, None, None,
                   t.get("compile_s")])
  rows.append([f"matmul peak ({peak['n']}^3 {peak['dtype']})", r["timings"]["matmul_peak"]
               ["median_s"], None, 2.0 * peak["n"] ** 3, peak["flop_per_s"], 1.0, None])
  lines += _table(["step", "s/step", "images/s", "FLOPs/step", "FLOP/s", "of peak", "compile s"],
                  rows)
  lines.append("")
  if r.get("speedup") is not None:
    lines.append(f"Speedup torch eager / JAX matched: **{r['speedup']:.2f}x**"
                 + (f"; torch.compile / JAX matched: {r['speedup_compile']:.2f}x"
                    if r.get("speedup_compile") else "")
                 + (f" (torch.compile: {t['compile_error']})" if t and t.get("compile_error")
                    else "") + ".")
    stats = r.get("speedup_stats") or {}
    if stats:
      lines.append("Same ratios " + "; ".join(
          f"{k}: of medians {v['of_medians']:.2f}x, of fastest calls {v['of_fastest']:.2f}x, "
          f"median per round {v['median_per_round']:.2f}x"
          + (f", of CPU time {v['of_cpu_medians']:.2f}x" if v.get("of_cpu_medians") else "")
          for k, v in stats.items()) + ".")
    loads = [x for v in r["timings"].values() for x in v.get("load", [])]
    cores = r["machine"].get("usable_cores") or r["machine"]["cores"]
    if loads and max(loads) > cores:
      lines.append(f"**Load average {min(loads)}-{max(loads)} on {cores} usable core(s) during "
                   "the timed rounds: the torch ratios above are not a framework comparison** "
                   "(PyTorch's OpenMP threads spin-wait for descheduled peers, see Load); even the "
                   "fastest calls are disturbed, and the matmul peak is measured low, so `of "
                   "peak` reads high.")
  lines.append(f"FLOPs: XLA cost analysis of the compiled step (all ops); the torch column "
               f"counts matmul/conv/attention only (FlopCounterMode). Peak memory: max RSS "
               f"{_mib(r['peak_memory']['max_rss_bytes'])} MiB"
               + (f", device {_mib(r['peak_memory']['device_bytes'])} MiB"
                  if r["peak_memory"].get("device_bytes") else "")
               + f"; XLA temporaries of the library step {_mib((lib.get('xla_memory') or {}).get('temp_size_in_bytes'))} MiB. "
               f"Library step init {lib['init_s']:.0f} s.")
  if "profile" in r:
    lines.append("")
    for name, prof in r["profile"].items():
      if "by_kind" not in prof:
        continue
      kinds = ", ".join(f"{k['name']} {k['pct']:.0f} %" for k in prof["by_kind"][:6])
      phases = ", ".join(f"{k['name']} {k['pct']:.0f} %" for k in prof["by_phase"])
      lines.append(f"Op time of the {name.replace('_', ' ')} (median of {prof.get('runs', 1)} "
                   f"traced steps, {prof['op_time_ms_total']:.0f} ms summed over threads): "
                   f"{kinds}; by phase: {phases}.")
  return lines


def restore(r: dict) -> list[str]:
  c = r["config"]
  lines = _header(r)
  lines.append(f"Executor of config `{c['variant']}` (UNet blocks {c['unet']['block_out_channels']}"
               f", {'VAE, ' if c['vae'] else 'pixel space, '}{c['dtype']}), {r['weights']}. "
               f"Tiling: {r['tiling']}.")
  lines.append("")
  rows = []
  jax_latency = {}
  for e in r["executor"]:
    if e.get("framework", "jax") == "jax" and e.get("latency_s"):
      jax_latency[(e["size"], e["mode"])] = e["latency_s"]
  for e in r["executor"]:
    xm = e.get("xla_memory") or {}
    note = e.get("skipped") or e.get("error") or ""
    framework = e.get("framework", "jax")
    ratio = None  # PyTorch latency / JAX latency: > 1 means JAX is faster
    if framework == "torch" and e.get("latency_s") and (e["size"], e["mode"]) in jax_latency:
      ratio = e["latency_s"] / jax_latency[(e["size"], e["mode"])]
    rows.append([f"{e['size']}^2", e["mode"], framework, e.get("tiles"),
                 str(e.get("executor_call_shape", "")), e.get("latency_s"),
                 e.get("first_image_s"), e.get("compile_s"), ratio,
                 _mib(e.get("max_rss_bytes")), _mib(xm.get("temp_size_in_bytes")),
                 _mib(e.get("device_peak_bytes")), note])
  lines += _table(["image", "mode", "framework", "tiles", "call shape", "latency s",
                   "first image s (compile incl.)", "compile s", "torch / jax latency",
                   "max RSS MiB", "XLA temp MiB", "device peak MiB", "note"], rows)
  p = r.get("planning") or {}
  if "per_size" in p:
    lines.append("")
    per = ", ".join(f"{s}^2 {v['latency_s']:.3f} s" for s, v in p["per_size"].items())
    lines.append(f"Planning per image (rule-planner hints + MiniLM plan encoding, host side): "
                 f"{per}; loading planner and encoder {p['load_s']:.1f} s once.")
  elif p.get("skipped"):
    lines.append("")
    lines.append(f"Planning: not timed ({p['skipped']}).")
  return lines


def pipeline(r: dict) -> list[str]:
  c = r["config"]
  lines = _header(r)
  lines.append(f"Config `{c['variant']}`: {c['train_pairs']} training pairs in "
               f"`{c['data_dir']}/{c['name']}`, batch {c['batch_size']} x {c['crop']}^2, "
               f"{c['read_threads']} read threads, prefetch {c['prefetch']}, plans "
               f"{'joined' if c['plans'] else 'off'}.")
  lines.append("")
  s = r["step"]
  rows = [["Grain training pipeline", r["pipeline_batches_per_s"], r["pipeline_images_per_s"],
           ""],
          ["train step consumption (library step)", r["step_batches_per_s"],
           r["step_batches_per_s"] * c["batch_size"], s["source"]],
          ["**headroom** (pipeline / step)", r["headroom"], None, "goal >= 3"]]
  if s.get("fed_step_s"):
    rows.append(["train step fed by the live pipeline", 1.0 / s["fed_step_s"],
                 c["batch_size"] / s["fed_step_s"],
                 f"fixed-batch step {s['step_s']:.3f} s vs fed {s['fed_step_s']:.3f} s"])
  lines += _table(["what", "batches/s", "images/s", "note"], rows)
  lines.append("")
  pr = r["pairs_reads"]
  reads = f"Random reads: pairs store {pr['records_per_s']:,.0f} records/s"
  if r.get("plan_reads"):
    reads += f", plan store {r['plan_reads']['records_per_s']:,.0f} records/s"
  lines.append(reads + f" (single thread, {pr['records_per_pass']} random records per pass, "
               "median of passes).")
  return lines


def step_changes() -> list[str]:
  """One row per bench/results/whatif_*.json in the before/after form: landed changes (before =
  the previous path) and tried ones that were not kept (before = the library)."""
  rows = []
  for path in sorted(measure.RESULTS.glob("whatif_*.json")):
    r = json.loads(path.read_text())
    if "step_s_before" not in r:
      continue
    agree = r["step3_metrics_before_vs_after"]
    rows.append([f"`{r['change']}`", "kept" if r.get("landed") else "not kept",
                 r["machine"]["date"][:16].replace("T", " "),
                 r["step_s_before"], r["step_s_after"], f"**{r['speedup']:.3f}**",
                 r.get("matched_step_s_before"), r.get("matched_step_s_after"),
                 f"**{r['matched_speedup']:.3f}**" if r.get("matched_speedup") else "—",
                 f"{r['speedup_stats']['of_fastest']:.3f}",
                 _f(r["speedup_stats"].get("of_cpu_medians")),
                 f"{r['machine']['load_average_start'][0]}-{r['load_average_end'][0]}",
                 f"{agree['loss'][0]:.7g} / {agree['loss'][1]:.7g}",
                 f"`{r['command'].split('whatif.py', 1)[-1].strip()}`"])
  return _table(["change", "in the library", "date (UTC)", "library s before",
                 "library s after", "library speedup", "matched s before", "matched s after",
                 "matched speedup", "library speedup of fastest calls",
                 "library speedup in CPU time", "load", "step-3 loss before / after",
                 "whatif.py flags"], rows)


def whatif(r: dict) -> list[str]:
  lines = _header(r)
  agree = r["step3_metrics_as_is_vs_changed"]
  lines += _table(["change", "s/step as is", "s/step changed", "speedup", "FLOPs as is",
                   "FLOPs changed", "step-3 loss / L_freq as is", "changed"],
                  [[f"`{r['change']}`", r["step_s_as_is"], r["step_s_changed"], r["speedup"],
                    r["flops_as_is"], r["flops_changed"],
                    f"{agree['loss'][0]:.7g} / {agree['freq'][0]:.4g}",
                    f"{agree['loss'][1]:.7g} / {agree['freq'][1]:.4g}"]])
  return lines


def kernels(r: dict) -> list[str]:
  lines = _header(r)
  rows = [[n, c["s"], c["flops"], c["flop_per_s"], c["of_peak"]] for n, c in r["cases"].items()]
  lines += _table(["op (level, B x H x W x C, 3x3 conv C -> C)", "s", "FLOPs", "FLOP/s",
                   "of peak"], rows)
  return lines


RENDERERS: dict[str, Callable[[dict], list[str]]] = {
    "train_step": train_step, "restore": restore, "pipeline": pipeline, "whatif": whatif,
    "kernels": kernels}


# Runs of bench/train_step.py with one thing changed, compared in one table.
VARIANTS = ("train_step", "train_step_load9", "train_step_1core", "train_step_2dev",
            "train_step_base_same_window", "train_step_heads8", "train_step_b32")


def _load_range(r: dict) -> str:
  loads = [x for v in r.get("timings", {}).values() for x in v.get("load", [])]
  if not loads:
    return str(r["machine"]["load_average_start"][0])
  return f"{min(loads)}-{max(loads)}"


def _digest_cell(r: dict) -> str:
  st = config_status(r)
  if st is None:
    return "—"
  if st["now"] is not None and st["now"] != st["measured"]:
    return f"`{st['measured']}` **STALE**"
  return f"`{st['measured']}`"


def train_step_variants() -> list[str]:
  rows = []
  for name in VARIANTS:
    path = measure.RESULTS / f"{name}.json"
    if not path.exists():
      continue
    r = json.loads(path.read_text())
    m, lib = r.get("matched_step", {}), r["library_step"]
    flags = f"`{r['command'].split('train_step.py', 1)[-1].strip() or '(defaults)'}`"
    usable = r["machine"].get("usable_cores")
    if usable and usable < r["machine"]["cores"]:
      flags += f" (pinned to {usable} core)"
    if r.get("note"):
      flags += f" ({r['note']})"
    rows.append([flags, r["machine"]["date"][:16].replace("T", " "), m.get("step_s"),
                 r.get("torch_eager_step_s"), r.get("speedup"),
                 ((r.get("speedup_stats") or {}).get("torch_eager/jax_matched") or {}).get(
                     "of_fastest"), m.get("images_per_s"),
                 m.get("flop_fraction"), lib["step_s"], lib["flop_fraction"],
                 _load_range(r), _digest_cell(r)])
  lines = _table(["train_step.py flags", "date (UTC)", "JAX matched s", "torch eager s",
                  "torch / JAX", "torch / JAX, fastest calls", "JAX matched img/s", "matched of peak", "JAX library s",
                  "library of peak", "load", "config"], rows)
  return lines


def render_block(name: str) -> str:
  if name == "train_step_variants":
    return "\n".join(train_step_variants()) + "\n"
  if name == "step_changes":
    return "\n".join(step_changes()) + "\n"
  path = measure.RESULTS / f"{name}.json"
  if not path.exists():
    return f"(no results yet: run the command above to write bench/results/{name}.json)\n"
  r = json.loads(path.read_text())
  return "\n".join(RENDERERS[r["benchmark"]](r)) + "\n"


def render(text: str) -> str:
  return _BLOCK.sub(lambda m: m.group(1) + render_block(m.group(2)) + m.group(4), text)


def main() -> int:
  text = DOC.read_text()
  new = render(text)
  if "--check" in sys.argv[1:]:
    if new != text:
      print("BENCHMARKS.md is out of date: run .venv/bin/python bench/report.py", file=sys.stderr)
      return 1
    return 0
  DOC.write_text(new)
  return 0


if __name__ == "__main__":
  sys.exit(main())
