"""The offline plan-cache job: pairs store in, plan store out (DESIGN.md data flow).

`run(config)` reads the degraded images of a pairs store, plans them (rule or HF planner), encodes
the plans (text or MLLM encoder), and writes the plan store keyed by the pairs' ids. It shards over
processes (`shard_index`/`num_shards`, default the JAX process index/count), resumes by skipping
ids already in the store, and ends with a summary: task-readout accuracy against the known labels
with a confusion matrix, per-task focus agreement, tokens per plan and bytes per record. Training
calls it to build the embedded default's store when that is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_collections
import numpy as np
from tqdm import tqdm

from fape_jax.errors import FapeError
from fape_jax.planning.encoders import MLLM_TEMPLATE, build_encoder
from fape_jax.planning.planners import DEFAULT_MODEL, build_planner
from fape_jax.planning.store import PlanStore, PlanStoreWriter
from fape_jax.tasks import FOCUS, TASK_ID, TASKS

# Settings that change what is planned or encoded (they make the config hash; device, batch
# sizes and paths do not).
_PLANNER_KEYS = ("kind", "model", "max_new_tokens", "temperature", "top_p", "retry_temperatures",
                 "seed", "image_max_side")
_ENCODER_KEYS = ("kind", "model", "max_tokens", "dtype", "template")


def plans_config(kind: str = "rule") -> ml_collections.ConfigDict:
  """The plan settings: planner, encoder, store, batching. The one definition both configs use:
  training's `config.plans` and the plan-cache job's config (which adds the `pairs` to plan).

  kind "rule": the rule planner + the bundled MiniLM (384-d), K = 32, float16 (embedded default);
  kind "hf": Qwen2.5-VL-7B-Instruct plans and encodes (3584-d last hidden states), K = 64, bf16.
  """
  if kind not in ("rule", "hf"):
    raise FapeError(f"Unknown plans kind {kind!r}; choose rule or hf.")
  c = ml_collections.ConfigDict()
  c.planner = ml_collections.ConfigDict(dict(
      kind="rule",              # rule | hf
      model="",                 # hf: local folder or HF id in the local cache ("" = Qwen2.5-VL-7B)
      device="auto",            # auto | cpu | cuda[:i]
      batch_size=4,             # images per generate() call
      max_new_tokens=512,
      temperature=0.7,
      top_p=0.9,
      retry_temperatures=(0.2, 0.5),   # re-prompts of unusable answers, then the rule fallback
      seed=0,
      image_max_side=1024,      # the image the MLLM sees is downscaled to this long side
  ))
  c.encoder = ml_collections.ConfigDict(dict(
      kind="text",              # text (sentence encoder, default bundled MiniLM) | mllm
      model="",                 # text: local HF folder ("" = MiniLM); mllm: "" = the planner's
      max_tokens=32,            # K: longer plans are truncated, shorter ones padded + masked
      dtype="float16",          # float16 | bfloat16
      device="auto",
      batch_size=32,            # rows per forward, always full (encoders.py): = batch_size below
      template=MLLM_TEMPLATE,   # mllm: the conversation the plan is wrapped in
  ))
  # "" = <data_dir>/plans/<name>-<planner>-<encoder>-K<K> (where training looks).
  c.store = ml_collections.ConfigDict(dict(path="", records_per_file=1024))
  c.batch_size = 32             # records planned and encoded per step
  c.limit = 0                   # >0: only the first `limit` records of each split (quick runs)
  c.progress = True             # tqdm progress bar
  if kind == "hf":
    c.planner.kind = "hf"
    c.planner.model = DEFAULT_MODEL
    c.encoder.kind = "mllm"
    c.encoder.max_tokens = 64
    c.encoder.dtype = "bfloat16"
    c.encoder.batch_size = 8
    c.batch_size = 16
  return c


def default_store_path(data_dir: str, name: str, planner: str, encoder: str, k: int,
                       digest: str = "") -> str:
  """Where training looks for the plans of pairs store `name` (`digest`: `store_digest`)."""
  return os.path.join(data_dir, "plans",
                      f"{name}-{planner}-{encoder}-K{k}" + (f"-{digest}" if digest else ""))


def pairs_identity(pairs) -> str:
  """What identifies the pairs a plan store was made from: for the synthetic store its config
  name and recipe version (ids repeat across recipes, the images behind them do not)."""
  if pairs.name == "synthetic":
    from fape_jax.data import pairs as pairs_lib  # pylint: disable=g-import-not-at-top
    cfg = pairs_lib.synthetic_config(pairs)
    return f"synthetic/{cfg.name}/{cfg.version}"
  return str(pairs.name)


def store_digest(config, pairs) -> str:
  """8 hex digits of the plan settings and the pairs' identity: a changed planner, encoder or
  synthesis recipe gets a new plan store instead of silently reusing plans of other images."""
  blob = f"{config_hash(config)}|{pairs_identity(pairs)}"
  return hashlib.sha256(blob.encode()).hexdigest()[:8]


def store_path(config, pairs=None) -> str:
  """The plan store of `config` (plan settings) for the pairs store `pairs` (default
  `config.pairs`)."""
  pairs = config.pairs if pairs is None else pairs
  return config.store.path or default_store_path(
      pairs.data_dir, pairs.name, config.planner.kind, config.encoder.kind,
      config.encoder.max_tokens, store_digest(config, pairs))


def config_hash(config) -> str:
  """Short hash of the settings that define the plans and their tokens."""
  planner = {k: config.planner[k] for k in _PLANNER_KEYS}
  if planner["kind"] == "rule":   # the rule planner uses none of the generation settings
    from fape_jax.planning import planners  # pylint: disable=g-import-not-at-top
    planner = {"kind": "rule", "version": planners.RULE_VERSION,
               "thresholds": dataclasses.asdict(planners.RuleThresholds())}
  encoder = {k: config.encoder[k] for k in _ENCODER_KEYS}
  if encoder["kind"] == "text":
    encoder.pop("template")
  blob = json.dumps({"planner": planner, "encoder": encoder}, sort_keys=True, default=list)
  return hashlib.sha256(blob.encode()).hexdigest()[:12]


def resolve_shards(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
  """Explicit values, else the JAX process index/count (0 of 1 when not distributed)."""
  if num_shards is None and shard_index is None:
    import jax
    return jax.process_index(), jax.process_count()
  if num_shards is None or shard_index is None:
    raise FapeError("Give both --shard_index and --num_shards, or neither (then the JAX process "
                    "index and count are used).")
  if num_shards < 1 or not 0 <= shard_index < num_shards:
    raise FapeError(f"--shard_index={shard_index} is outside [0, {num_shards}) for "
                    f"--num_shards={num_shards}.")
  return shard_index, num_shards


def _open_sources(pairs) -> dict[str, Sequence]:
  from fape_jax.data.pairs import open_pairs  # the data side; imported only when needed
  return {s: open_pairs(pairs.data_dir, pairs.name, s, pairs) for s in pairs.splits}


def summarize(store: PlanStore, labels: Mapping[str, Mapping[str, str]]) -> dict:
  """Task readout vs known labels, per split: accuracy, confusion, focus agreement, sizes.

  `labels[split][id]` is the pair's task ('deraining', or 'a+b' for a mix). Accuracy and the
  confusion matrix (rows: true task, columns: planned task, both in TASKS order) use the single
  degradations; mixes are counted apart.
  """
  out = {"splits": {}}
  all_n_tokens, all_bytes, all_fallback, all_retries = [], [], [], []
  for split, split_labels in labels.items():
    confusion = np.zeros((len(TASKS), len(TASKS)), np.int64)
    focus_hits = np.zeros(len(TASKS), np.int64)
    n_mixed = 0
    for plan_id, label in split_labels.items():
      rec = store.record(plan_id)
      all_n_tokens.append(int(rec["mask"].sum()))
      all_bytes.append(store.record_bytes(plan_id))
      all_fallback.append(bool(rec["fallback"]))
      all_retries.append(int(rec["n_retries"]))
      if label not in TASK_ID:
        n_mixed += 1
        continue
      confusion[TASK_ID[label], TASK_ID[rec["task"]]] += 1
      focus_hits[TASK_ID[label]] += rec["focus"] == FOCUS[label]
    per_task = confusion.sum(1)
    n_single = int(per_task.sum())
    out["splits"][split] = {
        "n": len(split_labels),
        "n_single": n_single,
        "n_mixed": n_mixed,
        "accuracy": float(np.trace(confusion) / n_single) if n_single else None,
        "per_task_accuracy": {t: float(confusion[i, i] / per_task[i])
                              for i, t in enumerate(TASKS) if per_task[i]},
        "focus_agreement": {t: float(focus_hits[i] / per_task[i])
                            for i, t in enumerate(TASKS) if per_task[i]},
        "confusion": confusion.tolist(),
    }
  n = len(all_n_tokens)
  out.update({
      "tasks": list(TASKS),
      "n": n,
      "tokens_per_plan": float(np.mean(all_n_tokens)) if n else 0.0,
      "bytes_per_record": float(np.mean(all_bytes)) if n else 0.0,
      "disk_bytes_per_record": store.disk_bytes() / len(store) if len(store) else 0.0,
      "fallback_rate": float(np.mean(all_fallback)) if n else 0.0,
      "mean_retries": float(np.mean(all_retries)) if n else 0.0,
  })
  return out


def format_summary(summary: Mapping) -> str:
  """A plain-text report of `summarize`'s dict (accuracy, confusion matrix, focus, sizes)."""
  short = [t[:7] for t in summary["tasks"]]
  lines = []
  for split, s in summary["splits"].items():
    acc = "n/a" if s["accuracy"] is None else f"{s['accuracy']:.3f}"
    lines.append(f"[{split}] {s['n']} plans ({s['n_single']} single, {s['n_mixed']} mixed); "
                 f"task-readout accuracy {acc}")
    if s["n_single"]:
      lines.append("  confusion (rows: true, cols: planned)")
      lines.append("  " + " " * 18 + " ".join(f"{c:>7s}" for c in short))
      for t, row in zip(summary["tasks"], s["confusion"]):
        lines.append(f"  {t:>18s}" + " ".join(f"{v:7d}" for v in row))
      lines.append("  focus agreement: " + ", ".join(
          f"{t} {v:.2f}" for t, v in s["focus_agreement"].items()))
  lines.append(f"tokens per plan {summary['tokens_per_plan']:.1f}; bytes per record "
               f"{summary['bytes_per_record']:.0f} serialized, "
               f"{summary['disk_bytes_per_record']:.0f} on disk; fallback rate "
               f"{summary['fallback_rate']:.3f}; mean retries {summary['mean_retries']:.2f}")
  return "\n".join(lines)


def run(config, *, pairs=None, shard_index: int | None = None, num_shards: int | None = None,
        sources: Mapping[str, Sequence] | None = None) -> dict:
  """Plans and encodes this shard's records into the plan store; returns the summary.

  `config` holds the plan settings (`plans_config`'s fields: training passes its `config.plans`
  as it is); `pairs` names the pairs store (default `config.pairs`, the plan-cache job's config).
  `sources` maps split -> random-access pairs (records with "id", "degraded", "task"); by default
  the splits of that pairs store. Records i with i % num_shards == shard_index are this
  shard's. Returns the summary of this shard's records (resumed ones included) plus "store" (its
  path), "written" (records planned now) and "shard".
  """
  shard_index, num_shards = resolve_shards(shard_index, num_shards)
  if config.batch_size < 1:
    raise FapeError(f"--config.batch_size must be >= 1; got {config.batch_size}.")
  pairs = config.pairs if pairs is None else pairs
  sources = dict(sources) if sources is not None else _open_sources(pairs)
  path = store_path(config, pairs)
  planner = build_planner(config.planner)
  encoder = build_encoder(config.encoder,
                          planner_model=planner.model_id if planner.name == "hf" else "")
  settings = {
      "planner": planner.name, "model_id": planner.model_id,
      "encoder": encoder.name, "encoder_model": encoder.model_id, "K": encoder.max_tokens,
      "D": encoder.dim, "dtype": config.encoder.dtype, "config_hash": config_hash(config),
      "pairs": pairs.name,
  }
  writer = PlanStoreWriter(path, settings, shard_index=shard_index,
                           records_per_file=config.store.records_per_file)
  work = []
  for split, source in sources.items():
    n = len(source) if config.limit <= 0 else min(len(source), config.limit)
    work.extend((split, i) for i in range(shard_index, n, num_shards))
  logging.info("plan_cache shard %d/%d: %d records -> %s (%d already there)", shard_index,
               num_shards, len(work), path, len(writer.done_ids))
  labels: dict[str, dict[str, str]] = {s: {} for s in sources}
  with writer, tqdm(total=len(work), disable=not config.progress, desc="plan_cache",
                    unit="img") as bar:
    for start in range(0, len(work), config.batch_size):
      todo = []
      for split, i in work[start:start + config.batch_size]:
        rec = sources[split][i]
        labels[split][rec["id"]] = rec["task"]
        if rec["id"] not in writer.done_ids:
          todo.append(rec)
      if todo:
        plans = planner.plan([r["degraded"] for r in todo])
        tokens, mask = encoder.encode([p.text for p in plans])
        for rec, plan, tok, m in zip(todo, plans, tokens, mask, strict=True):
          writer.add(rec["id"], plan, tok, m)
      bar.update(min(config.batch_size, len(work) - start))
  store = PlanStore(path)
  summary = summarize(store, labels)
  summary.update(store=str(path), written=writer.written, shard=[shard_index, num_shards],
                 manifest=store.manifest)
  Path(path, f"summary-s{shard_index:05d}.json").write_text(json.dumps(summary, indent=2))
  logging.info("plan_cache summary:\n%s", format_summary(summary))
  return summary
