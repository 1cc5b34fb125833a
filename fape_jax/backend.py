"""The JAX backend a run gets, checked against the one it was started for.

jax falls back to the CPU with a single log line when no accelerator jaxlib is installed or none
starts, so a GPU job would train on the CPU without a word. Every entry point takes
`--expect_backend` (any, the default; cpu, gpu or tpu: the GPU/TPU launchers pass theirs) and calls
`check` once the process group is up; a mismatch is one `error:` line and exit 2.

`python -m fape_jax.backend gpu|tpu` is the launchers' install check before they start a job: it
reads the installed packages only (no jax import, no device probe) and names the jaxlib to install.
"""

import importlib.metadata
import os
import re
import sys

from fape_jax.errors import FapeError

CHOICES = ("any", "cpu", "gpu", "tpu")
FLAG_HELP = ("The JAX backend this run must get: any (default), cpu, gpu or tpu. With gpu or tpu "
             "a missing or broken accelerator jaxlib is an error (exit 2), not a silent fall-back "
             "to the CPU.")

# The pip distributions that add an accelerator to jax (PJRT plugins; jaxlib itself is CPU-only),
# and the requirement that installs them, at the installed jax's version (pyproject's [cuda] and
# [tpu] extras). ROCm builds count as gpu (jax names both "gpu"), but only CUDA is suggested.
_PLUGIN = {"gpu": re.compile(r"jax-(cuda|rocm)\d+-pjrt"), "tpu": re.compile(r"libtpu(-nightly)?")}
_EXTRA = {"gpu": ("jax[cuda12]", "cuda"), "tpu": ("jax[tpu]", "tpu")}


def _normalize(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def installed_plugins(kind: str) -> list[str]:
  """'name version' of each installed distribution that gives jax the `kind` (gpu/tpu) backend."""
  found = set()
  for dist in importlib.metadata.distributions():
    name = _normalize(dist.metadata["Name"] or "")
    if _PLUGIN[kind].fullmatch(name):
      found.add(f"{name} {dist.version}")
  return sorted(found)


def install_hint(kind: str) -> str:
  """The pip command that adds the `kind` (gpu/tpu) backend to this environment's jax."""
  requirement, extra = _EXTRA[kind]
  try:
    requirement += f"=={importlib.metadata.version('jax')}"  # the plugin must match jax
  except importlib.metadata.PackageNotFoundError:
    pass
  return f"pip install \"{requirement}\" (or this package's [{extra}] extra)"


def _mismatch(expected: str, got: str) -> str:
  message = f"--expect_backend={expected}, but JAX runs on {got}"
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and expected not in platforms and not (expected == "gpu" and "cuda" in platforms):
    return f"{message}: JAX_PLATFORMS={platforms} leaves {expected} out; unset it."
  if expected == "cpu":
    return f"{message}; set JAX_PLATFORMS=cpu to run on the CPU."
  plugins = installed_plugins(expected)
  if plugins:
    return (f"{message}: {', '.join(plugins)} is installed but found no usable "
            f"{expected.upper()} (driver, visible devices? jax's warning above says why); or pass "
            f"--expect_backend=any to run on {got}.")
  return (f"{message}: no {expected.upper()} jaxlib is installed for {sys.executable}; install "
          f"it with {install_hint(expected)}, or pass --expect_backend=any to run on {got}.")


def check(expected: str | None) -> str | None:
  """`jax.default_backend()` when it is `expected`; FapeError when not. "any" or None: no check
  (jax is not even asked, so the default changes nothing)."""
  if not expected or expected == "any":
    return None
  if expected not in CHOICES:
    raise FapeError(f"--expect_backend={expected}: use one of {', '.join(CHOICES)}.")
  import jax  # pylint: disable=g-import-not-at-top (after the process group is up)
  try:
    got = jax.default_backend()
  except RuntimeError as e:  # JAX_PLATFORMS named a backend that did not start
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise FapeError(f"--expect_backend={expected}, but JAX could not start a backend ({first}).") \
        from None
  if got != expected:
    raise FapeError(_mismatch(expected, got))
  return got


DEVICES_HELP = ("The number of devices (all processes together) this run must see; 0 (default) = "
                "any. The launchers pass the slice's or allocation's count, so a host that did not "
                "join or GPUs that are not visible stop the run before the first step.")


def check_devices(expected: int | None) -> int | None:
  """`jax.device_count()` when it is `expected` (0 or None: no check); FapeError when not."""
  if not expected:
    return None
  if expected < 0:
    raise FapeError(f"--expect_devices={expected}: give a positive device count, or 0 for any.")
  import jax  # pylint: disable=g-import-not-at-top (after the process group is up)
  got = jax.device_count()
  if got != expected:
    raise FapeError(
        f"--expect_devices={expected}, but JAX sees {got} {jax.default_backend()} devices "
        f"({jax.process_count()} processes, {jax.local_device_count()} on this one, process "
        f"{jax.process_index()}): check that every host joined (the launcher's process count), "
        "that each process sees its accelerators (CUDA_VISIBLE_DEVICES, SLURM's GPU binding, "
        "a stale process holding the TPU), or pass the count this run really has.")
  return got


def main(argv: list[str]) -> int:
  """`python -m fape_jax.backend gpu|tpu`: exit 0 when that jaxlib is installed, else the one
  line saying what to install and exit 2 (cpu and any always pass)."""
  if len(argv) != 2 or argv[1] not in CHOICES:
    print(f"usage: python -m fape_jax.backend {{{'|'.join(CHOICES)}}}", file=sys.stderr)
    return 2
  kind = argv[1]
  if kind in ("gpu", "tpu") and not installed_plugins(kind):
    print(f"error: no {kind.upper()} jaxlib is installed for {sys.executable}, so JAX would run "
          f"on the CPU; install it once with {install_hint(kind)}.", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
