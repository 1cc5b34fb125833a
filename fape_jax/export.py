r"""Export a trained run's adapters, routers and plan projector.

  python -m fape_jax.export --workdir=runs/base --out=runs/base/adapters.safetensors
  python -m fape_jax.export --workdir=runs/base --out=/tmp/a.safetensors --checkpoint=800

Writes OUT (safetensors: every adapter, router and projector array by its executor path) and the
JSON beside it with the same stem (adapter config, plan width, adapted layers), from the run's
newest checkpoint or --checkpoint. The pair loads with `adapters_io.load_adapters` or as
`--config.init_from=OUT` (fape_jax/models/adapters_io.py). A checkpoint trained sharded over many
devices exports on one CPU.
"""

import os

from absl import app
from absl import flags

from fape_jax import backend
from fape_jax import errors
from fape_jax.errors import FapeError

_WORKDIR = flags.DEFINE_string("workdir", None, "Training run directory (config.json, "
                               "checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "The .safetensors file to write; its JSON config goes "
                           "beside it (same stem, .json).")
_CHECKPOINT = flags.DEFINE_integer("checkpoint", None, "Checkpoint step (default: the newest).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing OUT and its JSON.")
_EXPECT_BACKEND = flags.DEFINE_enum("expect_backend", "any", backend.CHOICES, backend.FLAG_HELP)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  with errors.exit_on_user_error():
    if not _WORKDIR.value or not _OUT.value:
      raise FapeError("--workdir (the training run) and --out (a .safetensors file) are required.")
    out = _OUT.value
    if not out.endswith(".safetensors"):
      raise FapeError(f"--out={out} must end in .safetensors (its JSON config is written beside it "
                      "with the same stem).")
    from fape_jax.models import adapters_io  # pylint: disable=g-import-not-at-top
    config_json = adapters_io.config_path(out)
    if os.path.abspath(config_json) == os.path.abspath(os.path.join(_WORKDIR.value, "config.json")):
      raise FapeError(f"--out={out} would write its JSON over the run's own {config_json}; pick "
                      "another file name, e.g. adapters.safetensors.")
    existing = [p for p in (out, config_json) if os.path.exists(p)]
    if existing and not _OVERWRITE.value:
      raise FapeError(f"{' and '.join(existing)} already exist(s); pass --overwrite to replace.")
    backend.check(_EXPECT_BACKEND.value)
    from fape_jax import restore_lib  # pylint: disable=g-import-not-at-top
    step = restore_lib.export_adapters(_WORKDIR.value, out, step=_CHECKPOINT.value)
  print(f"exported step {step} of {_WORKDIR.value}: {out} and {config_json}")


def cli():
  """`fape-export` (pyproject.toml's console script) and `python -m fape_jax.export`."""
  errors.run(main)


if __name__ == "__main__":
  cli()
