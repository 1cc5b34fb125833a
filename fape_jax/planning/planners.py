"""Planners: degraded images in, one-line plans out (METHOD.md section 2).

Both planners share one interface, `planner.plan(images) -> list[Plan]` over uint8 HxWx3 arrays,
used offline by the plan-cache job and online by `restore` for new images:

- `RulePlanner` decides task and focus from the label-free hints alone and writes the plan in the
  same format (the embedded default, and the baseline an MLLM has to beat).
- `HFPlanner` asks a frozen Hugging Face image-text-to-text model (default Qwen2.5-VL-7B-Instruct)
  with the prompt of `prompts.py`; malformed answers and answers that contradict strong evidence
  are asked again with a restricted task list at lower temperatures, and after the last retry the
  rule planner's answer is used (`Plan.fallback`). Every raw answer is kept (`Plan.raw`).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence

import numpy as np

from fape_jax.errors import FapeError
from fape_jax.planning import prompts
from fape_jax.planning.hints import Hints, compute_hints, downscale
from fape_jax.tasks import FOCUS

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"


@dataclasses.dataclass(frozen=True)
class Plan:
  """One image's plan: the parsed fields, every raw answer, the hints, and how it was reached."""
  task: str
  focus: str
  rationale: str
  pipeline: tuple[str, ...]
  raw: tuple[str, ...]          # every answer the planner produced, in order
  hints: Hints
  n_retries: int = 0            # re-prompts needed (0: the first answer was used)
  fallback: bool = False        # True: no usable answer after the retries; the rule plan is used

  @property
  def text(self) -> str:
    """The canonical one-line plan (what the encoders embed)."""
    return prompts.format_plan(self.task, self.focus, self.rationale, self.pipeline)


# ----------------------------------------------------------------------------- rule planner

# Pipelines per task. They describe operations and never name a task (prompt rule 5).
_PIPELINES = {
    "deraining": ("estimate the streak orientation", "suppress thin oriented bright lines",
                  "fill the occluded texture", "keep edges sharp"),
    "desnowing": ("detect small bright particles", "inpaint the particle regions",
                  "restore local texture"),
    "dehazing": ("estimate airlight and transmission", "restore contrast and saturation",
                 "balance the global tone"),
    "deblur": ("estimate the blur extent", "recover edges and fine texture",
               "suppress ringing"),
    "denoise": ("estimate the noise level in flat areas", "suppress grain and colour speckle",
                "preserve edges and texture"),
    "light_enhancement": ("lift the illumination", "restore colour balance",
                          "suppress amplified noise"),
    "super_resolution": ("rebuild the structure at full resolution",
                         "synthesise plausible fine texture", "remove blocking and aliasing"),
}


def _rationale(task: str, h: Hints) -> str:
  # Short, evidence-quoting reasons; they carry no commas so the line stays unambiguous.
  return {
      "deraining": f"oriented thin lines (line score {h.rain_line:.2f}; mid-band power "
                   f"{h.rain_fft_ratio:.2f}) look like rain streaks",
      "desnowing": f"{h.snow_blobs} small bright blobs with weak orientation look like snow",
      "dehazing": f"bright dark channel {h.haze_dark:.2f} and low saturation "
                  f"{h.haze_saturation:.2f} look like haze",
      "deblur": f"weak gradients (95th percentile {h.blur_grad95:.3f}) and little high-band "
                f"energy look like blur",
      "denoise": f"grain in flat areas (MAD {h.noise_mad:.4f}; chroma {h.noise_chroma:.4f}) "
                 f"looks like noise",
      "light_enhancement": f"mean luminance {h.luma_mean:.2f} means the image is under-exposed",
      "super_resolution": f"blocky or over-smooth detail at {h.width}x{h.height} px looks like "
                          f"a low-resolution input",
  }[task]


@dataclasses.dataclass(frozen=True)
class RuleThresholds:
  """The rule planner's decision thresholds.

  Tuned on the *training* split of the synthetic pairs (never on validation); see `decide`.
  """
  dark_mean: float = 0.32
  dark_median: float = 0.26
  haze_score: float = 0.50
  rain_line: float = 0.16
  noise_score: float = 0.45
  snow_density: float = 5.0
  blur_grad95: float = 0.17
  use_size_rule: bool = False     # both sides < 512 px -> super_resolution


class RulePlanner:
  """Task and focus from the hints alone, written as a plan in the one-line format."""

  name = "rule"
  model_id = "rule"

  def __init__(self, thresholds: RuleThresholds | None = None):
    self.thresholds = thresholds or RuleThresholds()

  def decide(self, h: Hints) -> str:
    """The task, by a decision list over the hints (first match wins)."""
    t = self.thresholds
    if h.luma_mean < t.dark_mean or h.luma_median < t.dark_median:
      return "light_enhancement"
    if h.haze_score >= t.haze_score:
      return "dehazing"
    if h.rain_line >= t.rain_line:
      return "deraining"
    if h.noise_score >= t.noise_score:
      return "denoise"
    if h.snow_blob_density >= t.snow_density:
      return "desnowing"
    if t.use_size_rule and h.low_resolution:
      return "super_resolution"
    if h.blur_grad95 <= t.blur_grad95:
      return "deblur"
    return "super_resolution"

  def plan_from_hints(self, h: Hints) -> Plan:
    task = self.decide(h)
    rationale, pipeline = _rationale(task, h), _PIPELINES[task]
    line = prompts.format_plan(task, FOCUS[task], rationale, pipeline)
    return Plan(task=task, focus=FOCUS[task], rationale=rationale, pipeline=pipeline,
                raw=(line,), hints=h)

  def plan(self, images: Sequence[np.ndarray]) -> list[Plan]:
    return [self.plan_from_hints(compute_hints(im)) for im in images]


# ----------------------------------------------------------------------------- retries

# generate(images, prompts, temperature) -> one raw answer per prompt.
GenerateFn = Callable[[Sequence[np.ndarray], Sequence[str], float], list[str]]


def plan_with_retries(generate: GenerateFn, images: Sequence[np.ndarray], hints: Sequence[Hints],
                      *, temperature: float, retry_temperatures: Sequence[float],
                      fallback: RulePlanner) -> list[Plan]:
  """Asks, checks, re-asks the unusable ones with a restricted task list, then falls back.

  The first round runs at `temperature`; round i+1 re-prompts only the images whose answer was
  unusable (malformed, off the offered list, or contradicting strong evidence), at
  `retry_temperatures[i]`, offering the strong-evidence tasks (all tasks when there are none).
  Images still without a usable answer get `fallback`'s plan, flagged, with all raw answers kept.
  """
  raws: list[list[str]] = [[] for _ in images]
  done: dict[int, Plan] = {}
  problems: dict[int, str] = {}
  pending = list(range(len(images)))
  for attempt, temp in enumerate([temperature, *retry_temperatures]):
    if not pending:
      break
    choices = {i: prompts.reprompt_choices(hints[i]) if attempt else None for i in pending}
    texts = [prompts.build_prompt(hints[i], choices[i], problems.get(i)) for i in pending]
    answers = generate([images[i] for i in pending], texts, temp)
    for i, answer in zip(pending, answers, strict=True):
      raws[i].append(answer)
      parsed, problem = prompts.check_answer(answer, hints[i], choices[i])
      if parsed is None:
        problems[i] = problem
        continue
      done[i] = Plan(task=parsed.task, focus=parsed.focus, rationale=parsed.rationale,
                     pipeline=parsed.pipeline, raw=tuple(raws[i]), hints=hints[i],
                     n_retries=attempt)
    pending = [i for i in pending if i not in done]
  for i in pending:
    rule = fallback.plan_from_hints(hints[i])
    done[i] = dataclasses.replace(rule, raw=tuple(raws[i]), n_retries=len(retry_temperatures),
                                  fallback=True)
    logging.debug("planner fell back to the rule plan for image %d: %s", i, problems.get(i))
  return [done[i] for i in range(len(images))]


# ----------------------------------------------------------------------------- HF planner


def resolve_device(device: str = "auto") -> str:
  import torch  # the planning side only; the training step never imports torch
  if device == "auto":
    return "cuda" if torch.cuda.is_available() else "cpu"
  if device.startswith("cuda") and not torch.cuda.is_available():
    raise FapeError(f"Planner device {device!r} requested but torch sees no CUDA device; "
                    "use --config.planner.device=cpu (slow) or run on a GPU machine.")
  return device


@functools.lru_cache(maxsize=2)
def load_mllm(model: str, device: str = "auto"):
  """(processor, model, device) of a frozen image-text-to-text model, local files only.

  `model` is a local folder or a Hugging Face id already in the local cache. bf16 on GPU, float32
  on CPU; eval mode, no gradients. Cached, so the planner and the `mllm` encoder share one copy.
  """
  import torch
  import transformers

  device = resolve_device(device)
  dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
  try:
    processor = transformers.AutoProcessor.from_pretrained(model, local_files_only=True)
    net = transformers.AutoModelForImageTextToText.from_pretrained(
        model, local_files_only=True, dtype=dtype)
  except (OSError, ValueError) as e:
    raise FapeError(
        f"Could not load the planner model {model!r} from local files ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}). Download it once on a machine with network "
        f"(`hf download {model}`) and copy the cache, or set --config.planner.model to a local "
        "folder holding config.json, the weights and the processor files.") from e
  net.to(device).eval().requires_grad_(False)
  return processor, net, device


class HFPlanner:
  """A frozen Hugging Face image-text-to-text model as planner (batched, seeded sampling)."""

  name = "hf"

  def __init__(self, model: str = DEFAULT_MODEL, *, device: str = "auto", batch_size: int = 4,
               max_new_tokens: int = 512, temperature: float = 0.7, top_p: float = 0.9,
               retry_temperatures: Sequence[float] = (0.2, 0.5), seed: int = 0,
               image_max_side: int = 1024, fallback: RulePlanner | None = None):
    if batch_size < 1 or max_new_tokens < 1:
      raise FapeError(f"HFPlanner needs batch_size >= 1 and max_new_tokens >= 1; got "
                      f"{batch_size} and {max_new_tokens}.")
    self.model_id = model
    self.processor, self.model, self.device = load_mllm(model, device)
    self.batch_size = batch_size
    self.max_new_tokens = max_new_tokens
    self.temperature = temperature
    self.top_p = top_p
    self.retry_temperatures = tuple(retry_temperatures)
    self.seed = seed
    self.image_max_side = image_max_side
    self.fallback = fallback or RulePlanner()
    self._calls = 0

  def _chat(self, prompt: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

  def generate(self, images: Sequence[np.ndarray], texts: Sequence[str],
               temperature: float) -> list[str]:
    """One sampled answer per (image, prompt), in micro-batches of `batch_size`."""
    import torch
    from PIL import Image

    tokenizer = self.processor.tokenizer
    tokenizer.padding_side = "left"   # decoder-only generation continues from the right edge
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    for start in range(0, len(texts), self.batch_size):
      batch_images = [Image.fromarray(downscale(im, self.image_max_side))
                      for im in images[start:start + self.batch_size]]
      batch_texts = [self._chat(t) for t in texts[start:start + self.batch_size]]
      inputs = self.processor(text=batch_texts, images=batch_images, padding=True,
                              return_tensors="pt").to(self.device)
      if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
      # Seeded per call: the same images in the same batches give the same plans.
      torch.manual_seed(self.seed + self._calls)
      self._calls += 1
      with torch.inference_mode():
        ids = self.model.generate(**inputs, do_sample=True, temperature=temperature,
                                  top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                                  pad_token_id=pad_id)
      new = ids[:, inputs["input_ids"].shape[1]:]
      out.extend(self.processor.batch_decode(new, skip_special_tokens=True))
    return out

  def plan(self, images: Sequence[np.ndarray]) -> list[Plan]:
    hints = [compute_hints(im) for im in images]
    return plan_with_retries(self.generate, images, hints, temperature=self.temperature,
                             retry_temperatures=self.retry_temperatures, fallback=self.fallback)


def build_planner(config) -> RulePlanner | HFPlanner:
  """The planner named by a `planner` config block (kind, model, device, batch_size, ...)."""
  if config.kind == "rule":
    return RulePlanner()
  if config.kind == "hf":
    return HFPlanner(config.model or DEFAULT_MODEL, device=config.device,
                     batch_size=config.batch_size, max_new_tokens=config.max_new_tokens,
                     temperature=config.temperature, top_p=config.top_p,
                     retry_temperatures=tuple(config.retry_temperatures), seed=config.seed,
                     image_max_side=config.image_max_side)
  raise FapeError(f"Unknown planner kind {config.kind!r} (--config.planner.kind): use 'rule' "
                  "(hints only, no model) or 'hf' (a local Hugging Face image-text-to-text model).")
