"""The DDPM CIFAR-10 model (Ho et al. 2020): 35,746,307 parameters at 32x32.

  python main.py --config configs/cifar10.py --workdir runs/cifar10

Needs the TFDS ``cifar10`` data prepared (see README: offline machines prepare it
elsewhere and point ``--config.data.data_dir`` at it).
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "cifar10"
  config.data.image_size = 32
  config.model.ch = 128
  config.model.ch_mult = (1, 2, 2, 2)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1
  config.optim.optimizer = "adam"
  config.optim.learning_rate = 2e-4
  config.optim.warmup_steps = 5000
  config.optim.grad_clip_norm = 1.0
  config.training.batch_size = 128
  config.training.num_train_steps = 800_000
  config.training.ema_decay = 0.9999
  config.training.ema_warmup = False
  return config
