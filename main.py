"""ddpm_jax command line: train, sample, and the other modes (``ddpm_jax/cli.py``).

  python main.py --config configs/quickstart.py --workdir runs/quickstart
  python main.py --mode=sample --workdir runs/quickstart

The same command as the installed ``ddpm-jax`` and ``python -m ddpm_jax``.
"""

import sys

if sys.version_info < (3, 11):  # noqa: UP036  checked before any import that needs 3.11
  sys.exit(f"error: ddpm_jax needs Python >= 3.11, not {sys.version.split()[0]} (docs/tpu_pod.md)")

from ddpm_jax import cli  # noqa: E402

if __name__ == "__main__":
  cli.run()
