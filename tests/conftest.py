"""Test setup: 4 forced CPU devices (set before JAX starts), tiny configs, shared data dir."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_FACES = os.path.join(REPO, "..", "shared", "data", "anime_faces_64", "images")


def tiny_config(**overrides):
  """A config that trains in well under a second a step on CPU: 8x8 images, 4k params."""
  from configs import default
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
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One TFDS data_dir for the session; cartoon_faces/tiny is prepared in it once."""
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def config(data_dir):
  c = tiny_config()
  c.data.data_dir = data_dir
  return c
