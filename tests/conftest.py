"""Test setup: 4 forced CPU devices (set before JAX starts), tiny configs, shared data dir."""

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# gs:// through gcsfs, as main.py sets it (run_utils.set_process_defaults): etils.epath picks
# its backend once, so a test that touches gs:// in this process must not find TF's.
os.environ.setdefault("EPATH_USE_TF", "false")
# One persistent compilation cache for the session, shared with the CLI subprocesses:
# the tiny configs compile the same programs in many tests.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ddpm_jax_test_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_FACES = os.path.join(REPO, "..", "shared", "data", "anime_faces_64", "images")


def tiny_config(**overrides):
  """configs/tiny.py with ``overrides`` ({"a.b": value}): under a second a step on CPU."""
  from configs import tiny
  from ddpm_jax import config_lib
  c = tiny.get_config()
  config_lib.apply_overrides(c, overrides)  # the one override loop
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
