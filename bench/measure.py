"""Measurement helpers shared by the benchmarks: timing, load-fair alternation, machine facts.

The CPU this project develops on is shared (2 cores, several people), so one number taken alone
says little. Every benchmark therefore:
  * runs the things it compares in alternation (A B A B ..., `alternate`), so load drift hits every
    side about equally, and reports medians over rounds;
  * records the load average (`os.getloadavg`) next to every round;
  * measures the machine's matmul peak in the same rounds (`matmul_peak_fn`), so "fraction of peak"
    compares like with like.
Results are printed as JSON and written to bench/results/<name>.json (`write_result`).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"

if str(REPO) not in sys.path:  # the scripts run as `python bench/x.py` from a source checkout
  sys.path.insert(0, str(REPO))


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def git_commit() -> str:
  """HEAD's hash, with '+dirty' when tracked files under fape_jax/, configs/ or bench/ changed."""
  def git(*args):
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                          check=False).stdout.strip()
  head = git("rev-parse", "--short=12", "HEAD") or "unknown"
  dirty = git("status", "--porcelain", "--untracked-files=no", "--", "fape_jax", "configs",
              "bench")
  return head + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
  """What the numbers were measured on (JAX devices are added by the JAX benchmarks)."""
  return {
      "cpu": cpu_model(),
      "cores": os.cpu_count(),
      # Cores this process may run on (fewer than `cores` under `taskset`).
      "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "commit": git_commit(),
      "python": platform.python_version(),
      "load_average_start": load_average(),
  }


def command_line() -> str:
  """This run's command, shell-quoted, as typed from the repository root."""
  return shlex.join([".venv/bin/python", os.path.relpath(sys.argv[0], REPO), *sys.argv[1:]])


def median(xs) -> float:
  return float(statistics.median(xs))


def time_calls(fn: Callable[[], Any], n: int, cpu: list[float] | None = None) -> list[float]:
  """Wall seconds of `n` calls of `fn`; `fn` must block until its work is done.

  With `cpu`, each call's process CPU seconds (all threads, user + system) are appended to it.
  """
  out = []
  for _ in range(n):
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    out.append(time.perf_counter() - t0)
    if cpu is not None:
      cpu.append(time.process_time() - c0)
  return out


def alternate(fns: Mapping[str, Callable[[], Any] | tuple[Callable[[], Any], int]], *,
              rounds: int, calls: int, log: Callable[[str], None] | None = None
              ) -> dict[str, dict[str, Any]]:
  """Runs each of `fns` for `calls` timed calls per round, in turn, for `rounds` rounds.

  A value may be `(fn, n)` to give that entry its own number of calls per round (e.g. more for
  a short matmul than for a long train step).

  Returns per name: `median_s` (median over rounds of each round's mean call time), `round_s`
  (the per-round means), `calls_s` (every call), `load` (the 1-minute load average after each
  round) and the same for process CPU seconds per call (`cpu_median_s`, `cpu_round_s`): CPU
  time counts work done, not time spent descheduled, so it is far less sensitive to other jobs
  on a shared machine (but counts spin-waiting threads as work). The mean within a round keeps steps that differ by design (a discriminator update every
  other step) in proportion; the median across rounds drops rounds hit by a load spike. Even rounds run the names in the given order, odd rounds in reverse (A B, B A, ...), so
  no side always runs right after the same neighbour.
  """
  names = list(fns)
  fns = {n: f if isinstance(f, tuple) else (f, calls) for n, f in fns.items()}
  out = {n: {"round_s": [], "calls_s": [], "load": [], "cpu_round_s": []} for n in names}
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      cpu: list[float] = []
      times = time_calls(*fns[name], cpu=cpu)
      out[name]["round_s"].append(statistics.fmean(times))
      out[name]["cpu_round_s"].append(statistics.fmean(cpu))
      out[name]["calls_s"].extend(times)
      out[name]["load"].append(load_average()[0])
      if log:
        log(f"round {r + 1}/{rounds} {name}: {statistics.fmean(times):.4f} s "
            f"(load {load_average()[0]})")
  for name in names:
    out[name]["median_s"] = median(out[name]["round_s"])
    out[name]["min_s"] = min(out[name]["calls_s"])
    out[name]["cpu_median_s"] = median(out[name]["cpu_round_s"])
  return out


def ratio_stats(timed: Mapping[str, Mapping[str, Any]], num: str, den: str) -> dict[str, float]:
  """num / den three ways: of the medians, of the fastest calls, and the median per-round ratio.

  On a shared CPU the sides need not suffer equally from load (a framework whose threads wait
  at a barrier for a descheduled peer loses more than one that steals work), so the ratio of
  the fastest calls (least disturbed) is reported next to the ratio of medians.
  """
  a, b = timed[num], timed[den]
  per_round = [x / y for x, y in zip(a["round_s"], b["round_s"])]
  out = {"of_medians": a["median_s"] / b["median_s"], "of_fastest": a["min_s"] / b["min_s"],
         "median_per_round": median(per_round)}
  if a.get("cpu_median_s") and b.get("cpu_median_s"):
    out["of_cpu_medians"] = a["cpu_median_s"] / b["cpu_median_s"]
  return out


def matmul_peak_fn(n: int = 2048, dtype: str = "float32"):
  """(blocking call, flops per call) of a jit'd n^3 matmul on the default JAX device."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), dtype)
  b = jax.random.normal(kb, (n, n), dtype)
  mm = jax.jit(jnp.matmul)
  mm(a, b).block_until_ready()  # compile + warm up
  return (lambda: mm(a, b).block_until_ready()), 2.0 * n ** 3


def compiled_flops(compiled) -> float | None:
  """Total flops of a compiled JAX executable from XLA's cost analysis (None if unavailable)."""
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):  # older jax: one dict per device program
    ca = ca[0] if ca else None
  if not ca or "flops" not in ca:
    return None
  return float(ca["flops"])


def memory_analysis(compiled) -> dict[str, int] | None:
  """XLA's buffer plan of a compiled executable: argument/output/temp bytes (None if absent)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  (not every backend implements it)
    return None
  if m is None:
    return None
  keys = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
          "alias_size_in_bytes", "generated_code_size_in_bytes")
  return {k: int(getattr(m, k)) for k in keys if hasattr(m, k)}


def max_rss_bytes() -> int:
  """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
  import resource  # pylint: disable=g-import-not-at-top
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def config_digest(summary: Mapping[str, Any]) -> str:
  """A short hash of a benchmark's config summary (canonical JSON): equal summaries, equal digests.

  Each result table names the digest of the config it measured, and `bench/report.py` compares it
  with the digest of the same config as `configs/` builds it now, so a table measured before a
  config change says so.
  """
  import hashlib  # pylint: disable=g-import-not-at-top
  text = json.dumps(json.loads(json.dumps(summary, default=_json_default)), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:10]


def write_result(name: str, payload: Mapping[str, Any], out_dir: Path | None = None) -> Path:
  """Writes bench/results/<name>.json (atomically) and prints the JSON on stdout."""
  out_dir = Path(out_dir) if out_dir else RESULTS
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{name}.json"
  text = json.dumps(payload, indent=2, sort_keys=False, default=_json_default)
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(text + "\n")
  os.replace(tmp, path)
  print(text, flush=True)
  return path


def _json_default(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  if isinstance(x, (set, tuple)):
    return list(x)
  return str(x)


def say(msg: str) -> None:
  """Progress on stderr (stdout carries the JSON only)."""
  print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
