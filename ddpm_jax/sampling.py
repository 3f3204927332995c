"""The sampling math: a ``Plan`` (what to run) and the samplers' steps, one ``lax.scan``.

A ``Plan`` is frozen data: the sampler, the timesteps it calls the model at (from
``ddpm_jax.timesteps``), eta, DDPM's variance, clipping, guidance, RePaint resampling
and recorded frames. ``sample(plan, eps_fn, schedule, x_T, key)`` runs it; reports of
what ran are written from the same plan (``Plan.report``). ``generate.plan_for`` builds
the plan of a config; ``make_plan`` builds one from plain arguments.

Samplers: DDPM ancestral, DDIM, DPM-Solver++(2M) and UniPC-bh2 (order 2). Every one takes
``eps_fn(x_t, t) -> eps``: any function of the noisy batch and an int32 array ``t`` of
shape (B,) with values in [0, T). The model (through ``generate.make_eps_fn``, with
classifier-free guidance by ``guided_eps_fn``) and analytic denoisers in tests are both
such functions. Every sampler can also start from an intermediate timestep
(image-to-image) and keep known pixels (inpainting).

``eps_fn`` and the plan are static arguments of the jitted ``sample``: pass the same
function object to reuse the compiled sampler. To sample from a model with changing
parameters without re-tracing, call ``sample`` inside your own ``jit``/``pmap`` with the
parameters as an argument (see ``ddpm_jax.generate.Sampler``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddpm_jax import diffusion
from ddpm_jax import timesteps as timesteps_lib
from ddpm_jax.errors import ConfigError
from ddpm_jax.timesteps import SPACINGS, distilled_grid  # noqa: F401  (re-exported)
from ddpm_jax.timesteps import spaced as timestep_sequence  # noqa: F401  (re-exported)

EpsFn = Callable[[jax.Array, jax.Array], jax.Array]
AUTO_SPACING = "auto"  # uniform for DDPM/DDIM, logsnr for the multistep solvers
SAMPLERS = ("ddpm", "ddim", "dpm_solver++", "unipc")
MULTISTEP = ("dpm_solver++", "unipc")  # keep a history of model outputs: no RePaint resampling
ALIASES = {"dpm_solver_pp": "dpm_solver++"}  # names accepted for SAMPLERS (shell-friendly)
VARIANCES = ("small", "large")


def canonical_sampler(name: str) -> str:
  """The sampler's name in SAMPLERS (``dpm_solver_pp`` is ``dpm_solver++``); the one place
  that knows the aliases. Raises ConfigError for an unknown name."""
  name = ALIASES.get(name, name)
  if name not in SAMPLERS:
    raise ConfigError(f"unknown sampling.sampler={name!r}: use one of {SAMPLERS}")
  return name


def check_resampling(sampler: str, resample_steps: int) -> None:
  """RePaint resampling needs a one-step sampler: ConfigError for a multistep one."""
  sampler = canonical_sampler(sampler)
  if sampler in MULTISTEP and resample_steps != 1:
    raise ConfigError(f"sampling.sampler={sampler} is multistep: inpainting with it needs "
                      "--config.sampling.resample_steps=1 (or use the ddpm or ddim sampler "
                      "for RePaint resampling)")


def resolve_spacing(sampler: str, spacing: str) -> str:
  """``"auto"`` is "logsnr" for the multistep solvers and "uniform" for DDPM/DDIM."""
  if spacing == AUTO_SPACING:
    return "logsnr" if canonical_sampler(sampler) in MULTISTEP else "uniform"
  return spacing


# ------------------------------------------------------------------ the plan

@dataclasses.dataclass(frozen=True)
class Plan:
  """One sampler run, as data (hashable: a static argument of the jitted ``sample``).

  sampler: a name of SAMPLERS. timesteps: the model's calls, decreasing; the input x is
  at ``timesteps[0]`` (T-1, or image-to-image's t_start) and the last step lands on the
  data. spacing: the rule that chose them (for reports; DDPM takes every step whatever
  it says). distilled: the timesteps are a distilled student's own grid. eta: DDIM's
  noise (0 deterministic). variance: DDPM's, "small" or "large". clip_x0: clip the
  predicted x0 to [-1, 1]. guidance_scale: classifier-free guidance of a labelled model
  (read by ``generate.make_eps_fn``). resample_steps: RePaint jumps per step when known
  pixels are given. num_frames: (x_t, x0) frames recorded along the way (0: none).
  """
  sampler: str
  timesteps: tuple[int, ...]
  spacing: str = "uniform"
  distilled: bool = False
  eta: float = 0.0
  variance: str = "small"
  clip_x0: bool = False
  guidance_scale: float = 1.0
  resample_steps: int = 1
  num_frames: int = 0

  def __post_init__(self):
    if self.sampler != canonical_sampler(self.sampler):
      raise ConfigError(f"a plan takes the canonical name {canonical_sampler(self.sampler)!r}")
    timesteps_lib.checked(self.timesteps)
    if self.variance not in VARIANCES:
      raise ConfigError(f"variance must be 'small' or 'large', got {self.variance!r}")
    if self.resample_steps < 1:
      raise ConfigError(f"resample_steps={self.resample_steps} must be >= 1")
    check_resampling(self.sampler, self.resample_steps)

  @property
  def num_steps(self) -> int:
    return len(self.timesteps)

  @property
  def t_start(self) -> int:
    return self.timesteps[0]

  def report(self) -> dict:
    """What runs, for sampling.json and eval reports (written from this plan only)."""
    return {"sampler": self.sampler, "spacing": self.spacing, "eta": float(self.eta),
            "clip_x0": bool(self.clip_x0), "num_steps": self.num_steps,
            "timesteps": [int(t) for t in self.timesteps]}


def make_plan(sampler: str, schedule: diffusion.Schedule, *, num_steps: int = 50,
              spacing: str = AUTO_SPACING, t_start: int | None = None, timesteps=None,
              **options) -> Plan:
  """The plan of ``sampler`` on ``schedule``: its timesteps from ``num_steps`` and
  ``spacing`` ("auto": ``resolve_spacing``) over [0, t_start] (default T-1; DDPM: every
  step from t_start), or exactly ``timesteps`` (DDIM only: a distilled student's grid).
  ``options`` are the other fields of ``Plan`` (eta, variance, clip_x0, ...)."""
  sampler = canonical_sampler(sampler)
  spacing = resolve_spacing(sampler, spacing)
  if timesteps is not None:
    if sampler != "ddim":
      raise ConfigError(f"explicit timesteps are a DDIM grid; sampler {sampler!r} takes none")
    ts = timesteps_lib.checked(timesteps)
  elif sampler == "ddpm":
    ts = timesteps_lib.every_step(schedule.num_timesteps - 1 if t_start is None else t_start)
  else:
    ts = timesteps_lib.respaced(schedule.alphas_cumprod_np(), num_steps, spacing, t_start)
  return Plan(sampler, tuple(int(t) for t in ts), spacing, **options)


def timesteps_used(sampler: str, schedule: diffusion.Schedule, num_steps: int,
                   spacing: str = AUTO_SPACING, t_start: int | None = None,
                   timesteps: tuple[int, ...] | None = None) -> np.ndarray:
  """The timesteps at which ``sample`` calls the model, in order (``make_plan``'s)."""
  plan = make_plan(sampler, schedule, num_steps=num_steps, spacing=spacing, t_start=t_start,
                   timesteps=timesteps)
  return np.asarray(plan.timesteps, np.int32)


# ------------------------------------------------------------------ shared pieces

def _tvec(x, t):
  return jnp.full((x.shape[0],), t, jnp.int32)


def _alpha_bar(schedule, t, ndim: int):
  """alpha_bar at t (a scalar or one per example; -1 = the data), shaped to broadcast
  against an array of ``ndim`` dimensions."""
  t = jnp.asarray(t)
  return diffusion.alpha_bar_at(schedule, t).reshape(t.shape + (1,) * (ndim - t.ndim))


def ddim_step(schedule: diffusion.Schedule, x0, eps, t_to, sigma=0.0, noise=None):
  """DDIM (Song et al. 2021, eq. 12) to level ``t_to`` (a scalar or one per example; -1 =
  the data) from a prediction (x0, eps): sqrt(ab) x0 + sqrt(1 - ab - sigma^2) eps, plus
  ``sigma * noise`` when noise is given. sigma = 0 is the deterministic update that
  sampling, DDIM inversion and distillation's teacher all take."""
  ab = _alpha_bar(schedule, t_to, x0.ndim)
  out = jnp.sqrt(ab) * x0 + jnp.sqrt(jnp.maximum(1 - ab - sigma**2, 0.0)) * eps
  return out if noise is None else out + sigma * noise


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


# ------------------------------------------------------------------ the runner

def _frame_slots(num_steps: int, num_frames: int) -> np.ndarray:
  """For each step, the trajectory slot to record into (num_frames = a dummy slot)."""
  slots = np.full((num_steps,), num_frames, np.int32)
  if num_frames:
    record_at = np.round(np.linspace(0, num_steps - 1, num_frames)).astype(int)
    slots[record_at] = np.arange(num_frames)
  return slots


def _scan(body, carry, xs, x_T, num_frames: int):
  """The one ``lax.scan`` of every sampler: ``body(carry, step_inputs) -> (carry, (x_next,
  x0_pred))`` over ``xs`` (one row a step), recording (x_next, x0_pred) into
  ``num_frames`` slots spread over the steps. Steps not recorded write into a spare slot,
  so recording costs no branch. Returns (carry, frames or None)."""
  num_steps = len(jax.tree_util.tree_leaves(xs)[0])
  frames = jnp.zeros((num_frames + 1, 2) + x_T.shape, x_T.dtype) if num_frames else None
  slots = jnp.asarray(_frame_slots(num_steps, num_frames))

  def scan_body(state, inp):
    carry, frames = state
    step_inp, slot = inp
    carry, (x_next, x0_pred) = body(carry, step_inp)
    if frames is not None:
      frames = jax.lax.dynamic_update_index_in_dim(
          frames, jnp.stack([x_next, x0_pred]), slot, 0)
    return (carry, frames), None

  (carry, frames), _ = jax.lax.scan(scan_body, (carry, frames), (xs, slots))
  return carry, (frames[:num_frames] if num_frames else None)


def _one_step_body(step, schedule, key, known, mask, resample_steps: int):
  """The scan body of a one-step sampler ``step(x_t, t, t_prev, key) -> (x_prev, x0)``.

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
  return body


# ------------------------------------------------------------------ the samplers' steps

def _ddpm_step(plan, eps_fn, schedule, eta):
  """Ancestral sampling (Ho et al. 2020, Algorithm 2): the posterior mean plus noise of
  the plan's variance ("small": beta-tilde_t, "large": beta_t), none at t = 0."""
  del eta  # DDPM's noise is its variance's
  log_var_table = ddpm_log_variance(schedule, plan.variance)

  def step(x, t, t_prev, k):
    x0, _ = pred_x0_eps(eps_fn, schedule, x, t, plan.clip_x0)
    mean, _, _ = diffusion.q_posterior(schedule, x0, x, _tvec(x, t))
    noise = jax.random.normal(k, x.shape, x.dtype)
    std = jnp.where(t > 0, jnp.exp(0.5 * log_var_table[t]), 0.0).astype(x.dtype)
    return mean + std * noise, x0
  return step


def _ddim_step(plan, eps_fn, schedule, eta):
  """DDIM (Song et al. 2021, eq. 12) between the plan's levels: eta = 0 deterministic;
  eta = 1 with all T steps is DDPM with the posterior ("small") variance. ``eta`` is
  ``plan.eta`` as a traced float32 (so the arithmetic is the same for every eta)."""
  def step(x, t, t_prev, k):
    x0, eps = pred_x0_eps(eps_fn, schedule, x, t, plan.clip_x0)
    ab, ab_prev = diffusion.alpha_bar_at(schedule, t), diffusion.alpha_bar_at(schedule, t_prev)
    sigma = eta * jnp.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    noise = jax.random.normal(k, x.shape, x.dtype)
    return ddim_step(schedule, x0, eps, t_prev, sigma, noise).astype(x.dtype), x0
  return step


def _dpm_solver_pp(plan, eps_fn, schedule, key, known, mask):
  """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), the multistep data-prediction solver.

  With lambda = log(alpha / sigma) and h_i = lambda_i - lambda_{i-1}:
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i,
    D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},  r_i = h_{i-1} / h_i.
  The first step and the last step (to sigma = 0, the clean data) are first order,
  which makes the last step identical to DDIM's. The logsnr spacing matters: with
  uniform spacing in t, the large log-SNR jumps near t=0 make 2M worse than DDIM at
  10-20 steps. Deterministic (``key`` only noises known pixels for inpainting, which
  takes no resampling here: the multistep history would not survive a jump back);
  coefficients are computed in float32 from the schedule. Returns (body, carry, xs).
  """
  ts = np.asarray(plan.timesteps, np.int32)
  ts_prev = timesteps_lib.targets(ts)
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

  def body(carry, inp):
    x, x0_last = carry
    t, t_prev, a_prev, s_ratio, em1, wp = inp
    x0, _ = pred_x0_eps(eps_fn, schedule, x, t, plan.clip_x0)
    d = (1.0 - wp) * x0 + wp * x0_last
    x_prev = (s_ratio * x - a_prev * em1 * d).astype(x.dtype)
    if known is not None:
      x_prev = _keep_known(schedule, x_prev, t_prev, known, mask, jax.random.fold_in(key, t))
    return (x_prev, x0), (x_prev, x0)

  xs = (jnp.asarray(ts), jnp.asarray(ts_prev), alpha_prev, sigma_ratio, exp_m1, w_prev)
  return body, lambda x_T: (x_T, jnp.zeros_like(x_T)), xs


def _unipc(plan, eps_fn, schedule, key, known, mask):
  """UniPC-bh2 of order 2 (Zhao et al. 2023), data prediction: the UniP-2 predictor with the
  UniC corrector, as diffusers' ``UniPCMultistepScheduler(solver_order=2, solver_type="bh2",
  predict_x0=True, lower_order_final=True)``.

  With lambda = log(alpha / sigma), m_i the model's x0 at (the predictor's) x_i, step i from
  s = t_i to t = t_{i+1}, h = lambda_t - lambda_s, B(h) = expm1(-h) (bh2):
    predictor  x_{i+1} = (sigma_t / sigma_s) xc_i - alpha_t (expm1(-h) m_i + B(h) D_i / 2),
               D_i = (m_{i-1} - m_i) / r_i,  r_i = (lambda_{i-1} - lambda_i) / h
    (first order on the first and the last step, which is then x0 = m_{N-1}: DDIM's; with bh2
    this predictor is DPM-Solver++(2M)), and before each step but the first the corrector
    turns x_i into xc_i with the model output m_i that the step computes anyway, so UniPC
    costs DPM-Solver++'s calls:
      xc_i = (sigma_i / sigma_{i-1}) xc_{i-1} - alpha_i (expm1(-h') m_{i-1}
             + B(h') (rho_0 D_{i-1} + rho_1 (m_i - m_{i-1}))),  h' = lambda_i - lambda_{i-1},
    D_{i-1} = (m_{i-2} - m_{i-1}) / r',  r' = (lambda_{i-2} - lambda_{i-1}) / h', and
    rho_1 = 1/2 (rho_0 = 0) after the first-order first step, else the solution of
    [[1, 1], [r', 1]] rho = b, b_1 = g_1 / B(h'), b_2 = 2 (g_1 / (-h') - 1/2) / B(h'),
    g_1 = expm1(-h') / (-h') - 1 (diffusers' ``multistep_uni_c_bh_update``).
  Deterministic; known pixels (inpainting, no resampling) are re-noised after the predictor
  and the same noise is put back after the corrector. Returns (body, init, xs).
  """
  ts = np.asarray(plan.timesteps, np.int32)
  n = len(ts)
  ts_prev = timesteps_lib.targets(ts)
  ts_last = np.append(ts[0], ts[:-1]).astype(np.int32)  # t_{i-1} (t_0 on the first step)
  ts_last2 = np.concatenate([ts[:2], ts[:-2]])[:n].astype(np.int32)  # t_{i-2} (from i = 2)
  last = ts_prev < 0  # the final step, to the clean data (sigma = 0)
  tp = np.maximum(ts_prev, 0)
  idx = np.arange(n)
  ac = schedule.alphas_cumprod
  lam = lambda t: 0.5 * (jnp.log(ac[t]) - jnp.log1p(-ac[t]))  # noqa: E731
  # the predictor, from t_i to t_{i+1}
  alpha_prev = jnp.where(last, 1.0, jnp.sqrt(ac[tp]))
  sigma_ratio = jnp.where(last, 0.0, jnp.sqrt((1 - ac[tp]) / (1 - ac[ts])))
  h = jnp.where(last, 1.0, lam(tp) - lam(ts))
  exp_m1 = jnp.where(last, -1.0, jnp.expm1(-h))  # exp(-inf) - 1 on the last step
  r = jnp.where(idx > 0, lam(ts_last) - lam(ts), -h) / h
  second_order = (idx > 0) & ~last
  p_d = jnp.where(second_order, exp_m1 * 0.5 / r, 0.0)  # B(h) rho_p / r on (m_{i-1} - m_i)
  # the corrector of x_i, from xc_{i-1} at t_{i-1} (none on the first step)
  corrects = idx > 0
  hc = jnp.where(corrects, lam(ts) - lam(ts_last), 1.0)
  hh = -hc
  phi1 = jnp.expm1(hh)
  b_h = jnp.expm1(hh)  # bh2
  b1 = (phi1 / hh - 1.0) / b_h
  b2 = 2.0 * ((phi1 / hh - 1.0) / hh - 0.5) / b_h
  rc = jnp.where(idx > 1, lam(ts_last2) - lam(ts_last), -hc) / hc
  rho0 = jnp.where(idx > 1, (b1 - b2) / (1.0 - rc), 0.0)
  rho1 = jnp.where(idx > 1, b1 - rho0, 0.5)
  alpha_c = jnp.sqrt(ac[ts])
  c_ratio = jnp.where(corrects, jnp.sqrt((1 - ac[ts]) / (1 - ac[ts_last])), 0.0)
  c_m1 = jnp.where(corrects, alpha_c * (phi1 - b_h * (rho0 / rc + rho1)), 0.0)  # on m_{i-1}
  c_m2 = jnp.where(corrects, alpha_c * b_h * rho0 / rc, 0.0)  # on m_{i-2}
  c_m0 = jnp.where(corrects, alpha_c * b_h * rho1, 0.0)  # on m_i
  keep_x = jnp.where(corrects, 0.0, 1.0)  # the first x is the input: nothing to correct

  def body(carry, inp):
    x, xc_last, m1, m2 = carry
    t, t_last, t_prev, first, kx, cr, cm0, cm1, cm2, a_prev, s_ratio, em1, pd = inp
    m0, _ = pred_x0_eps(eps_fn, schedule, x, t, plan.clip_x0)
    xc = (kx * x + cr * xc_last - cm0 * m0 - cm1 * m1 - cm2 * m2).astype(x.dtype)
    if known is not None:  # the corrected x keeps the known pixels x had
      kept = _keep_known(schedule, xc, t, known, mask, jax.random.fold_in(key, t_last))
      xc = jnp.where(first, xc, kept)
    x_prev = (s_ratio * xc - a_prev * (em1 * m0 + pd * (m1 - m0))).astype(x.dtype)
    if known is not None:
      x_prev = _keep_known(schedule, x_prev, t_prev, known, mask, jax.random.fold_in(key, t))
    return (x_prev, xc, m0, m1), (x_prev, m0)

  xs = (jnp.asarray(ts), jnp.asarray(ts_last), jnp.asarray(ts_prev), jnp.asarray(idx == 0),
        keep_x, c_ratio, c_m0, c_m1, c_m2, alpha_prev, sigma_ratio, exp_m1, p_d)
  return body, lambda x_T: (x_T, x_T, jnp.zeros_like(x_T), jnp.zeros_like(x_T)), xs


ONE_STEP = {"ddpm": _ddpm_step, "ddim": _ddim_step}
MULTISTEP_SOLVERS = {"dpm_solver++": _dpm_solver_pp, "unipc": _unipc}


@functools.partial(jax.jit, static_argnames=("plan", "eps_fn"))
def _run(plan: Plan, eps_fn: EpsFn, schedule, x_T, key, known, mask, eta):
  if plan.sampler in ONE_STEP:
    ts = np.asarray(plan.timesteps, np.int32)
    body = _one_step_body(ONE_STEP[plan.sampler](plan, eps_fn, schedule, eta), schedule, key,
                          known, mask, plan.resample_steps)
    xs, carry = (jnp.asarray(ts), jnp.asarray(timesteps_lib.targets(ts))), x_T
  else:
    body, init, xs = MULTISTEP_SOLVERS[plan.sampler](plan, eps_fn, schedule, key, known, mask)
    carry = init(x_T)
  carry, frames = _scan(body, carry, xs, x_T, plan.num_frames)
  x0 = carry[0] if isinstance(carry, tuple) else carry
  return (x0, frames) if plan.num_frames else x0


def sample(plan: Plan | str, eps_fn: EpsFn, schedule: diffusion.Schedule, x_T, key=None, *,
           known=None, mask=None, **plan_args):
  """Runs ``plan`` from ``x_T`` (noise at ``plan.timesteps[0]``, or x there for
  image-to-image); ``known``/``mask`` (an image and its 0/1 mask of pixels to keep) make
  it inpainting. ``key`` draws the stochastic samplers' noise (step t: ``fold_in(key, t)``).

  Returns x_0, or (x_0, frames) with ``plan.num_frames`` > 0: frames of (x_t, predicted
  x0), shaped (num_frames, 2, *x_T.shape), spread evenly over the trajectory. A sampler's
  name in place of the plan builds one with ``make_plan(name, schedule, **plan_args)``.
  """
  if isinstance(plan, str):
    plan = make_plan(plan, schedule, **plan_args)
  elif plan_args:
    raise TypeError(f"sample() got a plan and plan arguments {sorted(plan_args)}")
  if key is None:
    key = jax.random.key(0)  # deterministic samplers without known pixels draw nothing
  return _run(plan, eps_fn, schedule, x_T, key, known, mask, jnp.float32(plan.eta))


def ddpm_sample(eps_fn: EpsFn, schedule, x_T, key, **plan_args):
  """``sample`` with a DDPM plan (``make_plan("ddpm", ...)``: every step)."""
  known, mask = plan_args.pop("known", None), plan_args.pop("mask", None)
  return sample("ddpm", eps_fn, schedule, x_T, key, known=known, mask=mask, **plan_args)


def ddim_sample(eps_fn: EpsFn, schedule, x_T, key, num_steps: int = 50, **plan_args):
  """``sample`` with a DDIM plan (spacing "uniform" by default)."""
  known, mask = plan_args.pop("known", None), plan_args.pop("mask", None)
  return sample("ddim", eps_fn, schedule, x_T, key, known=known, mask=mask,
                num_steps=num_steps, **plan_args)


def dpm_solver_pp_sample(eps_fn: EpsFn, schedule, x_T, key=None, num_steps: int = 20,
                         **plan_args):
  """``sample`` with a DPM-Solver++(2M) plan (spacing "logsnr" by default)."""
  known, mask = plan_args.pop("known", None), plan_args.pop("mask", None)
  return sample("dpm_solver++", eps_fn, schedule, x_T, key, known=known, mask=mask,
                num_steps=num_steps, **plan_args)


def unipc_sample(eps_fn: EpsFn, schedule, x_T, key=None, num_steps: int = 10, **plan_args):
  """``sample`` with a UniPC-bh2 plan (order 2; spacing "logsnr" by default)."""
  known, mask = plan_args.pop("known", None), plan_args.pop("mask", None)
  return sample("unipc", eps_fn, schedule, x_T, key, known=known, mask=mask,
                num_steps=num_steps, **plan_args)


@functools.partial(jax.jit, static_argnames=("eps_fn", "timesteps"))
def _invert(eps_fn, schedule, x0, timesteps):
  ts = np.asarray(timesteps, np.int32)[::-1]
  ts_from = np.append(-1, ts[:-1]).astype(np.int32)

  def step(x, inp):
    t_from, t_to = inp
    eps = eps_fn(x, _tvec(x, jnp.maximum(t_from, 0))).astype(x.dtype)
    ab_from = diffusion.alpha_bar_at(schedule, t_from)
    x0_pred = (x - jnp.sqrt(1 - ab_from) * eps) / jnp.sqrt(ab_from)
    return ddim_step(schedule, x0_pred, eps, t_to).astype(x.dtype), None

  x_T, _ = jax.lax.scan(step, x0, (jnp.asarray(ts_from), jnp.asarray(ts)))
  return x_T


def ddim_invert(eps_fn: EpsFn, schedule: diffusion.Schedule, x0: jax.Array,
                num_steps: int = 50, spacing: str = "uniform", *, plan: Plan | None = None):
  """Deterministic DDIM run backwards (Song et al. 2021, sec. 4.3): data -> x at the
  plan's first level (default: a DDIM plan of ``num_steps``/``spacing``).

  Visits the plan's timesteps in reverse, so sampling that plan deterministically from
  the result reconstructs x0 up to discretisation error, which falls as the steps grow.
  The model is evaluated at the start of each step (at t=0 for the first step out of
  the data); each step is ``ddim_step``.
  """
  if plan is None:
    plan = make_plan("ddim", schedule, num_steps=num_steps, spacing=spacing)
  return _invert(eps_fn, schedule, x0, plan.timesteps)


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


