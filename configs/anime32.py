"""Anime faces at 32x32 on a CPU in one to two hours: the reference run of docs/results.md.

  python main.py --config configs/anime32.py --workdir runs/anime32 \
      --config.data.folder=anime_faces_64  # a folder of 64x64 faces: docs/results.md

Any folder of face images works (``data.dataset=image_folder``); with the Kaggle
download use ``--config.data.dataset=anime_faces`` instead of a folder. The U-Net is
small (32-64-64 channels, one residual block per level, 1.1M parameters): at batch 32 on
2 CPU cores a step takes 0.67 s on the machine of docs/results.md (1.5 steps/s) and 1.05 s
on an AVX2-only AMD EPYC (0.95 steps/s, 2026-12-03), so 6,000 steps take 1-2 hours.
Checkpoints are kept every 1,000 steps so that ``--mode=eval`` can show how the
held-out bits/dim falls as training goes on.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "image_folder"
  config.data.image_size = 32
  config.data.random_flip = True
  config.model.ch = 32
  config.model.ch_mult = (1, 2, 2)  # 32 -> 16 -> 8
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.num_groups = 8
  config.model.dropout = 0.0  # ~18 epochs: too short to overfit
  config.optim.learning_rate = 1e-3
  config.optim.warmup_steps = 200
  config.training.batch_size = 32
  config.training.num_train_steps = 6000
  config.training.ema_decay = 0.999
  config.training.log_every_steps = 100
  config.training.checkpoint_every_steps = 1000
  config.training.keep_checkpoints = 2
  config.training.keep_period = 1000  # keep every 1000th step for eval over training
  config.training.sample_every_steps = 2000
  config.sampling.num_samples = 64
  config.sampling.eta = 1.0  # stochastic DDIM, as in configs/quickstart.py
  config.sampling.num_steps = 100
  config.eval.num_examples = 256
  return config
