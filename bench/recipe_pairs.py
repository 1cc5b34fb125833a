"""The validation photos degraded by the training recipe (or the held-out one) as benchmark folders.

  .venv/bin/python bench/recipe_pairs.py --out=/tmp/pairs_train [--recipe=train|heldout]
  .venv/bin/python -m fape_jax.evaluate --workdir=RUN --out=/tmp/ev_train --mixes=false \
      $(.venv/bin/python bench/recipe_pairs.py --out=/tmp/pairs_train --print_data_flags)

Tells a generalisation gap from a learning gap. The run's validation split draws kernel families
and strengths that training never draws (fape_jax/data/degrade.py), so a task that does not gain
there may not generalise, or may not have been learned at all. These folders put the same
held-out photos (`corpus.VALIDATION`, prepared as the validation split prepares them) through
the *training* draws, in the layouts `evaluate --data` reads; `--recipe=heldout` writes the
validation split's own draws (other seeds), to check that the folders reproduce its numbers.
Denoising is left out: the clean-only denoising layouts synthesise their own noise.
"""

from __future__ import annotations

import os
import sys

import measure  # noqa: F401  (puts the repo root on sys.path; import first)

import numpy as np
from PIL import Image

from fape_jax.data import builders
from fape_jax.data import corpus
from fape_jax.data import degrade

SEED = 99  # not a store's seed: these draws differ from the validation split's own


def _save(path: str, img: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(img).save(path)


def _paths(task: str, name: str, params: dict) -> tuple[str, str]:
  """(degraded, clean) paths of one pair, relative to the task's folder, in its layout."""
  if task == "dehazing":  # SOTS names carry the airlight and beta
    step = params["steps"][0]
    return (f"hazy/{name}_{step['airlight_base']:.3f}_{step['beta']:.3f}.png",
            f"gt/{name}.png")
  if task == "light_enhancement":
    return f"Test/Low/low{name}.png", f"Test/Normal/normal{name}.png"
  if task == "super_resolution":
    return f"LR/{name}.png", f"HR/{name}.png"
  return f"input/{name}.png", f"target/{name}.png"  # Restormer / PromptIR layout


# task -> the `evaluate --data` layout its folder is written in.
LAYOUT = {"deraining": "rain100l", "desnowing": "snow100k_s", "dehazing": "sots_outdoor",
          "deblur": "gopro", "light_enhancement": "lol_v2", "super_resolution": "realsr"}


def write(out: str, recipe: str = "train", variants: int = 3, size: int = 128,
          corpus_spec: str = "embedded+wallpapers") -> dict[str, int]:
  """Writes out/<task>/... for every task in LAYOUT; returns the pairs written per task."""
  counts = dict.fromkeys(LAYOUT, 0)
  for i, entry in enumerate(corpus.split("validation", corpus_spec)):
    raw = corpus.load(entry, max_side=2 * size)
    clean, _ = builders.prepare_val_image(raw, size)
    for task in LAYOUT:
      for v in range(variants):
        sample = degrade.degrade(clean, task, [SEED, i, builders._crc(task), v],  # pylint: disable=protected-access
                                 evaluation=recipe == "heldout")
        # Digits only: SOTS and LOL pair files by their numeric names.
        degraded_rel, clean_rel = _paths(task, f"{i:02d}{v}", sample.params)
        _save(os.path.join(out, task, degraded_rel), sample.degraded)
        _save(os.path.join(out, task, clean_rel), clean)
        counts[task] += 1
  return counts


def data_flags(out: str) -> list[str]:
  return [f"--data={LAYOUT[t]}:{os.path.join(out, t)}" for t in LAYOUT]


def main(argv):
  del argv
  if not FLAGS.print_data_flags:
    counts = write(FLAGS.out, FLAGS.recipe, FLAGS.variants, FLAGS.size, FLAGS.corpus)
    print(f"Wrote {sum(counts.values())} pairs ({FLAGS.recipe} recipe) under {FLAGS.out}: "
          + ", ".join(f"{t} {n}" for t, n in counts.items()), file=sys.stderr)
  print(" ".join(data_flags(FLAGS.out)))


if __name__ == "__main__":
  from absl import app, flags  # pylint: disable=g-import-not-at-top

  FLAGS = flags.FLAGS
  flags.DEFINE_string("out", None, "Output folder (one sub-folder per task).", required=True)
  flags.DEFINE_enum("recipe", "train", ["train", "heldout"],
                    "train: the training draws; heldout: the validation split's draws.")
  flags.DEFINE_integer("variants", 3, "Degraded variants per photo and task.")
  flags.DEFINE_integer("size", 128, "Square size of the photos (the config's data.val_size).")
  flags.DEFINE_string("corpus", "embedded+wallpapers", "Corpus sets (config.data.corpus).")
  flags.DEFINE_boolean("print_data_flags", False,
                       "Only print the evaluate --data flags for --out (nothing is written).")
  app.run(main)
