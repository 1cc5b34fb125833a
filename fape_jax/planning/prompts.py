"""The planning prompt, its one-line answer format, and a strict parser of that answer.

Answer format (METHOD.md section 2), one line:

  Task: <task>, Focus: <high|low>, Rationale: <short reason>, Pipeline: <step -> step -> ...>.

The parser tolerates surrounding chatter lines and a trailing period, nothing else: a task word
outside the vocabulary, a focus that is not the task's band, or a missing field is an error, and the
planner then asks again (`reprompt`) with a restricted choice list.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from fape_jax.planning.hints import Hints
from fape_jax.tasks import FOCUS, TASKS

_TASK_HELP = {
    "deraining": "rain streaks (thin, oriented bright lines)",
    "desnowing": "snow (many small bright particles, little orientation)",
    "deblur": "motion or defocus blur (soft edges, little fine detail)",
    "denoise": "sensor or Gaussian noise (grain in flat areas, colour speckle)",
    "super_resolution": "low resolution (small, blocky or over-smooth detail)",
    "dehazing": "haze or fog (low contrast, washed-out colours, bright dark channel)",
    "light_enhancement": "low light (under-exposed, dark)",
}

FORMAT_LINE = "Task: <task>, Focus: <high|low>, Rationale: <short reason>, Pipeline: <step -> step -> ...>."


class PlanFormatError(ValueError):
  """A planner answer that does not follow the one-line format (internal: triggers a re-prompt)."""


@dataclasses.dataclass(frozen=True)
class ParsedPlan:
  task: str
  focus: str
  rationale: str
  pipeline: tuple[str, ...]

  @property
  def text(self) -> str:
    """The canonical one-line plan: what gets encoded into plan tokens."""
    return format_plan(self.task, self.focus, self.rationale, self.pipeline)


def format_plan(task: str, focus: str, rationale: str, pipeline: Sequence[str]) -> str:
  return (f"Task: {task}, Focus: {focus}, Rationale: {rationale}, "
          f"Pipeline: {' -> '.join(pipeline)}.")


def _band_rules() -> str:
  lines = []
  for band in ("high", "low"):
    tasks = [t for t in TASKS if FOCUS[t] == band]
    lines.append(f"- {band}-frequency tasks (Focus: {band}):")
    lines.extend(f"    {t}: {_TASK_HELP[t]}" for t in tasks)
  return "\n".join(lines)


def build_prompt(hints: Hints, choices: Sequence[str] | None = None,
                 problem: str | None = None) -> str:
  """The planning prompt for one image: expert rules, band assignment, hints, output format.

  `choices` restricts the task list (a re-prompt); `problem` says what was wrong with the previous
  answer.
  """
  choices = tuple(choices) if choices else TASKS
  text = [
      "You are an expert image-restoration planner. Look at the image and the measured hints, "
      "decide which single restoration task dominates, and write a short plan.",
      "",
      "Tasks by frequency band:",
      _band_rules(),
      "",
      "Rules:",
      f"1. Task must be exactly one of: {' | '.join(choices)}.",
      "2. Focus is the band of that task: high for deraining, desnowing, deblur, denoise and "
      "super_resolution; low for dehazing and light_enhancement.",
      "3. When several degradations are mixed, choose the task of the dominant band.",
      "4. Hints marked STRONG crossed a calibrated threshold: do not contradict them without a "
      "visible reason. A gray or dark-themed scene is not necessarily under-exposed.",
      "5. Pipeline: 2 to 5 concrete processing steps joined by ' -> '; the steps must not name "
      "any task from the list.",
      "6. Answer with exactly one line and nothing else:",
      FORMAT_LINE,
      "",
      "Hints measured on the image:",
      *hints.lines(),
  ]
  if problem:
    text += ["", f"Your previous answer could not be used: {problem}.",
             f"Choose the task from this list only: {' | '.join(choices)}. "
             "Answer again with exactly one line in the format above."]
  return "\n".join(text)


_LINE = re.compile(
    r"^Task:\s*(?P<task>[^,]*?)\s*,\s*Focus:\s*(?P<focus>[^,]*?)\s*,\s*"
    r"Rationale:\s*(?P<rationale>.*?)\s*,\s*Pipeline:\s*(?P<pipeline>.*?)\s*\.?\s*$")
_FIELDS = ("Task", "Focus", "Rationale", "Pipeline")


def parse_plan(text: str) -> ParsedPlan:
  """Parses one planner answer; raises PlanFormatError saying what is wrong.

  The first line that starts with 'Task:' is the answer (other lines are chatter). Fields must
  come in order; the task must be a vocabulary word, the focus that task's band, the rationale
  non-empty, and the pipeline at least one non-empty step.
  """
  lines = [ln.strip() for ln in text.strip().splitlines()]
  candidates = [ln for ln in lines if ln.startswith("Task:")]
  if not candidates:
    raise PlanFormatError("no line starts with 'Task:'")
  line = candidates[0]
  m = _LINE.match(line)
  if m is None:
    missing = [f for f in _FIELDS if f"{f}:" not in line]
    if missing:
      raise PlanFormatError(f"missing field(s) {', '.join(missing)} in {line!r}")
    raise PlanFormatError(f"fields out of order or badly separated in {line!r}")
  task, focus = m["task"].lower(), m["focus"].lower()
  if task not in TASKS:
    raise PlanFormatError(f"unknown task {m['task']!r} (expected one of {', '.join(TASKS)})")
  if focus not in ("high", "low"):
    raise PlanFormatError(f"focus {m['focus']!r} is not 'high' or 'low'")
  if focus != FOCUS[task]:
    raise PlanFormatError(f"focus {focus!r} contradicts the band of {task} ({FOCUS[task]})")
  rationale = m["rationale"].strip()
  if not rationale:
    raise PlanFormatError("empty rationale")
  steps = tuple(s.strip() for s in m["pipeline"].split("->"))
  if not steps or any(not s for s in steps):
    raise PlanFormatError(f"pipeline {m['pipeline']!r} has an empty step")
  return ParsedPlan(task=task, focus=focus, rationale=rationale, pipeline=steps)


def check_answer(text: str, hints: Hints,
                 choices: Sequence[str] | None = None) -> tuple[ParsedPlan | None, str | None]:
  """(plan, None) for a usable answer, else (None, problem) for the re-prompt.

  Unusable: malformed, outside the offered `choices`, or contradicting strong evidence (the task is
  not among the tasks whose hints crossed the authors' thresholds, when any did).
  """
  try:
    plan = parse_plan(text)
  except PlanFormatError as e:
    return None, f"it does not follow the format ({e})"
  if choices and plan.task not in choices:
    return None, f"{plan.task} is not one of the offered tasks"
  evidence = hints.strong_evidence()
  if evidence and plan.task not in evidence:
    return None, (f"{plan.task} contradicts the strong evidence for "
                  f"{' or '.join(evidence)}")
  return plan, None


def reprompt_choices(hints: Hints) -> tuple[str, ...]:
  """The restricted task list of a re-prompt: the strong-evidence tasks, or all when there are none."""
  return hints.strong_evidence() or TASKS
