"""ddpm_jax: denoising diffusion models in JAX/Flax.

Modules:
  diffusion: noise schedules, forward process, posteriors, losses (pure math).
  sampling: DDPM, DDIM and DPM-Solver++ samplers as compiled scans.
  models: the Flax U-Net.
  parallel: the one place that pmaps and shards.
  train: train state, train step and the training loop.
"""

__version__ = "0.1.0"


def _default_xla_cpu_flags():
  """Turns off XLA:CPU's YNNPACK fusions on jaxlib 0.10 unless the user set the flag.

  On jaxlib 0.10.2 they made our convolutions slower on x86 CPUs (a small 32x32
  U-Net's train step: 0.81 s -> 0.67 s without them; see docs/benchmarks.md). Must run before JAX
  initialises its backends; a flag the user sets in XLA_FLAGS always wins.
  """
  import importlib.metadata
  import os
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_cpu_experimental_ynn_fusion_type" in flags:
    return
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return
  if version.startswith("0.10."):
    os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_experimental_ynn_fusion_type=").strip()


_default_xla_cpu_flags()
