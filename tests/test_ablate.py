"""The ablation runner: variant configs, the Table-4 table, resuming, and one real tiny run.

Training all six variants for real compiles six train steps (~2-3 minutes each on this shared
2-core machine), so the module trains ONE variant for real, through the CLI (`no_plans`, the only
one that changes the data path: no plan store, a null context token), and checks the other five
by building their models abstractly (what each override changes in the parameter tree) and by
running the runner over all six with a recording stand-in for training.
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


def fake_table(offset):
  return {t: {"degraded_psnr": 20.0 + i, "restored_psnr": 20.0 + i + offset, "n": 2}
          for i, t in enumerate(TASKS)}


def test_runner_trains_each_variant_once_at_equal_budget(tmp_path):
  cfg = base.get_config("tiny")
  cfg.total_steps = 3  # a --config.total_steps override: every variant gets it
  seen = {}

  def train(c, workdir):
    name = os.path.basename(workdir)
    seen[name] = c
    return fake_table({"full": 1.0, "dense": 0.25}.get(name, 0.5))

  result = ablate_lib.run_ablation(cfg, tmp_path, train_fn=train)
  assert list(seen) == list(ablate_lib.VARIANTS)
  assert all(c.total_steps == 3 for c in seen.values())
  assert not seen["no_plans"].plans.enabled and seen["full"].plans.enabled
  assert not seen["no_text_router"].model.lora.text_router
  assert not seen["no_spectral_router"].model.lora.spectral_router
  assert seen["no_freq_loss"].loss.w_freq == 0 and seen["dense"].model.lora.variant == "dense"
  rows = {r["variant"]: r for r in result["rows"]}
  assert list(rows) == list(ablate_lib.VARIANTS) and result["tasks"] == list(TASKS)
  assert rows["full"]["mean"] == pytest.approx(24.0) and rows["full"]["delta_vs_full"] == 0
  assert rows["dense"]["delta_vs_full"] == pytest.approx(-0.75)
  assert rows["no_plans"]["delta_vs_full"] == pytest.approx(-0.5)
  assert result["input_mean"] == pytest.approx(23.0)
  saved = json.loads((tmp_path / "ablation.json").read_text())
  assert saved == json.loads(json.dumps(result))
  text = ablate_lib.format_table(result)
  assert all(v in text for v in ablate_lib.VARIANTS) and "Δ vs full" in text and "-0.75" in text
  report = (tmp_path / "ablation.html").read_text()
  assert "Δ vs full" in report and all(f"<td class=\"l\">{v}</td>" in report
                                       for v in ablate_lib.VARIANTS)

  # A second run reuses every finished variant: nothing is trained again.
  def must_not_train(c, workdir):
    raise AssertionError(f"retrained {workdir}")

  again = ablate_lib.run_ablation(cfg, tmp_path, train_fn=must_not_train)
  assert again == result

  # Checkpoints complete but the result lost (killed in between): validated, not retrained.
  os.remove(tmp_path / "dense" / ablate_lib.RESULT_FILE)
  evaluated = []

  def validate(workdir, limit):
    evaluated.append((os.path.basename(workdir), limit))
    return fake_table(0.25)

  again = ablate_lib.run_ablation(cfg, tmp_path, ["dense", "full"],
                                  train_fn=lambda c, w: {}, evaluate_fn=validate)
  assert evaluated == [("dense", cfg.num_eval_images)]
  assert [r["variant"] for r in again["rows"]] == ["full", "dense"]

  # A changed config (here the budget) is not "finished": that variant trains again.
  cfg.total_steps = 4
  ablate_lib.run_ablation(cfg, tmp_path, "full", train_fn=train)
  assert seen["full"].total_steps == 4


def test_unknown_variants_are_refused():
  with pytest.raises(FapeError, match="unknown variant"):
    ablate_lib.parse_variants("full,no_router")
  assert ablate_lib.parse_variants("dense, full") == ["full", "dense"]
  assert ablate_lib.parse_variants([]) == list(ablate_lib.VARIANTS)


@pytest.mark.slow
def test_cli_trains_a_real_variant(tmp_path, tmp_path_factory):
  data_dir = tmp_path_factory.getbasetemp() / "tiny_data"
  workdir = tmp_path / "ablation"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, like a laptop
  cmd = [sys.executable, "-m", "fape_jax.ablate", "--config=configs/base.py:tiny",
         f"--workdir={workdir}", "--variants=no_plans", "--config.total_steps=1",
         f"--config.data.data_dir={data_dir}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Ablation at an equal budget of 1 steps" in proc.stdout
  result = json.loads((workdir / "ablation.json").read_text())
  (row,) = result["rows"]
  assert row["variant"] == "no_plans" and row["delta_vs_full"] is None
  assert result["tasks"] and set(result["tasks"]) <= set(TASKS)
  assert all(np.isfinite(row["psnr"][t]) for t in result["tasks"])
  vdir = workdir / "no_plans"
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
  again = ablate_lib.run_ablation(cfg, workdir, "no_plans", train_fn=lambda c, w: 1 / 0)
  assert again["rows"][0]["psnr"] == row["psnr"]
