"""Pieces the CPU benchmarks share: our CIFAR-10 U-Net train step and the peer's."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Importing this module changes no environment variable: the entry scripts call
# run_utils.set_process_defaults() themselves, before JAX starts.

# Python for the peer's venv: defines ``step()``, one Adam step of diffusers' UNet2DModel
# on the epsilon-MSE loss, batch ``B`` (set before this runs), as diffusers_peer.py does.
PEER_TRAIN_STEP = r'''
from diffusers_peer import ddpm_cifar10_unet
torch.manual_seed(0)
model = ddpm_cifar10_unet(32)
opt = torch.optim.Adam(model.parameters(), lr=2e-4)
x0 = torch.randn(B, 3, 32, 32)
def step():
  t = torch.randint(0, 1000, (B,))
  noise = torch.randn_like(x0)
  loss = ((model(x0 + noise, t).sample - noise) ** 2).mean()
  opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
'''

DEFAULT_PEER_DIR = os.path.dirname(os.path.abspath(__file__))  # benchmarks/diffusers_peer.py


def our_train_step(batch: int, config_name: str = "cifar10"):
  """(jitted train step with donated state, state, batch x, key) on one device."""
  import importlib

  import jax
  import jax.numpy as jnp
  import numpy as np

  from ddpm_jax import diffusion, models, train
  from ddpm_jax import state as state_lib
  c = importlib.import_module(f"configs.{config_name}").get_config()
  c.training.batch_size = batch
  m = models.create_model(c)
  s = diffusion.make_schedule("linear", 1000)
  tx = state_lib.make_optimizer(c)
  state = state_lib.create_train_state(c, m, tx, jax.random.key(0))
  step = jax.jit(train.make_train_step(c, m, s, tx, axis_name=None), donate_argnums=0)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, 32, 32, 3)), jnp.float32)
  return step, state, x, jax.random.key(1)
