"""64x64 anime faces: the original Keras notebook's job, with the DDPM U-Net.

  python main.py --config configs/anime.py --workdir runs/
  python main.py --mode=sample

Needs the Kaggle "another anime face dataset" (see README, "Kaggle anime faces"):
put the zip or the extracted animefaces256cleaner/ folder into
--config.data.manual_dir (default <data_dir>/downloads/manual).

Kept from the notebook: 64x64 images, T=1000 linear betas (1e-4 to 0.02),
epsilon-prediction with the MSE loss (L_simple), batch 32, learning rate 1e-4.

The network is not the notebook's: it is Ho et al.'s DDPM U-Net (17,217,923 parameters
here, the notebook's about 6M). ``configs/anime_notebook.py`` has the notebook's blocks for
a like-for-like comparison. What differs, and why we default to DDPM's choices:
  * timestep embedding added after the first convolution of each residual block (the
    notebook: scale and shift of a GroupNorm): DDPM's form, the one whose samples and
    likelihoods are published for this U-Net;
  * softmax attention over positions at 16x16 (and in the middle) only (the notebook:
    linear attention at every level, reshaping NHWC straight into heads, which mixes
    pixels and channels): full attention where it is affordable, none at 64x64 and 32x32
    where a 4096-token softmax would dominate the cost;
  * GroupNorm with 32 groups (the notebook: 8): DDPM's setting;
  * dropout 0.1 (the notebook: none): DDPM used it against overfitting on small data sets;
  * strided 3x3 convolutions down, nearest-neighbour upsampling + 3x3 convolution up (the
    notebook: average pooling / upsampling without convolutions): learned resampling;
  * widths 64-128-128-256 with 2 residual blocks per level: more capacity than the
    notebook's, for 92k training images.
Changed in training, and why:
  * EMA of the weights (decay 0.9999 with warmup) for sampling: much cleaner samples;
  * AdamW with 1000 warmup steps: no early blow-ups at the start;
  * global-norm gradient clipping at 1.0, as in DDPM;
  * random horizontal flips: faces are left-right symmetric, twice the data for free.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.data.dataset = "anime_faces"
  config.data.image_size = 64
  config.data.random_flip = True
  config.model.ch = 64
  config.model.ch_mult = (1, 2, 2, 4)  # 64 -> 32 -> 16 -> 8
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (16,)
  config.model.dropout = 0.1
  config.diffusion.schedule = "linear"
  config.diffusion.num_timesteps = 1000
  config.optim.optimizer = "adamw"
  config.optim.learning_rate = 1e-4
  config.optim.warmup_steps = 1000
  config.optim.weight_decay = 0.0
  config.optim.grad_clip_norm = 1.0
  config.training.batch_size = 32
  config.training.num_train_steps = 200_000
  config.training.ema_decay = 0.9999
  config.training.ema_warmup = True
  config.training.checkpoint_every_steps = 5000
  config.training.sample_every_steps = 5000
  config.sampling.sampler = "ddim"
  config.sampling.num_steps = 50
  return config
