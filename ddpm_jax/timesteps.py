"""Timestep rules: at which levels of a T-step diffusion a sampler calls the model.

Plain numbers in, int32 arrays out: no config, no sampler, no JAX. Every grid is
decreasing, starts at the level of the sampler's input (T-1, or ``t_start`` for
image-to-image) and stops above the data (-1, which no model call sees).
``sampling.Plan`` holds the result, so the timesteps that run and the ones a report
names are the same array.
"""

from __future__ import annotations

import numpy as np

from ddpm_jax.errors import ConfigError

SPACINGS = ("uniform", "trailing", "quadratic", "logsnr")


def spaced(num_timesteps: int, num_steps: int, spacing: str = "uniform",
           alphas_cumprod: np.ndarray | None = None) -> np.ndarray:
  """Decreasing distinct timesteps in [0, T) at which a respaced sampler calls the model.

  Every spacing starts at T-1 (the level of the sampler's input: pure noise, or the
  noised image of image-to-image), for every ``num_steps`` >= 1; a single step is T-1
  alone.
  uniform: ``linspace(0, T-1, S)`` rounded, ending at t=0.
  trailing: ``round(arange(T, 0, -T/S)) - 1`` (Lin et al. 2024).
  quadratic: ``(T-1) linspace(0, 1, S) ** 2``, dense near t=0 (DDIM's spacing for small
    images, stretched from DDIM's [0, 0.8 T] to [0, T-1]).
  logsnr: uniform in log-SNR between t=T-1 and t=0 (Lu et al. 2022); needs
    ``alphas_cumprod``. Best for the multistep solvers.
  Where rounding repeats a timestep, later ones are moved up by one.
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ConfigError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
  top = num_timesteps - 1
  if spacing == "uniform":
    ts = np.round(np.linspace(0, top, num_steps) if num_steps > 1 else np.full(1, top))
  elif spacing == "trailing":
    ts = np.round(np.arange(num_timesteps, 0, -num_timesteps / num_steps)) - 1
  elif spacing == "quadratic":
    ts = np.round(top * np.linspace(1.0, 0.0, num_steps) ** 2)
  elif spacing == "logsnr":
    if alphas_cumprod is None:
      raise ConfigError("logsnr spacing needs the schedule's alphas_cumprod")
    lam = 0.5 * np.log(alphas_cumprod / (1.0 - alphas_cumprod))  # decreasing in t
    targets = np.linspace(lam[-1], lam[0], num_steps)
    ts = np.searchsorted(-lam, -targets).clip(0, top)
  else:
    raise ConfigError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
  ts = np.sort(ts.astype(np.int64))
  for i in range(1, len(ts)):  # rounding can repeat a step at the dense end: bump it
    ts[i] = max(ts[i], ts[i - 1] + 1)
  ts = np.minimum(ts, top - np.arange(len(ts))[::-1])  # and keep < T
  assert ts[-1] == top, (spacing, num_timesteps, num_steps, ts)  # the first call sees x_T
  return ts[::-1].astype(np.int32)


def every_step(t_start: int) -> np.ndarray:
  """DDPM's ancestral sampler: every level from ``t_start`` down to 0."""
  return np.arange(t_start, -1, -1, dtype=np.int32)


def respaced(alphas_cumprod: np.ndarray, num_steps: int, spacing: str,
             t_start: int | None = None) -> np.ndarray:
  """``num_steps`` levels spread over [0, t_start] (default T-1) by ``spacing``: the
  schedule cut at ``t_start`` and spaced as a shorter one."""
  n = len(alphas_cumprod) if t_start is None else t_start + 1
  return spaced(n, num_steps, spacing, np.asarray(alphas_cumprod)[:n])


def steps_from(num_steps: int, t_start: int, num_timesteps: int) -> int:
  """Steps of a respaced sampler that starts at ``t_start`` (image-to-image): the density of
  ``num_steps`` over all T, over the shorter way [0, t_start]; at least one, so the model
  always sees the input at t_start."""
  return max(1, min(t_start + 1, round(num_steps * (t_start + 1) / num_timesteps)))


def distilled_grid(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The ``num_steps`` + 1 levels of a distilled sampler (progressive distillation,
  Salimans & Ho 2022): the trailing timesteps from T-1 down, then -1 (the data). Evenly
  spaced in t with both ends kept, so the grid of N/2 steps is every other level of N's:
  a student's step is two of its teacher's."""
  return np.append(spaced(num_timesteps, num_steps, "trailing"), -1).astype(np.int32)


def student(num_timesteps: int, num_steps: int, t_start: int | None = None) -> np.ndarray:
  """A distilled student's model calls: its grid without the data level, from ``t_start``
  when given (a level of the grid: see ``snap``)."""
  grid = distilled_grid(num_timesteps, num_steps)[:-1]
  if t_start is None:
    return grid
  if t_start not in grid:
    raise ValueError(f"t_start={t_start} is not on the student's grid {list(grid)}")
  return grid[grid <= t_start]


def snap(grid: np.ndarray, t: int) -> int:
  """The level of ``grid`` (decreasing) at or below ``t``; the lowest if all are above."""
  below = [int(g) for g in grid if g <= t]
  return below[0] if below else int(grid[-1])


def checked(timesteps) -> np.ndarray:
  """Explicit timesteps as int32, refused (ConfigError) unless decreasing and >= 0."""
  ts = np.asarray(timesteps, np.int32)
  if len(ts) < 1 or np.any(np.diff(ts) >= 0) or ts[-1] < 0:
    raise ConfigError(f"timesteps must be decreasing and >= 0, got {list(ts)}")
  return ts


def targets(timesteps: np.ndarray) -> np.ndarray:
  """Where each step lands: the next model call's level, and -1 (the data) after the last."""
  return np.append(np.asarray(timesteps)[1:], -1).astype(np.int32)
