"""The ablation runner: the full model and its variants at an equal budget, one table.

  result = run_ablation(config, "runs/ablation")                  # every variant
  result = run_ablation(config, "runs/ablation", ["full", "dense"])

Each variant is the given config plus a few overrides (VARIANTS), trained with
`train_lib.train_and_evaluate` in its own sub-workdir `WORKDIR/<variant>` with the same steps,
data, seed and evaluation images, then scored on the validation split (the final validation of its
training run). A variant whose `ablation_result.json` matches its config is not retrained; an
interrupted one resumes from its checkpoints. The table follows the paper's Table 4: rows are the
variants, columns the per-task PSNR (Y channel, dB), their mean, and the mean's change against the
full model. It is printed and saved as WORKDIR/ablation.json and WORKDIR/ablation.html.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np
from etils import epath

from fape_jax import distributed
from fape_jax.distributed import say
from fape_jax import report as report_lib
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
}
RESULT_FILE = "ablation_result.json"


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


def variant_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The config of one variant: a copy of `config` with the variant's overrides."""
  _, overrides = VARIANTS[name]
  cfg = config.copy_and_resolve_references()
  cfg.update_from_flattened_dict(overrides)
  return cfg


def _config_hash(cfg) -> str:
  return hashlib.sha256(cfg.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:16]


def _mean(xs) -> float | None:
  xs = [x for x in xs if x is not None]
  return float(np.mean(xs)) if xs else None


def build_table(results: Mapping[str, Mapping[str, Any]], total_steps: int) -> dict:
  """The Table-4 rows from each variant's validation table (validation.validate's form)."""
  tasks = [t for t in tasks_lib.TASKS if any(t in r["table"] for r in results.values())]
  rows = []
  for name, r in results.items():
    psnr = {t: float(r["table"][t]["restored_psnr"]) for t in tasks if t in r["table"]}
    rows.append({"variant": name, "description": VARIANTS[name][0], "psnr": psnr,
                 "mean": _mean(psnr.values()), "steps": r.get("steps")})
  full = next((r["mean"] for r in rows if r["variant"] == "full"), None)
  for r in rows:
    r["delta_vs_full"] = (r["mean"] - full) if full is not None and r["mean"] is not None \
        else None
  first = next(iter(results.values()), None)
  inputs = ({t: float(first["table"][t]["degraded_psnr"]) for t in tasks if t in first["table"]}
            if first else {})
  return {"total_steps": total_steps, "tasks": tasks, "rows": rows, "input": inputs,
          "input_mean": _mean(inputs.values())}


def format_table(result: Mapping[str, Any]) -> str:
  tasks = result["tasks"]
  short = [t[:9] for t in tasks]
  lines = [f"Ablation at an equal budget of {result['total_steps']} steps: validation PSNR "
           "(Y, dB)",
           f"{'variant':<20}" + "".join(f"{s:>10}" for s in short) +
           f"{'mean':>8}{'Δ vs full':>11}"]
  for r in result["rows"]:
    cells = "".join(f"{r['psnr'][t]:>10.2f}" if t in r["psnr"] else f"{'-':>10}" for t in tasks)
    delta = f"{r['delta_vs_full']:>+11.2f}" if r["delta_vs_full"] is not None else f"{'-':>11}"
    lines.append(f"{r['variant']:<20}{cells}{r['mean']:>8.2f}{delta}")
  if result.get("input"):
    cells = "".join(f"{result['input'].get(t, float('nan')):>10.2f}" for t in tasks)
    lines.append(f"{'(degraded input)':<20}{cells}{result['input_mean']:>8.2f}")
  return "\n".join(lines)


def run_ablation(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                 variants: Sequence[str] | str | None = None, *,
                 train_fn: Callable[[Any, str], dict] | None = None,
                 evaluate_fn: Callable[..., dict] | None = None) -> dict:
  """Trains (or reuses) each variant, collects its validation table, writes the ablation table.

  `train_fn(config, workdir) -> table` defaults to `train_lib.train_and_evaluate`, and
  `evaluate_fn(workdir, limit=...) -> table` (used when a run's checkpoints are complete but its
  result was never written) to `evaluate_lib.validation_psnr`.
  """
  if train_fn is None:
    from fape_jax import train_lib  # pylint: disable=g-import-not-at-top
    train_fn = train_lib.train_and_evaluate
  if evaluate_fn is None:
    from fape_jax import evaluate_lib  # pylint: disable=g-import-not-at-top
    evaluate_fn = evaluate_lib.validation_psnr
  names = parse_variants(variants)
  workdir = epath.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  results = {}
  for name in names:
    cfg = variant_config(config, name)
    vdir = workdir / name
    result_path = vdir / RESULT_FILE
    digest = _config_hash(cfg)
    if result_path.exists():
      prev = json.loads(result_path.read_text())
      if prev.get("config_hash") == digest:
        say(f"[ablation] {name}: finished earlier ({prev['steps']} steps), not retrained.")
        results[name] = prev
        continue
      say(f"[ablation] {name}: its earlier result is for another config; training it again "
          "(it resumes from its checkpoints when only step counts or budgets changed; any other "
          "change is refused: use a new --workdir).")
    say(f"[ablation] {name}: {VARIANTS[name][0]}; training {cfg.total_steps} steps in {vdir}.")
    table = train_fn(cfg, os.fspath(vdir))
    if not table:  # checkpoints already complete: validate the finished run instead
      table = evaluate_fn(vdir, limit=int(cfg.get("num_eval_images", 0) or 0))
    if not table:
      raise FapeError(f"[ablation] {name}: no validation table from {vdir}.")
    results[name] = {"variant": name, "overrides": VARIANTS[name][1], "steps": cfg.total_steps,
                     "config_hash": digest, "table": table}
    if distributed.is_main_process():
      vdir.mkdir(parents=True, exist_ok=True)
      result_path.write_text(json.dumps(results[name], indent=2))
  result = build_table(results, int(config.total_steps))
  say(format_table(result))
  if distributed.is_main_process():
    (workdir / "ablation.json").write_text(json.dumps(result, indent=2))
    (workdir / "ablation.html").write_text(report_lib.ablation_report(result))
    say(f"Wrote {workdir / 'ablation.json'} and {workdir / 'ablation.html'}.")
  return result
