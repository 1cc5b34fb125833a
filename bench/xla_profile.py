"""Where a compiled JAX step spends its time: a jax.profiler trace, grouped by HLO op.

`op_breakdown(compiled, run)` traces one call of `run` (which must call `compiled` and block),
reads the trace back with `jax.profiler.ProfileData`, and joins every executed XLA thunk with its
HLO instruction (op kind, shape, the JAX `op_name` metadata naming the source primitive and its
transform path, e.g. `transpose(jvp(...))` for the backward pass). The result groups the time by
  * kind: dot/conv kernels, elementwise fusions, fft, plain convolution (XLA's slow generic
    path), ...;
  * phase: forward, backward, the discriminator update (`cond` branch);
  * source primitive (op_name with the transform path);
and lists the slowest single thunks. Op time on the CPU backend is the sum over its worker threads,
so it can exceed the wall time of the step; each thunk's time is its median over a few traced
calls.
"""

from __future__ import annotations

import collections
import re
import statistics
import tempfile
from pathlib import Path
from typing import Any, Callable

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([\w\-]+)\((.*)$", re.M)


def hlo_index(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """instruction name -> (opcode, result shape, op_name metadata) of an optimised HLO module."""
  out = {}
  for m in _INSTR.finditer(hlo_text):
    name, shape, op, rest = m.groups()
    meta = re.search(r'op_name="([^"]*)"', rest)
    out[name] = (op, shape, meta.group(1) if meta else "")
  return out


def _kind(name: str, op: str) -> str:
  if name.startswith(("ynn_fusion", "xnn_fusion", "onednn", "__onednn")):
    return "library kernel (dot/conv)"
  if op == "fusion":
    return "elementwise/reduce fusion"
  if op == "convolution":
    return "convolution (generic XLA path)"
  return op


def _phase(op_name: str) -> str:
  if "/cond/" in op_name or "branch_" in op_name:
    return "discriminator update"
  if "transpose(" in op_name:
    return "backward"
  if op_name:
    return "forward"
  return "unattributed"


def _source(op_name: str) -> str:
  return re.sub(r"\[[^\]]*\]", "", op_name).split("/", 1)[-1][-100:] or "(no metadata)"


def _thunk_times(data, index) -> dict[str, float]:
  """thunk name -> total ms in one trace (a thunk may run more than once, e.g. in a loop)."""
  out: dict[str, float] = collections.defaultdict(float)
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name in index:
          out[ev.name] += ev.duration_ns / 1e6
  return out


def op_breakdown(compiled, run: Callable[[], Any], *, runs: int = 4, top: int = 25,
                 trace_dir: str | None = None) -> dict[str, Any]:
  """Traces `runs` calls of `run()` and groups the time of `compiled`'s thunks.

  Each thunk's time is its median over the runs it ran in (so a thread descheduled for a moment
  on a shared machine does not make one op look slow), weighted by the share of runs it ran in.
  Use an even `runs` for a step with a discriminator update every other step.
  """
  import jax  # pylint: disable=g-import-not-at-top
  index = hlo_index(compiled.as_text())
  per_run = []
  for i in range(runs):
    with tempfile.TemporaryDirectory() as tmp:
      out_dir = str(Path(trace_dir) / f"run{i}") if trace_dir else tmp
      jax.profiler.start_trace(out_dir)
      try:
        run()
      finally:
        jax.profiler.stop_trace()
      files = sorted(Path(out_dir).rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
      if not files:
        return {"error": "the profiler wrote no trace"}
      per_run.append(_thunk_times(jax.profiler.ProfileData.from_file(str(files[-1])), index))
  names = set().union(*per_run)
  # A thunk that runs only in some steps (the discriminator update every `d_every` steps) counts
  # with its median time where it ran, times the share of steps it ran in.
  times = {}
  for n in names:
    ran = [r[n] for r in per_run if n in r]
    times[n] = statistics.median(ran) * len(ran) / len(per_run)
  by_kind, by_phase, by_source = (collections.Counter() for _ in range(3))
  singles = []
  for name, ms in times.items():
    op, shape, op_name = index[name]
    kind = _kind(name, op)
    by_kind[kind] += ms
    by_phase[_phase(op_name)] += ms
    by_source[f"{kind} | {_source(op_name)}"] += ms
    singles.append((ms, name, shape, _source(op_name)))
  total = sum(times.values())
  singles.sort(reverse=True)
  pct = lambda v: round(100.0 * v / total, 1) if total else 0.0  # noqa: E731
  rows = lambda c: [{"name": k, "ms": round(v, 1), "pct": pct(v)}  # noqa: E731
                    for k, v in c.most_common(top)]
  return {
      "runs": runs,
      "op_time_ms_total": round(total, 1),
      "by_kind": rows(by_kind),
      "by_phase": rows(by_phase),
      "by_source": rows(by_source),
      "slowest": [{"thunk": n, "ms": round(ms, 1), "shape": s[:80], "source": src}
                  for ms, n, s, src in singles[:top]],
  }
