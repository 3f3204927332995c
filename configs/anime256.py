"""256x256 anime faces (the Kaggle originals at full size) with Ho et al.'s 256 px network.

  python main.py --mode=import --model=PATH/ddpm-celebahq-256 --workdir runs/anime256
  python main.py --config configs/anime256.py --workdir runs/anime256   # fine-tunes it
  python main.py --mode=sample --workdir runs/anime256

(or train from scratch in an empty workdir). Needs the Kaggle "another anime face dataset"
in --config.data.manual_dir (see configs/anime.py); it is prepared once at 256 px.

The network is the one of Ho et al.'s CelebA-HQ / LSUN 256 px models: ch=128,
ch_mult=(1, 1, 2, 2, 4, 4), 2 residual blocks per level, attention at 16x16, dropout 0,
113,673,219 parameters, and the strided convolutions padded as TensorFlow's 'SAME'
(``downsample_padding="same"``, diffusers' ``downsample_padding=0``): so an imported
google/ddpm-celebahq-256 (``--mode=import``) has this config's architecture, resumes in
the same workdir and fine-tunes on anime faces. Learning rate 2e-5 as Ho et al. at 256 px.

Memory (benchmarks/memory.py, docs/benchmarks.md "Train-step memory", XLA:CPU's buffer
assignment): one 256 px train step is ~1.7 GiB of state (params, EMA, Adam moments) plus
~2.4 GiB an image without remat (4.6 GiB at batch 1, 11.6 at batch 4). Batch 64 (Ho et al.'s)
therefore runs as ``training.microbatches`` = 8 (microbatch 8, ~21 GiB: a 24-80 GB card); on
a 16 GB card set 16 (microbatch 4, ~12 GiB); an 80 GB card can use 2. Accumulation was
measured at the memory of one microbatch (batch 64 in 16 microbatches: 10.7 GiB vs 11.6 for
one microbatch of 4). A v4-32 (16 chips, 32 GiB each): 4 images a chip, ~12 GiB:
``--config.training.microbatches=1``. ``model.remat="block"`` cuts the saved residuals of the
backward pass ~2.4x in JAX, but XLA:CPU's assignment showed no lower peak (99%): it stays
"none" here until measured on an accelerator.
"""

from configs import anime


def get_config():
  config = anime.get_config()
  config.data.image_size = 256
  config.model.ch = 128
  config.model.ch_mult = (1, 1, 2, 2, 4, 4)  # 256 -> 128 -> 64 -> 32 -> 16 -> 8
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.num_heads = 1
  config.model.num_groups = 32
  config.model.dropout = 0.0
  config.model.downsample_padding = "same"  # as google/ddpm-celebahq-256
  config.model.remat = "none"  # "block": see the docstring
  config.optim.learning_rate = 2e-5
  config.training.batch_size = 64
  config.training.microbatches = 8
  config.training.num_train_steps = 100_000
  config.training.checkpoint_every_steps = 2500
  config.training.sample_every_steps = 5000
  config.sampling.batch_size = 16
  config.sampling.num_samples = 16
  return config
