"""ddpm_jax: denoising diffusion models in JAX/Flax.

Building blocks (import nothing above them):
  diffusion: noise schedules, forward process, posteriors, losses (pure math).
  sampling: DDPM, DDIM and DPM-Solver++ samplers as compiled scans.
  models: the Flax U-Net.
  parallel: the one place that pmaps, and where multi-host decisions are made.
  state, checkpoint, generate, validation, input_pipeline, datasets, fs, images, ...
Orchestration: train, modes (the generation modes), evaluate. The CLI (main.py) sits on top.

Importing ddpm_jax changes nothing in the process; entry points call
``run_utils.set_process_defaults()`` before JAX starts.
"""

__version__ = "0.2.0"
