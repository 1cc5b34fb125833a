"""The ablation runner: variant configs, seeds, fixed step budgets, resuming, the table and its
Markdown rendering, and one real tiny run.

Training all six variants for real compiles six train steps (~2-3 minutes each on this shared
2-core machine), so the module trains ONE variant and seed for real, through the CLI (`no_plans`,
the only one that changes the data path: no plan store, a null context token), and checks the
other five by building their models abstractly (what each override changes in the parameter tree)
and by running the runner over all of them and two seeds with a recording stand-in for training
(which writes validation.json, where the runner reads the steps a run actually trained).
"""
import collections
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from configs import base
from fape_jax import ablate_lib
from fape_jax import checkpoint as ckpt_lib
from fape_jax import evaluate_lib
from fape_jax import restore_lib
from fape_jax import model_state
from fape_jax.errors import FapeError
from fape_jax.tasks import TASKS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def param_names(cfg) -> collections.Counter:
  """Counts of the generator's trainable parameter names (last two path parts)."""
  abstract, _ = model_state.abstract_state(cfg)
  return collections.Counter(".".join(str(p) for p in path[-2:])
                             for path, _ in nnx.to_flat_state(abstract["gen"]["params"]))


def test_each_variant_changes_what_it_says():
  tiny = base.get_config("tiny")
  names = {v: param_names(ablate_lib.variant_config(tiny, v)) for v in ablate_lib.VARIANTS}
  full = names["full"]
  assert full["text.kernel"] > 0 and full["router.lambda_logit"] > 0 and full["fc1.kernel"] == 1
  # No plan context: the projector keeps only its learned null token.
  assert names["no_plans"]["fc1.kernel"] == 0 and names["no_plans"]["text.kernel"] > 0
  # No text routing: no text router, and nothing to fuse the spectral prior with.
  assert names["no_text_router"]["text.kernel"] == 0
  assert names["no_text_router"]["router.lambda_logit"] == 0
  # No spectral routing: the text router stays, the fusion weight goes.
  assert names["no_spectral_router"]["text.kernel"] == full["text.kernel"]
  assert names["no_spectral_router"]["router.lambda_logit"] == 0
  # No frequency loss: the same model, only the loss weight changes.
  assert names["no_freq_loss"] == full
  assert ablate_lib.variant_config(tiny, "no_freq_loss").loss.w_freq == 0.0
  assert tiny.loss.w_freq > 0  # the base config is not modified
  # Dense: one LoRA per layer (half the A/B pairs of two experts), no routers.
  dense = names["dense"]
  assert dense["text.kernel"] == 0 and dense["router.lambda_logit"] == 0
  assert 0 < sum(v for k, v in dense.items() if k.startswith("A.")) < sum(
      v for k, v in full.items() if k.startswith("A."))
  # The objective and routing variants keep the model and change only their setting.
  assert names["plain_mse"] == full and names["top1_ste_all"] == full
  assert ablate_lib.variant_config(tiny, "plain_mse").loss.balance == "none" != tiny.loss.balance
  ste = ablate_lib.variant_config(tiny, "top1_ste_all").model.lora
  assert (ste.top1, ste.top1_mode) == ("all", "ste") != (tiny.model.lora.top1,
                                                         tiny.model.lora.top1_mode)


def fake_table(offset):
  return {t: {"degraded_psnr": 20.0 + i, "restored_psnr": 20.0 + i + offset, "n": 2}
          for i, t in enumerate(TASKS)}


GAIN = {"full": 1.0, "dense": 0.25}  # the other variants: 0.5; seed s adds 0.1 * s


def recording_trainer(seen, stop_at=None):
  """A stand-in for train_and_evaluate: records each call, writes validation.json as it does."""
  def train(c, workdir):
    name, seed = os.path.basename(os.path.dirname(workdir)), c.seed
    seen[(name, seed)] = (c, workdir)
    step = min(c.total_steps, (stop_at or {}).get((name, seed), c.total_steps))
    table = fake_table(GAIN.get(name, 0.5) + 0.1 * seed)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "validation.json"), "w") as f:
      json.dump({"step": step, "tasks": table}, f)
    return table
  return train


def must_not_train(c, workdir):
  raise AssertionError(f"retrained {workdir}")


def test_runner_trains_each_variant_and_seed_once_at_equal_budget(tmp_path, monkeypatch):
  cfg = base.get_config("tiny")
  cfg.total_steps = 3  # a --config.total_steps override: every run gets it
  cfg.max_wall_minutes = 5.0  # forced off: the budget is steps, not the machine's speed
  seen = {}
  result = ablate_lib.run_ablation(cfg, tmp_path, train_fn=recording_trainer(seen))
  # Default seeds 0 and 1, seed-major; each (variant, seed) in its own workdir.
  assert list(seen) == [(v, s) for s in (0, 1) for v in ablate_lib.VARIANTS]
  dirs = {k: w for k, (_, w) in seen.items()}
  assert len(set(dirs.values())) == 2 * len(ablate_lib.VARIANTS)
  assert dirs[("dense", 1)] == os.fspath(tmp_path / "dense" / "seed_1")
  assert all((tmp_path / v / f"seed_{s}" / ablate_lib.RESULT_FILE).exists() for v, s in seen)
  cfgs = {k: c for k, (c, _) in seen.items()}
  assert all(c.total_steps == 3 and c.max_wall_minutes == 0 and c.seed == k[1]
             for k, c in cfgs.items())
  assert cfg.max_wall_minutes == 5.0 and cfg.seed == 0  # the given config is not modified
  full0 = cfgs[("full", 0)]
  assert not cfgs[("no_plans", 0)].plans.enabled and full0.plans.enabled
  assert not cfgs[("no_text_router", 1)].model.lora.text_router
  assert not cfgs[("no_spectral_router", 0)].model.lora.spectral_router
  assert cfgs[("no_freq_loss", 0)].loss.w_freq == 0
  assert cfgs[("dense", 0)].model.lora.variant == "dense"

  assert result["steps"] == result["total_steps"] == 3 and result["seeds"] == [0, 1]
  assert len(result["runs"]) == 2 * len(ablate_lib.VARIANTS) and all(r["steps"] == 3 for r in result["runs"])
  rows = {r["variant"]: r for r in result["rows"]}
  assert list(rows) == list(ablate_lib.VARIANTS) and result["tasks"] == list(TASKS)
  assert rows["full"]["mean"] == pytest.approx(24.05) and rows["full"]["delta_vs_full"] == 0
  assert rows["full"]["mean_gain"] == pytest.approx(1.05)
  assert rows["full"]["mean_gain_spread"] == pytest.approx(0.1)
  assert rows["full"]["gain_spread"]["denoise"] == pytest.approx(0.1)
  assert rows["dense"]["delta_vs_full"] == pytest.approx(-0.75)
  assert rows["no_plans"]["delta_vs_full"] == pytest.approx(-0.5)
  assert result["input_mean"] == pytest.approx(23.0)
  assert result["machine"]["cores"] and result["date"]
  saved = json.loads((tmp_path / "ablation.json").read_text())
  assert saved == json.loads(json.dumps(result))
  text = ablate_lib.format_table(result)
  assert all(v in text for v in ablate_lib.VARIANTS) and "Δ vs full" in text and "-0.75" in text
  assert "equal budget of 3 steps" in text
  report = (tmp_path / "ablation.html").read_text()
  assert "Δ mean vs full" in report and all(f"<td class=\"l\">{v}</td>" in report
                                            for v in ablate_lib.VARIANTS)
  assert 'alt="mean gain per variant"' in report  # the bar chart (tests/test_report.py)

  # A second run reuses every finished run, whatever the budget flags: nothing is trained again.
  cfg.stop_after = 1
  again = ablate_lib.run_ablation(cfg, tmp_path, train_fn=must_not_train)
  assert again["rows"] == result["rows"] and again["runs"] == result["runs"]

  # A run recorded before a config field was added (its config.json lacks it, its result has an
  # older hash) is the same run when the field is at the value it trained with
  # (run_dir.ADDED_FIELDS); at another value it is another config and trains again.
  full1 = tmp_path / "full" / "seed_1"
  trained = json.loads(ablate_lib.run_config(cfg, "full", 1).to_json_best_effort())
  del trained["optim"]["flatten"]
  (full1 / "config.json").write_text(json.dumps(trained))
  old = json.loads((full1 / ablate_lib.RESULT_FILE).read_text())
  (full1 / ablate_lib.RESULT_FILE).write_text(json.dumps(old | {"config_hash": "before"}))
  cfg.optim.flatten = False
  again = ablate_lib.run_ablation(cfg, tmp_path, "full", [1], train_fn=must_not_train)
  assert again["runs"][0]["table"] == old["table"]
  (full1 / ablate_lib.RESULT_FILE).write_text(json.dumps(old | {"config_hash": "before"}))
  cfg.optim.flatten = True
  seen.clear()
  ablate_lib.run_ablation(cfg, tmp_path, "full", [1], train_fn=recording_trainer(seen))
  assert list(seen) == [("full", 1)]

  # Checkpoints complete but the result lost (killed in between, or a config field added since):
  # not retrained; the table is training's own final validation (validation.json), the same
  # measurement as every other run's, and only without it is the run validated again.
  evaluated = []

  def validate(workdir, limit):
    evaluated.append((os.fspath(workdir), limit))
    return fake_table(0.3)

  dense0 = tmp_path / "dense" / "seed_0"
  for validated_step in (3, 2):  # 2: the newest checkpoint (step 3) was never validated
    os.remove(dense0 / ablate_lib.RESULT_FILE)
    saved = json.loads((dense0 / "validation.json").read_text())
    (dense0 / "validation.json").write_text(json.dumps(saved | {"step": validated_step}))
    monkeypatch.setattr(ablate_lib, "steps_run", lambda vdir: 3)  # the newest checkpoint
    again = ablate_lib.run_ablation(cfg, tmp_path, ["dense", "full"], "0",
                                    train_fn=lambda c, w: {}, evaluate_fn=validate)
    assert [r["variant"] for r in again["rows"]] == ["full", "dense"] and again["seeds"] == [0]
    dense = next(r for r in again["runs"] if r["variant"] == "dense")
    assert dense["table"] == fake_table(0.25 if validated_step == 3 else 0.3)
  assert evaluated == [(os.fspath(dense0), cfg.num_eval_images)]
  monkeypatch.undo()

  # A longer budget: the finished runs are not finished any more, and resume.
  cfg.total_steps, cfg.stop_after = 4, 0
  seen.clear()
  ablate_lib.run_ablation(cfg, tmp_path, "full", [1], train_fn=recording_trainer(seen))
  assert list(seen) == [("full", 1)] and seen[("full", 1)][0].total_steps == 4


def test_runs_stopped_early_keep_their_true_steps_and_resume(tmp_path):
  cfg = base.get_config("tiny")
  cfg.total_steps = 3
  seen = {}
  # dense/seed_1 stops at step 2 (stop_after, or a preemption): the table must refuse it.
  with pytest.raises(FapeError,
                     match=r"unequal budgets.*2 steps: dense/seed_1; 3 steps: full/seed_0"):
    ablate_lib.run_ablation(cfg, tmp_path, "full,dense", train_fn=recording_trainer(
        seen, stop_at={("dense", 1): 2}))
  saved = json.loads((tmp_path / "dense" / "seed_1" / ablate_lib.RESULT_FILE).read_text())
  assert saved["steps"] == 2 and saved["total_steps"] == 3  # the true count, not total_steps
  # The same command again: only the unfinished run trains (the trainer resumes it).
  seen.clear()
  result = ablate_lib.run_ablation(cfg, tmp_path, "full,dense", train_fn=recording_trainer(seen))
  assert list(seen) == [("dense", 1)]
  assert result["steps"] == 3 and {r["steps"] for r in result["runs"]} == {3}


def test_steps_are_read_from_the_run_not_the_config(tmp_path):
  with pytest.raises(FapeError, match="how many steps"):
    ablate_lib.steps_run(tmp_path)
  (tmp_path / "validation.json").write_text(json.dumps({"step": 7, "tasks": {}}))
  assert ablate_lib.steps_run(tmp_path) == 7


def hand_made_result():
  runs = [{"variant": v, "seed": s, "steps": 100, "table": fake_table(g)}
          for v, gains in [("full", (1.0, 1.1)), ("no_freq_loss", (1.0, 1.02)),
                           ("dense", (0.25, 0.25))]
          for s, g in zip((0, 1), gains)]
  return {"total_steps": 100, "runs": runs, "command": ".venv/bin/python -m fape_jax.ablate x",
          "machine": {"cpu": "Test CPU 9000", "cores": 2, "backend": "cpu", "devices": 1,
                      "device_kind": "cpu", "commit": "abc123"},
          "date": "2026-12-01T00:00:00+00:00"}


def test_markdown_from_a_hand_made_json():
  text = ablate_lib.render_markdown(hand_made_result(), source="bench/results/ablation.json")
  lines = text.splitlines()
  assert "| task | input PSNR | `full` | `no_freq_loss` | `dense` |" in lines
  assert "| deraining | 20.00 | +1.05 (0.10) | +1.01 (0.02) | +0.25 (0.00) |" in lines
  assert f"| {TASKS[-1]} | {20.0 + len(TASKS) - 1:.2f} | +1.05 (0.10) |" in text
  assert "| **mean** | 23.00 | +1.05 (0.10) | +1.01 (0.02) | +0.25 (0.00) |" in lines
  assert "| Δ mean vs full | | — | -0.04 | -0.80 |" in lines
  assert "| steps run | | 100 | 100 | 100 |" in lines
  # no_freq_loss is 0.04 below full with a seed spread of 0.10: within; dense is beyond.
  note = next(l for l in lines if l.startswith("Full model vs each variant"))
  assert "within the spread (not told apart from seed noise): `no_freq_loss` -0.04 (spread " \
         "0.10); beyond it: `dense` -0.80 (spread 0.10)." in note
  # A result marked stale says so at the top; an unmarked one does not.
  assert not any("STALE" in l for l in lines)
  stale = dict(hand_made_result(), stale="the default batching changed")
  stale_lines = ablate_lib.render_markdown(stale).splitlines()
  assert stale_lines[4] == "**STALE: the default batching changed**"
  assert "max - min over seeds" in text and "seeds 0, 1" in text
  assert "Steps: 100 per run, 6 runs (3 variant(s) x 2 seed(s): 0, 1)" in text
  assert "Command: `.venv/bin/python -m fape_jax.ablate x`" in lines
  assert "Machine: Test CPU 9000, 2 cores (cpu, 1 device(s): cpu); commit `abc123`; " \
         "2026-12-01T00:00:00+00:00" in lines
  assert "`bench/results/ablation.json`" in text

  one_seed = hand_made_result()
  one_seed["runs"] = [r for r in one_seed["runs"] if r["seed"] == 0]
  assert "One seed only" in ablate_lib.render_markdown(one_seed)


def test_unequal_budgets_are_refused():
  result = hand_made_result()
  result["runs"][3]["steps"] = 80  # no_freq_loss seed 1
  with pytest.raises(FapeError, match=r"unequal budgets.*80 steps: no_freq_loss/seed_1; "
                     r"100 steps: full/seed_0, full/seed_1"):
    ablate_lib.render_markdown(result)


def test_publish_render_and_check(tmp_path):
  results, md = tmp_path / "bench" / "ablation.json", tmp_path / "ABLATION.md"
  with pytest.raises(FapeError, match="--out needs --results"):
    ablate_lib.publish(hand_made_result(), None, md)
  with pytest.raises(FapeError, match="No ablation results"):
    ablate_lib.check_file(results, md)
  ablate_lib.publish(hand_made_result(), results, md)
  assert json.loads(results.read_text()) == hand_made_result()
  assert "`bench/ablation.json`" in md.read_text() and ablate_lib.check_file(results, md)
  md.write_text(md.read_text().replace("+1.05", "+1.50"))
  assert not ablate_lib.check_file(results, md)
  ablate_lib.render_file(results, md)
  assert ablate_lib.check_file(results, md)


def test_ablation_md_is_rendered_from_its_json():
  if not ablate_lib.DEFAULT_MARKDOWN.exists():
    pytest.skip("no ABLATION.md yet (the real ablation has not been published)")
  assert ablate_lib.check_file(ablate_lib.DEFAULT_RESULTS, ablate_lib.DEFAULT_MARKDOWN), (
      "ABLATION.md is stale: run .venv/bin/python -m fape_jax.ablate --render_only")


def test_unknown_variants_and_bad_seeds_are_refused():
  with pytest.raises(FapeError, match="unknown variant"):
    ablate_lib.parse_variants("full,no_router")
  assert ablate_lib.parse_variants("dense, full") == ["full", "dense"]
  assert ablate_lib.parse_variants([]) == list(ablate_lib.VARIANTS)
  assert ablate_lib.parse_seeds(None) == [0, 1] and ablate_lib.parse_seeds("2, 0") == [2, 0]
  assert ablate_lib.parse_seeds(["0", "1", "2"]) == [0, 1, 2]
  with pytest.raises(FapeError, match="not non-negative integers"):
    ablate_lib.parse_seeds("0,x")
  with pytest.raises(FapeError, match="repeats a seed"):
    ablate_lib.parse_seeds("1,1")


@pytest.mark.slow
def test_render_and_check_cli(tmp_path):
  results, md = tmp_path / "ablation.json", tmp_path / "ABLATION.md"
  results.write_text(json.dumps(hand_made_result()))
  cli = [sys.executable, "-m", "fape_jax.ablate", f"--results={results}", f"--out={md}"]
  run = lambda *flags: subprocess.run([*cli, *flags], cwd=REPO, capture_output=True, text=True,
                                      timeout=300)
  proc = run("--check")
  assert proc.returncode == 1 and "out of date" in proc.stderr
  assert run("--render_only").returncode == 0 and "| **mean** |" in md.read_text()
  assert run("--check").returncode == 0


@pytest.mark.slow
def test_cli_trains_a_real_variant(tmp_path, tmp_path_factory):
  data_dir = tmp_path_factory.getbasetemp() / "tiny_data"
  workdir = tmp_path / "ablation"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, like a laptop
  cmd = [sys.executable, "-m", "fape_jax.ablate", "--config=configs/base.py:tiny",
         f"--workdir={workdir}", "--variants=no_plans", "--seeds=0", "--config.total_steps=1",
         f"--config.data.data_dir={data_dir}", f"--results={tmp_path / 'abl.json'}",
         f"--out={tmp_path / 'ABL.md'}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Ablation at an equal budget of 1 steps" in proc.stdout
  result = json.loads((workdir / "ablation.json").read_text())
  (row,) = result["rows"]
  assert row["variant"] == "no_plans" and row["delta_vs_full"] is None
  assert result["tasks"] and set(result["tasks"]) <= set(TASKS)
  assert all(np.isfinite(row["psnr"][t]) for t in result["tasks"])
  # The steps come from the run's checkpoint; the published JSON renders into the Markdown.
  assert result["steps"] == row["steps"] == 1 and result["seeds"] == [0]
  assert json.loads((tmp_path / "abl.json").read_text())["runs"] == result["runs"]
  md = (tmp_path / "ABL.md").read_text()
  assert "| steps run | | 1 |" in md and "One seed only" in md and "--seeds=0" in md
  assert ablate_lib.check_file(tmp_path / "abl.json", tmp_path / "ABL.md")
  vdir = workdir / "no_plans" / "seed_0"
  ckpt = ckpt_lib.Checkpointer(vdir / "checkpoints", save_every=1, keep=1, read_only=True)
  assert ckpt.all_steps() == [1]
  ckpt.close()

  # The real training checkpoint (with its data-iterator item) restores for inference, and the
  # evaluate path (per-image restore) reproduces training's own final validation numbers.
  restorer = restore_lib.load_restorer(vdir, devices=jax.devices()[:1])
  assert restorer.step == 1 and not restorer.plans_enabled
  table = evaluate_lib.validation_psnr(vdir, limit=8, restorer=restorer)
  trained = json.loads((vdir / ablate_lib.RESULT_FILE).read_text())["table"]
  assert table.keys() == trained.keys()
  for t in table:
    assert table[t]["n"] == trained[t]["n"]
    assert table[t]["restored_psnr"] == pytest.approx(trained[t]["restored_psnr"], abs=1e-3)

  # The same config built in Python is recognised as finished: no retraining.
  cfg = base.get_config("tiny")
  cfg.total_steps = 1
  cfg.data.data_dir = str(data_dir)
  again = ablate_lib.run_ablation(cfg, workdir, "no_plans", [0], train_fn=lambda c, w: 1 / 0)
  assert again["rows"][0]["psnr"] == row["psnr"]
