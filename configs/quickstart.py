"""Quickstart: a small U-Net on the built-in cartoon faces at 32x32, ~10 min on 2 CPU cores.

  python main.py --config configs/quickstart.py --workdir runs/quickstart
  python main.py --mode=sample --workdir runs/quickstart
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "cartoon_faces"
  config.data.image_size = 32
  # A narrow U-Net (16-32-64 channels, 0.7M parameters): ~0.3 s a step on 2 cores.
  config.model.ch = 16
  config.model.ch_mult = (1, 2, 4)
  config.model.num_groups = 8
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.dropout = 0.0
  # v-prediction (Salimans & Ho 2022): with epsilon, L_simple gives an image's overall colour
  # a weight of (alpha/sigma)^2 ~ 4e-5 at the noise levels where a sampler decides it, so
  # after 1,500 steps the colours were the network's bias (grids pulled towards grey with
  # magenta/green casts, R/G means 27/23 levels below the data); v weighs it ~1 (measured
  # in docs/results.md, "The quickstart's first grid"; tests/test_diffusion.py).
  config.model.prediction_type = "v"
  config.optim.learning_rate = 2e-3
  config.optim.warmup_steps = 100
  config.training.batch_size = 32
  config.training.num_train_steps = 1500
  config.training.ema_decay = 0.995
  config.training.log_every_steps = 100
  config.training.checkpoint_every_steps = 500
  config.sampling.num_samples = 64
  # Stochastic DDIM (eta=1, 100 steps): with this briefly trained model it gave clearly
  # cleaner faces than deterministic DDIM-50 or DPM-Solver++-25, whose samples kept
  # speckle noise (compared on the same checkpoint); it costs ~20 s on 2 cores.
  config.sampling.eta = 1.0
  config.sampling.num_steps = 100
  return config
