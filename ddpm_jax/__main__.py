"""``python -m ddpm_jax ...``: the command line (``ddpm_jax.cli``), as ``main.py`` in a clone."""

from ddpm_jax import cli

cli.run()
