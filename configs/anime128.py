"""128x128 anime faces (the Kaggle originals, halved): between configs/anime.py and anime256.

  python main.py --config configs/anime128.py --workdir runs/anime128
  python main.py --mode=sample --workdir runs/anime128

Needs the Kaggle "another anime face dataset" in --config.data.manual_dir (see
configs/anime.py); it is prepared once at 128 px. The network is the 256 px DDPM's
(configs/anime256.py) less its top level: ch=128, ch_mult=(1, 1, 2, 2, 4), attention at 16x16,
dropout 0.1 against overfitting on 92k images (as configs/anime.py).

Memory: estimated from the 256 px measurement (benchmarks/memory.py; 128 px rows not run):
about a quarter of 256 px's ~2.4 GiB an image, ~0.6 GiB, plus ~1.5 GiB of state. Batch 64
runs as ``training.microbatches`` = 4 (microbatch 16, ~11 GiB: a 16 GB card); 80 GB cards
can set 1. A v4-32 (16 chips, 32 GiB): 4 a chip, ``--config.training.microbatches=1``.
Remat stays "none" (see configs/anime256.py).
"""

from configs import anime


def get_config():
  config = anime.get_config()
  config.data.image_size = 128
  config.model.ch = 128
  config.model.ch_mult = (1, 1, 2, 2, 4)  # 128 -> 64 -> 32 -> 16 -> 8
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1
  config.model.remat = "none"
  config.optim.learning_rate = 2e-5
  config.training.batch_size = 64
  config.training.microbatches = 4
  config.training.num_train_steps = 200_000
  config.sampling.batch_size = 32
  config.sampling.num_samples = 32
  return config
