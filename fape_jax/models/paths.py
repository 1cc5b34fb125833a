"""Dotted names of nnx state paths, shared by the models and the sharding rules.

Here rather than in `fape_jax.sharding` so that `fape_jax.models` imports nothing of the package
outside itself but `errors` and `tasks`.
"""

from __future__ import annotations

from typing import Any, Sequence


def path_str(path: Sequence[Any]) -> str:
  """'down_blocks.0.attentions.0...' from an nnx state path."""
  return ".".join(str(p) for p in path)
