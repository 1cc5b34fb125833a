"""Routing statistics of validation (issue 14, 'no dead experts'): the summary written to
validation.json and the layer x task heatmap of the reports, on hand-built routing dicts (the
tiny training run's validation.json is checked in test_train.py)."""
import base64
import io

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils
from PIL import Image

from fape_jax import report_figures
from fape_jax import report_lib
from fape_jax import validation

SELF_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CROSS_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
CROSS_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
CONV = "up_blocks.1.resnets.0.conv1"


def routing(**w_high):
  """{task: {layer: [1 - w, w]}} from task=(w_self_q, w_cross_q, w_cross_k, w_conv)."""
  return {t: {l: [1.0 - w, w] for l, w in zip((SELF_Q, CROSS_Q, CROSS_K, CONV), ws)}
          for t, ws in w_high.items()}


def test_spatial_layers_are_all_but_the_context_projections():
  assert validation.is_spatial_layer(SELF_Q) and validation.is_spatial_layer(CROSS_Q)
  assert validation.is_spatial_layer(CONV)
  assert validation.is_spatial_layer(CROSS_Q.replace("to_q", "to_out.0"))
  assert not validation.is_spatial_layer(CROSS_K)
  assert not validation.is_spatial_layer(CROSS_K.replace("to_k", "to_v"))


def test_summary_counts_layers_where_every_task_prefers_one_expert():
  s = validation.routing_summary(routing(
      deraining=(0.9, 0.7, 0.2, 0.5), denoise=(0.8, 0.3, 0.1, 0.5),
      dehazing=(0.6, 0.2, 0.4, 0.5)))
  # attn1.to_q: high everywhere; attn2.to_k: low everywhere; attn2.to_q: mixed; the conv ties
  # (0.5 / 0.5) everywhere, so it has no dominant expert and is not counted.
  assert s["layers"] == 4
  assert s["single_expert_layers"] == 2
  assert s["single_expert_layer_names"] == sorted([SELF_Q, CROSS_K])


def test_premise_is_high_band_tasks_weighting_the_high_expert_more_on_spatial_layers():
  # High band: deraining, denoise; low band: dehazing. The context layer (attn2.to_k) would flip
  # the comparison if it counted.
  r = routing(deraining=(0.6, 0.6, 0.0, 0.6), denoise=(0.8, 0.8, 0.0, 0.8),
              dehazing=(0.5, 0.5, 1.0, 0.5))
  s = validation.routing_summary(r)
  assert s["high_weight_high_band_tasks"] == pytest.approx(0.7)
  assert s["high_weight_low_band_tasks"] == pytest.approx(0.5)
  assert s["premise_holds"] is True
  r["dehazing"] = {l: [0.1, 0.9] for l in r["dehazing"]}
  s = validation.routing_summary(r)
  assert s["high_weight_low_band_tasks"] == pytest.approx(0.9) and s["premise_holds"] is False
  # No low-band task (or a mix, which has no band): untested rather than a guess.
  s = validation.routing_summary({"deraining": r["deraining"], "deraining+dehazing": r["dehazing"]})
  assert s["high_weight_low_band_tasks"] is None and s["premise_holds"] is None
  assert "premise untested" in validation.format_routing_summary(s)


def test_dense_model_has_an_empty_summary():
  s = validation.routing_summary({})
  assert s == {"layers": 0, "single_expert_layers": 0, "single_expert_layer_names": [],
               "high_weight_high_band_tasks": None, "high_weight_low_band_tasks": None,
               "premise_holds": None}
  assert validation.format_routing_summary(s).startswith("Routing: 0 adapted layers")


def test_heatmap_renders_layers_by_tasks():
  r = routing(deraining=(0.9, 0.7, 0.2, 0.5), dehazing=(0.6, 0.2, 0.4, 0.5))
  fig = report_figures.routing_heatmap_figure(r, "t")
  ax = fig.axes[0]
  assert ax.images[0].get_array().shape == (4, 2)  # layers x tasks
  assert [t.get_text() for t in ax.get_xticklabels()] == ["deraining (high)", "dehazing (low)"]
  assert len(fig.axes) == 2  # the colour bar
  uri = report_figures.figure_data_uri(fig)
  Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).verify()
  section = report_lib.routing_heatmap_section(r, "validation")
  assert section.count("data:image/png;base64,") == 1 and "attn1.q" in section


def test_sums_over_processes_arrive_as_float64_in_their_shapes(monkeypatch):
  """Two arrays in one raw-bytes gather, as on 2 processes (the real gather: test_cluster_rehearsal)."""
  psnr = np.arange(6, dtype=np.float64).reshape(3, 2) + 1e-9  # float32 would lose the 1e-9
  rout = np.full((2, 3, 2), 0.25)
  other = np.concatenate([2 * psnr.ravel(), rout.ravel()])  # the other process's sums
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack(
      [x, np.frombuffer(other.tobytes(), np.uint8)]))
  got_psnr, got_rout = validation._sum_over_processes(psnr, rout)
  assert got_psnr.dtype == np.float64 and got_rout.shape == rout.shape
  np.testing.assert_array_equal(got_psnr, 3 * psnr)
  np.testing.assert_array_equal(got_rout, 2 * rout)
