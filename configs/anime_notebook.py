"""The Keras notebook's network, for users moving from the notebook to compare like with like.

  python main.py --config configs/anime_notebook.py --workdir runs/notebook
  python main.py --mode=sample --workdir runs/notebook

Same data, diffusion and training as ``configs/anime.py`` (64x64 anime faces, T=1000
linear betas, epsilon-MSE, batch 32, learning rate 1e-4); the U-Net is built from the
notebook's blocks, as options of the one ``UNet``:
  * the timestep embedding scales and shifts the second GroupNorm of each residual
    block (``model.time_conditioning="scale_shift"``) instead of being added;
  * linear attention at every resolution (``model.attention="linear"``, 64 to 8), with
    softmax attention in the middle block; the notebook's attention reshaped NHWC
    straight into heads, mixing pixels and channels; here it attends over positions;
  * GroupNorm with 8 groups, no dropout;
  * 2x2 average pooling down and bilinear upsampling up, no resampling convolutions
    (``model.resample="pool"``);
  * about 6M parameters (6,212,099 with these widths, 64-128-128-128 channels and one
    residual block per level; the notebook's exact widths are not recorded here, its size
    and building blocks are).
Checkpoints of this config and of ``configs/anime.py`` are not interchangeable.
"""

from configs import anime


def get_config():
  config = anime.get_config()
  m = config.model
  m.ch = 64
  m.ch_mult = (1, 2, 2, 2)  # 64 -> 32 -> 16 -> 8
  m.num_res_blocks = 1
  m.attn_resolutions = (64, 32, 16, 8)
  m.attention = "linear"
  m.time_conditioning = "scale_shift"
  m.resample = "pool"
  m.num_groups = 8
  m.dropout = 0.0
  return config
