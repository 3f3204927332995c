"""Sampler error vs steps on analytic data, with wall time: pick steps by cost.

  python benchmarks/sampler_accuracy.py

Gaussian data N(0.3, 0.5^2) (exact probability-flow ODE solution known) and a
two-component mixture (reference: DPM-Solver++ with all 1000 steps). Error = mean
|x - x_ref| over 2048 samples x 4 dimensions, from the same x_T. Time = warm
wall time of one call with the analytic denoiser (measures the sampler's own
overhead, not a network's).
"""

import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from ddpm_jax import diffusion, sampling  # noqa: E402
from tests import analytic  # noqa: E402


def main():
  schedule = diffusion.make_schedule("linear", 1000)
  gauss = analytic.gaussian_eps_fn(schedule, 0.3, 0.5)
  mix = analytic.mixture_eps_fn(schedule, [0.3, 0.7], [-0.6, 0.5], [0.1, 0.2])
  x_T = jax.random.normal(jax.random.key(0), (2048, 4))
  exact = analytic.gaussian_ode_solution(schedule, x_T, 0.3, 0.5)
  ref_mix = np.asarray(sampling.dpm_solver_pp_sample(mix, schedule, x_T, num_steps=1000))
  samplers = {"DDIM (uniform)": lambda f, n: sampling.ddim_sample(f, schedule, x_T,
                                                                   jax.random.key(0), n),
              "DPM-Solver++(2M) (logsnr)": lambda f, n: sampling.dpm_solver_pp_sample(
                  f, schedule, x_T, num_steps=n)}
  print("| sampler | steps | error, Gaussian (vs exact ODE) | error, mixture (vs ref) | "
        "time (ms) |")
  print("|---|---|---|---|---|")
  for name, fn in samplers.items():
    for n in (10, 20, 50, 100, 250):
      xg = np.asarray(fn(gauss, n))
      xm = fn(mix, n)
      jax.block_until_ready(xm)
      t = time.perf_counter()
      jax.block_until_ready(fn(mix, n))
      ms = 1000 * (time.perf_counter() - t)
      print(f"| {name} | {n} | {np.abs(xg - exact).mean():.5f} | "
            f"{np.abs(np.asarray(xm) - ref_mix).mean():.5f} | {ms:.1f} |")


if __name__ == "__main__":
  main()
