"""Process set-up for entry points: environment defaults before JAX starts, a quiet console,
the persistent compilation cache. (The workdir lock is ``lock.py``, stop signals
``signals.py``, metric writers ``writers.py``.)"""

from __future__ import annotations

import logging as py_logging
import os

from absl import logging


def set_process_defaults() -> None:
  """Environment defaults for entry points (``main.py``, benchmarks); call before importing JAX.

  A variable the user set always wins:
    * XLA:CPU's YNNPACK fusions off on jaxlib 0.10 (they made our convolutions slower
      on x86: a 32x32 U-Net's train step 0.81 s -> 0.67 s without; docs/benchmarks.md);
    * ``EPATH_USE_TF=false``: ``gs://`` files through gcsfs (tensorstore and google-cloud-storage
      serve checkpoint arrays and the lock);
    * ``TF_CPP_MIN_LOG_LEVEL=2``, ``TF_ENABLE_ONEDNN_OPTS=0``: TensorFlow's C++
      start-up chatter off (TensorFlow only prepares data here).
  """
  import importlib.metadata
  flags = os.environ.get("XLA_FLAGS", "")
  try:
    jaxlib = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    jaxlib = ""
  if jaxlib.startswith("0.10.") and "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_experimental_ynn_fusion_type=").strip()
  os.environ.setdefault("EPATH_USE_TF", "false")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF only decodes images here


# Library warnings that say nothing a user can act on.
_NOISE = (("tensorflow_datasets", "OpenCV is not installed"),
          ("tensorflow_datasets", "has no dataset_info.json"),
          ("tensorflow_datasets", "Using custom data configuration"),
          ("orbax", "Given directory is read only"))


class _OwnInfoOnly(py_logging.Filter):
  """Lets through warnings and errors (but known noise), and INFO lines from ddpm_jax and
  main.py only."""

  def filter(self, record):
    path = record.pathname.replace(os.sep, "/")
    if "/ddpm_jax/" in path or path.endswith("/main.py"):
      return True
    if record.levelno < py_logging.WARNING:
      return False
    message = record.getMessage()
    return not any(lib in path and text in message for lib, text in _NOISE)


def quiet_libraries(verbosity: int) -> None:
  """At the default verbosity, library INFO lines (orbax's checkpoint internals, ...) stay
  off the console; ``--verbosity=1`` shows them."""
  handler = logging.get_absl_handler()
  for f in list(handler.filters):
    if isinstance(f, _OwnInfoOnly):
      handler.removeFilter(f)
  if verbosity < 1:
    handler.addFilter(_OwnInfoOnly())
    for name in ("gcsfs", "google", "urllib3", "fsspec"):
      py_logging.getLogger(name).setLevel(py_logging.ERROR)


def enable_compilation_cache(path: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache (``~/.cache/ddpm_jax/jax_compilation_cache``)
  unless the user configured one."""
  import jax
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
  path = path or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                              "ddpm_jax", "jax_compilation_cache")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
