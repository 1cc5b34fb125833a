"""The planning prompt and the strict one-line parser, including the re-prompt path."""

import dataclasses

import numpy as np
import pytest

from fape_jax.planning import prompts
from fape_jax.planning.hints import Hints
from fape_jax.planning.planners import RulePlanner, plan_with_retries
from fape_jax.tasks import FOCUS, TASKS

VALID = ("Task: deraining, Focus: high, Rationale: thin oriented streaks, low contrast, "
         "Pipeline: find streaks -> remove streaks -> restore texture.")

# Hints with no strong evidence at all (a large, clean, well-exposed image).
QUIET = Hints(height=800, width=900, rain_line=0.08, rain_anisotropy=0.44, rain_fft_ratio=0.05,
              snow_blobs=3, snow_blob_density=0.1, noise_mad=0.001, noise_chroma=0.002,
              noise_score=0.43, blur_laplacian_var=0.01, blur_fft_ratio=0.02, blur_grad95=0.40,
              haze_dark=0.1, haze_saturation=0.5, haze_depth=0.0, haze_score=0.3,
              luma_mean=0.5, luma_median=0.5)
# Strong haze evidence only.
HAZY = dataclasses.replace(QUIET, haze_score=0.8, haze_depth=0.1, haze_dark=0.6,
                           blur_laplacian_var=0.05)


def test_valid_line_parses_with_commas_in_rationale():
  p = prompts.parse_plan(VALID)
  assert p.task == "deraining" and p.focus == "high"
  assert p.rationale == "thin oriented streaks, low contrast"
  assert p.pipeline == ("find streaks", "remove streaks", "restore texture")
  # The canonical text parses back to the same plan.
  assert prompts.parse_plan(p.text) == p


def test_chatter_and_missing_period_tolerated():
  text = "Sure! Here is my plan:\n\n" + VALID.rstrip(".") + "  \nI hope this helps."
  assert prompts.parse_plan(text).pipeline[-1] == "restore texture"


@pytest.mark.parametrize("text, message", [
    ("Task: deraining, Focus: high, Pipeline: a -> b.", "missing field(s) Rationale"),
    ("Task: deraining, Rationale: r, Pipeline: a -> b.", "missing field(s) Focus"),
    ("Focus: high, Rationale: r, Pipeline: a.", "no line starts with 'Task:'"),
    ("Task: deraining, Focus: high, Rationale: r.", "missing field(s) Pipeline"),
    ("Task: derain, Focus: high, Rationale: r, Pipeline: a -> b.", "unknown task 'derain'"),
    ("Task: rain removal, Focus: high, Rationale: r, Pipeline: a.", "unknown task"),
    ("Task: dehazing, Focus: medium, Rationale: r, Pipeline: a.", "not 'high' or 'low'"),
    ("Task: dehazing, Focus: high, Rationale: r, Pipeline: a.", "contradicts the band"),
    ("Task: deblur, Focus: high, Rationale: , Pipeline: a.", "empty rationale"),
    ("Task: deblur, Focus: high, Rationale: r, Pipeline: a -> -> b.", "empty step"),
    ("", "no line starts with 'Task:'"),
])
def test_malformed_answers_rejected(text, message):
  with pytest.raises(prompts.PlanFormatError, match=message.replace("(", r"\(").replace(")", r"\)")):
    prompts.parse_plan(text)


def test_prompt_holds_rules_bands_hints_and_format():
  text = prompts.build_prompt(HAZY)
  for t in TASKS:
    assert t in text
  assert prompts.FORMAT_LINE in text
  assert "dark channel 0.60" in text and "STRONG" in text
  assert "could not be used" not in text
  re_ask = prompts.build_prompt(HAZY, choices=("dehazing",), problem="it was wrong")
  assert "Task must be exactly one of: dehazing." in re_ask
  assert "could not be used: it was wrong" in re_ask


def test_check_answer_flags_contradicted_evidence():
  rain = VALID
  plan, problem = prompts.check_answer(rain, QUIET)
  assert plan is not None and problem is None          # nothing strong to contradict
  plan, problem = prompts.check_answer(rain, HAZY)
  assert plan is None and "contradicts the strong evidence for dehazing" in problem
  assert prompts.reprompt_choices(HAZY) == ("dehazing",)
  assert prompts.reprompt_choices(QUIET) == TASKS
  # An answer outside the offered list is unusable even when well-formed.
  plan, problem = prompts.check_answer(rain, QUIET, choices=("deblur",))
  assert plan is None and "not one of the offered" in problem


def _line(task):
  return f"Task: {task}, Focus: {FOCUS[task]}, Rationale: seen, Pipeline: step one -> step two."


def test_reprompt_path_restricts_choices_and_lowers_temperature():
  calls = []

  def generate(images, texts, temperature):
    calls.append((len(texts), temperature, texts))
    if temperature == 0.7:   # first round: garbage for image 0, a contradiction for image 1
      return ["no idea", _line("deraining"), _line("deblur")]
    return [_line("dehazing") for _ in texts]

  images = [np.zeros((8, 8, 3), np.uint8)] * 3
  plans = plan_with_retries(generate, images, [QUIET, HAZY, QUIET], temperature=0.7,
                            retry_temperatures=(0.2, 0.5), fallback=RulePlanner())
  assert [c[:2] for c in calls] == [(3, 0.7), (2, 0.2)]
  retry_texts = calls[1][2]
  assert "Choose the task from this list only: dehazing." in retry_texts[1]
  assert "does not follow the format" in retry_texts[0]
  assert [p.task for p in plans] == ["dehazing", "dehazing", "deblur"]
  assert [p.n_retries for p in plans] == [1, 1, 0]
  assert not any(p.fallback for p in plans)
  assert plans[0].raw == ("no idea", _line("dehazing"))   # every raw answer kept


def test_fallback_after_all_retries_keeps_raw_text():
  temps = []

  def generate(images, texts, temperature):
    temps.append(temperature)
    return ["Task: rain removal, Focus: high, Rationale: x, Pipeline: a."] * len(texts)

  plans = plan_with_retries(generate, [np.zeros((8, 8, 3), np.uint8)], [HAZY], temperature=0.7,
                            retry_temperatures=(0.2, 0.5), fallback=RulePlanner())
  assert temps == [0.7, 0.2, 0.5]
  (p,) = plans
  assert p.fallback and p.n_retries == 2 and len(p.raw) == 3
  assert p.task == RulePlanner().decide(HAZY) == "dehazing"
  assert prompts.parse_plan(p.text).task == p.task
