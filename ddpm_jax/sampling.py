"""Samplers: DDPM ancestral, DDIM and DPM-Solver++(2M), each one ``lax.scan`` under ``jit``.

Every sampler takes ``eps_fn(x_t, t) -> eps``: any function of the noisy batch and
an int32 array ``t`` of shape (B,) with values in [0, T). The model (through
``generate.make_eps_fn``, with classifier-free guidance by ``guided_eps_fn``) and
analytic denoisers in tests are both such functions. Every sampler can also start
from an intermediate timestep (image-to-image) and keep known pixels (inpainting).

``eps_fn`` is a static argument of the jitted samplers: pass the same function
object to reuse the compiled sampler. To sample from a model with changing
parameters without re-tracing, call the sampler inside your own ``jit``/``pmap``
with the parameters as an argument (see ``ddpm_jax.generate.Sampler``).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax.errors import ConfigError

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
SPACINGS = ("uniform", "trailing", "quadratic", "logsnr")
AUTO_SPACING = "auto"  # uniform for DDPM/DDIM, logsnr for DPM-Solver++
SAMPLERS = ("ddpm", "ddim", "dpm_solver++")
ALIASES = {"dpm_solver_pp": "dpm_solver++"}  # names accepted for SAMPLERS (shell-friendly)


def canonical_sampler(name: str) -> str:
  """The sampler's name in SAMPLERS (``dpm_solver_pp`` is ``dpm_solver++``); the one place
  that knows the aliases. Raises ConfigError for an unknown name."""
  name = ALIASES.get(name, name)
  if name not in SAMPLERS:
    raise ConfigError(f"unknown sampling.sampler={name!r}: use one of {SAMPLERS}")
  return name


def check_resampling(sampler: str, resample_steps: int) -> None:
  """RePaint resampling needs a one-step sampler: ConfigError for DPM-Solver++ (multistep)."""
  if canonical_sampler(sampler) == "dpm_solver++" and resample_steps != 1:
    raise ConfigError("sampling.sampler=dpm_solver++ is multistep: inpainting with it needs "
                      "--config.sampling.resample_steps=1 (or use the ddpm or ddim sampler "
                      "for RePaint resampling)")


def timestep_sequence(num_timesteps: int, num_steps: int, spacing: str = "uniform",
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
    ``alphas_cumprod``. Best for DPM-Solver++.
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


def distilled_grid(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The ``num_steps`` + 1 levels of a distilled sampler (progressive distillation,
  Salimans & Ho 2022): the trailing timesteps from T-1 down, then -1 (the data). Evenly
  spaced in t with both ends kept, so the grid of N/2 steps is every other level of N's:
  a student's step is two of its teacher's."""
  return np.append(timestep_sequence(num_timesteps, num_steps, "trailing"), -1).astype(np.int32)


def _tvec(x, t):
  return jnp.full((x.shape[0],), t, jnp.int32)


def _frame_slots(num_steps: int, num_frames: int) -> np.ndarray:
  """For each step, the trajectory slot to record into (num_frames = a dummy slot)."""
  slots = np.full((num_steps,), num_frames, np.int32)
  if num_frames:
    record_at = np.round(np.linspace(0, num_steps - 1, num_frames)).astype(int)
    slots[record_at] = np.arange(num_frames)
  return slots


def _scan_with_frames(step_fn, carry, xs, x_T, num_steps, num_frames):
  """Runs ``step_fn`` over ``xs`` and records (x_t, x0_pred) into ``num_frames`` slots.

  Non-recorded steps write into a spare slot, so recording costs no branch.
  """
  frames = jnp.zeros((num_frames + 1, 2) + x_T.shape, x_T.dtype) if num_frames else None
  slots = jnp.asarray(_frame_slots(num_steps, num_frames))

  def body(state, inp):
    carry, frames = state
    step_inp, slot = inp
    carry, (x_next, x0_pred) = step_fn(carry, step_inp)
    if frames is not None:
      frames = jax.lax.dynamic_update_index_in_dim(
          frames, jnp.stack([x_next, x0_pred]), slot, 0)
    return (carry, frames), None

  (carry, frames), _ = jax.lax.scan(body, (carry, frames), (xs, slots))
  return carry, (frames[:num_frames] if num_frames else None)


def pred_x0_eps(eps_fn, schedule, x, t, clip_x0):
  """Model's x0 and eps at (x, t) (t a scalar or one per example); with clipping, eps is made
  consistent with the clipped x0."""
  tv = _tvec(x, t)
  eps = eps_fn(x, tv).astype(x.dtype)
  x0 = diffusion.eps_to_x0(schedule, x, tv, eps)
  if clip_x0:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = diffusion.x0_to_eps(schedule, x, tv, x0)
  return x0, eps


def ddpm_log_variance(schedule: diffusion.Schedule, variance: str) -> jax.Array:
  """log of the variance DDPM's step t adds: "small" the posterior variance beta-tilde_t
  (clipped at t=0 as in Ho et al.'s code), "large" beta_t (with beta-tilde at t=0, where
  the step adds no noise anyway)."""
  if variance == "small":
    return schedule.posterior_log_variance_clipped
  if variance == "large":
    return jnp.log(jnp.append(schedule.posterior_variance[1], schedule.betas[1:]))
  raise ConfigError(f"variance must be 'small' or 'large', got {variance!r}")


def _keep_known(schedule, x_prev, t_prev, known, mask, key):
  """Inpainting: the known pixels (mask 1) replaced by the known image noised to t_prev's
  level, fresh noise each time; at t_prev = -1 they are the known values exactly."""
  ab = diffusion.alpha_bar_at(schedule, t_prev)
  z = jax.random.normal(key, x_prev.shape, x_prev.dtype)
  noisy = (jnp.sqrt(ab) * known + jnp.sqrt(1.0 - ab) * z).astype(x_prev.dtype)
  return mask * noisy + (1.0 - mask) * x_prev


def _run_stateless(step, schedule, ts, ts_prev, x_T, key, known, mask, resample_steps,
                   num_frames):
  """Runs ``step(x_t, t, t_prev, key) -> (x_prev, x0)`` over (ts, ts_prev) in one scan.

  Step t's key is ``fold_in(key, t)``. With ``known``/``mask``, the known region of every
  x_prev is re-noised from the known image. With ``resample_steps`` U > 1 (RePaint,
  Lugmayr et al. 2022), each step is taken U times: after each but the last, x_prev is
  noised forward again to t, x_t = sqrt(ab_t / ab_prev) x_prev + sqrt(1 - ab_t / ab_prev) z,
  so the generated region can take up what the known region says.
  """
  def once(x, t, t_prev, k):
    x_prev, x0 = step(x, t, t_prev, k)
    if known is not None:
      x_prev = _keep_known(schedule, x_prev, t_prev, known, mask, jax.random.fold_in(k, 1))
    return x_prev, x0

  def body(x, inp):
    t, t_prev = inp
    k = jax.random.fold_in(key, t)
    if resample_steps == 1:
      x_prev, x0 = once(x, t, t_prev, k)
      return x_prev, (x_prev, x0)
    ratio = diffusion.alpha_bar_at(schedule, t) / diffusion.alpha_bar_at(schedule, t_prev)

    def again(u, carry):
      x_t, _, _ = carry
      ku = jax.random.fold_in(k, u)
      x_prev, x0 = once(x_t, t, t_prev, ku)
      z = jax.random.normal(jax.random.fold_in(ku, 2), x.shape, x.dtype)
      back = (jnp.sqrt(ratio) * x_prev + jnp.sqrt(1.0 - ratio) * z).astype(x.dtype)
      return back, x_prev, x0

    _, x_prev, x0 = jax.lax.fori_loop(0, resample_steps, again, (x, x, jnp.zeros_like(x)))
    return x_prev, (x_prev, x0)

  return _scan_with_frames(body, x_T, (jnp.asarray(ts), jnp.asarray(ts_prev)), x_T, len(ts),
                           num_frames)


def _respaced(schedule, num_steps, spacing, t_start, timesteps=None):
  """(ts, ts_prev) of a sampler starting at ``t_start`` (default T-1), ending at -1 (data);
  ``timesteps`` given (a distilled model's own grid), exactly those."""
  if timesteps is not None:
    ts = np.asarray(timesteps, np.int32)
    if len(ts) < 1 or np.any(np.diff(ts) >= 0) or ts[-1] < 0:
      raise ConfigError(f"timesteps must be decreasing and >= 0, got {list(ts)}")
  else:
    n = schedule.num_timesteps if t_start is None else t_start + 1
    ts = timestep_sequence(n, num_steps, spacing, schedule.alphas_cumprod_np()[:n])
  return ts, np.append(ts[1:], -1).astype(np.int32)


@functools.partial(jax.jit, static_argnames=("eps_fn", "variance", "clip_x0", "num_frames",
                                             "t_start", "resample_steps"))
def ddpm_sample(eps_fn: EpsFn, schedule: diffusion.Schedule, x_T: jax.Array, key: jax.Array,
                variance: str = "small", clip_x0: bool = False, num_frames: int = 0,
                t_start: int | None = None, known=None, mask=None, resample_steps: int = 1):
  """Ancestral sampling (Ho et al. 2020, Algorithm 2) over all T steps.

  Args:
    eps_fn: the denoiser, ``eps_fn(x_t, t) -> eps``.
    schedule: the diffusion schedule.
    x_T: the starting noise, (B, ...) (or x at ``t_start``).
    key: PRNG key; step t uses ``fold_in(key, t)``.
    variance: "small" (posterior variance beta-tilde) or "large" (beta_t).
    clip_x0: clip the predicted x0 to [-1, 1] before the posterior mean.
    num_frames: if > 0, also return ``(num_frames, 2, *x_T.shape)`` frames of
      (x_t, predicted x0) spread evenly over the trajectory.
    t_start: start from this timestep instead of T-1 (image-to-image: ``x_T`` is then
      ``q_sample(x0, t_start, noise)``).
    known, mask: inpainting: an image (B, ...) and a 0/1 mask of the pixels to keep.
    resample_steps: RePaint jumps per step (needs ``known``).

  Returns:
    x_0, or (x_0, frames) when num_frames > 0.
  """
  T = schedule.num_timesteps
  log_var_table = ddpm_log_variance(schedule, variance)

  def step(x, t, t_prev, k):
    x0, _ = pred_x0_eps(eps_fn, schedule, x, t, clip_x0)
    mean, _, _ = diffusion.q_posterior(schedule, x0, x, _tvec(x, t))
    noise = jax.random.normal(k, x.shape, x.dtype)
    std = jnp.where(t > 0, jnp.exp(0.5 * log_var_table[t]), 0.0).astype(x.dtype)
    return mean + std * noise, x0

  start = T - 1 if t_start is None else t_start
  ts = np.arange(start, -1, -1, dtype=np.int32)
  x0, frames = _run_stateless(step, schedule, ts, ts - 1, x_T, key, known, mask,
                              resample_steps, num_frames)
  return (x0, frames) if num_frames else x0


@functools.partial(jax.jit, static_argnames=("eps_fn", "num_steps", "spacing", "clip_x0",
                                             "num_frames", "t_start", "resample_steps",
                                             "timesteps"))
def ddim_sample(eps_fn: EpsFn, schedule: diffusion.Schedule, x_T: jax.Array, key: jax.Array,
                num_steps: int = 50, eta: float = 0.0, spacing: str = "uniform",
                clip_x0: bool = False, num_frames: int = 0, t_start: int | None = None,
                known=None, mask=None, resample_steps: int = 1,
                timesteps: tuple[int, ...] | None = None):
  """DDIM (Song et al. 2021, eq. 12) on a respaced sequence of ``num_steps`` timesteps.

  eta=0 is the deterministic sampler; eta=1 with all T steps is DDPM with the
  posterior ("small") variance. The last step goes to alpha_bar = 1 (clean data).
  Other arguments and the return value are as for ``ddpm_sample`` (with ``t_start``
  the steps are spread over [0, t_start]). ``timesteps`` (a tuple, decreasing) replaces
  ``num_steps``/``spacing``/``t_start``: the model is called at exactly those (a distilled
  student's grid; ``x_T`` is x at the first of them).
  """
  ts, ts_prev = _respaced(schedule, num_steps, spacing, t_start, timesteps)

  def step(x, t, t_prev, k):
    x0, eps = pred_x0_eps(eps_fn, schedule, x, t, clip_x0)
    ab, ab_prev = diffusion.alpha_bar_at(schedule, t), diffusion.alpha_bar_at(schedule, t_prev)
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    dir_coef = jnp.sqrt(jnp.maximum(1 - ab_prev - sigma**2, 0.0))
    noise = jax.random.normal(k, x.shape, x.dtype)
    return (jnp.sqrt(ab_prev) * x0 + dir_coef * eps + sigma * noise).astype(x.dtype), x0

  x0, frames = _run_stateless(step, schedule, ts, ts_prev, x_T, key, known, mask,
                              resample_steps, num_frames)
  return (x0, frames) if num_frames else x0


@functools.partial(jax.jit, static_argnames=("eps_fn", "num_steps", "spacing", "clip_x0",
                                             "num_frames", "t_start"))
def dpm_solver_pp_sample(eps_fn: EpsFn, schedule: diffusion.Schedule, x_T: jax.Array,
                         key: jax.Array = None, num_steps: int = 20, spacing: str = "logsnr",
                         clip_x0: bool = False, num_frames: int = 0,
                         t_start: int | None = None, known=None, mask=None):
  """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), the multistep data-prediction solver.

  With lambda = log(alpha / sigma) and h_i = lambda_i - lambda_{i-1}:
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i,
    D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},  r_i = h_{i-1} / h_i.
  The first step and the last step (to sigma = 0, the clean data) are first order,
  which makes the last step identical to DDIM's. The default logsnr spacing matters:
  with uniform spacing in t, the large log-SNR jumps near t=0 make 2M worse than
  DDIM at 10-20 steps. Deterministic (``key`` only noises known pixels for
  inpainting, which takes no resampling here: the multistep history would not survive
  a jump back); coefficients are computed in float32 from the schedule.
  """
  ts, ts_prev = _respaced(schedule, num_steps, spacing, t_start)
  last = ts_prev < 0  # the final step, to the clean data (sigma = 0)
  tp = np.maximum(ts_prev, 0)
  ac = schedule.alphas_cumprod
  lam = lambda t: 0.5 * (jnp.log(ac[t]) - jnp.log1p(-ac[t]))  # noqa: E731
  alpha_prev = jnp.where(last, 1.0, jnp.sqrt(ac[tp]))
  sigma_ratio = jnp.where(last, 0.0, jnp.sqrt((1 - ac[tp]) / (1 - ac[ts])))
  h = lam(tp) - lam(ts)
  exp_m1 = jnp.where(last, -1.0, jnp.expm1(-h))  # exp(-inf) - 1 on the last step
  r = jnp.concatenate([jnp.ones((1,)), h[:-1]]) / h
  second_order = (np.arange(len(ts)) > 0) & ~last
  w_prev = jnp.where(second_order, -0.5 / r, 0.0)

  def step(carry, inp):
    x, x0_last = carry
    t, t_prev, a_prev, s_ratio, em1, wp = inp
    x0, _ = pred_x0_eps(eps_fn, schedule, x, t, clip_x0)
    d = (1.0 - wp) * x0 + wp * x0_last
    x_prev = (s_ratio * x - a_prev * em1 * d).astype(x.dtype)
    if known is not None:
      x_prev = _keep_known(schedule, x_prev, t_prev, known, mask, jax.random.fold_in(key, t))
    return (x_prev, x0), (x_prev, x0)

  xs = (jnp.asarray(ts), jnp.asarray(ts_prev), alpha_prev, sigma_ratio, exp_m1, w_prev)
  (x0, _), frames = _scan_with_frames(step, (x_T, jnp.zeros_like(x_T)), xs, x_T,
                                      len(ts), num_frames)
  return (x0, frames) if num_frames else x0


@functools.partial(jax.jit, static_argnames=("eps_fn", "num_steps", "spacing"))
def ddim_invert(eps_fn: EpsFn, schedule: diffusion.Schedule, x0: jax.Array,
                num_steps: int = 50, spacing: str = "uniform"):
  """Deterministic DDIM run backwards (Song et al. 2021, sec. 4.3): data -> x_T.

  Visits the same timesteps as ``ddim_sample(..., num_steps, spacing)`` in reverse,
  so ``ddim_sample(eta=0)`` of the result reconstructs x0 up to discretisation
  error, which falls as ``num_steps`` grows. The model is evaluated at the start of
  each step (at t=0 for the first step out of the data).
  """
  ts = timestep_sequence(schedule.num_timesteps, num_steps, spacing,
                         schedule.alphas_cumprod_np())[::-1]
  ts_from = np.append(-1, ts[:-1]).astype(np.int32)

  def step(x, inp):
    t_from, t_to = inp
    eps = eps_fn(x, _tvec(x, jnp.maximum(t_from, 0))).astype(x.dtype)
    ab_from = diffusion.alpha_bar_at(schedule, t_from)
    ab_to = diffusion.alpha_bar_at(schedule, t_to)
    x0_pred = (x - jnp.sqrt(1 - ab_from) * eps) / jnp.sqrt(ab_from)
    return (jnp.sqrt(ab_to) * x0_pred + jnp.sqrt(1 - ab_to) * eps).astype(x.dtype), None

  x_T, _ = jax.lax.scan(step, x0, (jnp.asarray(ts_from), jnp.asarray(ts.astype(np.int32))))
  return x_T


def slerp(a: jax.Array, b: jax.Array, w: jax.Array) -> jax.Array:
  """Spherical interpolation between noise tensors a and b (flattened per example)."""
  af, bf = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
  cos = jnp.sum(af * bf, -1) / (jnp.linalg.norm(af, axis=-1) * jnp.linalg.norm(bf, axis=-1))
  theta = jnp.arccos(jnp.clip(cos, -1.0, 1.0)).reshape((-1,) + (1,) * (a.ndim - 1))
  w = jnp.asarray(w, a.dtype).reshape((-1,) + (1,) * (a.ndim - 1))
  sin = jnp.maximum(jnp.sin(theta), 1e-6)
  return (jnp.sin((1 - w) * theta) * a + jnp.sin(w * theta) * b) / sin


def guided_eps_fn(cond_eps_fn: Callable, labels, null_label: int, scale: float,
                  shortcuts: bool = True) -> EpsFn:
  """Classifier-free guidance (Ho & Salimans 2022) of ``cond_eps_fn(x_t, t, y) -> eps``.

  eps = eps(x, null) + w (eps(x, y) - eps(x, null)): w = 0 unconditional, 1 conditional,
  > 1 guided. Both branches go through one call on a doubled batch; with ``shortcuts``,
  w = 0 and w = 1 call only the branch they need (the same values, half the work).
  """
  w = float(scale)
  if shortcuts and w == 0.0:
    return lambda x, t: cond_eps_fn(x, t, jnp.full_like(labels, null_label))
  if shortcuts and w == 1.0:
    return lambda x, t: cond_eps_fn(x, t, labels)

  def eps_fn(x, t):
    both = cond_eps_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                       jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
    cond, uncond = jnp.split(both, 2)
    return uncond + w * (cond - uncond)
  return eps_fn


def resolve_spacing(sampler: str, spacing: str) -> str:
  """``"auto"`` is "logsnr" for DPM-Solver++ and "uniform" for DDPM/DDIM."""
  if spacing == AUTO_SPACING:
    return "logsnr" if canonical_sampler(sampler) == "dpm_solver++" else "uniform"
  return spacing


def timesteps_used(sampler: str, schedule: diffusion.Schedule, num_steps: int,
                   spacing: str = AUTO_SPACING, t_start: int | None = None,
                   timesteps: tuple[int, ...] | None = None) -> np.ndarray:
  """The timesteps at which ``sample(sampler, ...)`` calls the model, in order."""
  if timesteps is not None:
    return np.asarray(timesteps, np.int32)
  if canonical_sampler(sampler) == "ddpm":
    start = schedule.num_timesteps - 1 if t_start is None else t_start
    return np.arange(start, -1, -1, dtype=np.int32)
  return _respaced(schedule, num_steps, resolve_spacing(sampler, spacing), t_start)[0]


def sample(sampler: str, eps_fn: EpsFn, schedule: diffusion.Schedule, x_T, key, *,
           num_steps: int = 50, eta: float = 0.0, spacing: str = AUTO_SPACING,
           variance: str = "small", clip_x0: bool = False, num_frames: int = 0,
           t_start: int | None = None, known=None, mask=None, resample_steps: int = 1,
           timesteps: tuple[int, ...] | None = None):
  """Dispatches to the sampler named ``sampler`` (one of SAMPLERS).

  spacing "auto" is "uniform" for DDIM and "logsnr" for DPM-Solver++. ``t_start``
  (image-to-image), ``known``/``mask`` (inpainting) and ``resample_steps`` are as for
  ``ddpm_sample``; DPM-Solver++ takes no resampling. ``timesteps``: DDIM only, see
  ``ddim_sample``.
  """
  sampler = canonical_sampler(sampler)
  spacing = resolve_spacing(sampler, spacing)
  if timesteps is not None and sampler != "ddim":
    raise ConfigError(f"explicit timesteps are a DDIM grid; sampler {sampler!r} takes none")
  if sampler == "ddpm":
    return ddpm_sample(eps_fn, schedule, x_T, key, variance=variance, clip_x0=clip_x0,
                       num_frames=num_frames, t_start=t_start, known=known, mask=mask,
                       resample_steps=resample_steps)
  if sampler == "ddim":
    return ddim_sample(eps_fn, schedule, x_T, key, num_steps=num_steps, eta=eta,
                       spacing=spacing, clip_x0=clip_x0, num_frames=num_frames,
                       t_start=t_start, known=known, mask=mask, resample_steps=resample_steps,
                       timesteps=timesteps)
  check_resampling(sampler, resample_steps)
  return dpm_solver_pp_sample(eps_fn, schedule, x_T, key, num_steps=num_steps, spacing=spacing,
                              clip_x0=clip_x0, num_frames=num_frames, t_start=t_start,
                              known=known, mask=mask)
