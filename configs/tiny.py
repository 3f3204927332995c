"""A seconds-long smoke run: 8x8 cartoon faces, a 45k-parameter U-Net, 4 steps.

  python main.py --config configs/tiny.py --workdir /tmp/tiny && \
  python main.py --mode=sample --workdir /tmp/tiny

Used by the tests; handy to check an installation.
"""

from configs import default


def get_config():
  c = default.get_config()
  c.data.dataset = "cartoon_faces/tiny"
  c.data.image_size = 8
  c.data.num_workers = 2
  c.model.ch = 8
  c.model.ch_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.attn_resolutions = (4,)
  c.model.num_groups = 4
  c.model.dropout = 0.0
  c.diffusion.num_timesteps = 100
  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 2
  c.training.batch_size = 8
  c.training.num_train_steps = 4
  c.training.log_every_steps = 1
  c.training.checkpoint_every_steps = 2
  c.training.checkpoint_every_minutes = 0.0
  c.training.compilation_cache = False
  c.sampling.num_samples = 8
  c.sampling.batch_size = 8
  c.sampling.num_steps = 5
  c.sampling.num_frames = 3
  c.eval.num_examples = 16
  c.eval.batch_size = 8
  c.eval.timesteps_per_image = 4
  c.eval.num_samples = 8
  c.eval.num_reference = 64
  c.eval.inception_weights = "none"  # a smoke run: no ~1 CPU-s-an-image FID network
  return c
