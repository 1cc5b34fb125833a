"""Planners end to end: the `hf` planner on a tiny random local MLLM (batch > 1), its happy path
with a valid generated line, the `mllm` encoder on the same model, and the rule planner's format."""

import numpy as np
import pytest
import torch

from fape_jax.errors import FapeError
from fape_jax.planning import prompts
from fape_jax.planning.encoders import MLLMEncoder
from fape_jax.planning.hints import compute_hints
from fape_jax.planning.planners import PIPELINES, HFPlanner, RulePlanner
from fape_jax.planning.tiny_mllm import write_tiny_mllm
from fape_jax.tasks import FOCUS, TASKS


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return write_tiny_mllm(tmp_path_factory.mktemp("tiny_mllm"))


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8) for i in range(3)]


def test_hf_planner_garbage_goes_through_retries_to_fallback(tiny, images):
  planner = HFPlanner(tiny, batch_size=2, max_new_tokens=12, seed=3)
  assert not planner.model.training
  assert not any(p.requires_grad for p in planner.model.parameters())
  assert next(planner.model.parameters()).dtype == torch.float32   # CPU: float32
  plans = planner.plan(images)
  assert len(plans) == 3
  rule = RulePlanner()
  for image, plan in zip(images, plans):
    # A random model writes garbage: three answers (0.7, then 0.2 and 0.5), all kept, then the
    # rule planner's plan.
    assert plan.fallback and plan.n_retries == 2 and len(plan.raw) == 3
    assert all(isinstance(r, str) for r in plan.raw)
    assert plan.task == rule.plan([image])[0].task
    assert prompts.parse_plan(plan.text).task == plan.task
  # Seeded: a fresh planner with the same seed writes the same raw answers.
  again = HFPlanner(tiny, batch_size=2, max_new_tokens=12, seed=3).plan(images)
  assert [p.raw for p in again] == [p.raw for p in plans]


def test_hf_planner_happy_path_with_valid_generation(tiny, images, monkeypatch):
  planner = HFPlanner(tiny, batch_size=2, max_new_tokens=64)
  tok = planner.processor.tokenizer
  # Answers that agree with each image's strong evidence, with the chatter a chat model adds.
  wanted = [compute_hints(im).strong_evidence()[-1] for im in images]
  answers = iter([
      f"Task: {wanted[0]}, Focus: {FOCUS[wanted[0]]}, Rationale: soft, Pipeline: a -> b.",
      f"Sure.\nTask: {wanted[1]}, Focus: {FOCUS[wanted[1]]}, Rationale: grain, Pipeline: c",
      f"Task: {wanted[2]}, Focus: {FOCUS[wanted[2]]}, Rationale: small, Pipeline: up -> refine.",
  ])
  seen = []

  def fake_generate(**inputs):
    seen.append((inputs["input_ids"].shape[0], inputs["temperature"], inputs["top_p"],
                 inputs["max_new_tokens"], "pixel_values" in inputs))
    rows = [tok(next(answers), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            for _ in range(inputs["input_ids"].shape[0])]
    new = torch.full((len(rows), max(len(r) for r in rows)), tok.pad_token_id)
    for i, r in enumerate(rows):
      new[i, :len(r)] = r
    return torch.cat([inputs["input_ids"], new], dim=1)

  monkeypatch.setattr(planner.model, "generate", fake_generate)
  plans = planner.plan(images)
  # Batched in twos, the paper's sampling settings, the image passed along, no re-prompt.
  assert seen == [(2, 0.7, 0.9, 64, True), (1, 0.7, 0.9, 64, True)]
  assert [p.task for p in plans] == wanted
  assert all(p.n_retries == 0 and not p.fallback and len(p.raw) == 1 for p in plans)
  assert plans[1].raw[0].startswith("Sure.") and plans[1].pipeline == ("c",)
  assert plans[2].pipeline == ("up", "refine") and plans[2].rationale == "small"


def test_mllm_encoder_on_the_same_model(tiny):
  planner = HFPlanner(tiny, batch_size=2, max_new_tokens=4)
  enc = MLLMEncoder(tiny, max_tokens=16, dtype="float16")
  assert enc.model is planner.model               # loaded once, shared
  texts = [prompts.format_plan("deblur", "high", "soft", ["a", "b"]),
           prompts.format_plan("dehazing", "low", "washed out colours everywhere", ["c"])]
  tokens, mask = enc.encode(texts)
  assert tokens.shape == (2, 16, 32) and tokens.dtype == np.float16 and mask.all()
  assert not np.array_equal(tokens[0], tokens[1])
  # Short K keeps the *last* tokens: the end of the conversation, where the plan is.
  long_k = MLLMEncoder(tiny, max_tokens=512)
  full, full_mask = long_k.encode(texts[:1])
  n = int(full_mask[0].sum())
  assert 16 < n < 512 and not full_mask[0, n:].any()
  np.testing.assert_allclose(tokens[0].astype(np.float32),
                             full[0, n - 16:n].astype(np.float32), atol=2e-3)
  # Batch-independent (right padding): alone or next to a longer text, the same states.
  alone, _ = enc.encode(texts[:1])
  np.testing.assert_allclose(alone[0].astype(np.float32), tokens[0].astype(np.float32), atol=2e-3)


def test_hf_planner_missing_model_is_a_clear_error(tmp_path):
  with pytest.raises(FapeError, match="local files"):
    HFPlanner(str(tmp_path / "no_such_model"))


def test_rule_planner_writes_parseable_plans_for_every_task():
  rule = RulePlanner()
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
  plan = rule.plan([image])[0]
  for task in TASKS:
    line = prompts.format_plan(task, FOCUS[task], "r", ["x"])
    assert prompts.parse_plan(line).task == task
  parsed = prompts.parse_plan(plan.raw[0])
  assert (parsed.task, parsed.focus, parsed.pipeline) == (plan.task, plan.focus, plan.pipeline)
  # Pipelines describe operations and never name a task (prompt rule 5).
  for steps in PIPELINES.values():
    assert not any(t in " ".join(steps) for t in TASKS)
