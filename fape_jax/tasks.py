"""The task vocabulary shared by data synthesis, planning, training and evaluation.

Seven single-degradation tasks (METHOD.md section 2), each living in one frequency band, and the
CDD-11-style mixes used only for zero-shot evaluation (DEGRADATIONS.md, OneRestore's order:
low light, then rain or snow, then haze).
"""

TASKS = (
    "deraining",
    "desnowing",
    "dehazing",
    "deblur",
    "denoise",
    "light_enhancement",
    "super_resolution",
)
TASK_ID = {t: i for i, t in enumerate(TASKS)}

# Which band each task's restoration mainly lives in ("Focus" in a plan).
FOCUS = {
    "deraining": "high",
    "desnowing": "high",
    "deblur": "high",
    "denoise": "high",
    "super_resolution": "high",
    "dehazing": "low",
    "light_enhancement": "low",
}
BANDS = ("low", "high")  # expert 0 = low frequency, expert 1 = high frequency

# Zero-shot mixes, named by their parts in the order they are applied.
MIXES = (
    ("light_enhancement", "dehazing"),
    ("light_enhancement", "deraining"),
    ("light_enhancement", "desnowing"),
    ("deraining", "dehazing"),
    ("desnowing", "dehazing"),
    ("light_enhancement", "deraining", "dehazing"),
    ("light_enhancement", "desnowing", "dehazing"),
)


def mix_name(parts) -> str:
  """'light_enhancement+dehazing' style name of a mix (or of a single task)."""
  return "+".join(parts)
