"""The ablation runner: the full model and its variants at one fixed step budget, over seeds.

  result = run_ablation(config, "runs/ablation")                          # every variant, seeds 0,1
  result = run_ablation(config, "runs/ablation", ["full", "dense"], seeds=[0, 1, 2])
  publish(result, "bench/results/ablation.json", "ABLATION.md")          # the repo's table
  render_markdown(json.loads(path.read_text()), source=...)               # ABLATION.md's text

Each (variant, seed) is the given config plus the variant's overrides (VARIANTS) and
`config.seed = seed`, trained with `train_lib.train_and_evaluate` in its own sub-workdir
`WORKDIR/<variant>/seed_<seed>` for exactly `config.total_steps` steps (the wall-clock budget
`max_wall_minutes` is forced off: a budget that depends on the machine's speed and load is no
budget to compare at), then scored on the validation split (its final validation). Every run
records the steps it actually ran (its newest checkpoint), so one stopped early (`stop_after`, a
preemption) is never mistaken for a finished one: the next invocation resumes it from its
checkpoints, and a finished run whose result matches its config is not retrained. The summary
refuses runs with unequal step counts. It is printed and saved as WORKDIR/ablation.json and
WORKDIR/ablation.html (a bar chart of the mean gain per variant with the seeds' range, the
per-task tables); `publish` also writes the JSON, the Markdown table (ABLATION.md) and the same
page beside it (ABLATION.html, `html_path`). A run
that fails (a `FapeError`: a non-finite loss, a refused resume) is named on stderr and in
`result["failed"]` and the others still run and are tabulated (in a single process: several
processes stop together at the first failure).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np
from etils import epath

from fape_jax import distributed
from fape_jax.distributed import say
from fape_jax import errors
from fape_jax import report_html
from fape_jax import report_lib
from fape_jax import run_dir as run_dir_lib
from fape_jax import tasks as tasks_lib
from fape_jax.errors import FapeError

# name -> (what changes, dotted config overrides). Order = table order.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("full model", {}),
    "no_plans": ("no plan context (a learned null token)", {"plans.enabled": False}),
    "no_text_router": ("no text routing", {"model.lora.text_router": False}),
    "no_spectral_router": ("no spectral routing", {"model.lora.spectral_router": False}),
    "no_freq_loss": ("no frequency loss", {"loss.w_freq": 0.0}),
    "dense": ("one dense LoRA (no experts, no routing)", {"model.lora.variant": "dense"}),
    "plain_mse": ("plain batch MSE (no per-sample task balancing)", {"loss.balance": "none"}),
    "top1_ste_all": ("straight-through top-1 on every layer (the previous default)",
                     {"model.lora.top1": "all", "model.lora.top1_mode": "ste"}),
}
RESULT_FILE = "ablation_result.json"
DEFAULT_SEEDS = (0, 1)
SPREAD = "max - min over seeds"
REPO = epath.Path(__file__).resolve().parent.parent
# Where the repo's published table lives (bench/results/*.json next to BENCHMARKS.md's).
DEFAULT_RESULTS = REPO / "bench" / "results" / "ablation.json"
DEFAULT_MARKDOWN = REPO / "ABLATION.md"
# How long a run may go, not what it trains: left out of a run's config hash, so changing them
# neither discards a finished run nor makes a stopped one a new run; its recorded steps decide.
_BUDGET_FIELDS = ("total_steps", "stop_after", "max_wall_minutes")


def parse_variants(names: Sequence[str] | str | None) -> list[str]:
  """Variant names (comma-separated string or list; empty = all), checked, in table order."""
  if isinstance(names, str):
    names = [n for n in names.split(",") if n.strip()]
  names = [n.strip() for n in (names or [])]
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    raise FapeError(f"--variants: unknown variant(s) {unknown}; choose from "
                    f"{', '.join(VARIANTS)}.")
  return [v for v in VARIANTS if v in names] if names else list(VARIANTS)


def parse_seeds(seeds: Sequence[int | str] | str | None) -> list[int]:
  """Seeds (comma-separated string or list; empty = DEFAULT_SEEDS), unique, in the given order."""
  if isinstance(seeds, str):
    seeds = seeds.split(",")
  items = [str(s).strip() for s in (seeds or []) if str(s).strip()]
  if not items:
    return list(DEFAULT_SEEDS)
  bad = [s for s in items if not s.isdigit()]
  if bad:
    raise FapeError(f"--seeds: {bad} are not non-negative integers; give a comma-separated list, "
                    "e.g. --seeds=0,1.")
  out = [int(s) for s in items]
  if len(set(out)) != len(out):
    raise FapeError(f"--seeds: {items} repeats a seed; each seed is one run per variant.")
  return out


def variant_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The config of one variant: a copy of `config` with the variant's overrides."""
  _, overrides = VARIANTS[name]
  cfg = config.copy_and_resolve_references()
  cfg.update_from_flattened_dict(overrides)
  return cfg


def run_config(config: ml_collections.ConfigDict, name: str,
               seed: int) -> ml_collections.ConfigDict:
  """One (variant, seed) run: the variant's config, that seed, and no wall-clock budget."""
  cfg = variant_config(config, name)
  cfg.seed = seed
  cfg.max_wall_minutes = 0.0
  return cfg


def run_dir(workdir: str | os.PathLike, name: str, seed: int) -> epath.Path:
  return epath.Path(workdir) / name / f"seed_{seed}"


def _config_hash(cfg) -> str:
  flat = json.loads(cfg.to_json_best_effort(sort_keys=True))
  for field in _BUDGET_FIELDS:
    flat.pop(field, None)
  return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:16]


def _same_config(vdir: epath.Path, cfg) -> bool:
  """Whether the run in `vdir` trained `cfg`, up to budgets and fields added to the config since
  (absent from its config.json and set to the value it ran with: run_dir.ADDED_FIELDS)."""
  path = vdir / run_dir_lib.CONFIG_FILE
  if not path.exists():
    return False
  changes = run_dir_lib.config_changes(json.loads(path.read_text()),
                                       json.loads(cfg.to_json_best_effort()))
  return all(k in _BUDGET_FIELDS for k in changes)


def steps_run(vdir: epath.Path) -> int:
  """The steps a run actually trained: its newest checkpoint, else its last validation.json."""
  ckdir = vdir / "checkpoints"
  if ckdir.exists():
    from fape_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top (orbax)
    ckpt = ckpt_lib.Checkpointer(ckdir, save_every=1, keep=1, read_only=True)
    try:
      step = ckpt.latest_step()
    finally:
      ckpt.close()
    if step is not None:
      return int(step)
  val = vdir / "validation.json"
  if val.exists():
    return int(json.loads(val.read_text())["step"])
  raise FapeError(f"[ablation] {vdir}: neither a checkpoint nor a validation.json says how many "
                  "steps this run trained; delete the folder and run the ablation again.")


def _mean(xs) -> float | None:
  xs = [x for x in xs if x is not None]
  return float(np.mean(xs)) if xs else None


def _spread(xs) -> float | None:
  xs = [x for x in xs if x is not None]
  return float(max(xs) - min(xs)) if xs else None


def check_equal_steps(runs: Sequence[Mapping[str, Any]], total_steps: int | None = None) -> int:
  """The one step count of all runs; FapeError naming the runs when they differ."""
  by_steps: dict[int, list[str]] = {}
  for r in runs:
    by_steps.setdefault(int(r["steps"]), []).append(f"{r['variant']}/seed_{r['seed']}")
  if len(by_steps) > 1:
    groups = "; ".join(f"{s} steps: {', '.join(names)}" for s, names in sorted(by_steps.items()))
    raise FapeError(
        f"[ablation] unequal budgets, not compared: {groups}. Every run must train the same "
        f"number of steps (config.total_steps={total_steps}). Run the same ablation command "
        "again: runs stopped early (stop_after, preemption) resume from their checkpoints; a run "
        "past total_steps was trained with a larger total_steps: rerun with that value, or use a "
        "new --workdir.")
  return next(iter(by_steps)) if by_steps else 0


def build_table(runs: Sequence[Mapping[str, Any]], total_steps: int) -> dict:
  """The summary over runs [{variant, seed, steps, table}] (table: validation.validate's form).

  Refuses unequal step counts. Per variant: mean over seeds of the restored PSNR and of the gain
  over the degraded input, per task and averaged over tasks, with the spread (max - min) over
  seeds; `delta_vs_full` is the change of the mean gain against the full model.
  """
  runs = sorted(runs, key=lambda r: (list(VARIANTS).index(r["variant"]), r["seed"]))
  if not runs:
    raise FapeError("[ablation] no runs to summarise.")
  steps = check_equal_steps(runs, total_steps)
  tasks = [t for t in tasks_lib.TASKS if any(t in r["table"] for r in runs)]

  def gain(r, t):
    return float(r["table"][t]["restored_psnr"]) - float(r["table"][t]["degraded_psnr"])

  rows = []
  for name in dict.fromkeys(r["variant"] for r in runs):
    mine = [r for r in runs if r["variant"] == name]
    have = {t: [r for r in mine if t in r["table"]] for t in tasks}
    psnr = {t: _mean(float(r["table"][t]["restored_psnr"]) for r in rs)
            for t, rs in have.items() if rs}
    gains = {t: [gain(r, t) for r in rs] for t, rs in have.items() if rs}
    seed_means = [_mean(gain(r, t) for t in tasks if t in r["table"]) for r in mine]
    rows.append({"variant": name, "description": VARIANTS[name][0],
                 "seeds": [r["seed"] for r in mine], "steps": steps, "psnr": psnr,
                 "mean": _mean(psnr.values()),
                 "gain": {t: _mean(g) for t, g in gains.items()},
                 "gain_spread": {t: _spread(g) for t, g in gains.items()},
                 "mean_gain": _mean(seed_means), "mean_gain_spread": _spread(seed_means),
                 "seed_mean_gains": seed_means})
  full = next((r for r in rows if r["variant"] == "full"), None)
  for r in rows:
    r["delta_vs_full"] = (r["mean_gain"] - full["mean_gain"]) if full else None
  # The degraded inputs are the same images for every run; averaged in case they are not.
  inputs = {t: _mean(float(r["table"][t]["degraded_psnr"]) for r in runs if t in r["table"])
            for t in tasks}
  return {"total_steps": int(total_steps), "steps": steps,
          "seeds": sorted({r["seed"] for r in runs}), "spread": SPREAD, "tasks": tasks,
          "rows": rows, "input": inputs, "input_mean": _mean(inputs.values()),
          "runs": [{"variant": r["variant"], "seed": r["seed"], "steps": int(r["steps"]),
                    "table": r["table"]} for r in runs]}


def format_table(result: Mapping[str, Any]) -> str:
  """The terminal table: rows = variants, per-task restored PSNR (mean over seeds)."""
  tasks = result["tasks"]
  short = [t[:9] for t in tasks]
  lines = [f"Ablation at an equal budget of {result['steps']} steps: validation PSNR (Y, dB), "
           f"mean over seeds {result['seeds']}; spread = {SPREAD} of the mean gain",
           f"{'variant':<20}" + "".join(f"{s:>10}" for s in short) +
           f"{'mean':>8}{'spread':>8}{'Δ vs full':>11}"]
  for r in result["rows"]:
    cells = "".join(f"{r['psnr'][t]:>10.2f}" if t in r["psnr"] else f"{'-':>10}" for t in tasks)
    delta = f"{r['delta_vs_full']:>+11.2f}" if r["delta_vs_full"] is not None else f"{'-':>11}"
    lines.append(f"{r['variant']:<20}{cells}{r['mean']:>8.2f}{r['mean_gain_spread']:>8.2f}"
                 f"{delta}")
  if result.get("input"):
    cells = "".join(f"{result['input'].get(t, float('nan')):>10.2f}" for t in tasks)
    lines.append(f"{'(degraded input)':<20}{cells}{result['input_mean']:>8.2f}")
  return "\n".join(lines)


def spread_note(result: Mapping[str, Any]) -> str:
  """Which differences to the full model are within the seed spread (indistinguishable)."""
  if len(result["seeds"]) < 2:
    return ("One seed only: no seed spread, so no difference is tested against seed noise; run "
            "with --seeds=0,1 (or more).")
  rows = {r["variant"]: r for r in result["rows"]}
  full = rows.get("full")
  if full is None or len(rows) < 2:
    return "No `full` row and another variant: nothing to compare."
  within, beyond = [], []
  for name, r in rows.items():
    if name == "full":
      continue
    d, s = r["mean_gain"] - full["mean_gain"], max(r["mean_gain_spread"], full["mean_gain_spread"])
    (within if abs(d) <= s else beyond).append(f"`{name}` {d:+.2f} (spread {s:.2f})")
  return ("Full model vs each variant, difference of the mean gains against the larger seed "
          f"spread ({SPREAD}) of the two: within the spread (not told apart from seed noise): "
          f"{', '.join(within) or 'none'}; beyond it: {', '.join(beyond) or 'none'}.")


def _cell(mean: float | None, spread: float | None) -> str:
  return "—" if mean is None else f"{mean:+.2f} ({spread:.2f})"


def render_markdown(result: Mapping[str, Any], source: str | None = None) -> str:
  """ABLATION.md from the ablation JSON, recomputed from its raw runs (so never out of step)."""
  s = build_table(result["runs"], result["total_steps"])
  names = [r["variant"] for r in s["rows"]]
  rows = {r["variant"]: r for r in s["rows"]}
  seeds = ", ".join(str(x) for x in s["seeds"])
  gen = "Generated by `python -m fape_jax.ablate --render_only`" + (
      f" from `{source}`" if source else "") + "; `--check` verifies it. Do not edit by hand."
  lines = ["# Ablation at an equal budget", "", f"<!-- {gen} -->", ""]
  if result.get("stale"):  # set in the JSON when a default the runs used has changed since
    lines += [f"**STALE: {result['stale']}**", ""]
  lines += ["PSNR gain of the restored over the degraded validation images (Y channel, dB) per "
           f"task: the mean over seeds {seeds}, in brackets the spread ({SPREAD}); `mean`: each "
           "seed's mean over the tasks, then their mean and spread. Every run trained exactly "
           f"{s['steps']} steps (a fixed step budget, no wall clock). `input PSNR` is the "
           "degraded images' PSNR.", "",
           "| task | input PSNR | " + " | ".join(f"`{n}`" for n in names) + " |",
           "|---|---:|" + "---:|" * len(names)]
  for t in s["tasks"]:
    lines.append(f"| {t} | {s['input'][t]:.2f} | " + " | ".join(
        _cell(rows[n]["gain"].get(t), rows[n]["gain_spread"].get(t)) for n in names) + " |")
  lines.append(f"| **mean** | {s['input_mean']:.2f} | " + " | ".join(
      _cell(rows[n]["mean_gain"], rows[n]["mean_gain_spread"]) for n in names) + " |")
  lines.append("| Δ mean vs full | | " + " | ".join(
      "—" if n == "full" or rows[n]["delta_vs_full"] is None
      else f"{rows[n]['delta_vs_full']:+.2f}" for n in names) + " |")
  lines.append("| steps run | | " + " | ".join(str(rows[n]["steps"]) for n in names) + " |")
  m = result.get("machine") or {}
  devices = (f" ({m['backend']}, {m['devices']} device(s): {m['device_kind']})"
             if m.get("backend") else "")
  lines += ["", spread_note(s), "",
            "Variants: " + "; ".join(f"`{n}` {VARIANTS[n][0]}" for n in names) + ".", "",
            f"Steps: {s['steps']} per run, {len(s['runs'])} runs ({len(names)} variant(s) x "
            f"{len(s['seeds'])} seed(s): {seeds}); config.total_steps = {s['total_steps']}.",
            "", f"Command: `{result.get('command') or '(not recorded)'}`", "",
            f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores{devices}; commit "
            f"`{m.get('commit') or '?'}`; {result.get('date') or '?'}", ""]
  return "\n".join(lines)


def render_html(result: Mapping[str, Any]) -> str:
  """The ablation page (`report_lib.ablation_report`) from the JSON, recomputed from its raw runs
  as the Markdown is."""
  s = build_table(result["runs"], result["total_steps"])
  s.update({k: result[k] for k in ("command", "machine", "date") if result.get(k)})
  return report_lib.ablation_report(s, spread_note(s))


def html_path(md_path: str | os.PathLike) -> epath.Path:
  """Where the HTML page of a Markdown table goes: beside it, ABLATION.md -> ABLATION.html."""
  return epath.Path(md_path).with_suffix(".html")


def _cpu_model() -> str:
  try:
    for line in open("/proc/cpuinfo", encoding="utf-8"):
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform  # pylint: disable=g-import-not-at-top
  return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  return {"cpu": _cpu_model(), "cores": os.cpu_count(), "backend": jax.default_backend(),
          "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind,
          "processes": jax.process_count(), "commit": report_html.git_commit()}


def run_ablation(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                 variants: Sequence[str] | str | None = None,
                 seeds: Sequence[int | str] | str | None = None, *,
                 train_fn: Callable[[Any, str], dict] | None = None,
                 evaluate_fn: Callable[..., dict] | None = None,
                 command: str | None = None) -> dict:
  """Trains (or reuses, or resumes) each (variant, seed), writes the ablation table.

  `train_fn(config, workdir) -> table` defaults to `train_lib.train_and_evaluate`, and
  `evaluate_fn(workdir, limit=...) -> table` (used when a run's checkpoints are complete but its
  result was never written) to `evaluate_lib.validation_psnr`. `command` is recorded as is.
  """
  if train_fn is None:
    from fape_jax import train_lib  # pylint: disable=g-import-not-at-top
    train_fn = train_lib.train_and_evaluate
  if evaluate_fn is None:
    from fape_jax import evaluate_lib  # pylint: disable=g-import-not-at-top
    evaluate_fn = evaluate_lib.validation_psnr
  names, seeds = parse_variants(variants), parse_seeds(seeds)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  if config.get("max_wall_minutes"):
    say(f"[ablation] config.max_wall_minutes={config.max_wall_minutes} is ignored: every run "
        f"trains exactly config.total_steps={config.total_steps} steps (to split a long run over "
        "invocations, use --config.stop_after=N; the same command resumes).")
  runs, failed = [], []
  bar = distributed.progress(desc="ablate", unit="run", total=len(seeds) * len(names))
  for seed in seeds:  # seed-major: an interrupted ablation leaves complete seeds behind
    for name in names:
      try:
        runs.append(_run_one(config, workdir, name, seed, train_fn, evaluate_fn))
      except (FapeError, OSError) as e:
        import jax  # pylint: disable=g-import-not-at-top
        if jax.process_count() > 1:
          raise  # the other processes may be inside a collective of this run: stop them all
        # One variant that fails (a non-finite loss, a refused resume) does not cost the others.
        failed.append({"variant": name, "seed": seed, "error": str(e)})
        with distributed.progress_write():
          print(f"error: [ablation] {name}/seed_{seed}: {e}", file=sys.stderr)
      bar.update(1)
  bar.close()
  if failed and not runs:
    raise FapeError(f"[ablation] every run failed; the first: {failed[0]['variant']}/seed_"
                    f"{failed[0]['seed']}: {failed[0]['error']}")
  result = build_table(runs, int(config.total_steps))
  result.update(command=command, machine=machine_info(), date=report_html.now())
  if failed:
    result["failed"] = failed
  say(format_table(result))
  if result["steps"] != result["total_steps"]:
    say(f"[ablation] every run stopped at step {result['steps']} of {result['total_steps']} "
        "(stop_after): comparable, but not the configured budget; the same command resumes.")
  say(spread_note(result))
  if distributed.is_main_process():
    (workdir / "ablation.json").write_text(json.dumps(result, indent=2))
    (workdir / "ablation.html").write_text(render_html(result))
    say(f"Wrote {workdir / 'ablation.json'} and {workdir / 'ablation.html'}.")
  if failed:
    print(f"error: {len(failed)} of {len(failed) + len(runs)} run(s) failed (exit code "
          f"{errors.PARTIAL_EXIT_CODE}); the table holds the others. The same command retries "
          "them (finished runs are not retrained).", file=sys.stderr)
  return result


def exit_code(result: Mapping[str, Any]) -> int:
  """The CLI's exit status: 0 every run trained, 1 some failed (the table holds the others)."""
  return errors.PARTIAL_EXIT_CODE if result.get("failed") else 0


def _run_one(config, workdir: epath.Path, name: str, seed: int, train_fn, evaluate_fn) -> dict:
  cfg = run_config(config, name, seed)
  vdir = run_dir(workdir, name, seed)
  result_path = vdir / RESULT_FILE
  digest = _config_hash(cfg)
  tag = f"[ablation] {name}/seed_{seed}"
  if result_path.exists():
    prev = json.loads(result_path.read_text())
    if prev.get("config_hash") != digest and _same_config(vdir, cfg):
      prev["config_hash"] = digest  # recorded before a field was added, at that field's value
    if prev.get("config_hash") != digest:
      say(f"{tag}: its earlier result is for another config; training it again (it resumes "
          "from its checkpoints when only step counts or budgets changed; any other change is "
          "refused: use a new --workdir).")
    elif prev["steps"] >= cfg.total_steps:
      say(f"{tag}: finished earlier ({prev['steps']} steps), not retrained.")
      return prev
    else:
      say(f"{tag}: stopped at step {prev['steps']} of {cfg.total_steps}; resuming.")
  say(f"{tag}: {VARIANTS[name][0]}; training to step {cfg.total_steps} in {vdir}.")
  table = train_fn(cfg, os.fspath(vdir))
  steps = steps_run(vdir)
  if not table:  # checkpoints already complete: the run's own final validation, else validate it
    table = (_final_validation(vdir, steps)
             or evaluate_fn(vdir, limit=int(cfg.get("num_eval_images", 0) or 0)))
  if not table:
    raise FapeError(f"{tag}: no validation table from {vdir}.")
  if steps < cfg.total_steps:
    say(f"{tag}: stopped at step {steps} of {cfg.total_steps} (stop_after or preemption); "
        "recorded as such, the same command resumes it.")
  out = {"variant": name, "seed": seed, "overrides": VARIANTS[name][1], "steps": steps,
         "total_steps": int(cfg.total_steps), "config_hash": digest, "table": table}
  if distributed.is_main_process():
    vdir.mkdir(parents=True, exist_ok=True)
    result_path.write_text(json.dumps(out, indent=2))
  return out


def _final_validation(vdir: epath.Path, newest_step: int) -> dict:
  """The table training's validation wrote for `newest_step`, the run's newest checkpoint ({}
  if none).

  Preferred to `evaluate_fn`, which restores through the `evaluate` path (tiled at the training
  crop): a different measurement from training's whole-image validation, which every other run
  in the table reports (on the 400-step `full` run, +1.42 against +1.49 dB mean).
  """
  path = vdir / "validation.json"
  if not path.exists():
    return {}
  saved = json.loads(path.read_text())
  return saved.get("tasks", {}) if saved.get("step") == newest_step else {}


def _source(results_path: epath.Path, md_path: epath.Path) -> str:
  """The JSON's path as seen from the Markdown's folder (what ABLATION.md names as its source)."""
  return os.path.relpath(os.path.abspath(results_path), os.path.dirname(os.path.abspath(md_path)))


def publish(result: Mapping[str, Any], results_path: str | os.PathLike | None,
            md_path: str | os.PathLike | None) -> None:
  """Writes the ablation JSON to `results_path` and renders it into `md_path` (either optional)."""
  if results_path:
    results_path = epath.Path(results_path)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(result, indent=2) + "\n")
    say(f"Wrote {results_path}.")
  if md_path:
    if not results_path:
      raise FapeError("--out needs --results: ABLATION.md is rendered from a stored JSON, so that "
                      "--check can verify it; add e.g. --results=bench/results/ablation.json.")
    render_file(results_path, md_path)


def _load(results_path: epath.Path) -> dict:
  if not results_path.exists():
    raise FapeError(f"No ablation results at {results_path}: run the ablation with "
                    f"--results={results_path} first (python -m fape_jax.ablate --config=... "
                    "--workdir=... --results=... --out=...).")
  return json.loads(results_path.read_text())


def render_file(results_path: str | os.PathLike, md_path: str | os.PathLike) -> str:
  """Renders the JSON at `results_path` into `md_path` and its page `html_path(md_path)`;
  returns the Markdown."""
  results_path, md_path = epath.Path(results_path), epath.Path(md_path)
  result = _load(results_path)
  text = render_markdown(result, _source(results_path, md_path))
  md_path.write_text(text)
  html_path(md_path).write_text(render_html(result))
  say(f"Wrote {md_path} and {html_path(md_path)}.")
  return text


def check_file(results_path: str | os.PathLike, md_path: str | os.PathLike) -> bool:
  """True when `md_path` is exactly what its JSON renders to (bench/report.py --check's rule)."""
  results_path, md_path = epath.Path(results_path), epath.Path(md_path)
  text = render_markdown(_load(results_path), _source(results_path, md_path))
  return md_path.exists() and md_path.read_text() == text
