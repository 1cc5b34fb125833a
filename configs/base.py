"""FAPE-IR training configs.

  --config=configs/base.py         the embedded default: pixel space, a small UNet trained from
                                   scratch with the frequency LoRA-MoE, synthetic seven-task data
                                   from images bundled with installed packages, rule planner +
                                   MiniLM plan tokens. Runs on a laptop CPU in ~10 minutes.
  --config=configs/base.py:long    the same model and data trained ~8x longer (1-1.7 hours on a
                                   2-core CPU; validation every 1000 steps).
  --config=configs/base.py:tiny    a few-second version of the same for tests.
  --config=configs/base.py:sd21    SD-2.1/SD-Turbo-scale 512^2 latent executor, Qwen2.5-VL-7B plan
                                   tokens, the paper's hyper-parameters (needs local weights and
                                   accelerators; `--dry_run` checks memory and sharding without them).
                                   Batches are per data-parallel shard: 1 row per device.
  --config=configs/base.py:cluster_smoke  (or :cluster-smoke) the tiny model on the embedded data,
                                   batches per shard (2 train, 1 eval rows per device), no wall
                                   cap: a few minutes' rehearsal of a pod or cluster launch.
Override anything with dotted flags, e.g. `--config.total_steps=50`.
"""

import ml_collections

from fape_jax import tasks
from fape_jax.models import discriminator
from fape_jax.models import lora_moe
from fape_jax.planning import job

TINY_UNET = dict(
    sample_size=32,
    in_channels=3,
    out_channels=3,
    # Attention (and the LoRA-MoE) at the half-resolution level, 2 heads, as in the base config:
    # at full resolution with 8 heads its softmax over 32^2 tokens was ~90 % of a CPU step, and the
    # tests that train this config exercise the same code paths either way.
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(16, 32),
    layers_per_block=1,
    attention_head_dim=2,
    cross_attention_dim=32,
    norm_num_groups=8,
    use_linear_projection=True,
)

# Attention (and so the LoRA-MoE and plan routing) at the 1/4-resolution level only:
# full-resolution self-attention costs most of a CPU step and adds little to these mostly local
# restorations. 32 channels at full resolution: with 16 the seven tasks compete for the few
# full-resolution features and denoising / deblurring / SR never beat the input in a 10-minute run.
# 2 heads of 32 channels: the same projections as 8 x 8, ~1.4x faster softmax on CPU (BENCHMARKS.md).
BASE_UNET = dict(
    sample_size=64,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    attention_head_dim=2,
    cross_attention_dim=64,
    norm_num_groups=8,
    use_linear_projection=True,
)

# Stable Diffusion 2.1 (and SD-Turbo) UNet, as in its diffusers config.json.
SD21_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20, 20),
    cross_attention_dim=1024,
    norm_num_groups=32,
    use_linear_projection=True,
    upcast_attention=True,
    flip_sin_to_cos=True,
    freq_shift=0,
)

SD21_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = (arg or "base").replace("-", "_")
  if arg not in ("base", "long", "tiny", "sd21", "cluster_smoke"):
    raise ValueError(f"Unknown config variant {arg!r}; choose base, long, tiny, sd21 or "
                     "cluster_smoke.")
  c = ml_collections.ConfigDict()
  c.variant = arg
  c.seed = 0
  c.prng_impl = "rbg"               # parameter-init RNG; rbg compiles much faster than threefry

  # --- data: pairs store (TFDS/ArrayRecord) and the Grain pipeline ---
  c.data = ml_collections.ConfigDict()
  c.data.data_dir = "data"          # stores are built here when missing (relative to the cwd)
  c.data.name = "synthetic"         # pairs store: the embedded synthetic corpus, or a benchmark
  # Photos the synthetic store degrades (fape_jax/data/corpus.py): 'embedded' (11 bundled with
  # Python packages) + 'wallpapers' (36 from Debian packages; `make corpus` installs them).
  c.data.corpus = "embedded+wallpapers"
  c.data.manual_dir = ""            # benchmark name: its folder in the usual layout (built once)
  c.data.variants_per_image = 6     # K degraded variants per corpus image per task
  c.data.train_max_side = 256       # train images are resized so their long side is <= this
  c.data.val_size = 128             # validation pairs are this square size (one compiled shape)
  # Training crop (the same box on degraded and clean). 32, not 48: 1.8x the steps in the same
  # time (575 against 325 in `make train`'s 8 minutes on the 2-core AMD VM), which at this budget
  # is worth more than the context: mean gain +1.4-2.0 dB against +0.5 (README, "Crop and task
  # slots").
  c.data.crop = 32
  c.data.batch_size = 8             # global batch (split over processes and devices)
  c.data.eval_batch_size = 8
  # 'task': every global batch holds one task (tasks alternate, each cycle visits all); 'mixed':
  # a plain shuffle. 'task' lifts denoising from +0.1 to +0.8-1.3 dB at 800 steps, the mean
  # within the seed spread (README "What the embedded default trains on", Batching).
  c.data.batching = "task"
  # With 'task' batching: batches per cycle for each task (0 leaves a task out of training).
  # Twice for the three full-resolution tasks and low light, the slowest to start: with one slot
  # each, denoising stayed at +0.3-0.5 dB and low light swung between seeds (README, "Crop and
  # task slots").
  c.data.task_slots = ml_collections.ConfigDict({t: 1 for t in tasks.TASKS})
  for t in ("deblur", "denoise", "super_resolution", "light_enhancement"):
    c.data.task_slots[t] = 2
  # >0: rows per data-parallel shard; the global sizes above are then this x the data-parallel
  # size of the run's mesh, resolved at start-up (fape_jax/preflight.py), so one config fits any
  # device count. 0: the global sizes as given.
  c.data.batch_size_per_shard = 0
  c.data.eval_batch_size_per_shard = 0
  c.data.skip_bad = False
  c.data.val_variants = 3           # degraded variants per validation image per task
  c.data.read_threads = 2
  c.data.prefetch = 2

  # --- plans: offline plan cache (planner + encoder), read by id. The same block as
  # configs/plan_cache.py (`job.plans_config`), handed to the plan-cache job as it is when training
  # builds the embedded default's store ---
  c.plans = job.plans_config("rule")
  c.plans.enabled = True            # False: no plan context (ablation): a learned null token
  c.plans.dim = 384                 # D of the cached plan tokens (checked against the store)
  c.plans.build_if_missing = True   # run the plan-cache job (rule/text only) when absent

  # --- model: executor = (VAE) + UNet + frequency LoRA-MoE + plan projector ---
  c.model = ml_collections.ConfigDict()
  c.model.unet = ml_collections.ConfigDict(BASE_UNET)
  c.model.vae = None                # a diffusers AutoencoderKL config for latent executors
  c.model.timestep = 300
  # A UNet trained from scratch does not start at the identity: predict a residual over the input.
  c.model.residual = True
  c.model.dtype = "float32"         # compute dtype; parameters stay float32
  c.model.remat = False
  # Frequency LoRA-MoE: every field is documented in lora_moe.default_lora_config (paper values).
  c.model.lora = lora_moe.default_lora_config()
  c.train_base_unet = True          # from scratch: the whole UNet trains (no pretrained weights)
  c.init_from = ""                  # local diffusers folder (unet/, vae/) or exported adapters
  # A frozen base (train_base_unet=False) needs init_from; True allows random base weights (tests,
  # smoke runs). Otherwise training refuses to start rather than adapt a random network.
  c.allow_random_base = False

  # --- losses ---
  c.loss = ml_collections.ConfigDict(dict(w_mse=50.0, w_lpips=5.0, w_adv=0.5, w_freq=1e-3))
  # Per-sample weights of the MSE term (losses.reconstruction_loss): 'psnr' weighs each sample by
  # 1 / its current error, i.e. optimises mean PSNR, so the small-error full-resolution tasks
  # (denoise, deblur, SR) are learned alongside haze and low light (README, "Objective").
  c.loss.balance = "psnr"
  # LPIPS needs local weights (torchvision VGG16 + lpips' vgg.pth); unset = term switched off.
  c.lpips = ml_collections.ConfigDict(dict(vgg16_path="", lin_path=""))
  # Discriminator: fields in discriminator.default_discriminator_config. The embedded default
  # trains a small conv backbone; `backbone="vgg16"` + `vgg16_path` gives the frozen pretrained one.
  c.disc = discriminator.default_discriminator_config()
  c.disc.conv_widths = (16, 32)
  c.disc.level_fractions = (0.5, 1.0)
  c.disc.head_width = 32

  # --- optimisation ---
  c.optim = ml_collections.ConfigDict()
  c.optim.g = ml_collections.ConfigDict(dict(
      name="prodigy", lr=1.0, b1=0.9, b2=0.99, weight_decay=0.01, schedule="cosine",
      warmup_steps=0, estim_lr0=1e-6))  # Prodigy's initial step size (its d_0)
  c.optim.d = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-4, b1=0.5, b2=0.999, weight_decay=0.0, schedule="cosine",
      warmup_steps=0))
  c.optim.clip_norm = 1.0
  # Both optimisers update all parameters as one raveled vector (model_state.make_optimizer): the
  # same arithmetic in a program less than half the size, which compiles in ~50 s instead of
  # ~70 s on the 2-core VM (and loads from the cache in 12 s instead of 34 s). Turn off when
  # trainable parameters are sharded over fsdp (train_base_unet=True on a mesh with fsdp > 1): the
  # vector is replicated.
  c.optim.flatten = True
  # >0: validation, restore, evaluate and export use an exponential moving average of the
  # generator's trainable weights with this decay (model_state.update_ema); 0: the raw weights.
  # Off here: at the 225 steps a slow machine reaches, 0.999 helped one seed and hurt the other
  # by as much (README, Objective).
  c.optim.ema_decay = 0.0
  # True (needs data.batching='task'): one generator optimiser state per task, so a task's
  # moments and Prodigy step size are not set by the others' gradients. Off: at 800 steps it made
  # four tasks worse than their input (README, Batching).
  c.optim.per_task_state = False
  c.optim.d_warmup_steps = 100      # the adversarial term joins the generator loss after this
  c.optim.d_every = 2               # discriminator update ratio: once every N steps

  # 800 steps: with building the stores (~2 min, first run only) and compiling, the wall-clock
  # budget below stops the 2-core AMD VM (11-13 images/s at the 32 crop) at step 525-650; a
  # machine ~1.4x faster runs all 800 in `make train`'s 10 minutes. A schedule sized to the slow
  # machine (total_steps=225, at the old 48 crop) was no better (README, "Two commands").
  c.total_steps = 800
  c.log_every = 25
  c.eval_every = 800
  c.num_eval_images = 0             # 0 = the whole validation split
  c.ckpt_every = 200
  c.keep_checkpoints = 3
  c.num_sample_images = 2           # per task, in the sample grids
  # >0: stop the training loop (checkpoint + validation) once this many minutes have passed since
  # the job started (building missing stores and compiling count): a safety net that keeps the
  # embedded default's `make train` within 10 minutes on slow machines, the final validation
  # included. The same command resumes.
  c.max_wall_minutes = 8.0
  c.stop_after = 0                  # >0: this invocation stops after that many steps (resumable)

  # --- topology: mesh axes (one may be -1 = fill) and logical -> mesh axis rules ---
  c.mesh = ml_collections.ConfigDict(dict(axes=("data", "fsdp"), shape=(-1, 1)))
  c.data_axes = ("data", "fsdp")
  c.logical_axis_rules = (
      ("conv_out", "fsdp"),
      ("embed_out", "fsdp"),
      ("conv_in", None),
      ("embed_in", None),
      ("channels", None),
      ("adapter", None),
  )

  if arg == "long":
    c.total_steps = 6000            # ~1-2 steps/s on a 2-core CPU: 1-1.7 hours
    c.max_wall_minutes = 0.0
    c.eval_every = 1000
    c.ckpt_every = 500
  elif arg in ("tiny", "cluster_smoke"):
    c.model.unet = ml_collections.ConfigDict(TINY_UNET)
    c.model.lora.ranks = (2, 2)
    c.disc.conv_widths = (8, 16)
    c.disc.level_fractions = (0.5, 1.0)
    c.disc.head_width = 8
    c.data.variants_per_image = 1
    c.data.corpus = "embedded"
    c.data.train_max_side = 64
    c.data.val_size = 32
    c.data.crop = 32
    c.data.batch_size = 4
    c.data.eval_batch_size = 4
    c.data.read_threads = 1
    c.plans.encoder.max_tokens = 8
    c.total_steps = 6
    c.max_wall_minutes = 0.0
    c.log_every = 2
    c.eval_every = 6
    c.num_eval_images = 8
    c.ckpt_every = 3
    c.optim.d_warmup_steps = 2
    if arg == "cluster_smoke":
      c.data.batch_size_per_shard = 2
      c.data.eval_batch_size_per_shard = 1
      c.total_steps = 40
      c.log_every = 5
      c.ckpt_every = 10
      c.eval_every = 40
      c.num_eval_images = 32
  elif arg == "sd21":
    c.model.unet = ml_collections.ConfigDict(SD21_UNET)
    c.model.vae = ml_collections.ConfigDict(SD21_VAE)
    c.model.residual = False
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.train_base_unet = False
    c.init_from = ""                # set to a local diffusers SD-2.1 / SD-Turbo folder
    c.data.crop = 512
    c.data.batch_size = 8           # on 8 devices; per shard below: 16 on a v5e-16 or 2 x 8 GPUs
    c.data.batch_size_per_shard = 1
    c.data.eval_batch_size_per_shard = 1
    c.data.train_max_side = 0       # real data: no resizing
    c.plans.update(job.plans_config("hf"))   # Qwen2.5-VL-7B plans, its 3584-d hidden states
    c.plans.dim = 3584
    c.plans.build_if_missing = False  # build it with launch/plan_cache_slurm.sbatch first
    # Paper-width heads; add --config.disc.backbone=vgg16 --config.disc.vgg16_path=... for the
    # frozen pretrained backbone.
    c.disc = discriminator.default_discriminator_config()
    c.total_steps = 200_000
    c.max_wall_minutes = 0.0
    c.log_every = 50
    c.eval_every = 5000
    c.ckpt_every = 2000
    c.optim.d_warmup_steps = 1000
    c.mesh.shape = (-1, 8)          # shard the frozen UNet over 8 devices (fsdp)
  return c
