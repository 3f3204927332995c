"""Easy consistency tuning (ECT; Geng et al., ICLR 2025): a trained DDPM made a 1-2 step model.

ECT fine-tunes a diffusion model's denoiser into a consistency model f(x_sigma, sigma), which
maps any point of a probability-flow ODE trajectory to its end, with no second network: the
loss compares f at two noise levels t > r of one noise draw, the r branch without gradient,
and the gap t - r shrinks in stages over training. References: ECT's code,
github.com/locuslab/ect ``training/loss.py`` (ECMLoss) and ``ct_training_loop.py``; the
paper's eq. numbers below are of Geng et al. (arXiv 2406.14548), "CM" is Song et al. 2023
(Consistency Models, ICML), "EDM" Karras et al. 2022.

Time: our discrete VP process to ECT's continuous VE sigma. Our x_t = sqrt(ab_t) x0 +
sqrt(1-ab_t) eps is exactly sqrt(ab_t) (x0 + sigma_t eps) with sigma_t = sqrt((1-ab_t)/ab_t)
(EDM, Table 1, "VP" column: s(t) = 1/sqrt(1+sigma^2)), so x_ve = x_vp / sqrt(ab) is a VE
point of noise level sigma and the same image scale ([-1, 1]) as EDM's CIFAR-10 models:
ECT's sigma-space hyperparameters (P_mean, P_std, k, b, the 2-step sigma 0.821) carry over
unchanged. Continuous levels between our T integer timesteps interpolate the log-SNR
lambda = log(ab/(1-ab)) linearly in the timestep (the network's sinusoidal embedding takes
a float timestep), so sigma ranges over [sigma_min, sigma_max] = [sigma(t=0), sigma(t=T-1)]:
the network never sees a level it was not trained next to.

Parameterisation. The teacher's x0-prediction in VE terms is D(x, sigma) = a(sigma) x +
b(sigma) F(x_vp, t(sigma)) with F the raw network: epsilon: a = 1, b = -sigma; v: a =
1/(1+sigma^2), b = -sigma/sqrt(1+sigma^2) (EDM's c_skip, c_out with sigma_data = 1); x0:
a = 0, b = 1. ECT takes the EDM denoiser itself as f, whose c_skip(0) = 1, c_out(0) = 0 give
f(x, 0) = x. Our smallest level is sigma_min = sigma(t=0) > 0 (0.01 for the linear
schedule), so, as CM's eq. 3 shifts its c_out by sigma - sigma_min, we scale the
denoiser's correction by kappa = (sigma - sigma_min)/sigma:

    f(x, sigma) = x + kappa (D(x, sigma) - x) = c_skip x + c_out F,
    c_skip = 1 - kappa (1 - a),  c_out = kappa b.

At sigma = sigma_min, kappa = 0 exactly: c_skip = 1, c_out = 0, f(x, sigma_min) = x bit for bit
(CM's boundary condition, eq. 2). For an epsilon network c_out = -(sigma - sigma_min), CM's
shift exactly. At the start f - D = -(sigma_min/sigma)(D - x): for epsilon sigma_min * eps^, a
hundredth of a pixel's scale, so the tuning starts from the teacher's own denoiser.

Objective (ECMLoss): sigma_t ~ lognormal(P_mean, P_std) (ECT's p(t), truncated here to
[sigma_min, sigma_max]); sigma_r = max(sigma_t (1 - n(sigma_t) / q^(a+1)), sigma_min) with
n(sigma) = 1 + k sigmoid(-b sigma) (the paper's mapping function, eq. 9; ECT's r is clamped at
0, where its f is the identity, ours at sigma_min, where ours is); a = step // d, the stage
(``t_to_r_sigmoid``, ``update_schedule``); one eps for both levels, one dropout key for both
branches (ECT restores the RNG state: the same masks), and

    loss = (sqrt(||f(x0 + sigma_t eps, sigma_t) - sg[f(x0 + sigma_r eps, sigma_r)]||^2 + c^2) - c)
           / (sigma_t - sigma_r),

the pseudo-Huber metric (c = 0: ECT's CIFAR-10 runs, the L2 norm, its "adaptive weighting
p = 1/2"; iCT's c is 0.00054 sqrt(dim)) with ECT's weighting w(t, r) = 1/(t - r).

Sampling: CM's Algorithm 1 (ECT's ``generator_fn``): x0 = f(x_T, sigma_max), then per
intermediate level tau_i: x = x0 + sqrt(tau_i^2 - sigma_min^2) z, x0 = f(x, tau_i).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr, ndtri

from ddpm_jax import diffusion, models
from ddpm_jax.errors import ConfigError

TWO_STEP_SIGMA = 0.821  # ECT's --mid_t default (CIFAR-10, from iCT)


class Settings(NamedTuple):
  """ECT's training settings (``configs/default.py``'s ``consistency`` section has their
  meaning and defaults): log sigma_t ~ N(p_mean, p_std^2); the gap schedule's q, k, b and
  ``double_every`` (steps per stage); the pseudo-Huber constant c."""
  p_mean: float
  p_std: float
  q: float
  k: float
  b: float
  c: float
  double_every: int


# ------------------------------------------------------------------ time: VP timestep <-> sigma

class Levels(NamedTuple):
  """The schedule's noise levels as ECT's sigma: ``log_snr`` (T,) at the integer timesteps
  (decreasing), ``sigma_min`` = sigma(t=0) and ``sigma_max`` = sigma(t=T-1) (float32)."""
  log_snr: jax.Array
  sigma_min: jax.Array
  sigma_max: jax.Array


def levels(schedule: diffusion.Schedule) -> Levels:
  """Levels of ``schedule``, computed in float64 on the host (usable while tracing)."""
  ab = schedule.alphas_cumprod_np()
  lam = np.log(ab) - np.log1p(-ab)
  sig = np.exp(-lam / 2).astype(np.float32)
  return Levels(jnp.asarray(lam, jnp.float32), jnp.float32(sig[0]), jnp.float32(sig[-1]))


def sigma_at(lv: Levels, t) -> jax.Array:
  """sigma at a float timestep t in [0, T-1]: exp(-lambda(t)/2), lambda linear between the
  integer timesteps."""
  lam = jnp.interp(jnp.asarray(t, jnp.float32), jnp.arange(lv.log_snr.shape[0]), lv.log_snr)
  return jnp.exp(-lam / 2)


def timestep_at(lv: Levels, sigma) -> jax.Array:
  """The float timestep of noise level ``sigma`` (the inverse of ``sigma_at``), clipped to
  [0, T-1]: what the network's timestep embedding is given."""
  lam = -2.0 * jnp.log(jnp.asarray(sigma, jnp.float32))
  return jnp.interp(-lam, -lv.log_snr, jnp.arange(lv.log_snr.shape[0], dtype=jnp.float32))


def int_timestep(lv: Levels, sigma) -> jax.Array:
  """The nearest integer timestep (the trainer's per-timestep loss buckets)."""
  T = lv.log_snr.shape[0]
  return jnp.clip(jnp.round(timestep_at(lv, sigma)), 0, T - 1).astype(jnp.int32)


# ------------------------------------------------------------------ the consistency function

def denoiser_scalings(sigma, prediction_type: str):
  """(a, b) with the teacher's x0-prediction D = a x_ve + b F for a raw network output F of
  ``prediction_type`` at VE level sigma (derivation in the module docstring)."""
  if prediction_type == "epsilon":
    return jnp.ones_like(sigma), -sigma
  if prediction_type == "v":
    return 1.0 / (1.0 + sigma**2), -sigma / jnp.sqrt(1.0 + sigma**2)
  if prediction_type == "x0":
    return jnp.zeros_like(sigma), jnp.ones_like(sigma)
  raise ConfigError(f"model.prediction_type={prediction_type!r}: use one of "
                    f"{diffusion.PREDICTION_TYPES}")


def scalings(sigma, sigma_min, prediction_type: str):
  """(c_skip, c_out) of f = c_skip x + c_out F: kappa = (sigma - sigma_min)/sigma (CM eq. 3's
  shift) on the denoiser's correction, so c_skip(sigma_min) = 1 and c_out(sigma_min) = 0."""
  a, b = denoiser_scalings(sigma, prediction_type)
  kappa = (sigma - sigma_min) / sigma
  return 1.0 - kappa * (1.0 - a), kappa * b


def consistency_fn(net: Callable, lv: Levels, prediction_type: str, x_ve, sigma):
  """f(x_ve, sigma) (per example sigma, shape (B,)): the network ``net(x_vp, t_float)`` is
  called on x_vp = x_ve / sqrt(1 + sigma^2) at its float timestep t(sigma)."""
  bshape = sigma.shape + (1,) * (x_ve.ndim - sigma.ndim)
  s = sigma.reshape(bshape)
  out = net(x_ve / jnp.sqrt(1.0 + s**2), timestep_at(lv, sigma)).astype(jnp.float32)
  c_skip, c_out = scalings(s, lv.sigma_min, prediction_type)
  return c_skip * x_ve + c_out * out


def model_net(model, params, labels, *, train: bool = False, dropout_key=None) -> Callable:
  """net(x_vp, t) of a U-Net (what ``consistency_fn`` calls)."""
  return lambda x, t: models.apply(model, params, x, t, labels, train=train,
                                   dropout_key=dropout_key)


# ------------------------------------------------------------------ the ECT objective

def sample_sigma(key, lv: Levels, p_mean: float, p_std: float) -> jax.Array:
  """One sigma_t ~ lognormal: log sigma ~ N(P_mean, P_std^2) (ECT's p(t)), restricted to
  [sigma_min, sigma_max] by inverse-CDF sampling (no mass piles up at the ends)."""
  z = lambda s: (jnp.log(s) - p_mean) / p_std  # noqa: E731
  u = jax.random.uniform(key, (), minval=ndtr(z(lv.sigma_min)), maxval=ndtr(z(lv.sigma_max)))
  return jnp.clip(jnp.exp(p_mean + p_std * ndtri(u)), lv.sigma_min, lv.sigma_max)


def sigma_r(sigma_t, stage, sigma_min, q: float, k: float, b: float) -> jax.Array:
  """ECT's mapping function (``t_to_r_sigmoid``): r = t (1 - n(t)/q^(stage+1)), n(t) = 1 +
  k sigmoid(-b t), clamped at sigma_min (ECT: at 0) where f is the identity."""
  decay = jnp.asarray(q, jnp.float32) ** -(jnp.asarray(stage, jnp.float32) + 1.0)
  ratio = 1.0 - decay * (1.0 + k * jax.nn.sigmoid(-b * sigma_t))
  return jnp.maximum(sigma_t * ratio, sigma_min)


def pseudo_huber(diff, c: float) -> jax.Array:
  """sqrt(||diff||^2 + c^2) - c per example (sum over all but the first axis); c = 0 is the
  L2 norm, whose gradient at diff = 0 is taken as 0 (ECT never meets it: t > r there)."""
  sq = jnp.sum(jnp.square(diff), axis=tuple(range(1, diff.ndim)))
  if c > 0:
    return jnp.sqrt(sq + c * c) - c
  pos = sq > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def ect_weight(sigma_t, sigma_r_) -> jax.Array:
  """w(t, r) = 1/(t - r) (ECMLoss's last line); 0 where t = r (both ends at sigma_min, where
  both branches are the input itself and the loss is 0)."""
  gap = sigma_t - sigma_r_
  return jnp.where(gap > 0, 1.0 / jnp.where(gap > 0, gap, 1.0), 0.0)


def ect_losses(net: Callable, lv: Levels, prediction_type: str, x0, noise, sigma_t, sigma_r_,
               c: float) -> jax.Array:
  """Per-example ECT losses of one noise draw at the two levels; no gradient through r."""
  bshape = sigma_t.shape + (1,) * (x0.ndim - 1)
  f_t = consistency_fn(net, lv, prediction_type, x0 + sigma_t.reshape(bshape) * noise, sigma_t)
  f_r = consistency_fn(net, lv, prediction_type, x0 + sigma_r_.reshape(bshape) * noise, sigma_r_)
  return pseudo_huber(f_t - jax.lax.stop_gradient(f_r), c) * ect_weight(sigma_t, sigma_r_)


def stage_of(step, every: int):
  """The gap schedule's stage at optimizer step ``step`` (ECT's ``update_schedule``)."""
  return step // every


# ------------------------------------------------------------------ sampling

def default_mid_sigmas(lv: Levels, num_steps: int) -> tuple[float, ...]:
  """Intermediate levels of a k-step sample: none at 1; ECT's 0.821 at 2; otherwise EDM's
  rho = 7 grid from sigma_max to sigma_min (eq. 5), its k - 1 inner points."""
  if num_steps < 1:
    raise ConfigError(f"consistency.num_steps={num_steps} must be >= 1")
  if num_steps == 1:
    return ()
  if num_steps == 2:
    return (TWO_STEP_SIGMA,)
  hi, lo = float(lv.sigma_max) ** (1 / 7), float(lv.sigma_min) ** (1 / 7)
  return tuple((hi + i / num_steps * (lo - hi)) ** 7 for i in range(1, num_steps))


def sample(net: Callable, lv: Levels, prediction_type: str, x_T, key, mid_sigmas=(),
           clip: bool = False, start_sigma=None) -> jax.Array:
  """Multistep consistency sampling (CM Algorithm 1) from VP noise ``x_T`` ~ N(0, I) at
  t = T-1: x0 = f(x_T / sqrt(ab_{T-1}), sigma_max); then for each tau in ``mid_sigmas``
  (decreasing) x = x0 + sqrt(tau^2 - sigma_min^2) z with fresh z from ``key``, x0 = f(x, tau)
  (a ``lax.scan``). 1 network call per level; deterministic given ``key``. ``clip``: each x0
  clipped to [-1, 1]. ``start_sigma``: x_T is a VP point of that level instead (image to
  image: an input noised to a timestep)."""
  B = x_T.shape[0]
  start = lv.sigma_max if start_sigma is None else jnp.float32(start_sigma)
  maybe_clip = (lambda x: jnp.clip(x, -1.0, 1.0)) if clip else (lambda x: x)  # noqa: E731
  f = lambda x, s: maybe_clip(consistency_fn(  # noqa: E731
      net, lv, prediction_type, x, jnp.full((B,), s, jnp.float32)))
  x0 = f(x_T.astype(jnp.float32) * jnp.sqrt(1.0 + start**2), start)
  taus = jnp.asarray(mid_sigmas, jnp.float32).reshape(-1)
  if taus.shape[0] == 0:
    return x0

  def step(x0, inp):
    tau, k = inp
    z = jax.random.normal(k, x0.shape, jnp.float32)
    return f(x0 + jnp.sqrt(jnp.maximum(tau**2 - lv.sigma_min**2, 0.0)) * z, tau), None

  x0, _ = jax.lax.scan(step, x0, (taus, jax.random.split(key, taus.shape[0])))
  return x0


@dataclasses.dataclass(frozen=True)
class Plan:
  """A consistency model's sampling run, as data (hashable), what ``generate.Sampler`` runs
  for a tuned workdir in place of a ``sampling.Plan``; the fields generation and eval read
  of one (sampler, num_steps, eta, guidance_scale, num_frames, distilled, report) mean the
  same. ``sigmas``: the levels f is called at, decreasing: the start (sigma_max, or an
  image-to-image input's level), then the re-noised mid levels. ``guidance_scale``: 1, the
  labels as given (ECT has no guided target)."""
  sigmas: tuple[float, ...]
  timesteps: tuple[float, ...]  # the float timesteps the network is told, per level
  clip_x0: bool = True
  from_noise: bool = True  # False: x starts at sigmas[0] (image to image)
  teacher: str = ""
  sampler: str = "consistency"
  guidance_scale: float = 1.0
  eta: float = 0.0
  num_frames: int = 0  # no denoising GIF: there is no trajectory to record
  distilled: bool = False

  @property
  def num_steps(self) -> int:
    """Network calls per sample."""
    return len(self.sigmas)

  def report(self) -> dict:
    """What runs, for sampling.json and eval reports."""
    return {"sampler": self.sampler, "num_steps": self.num_steps,
            "network_calls": self.num_steps, "sigmas": [float(x) for x in self.sigmas],
            "timesteps": [round(float(t), 4) for t in self.timesteps],
            "clip_x0": bool(self.clip_x0), "from_noise": self.from_noise,
            "teacher": self.teacher}


def make_plan(schedule: diffusion.Schedule, num_steps: int = 1, mid_sigmas=(), *,
              t_start: int | None = None, clip_x0: bool = False, teacher: str = "") -> Plan:
  """The plan of ``num_steps`` calls at sigma_max and ``mid_sigmas`` (empty: those of
  ``default_mid_sigmas``); ``t_start``: from an input at that timestep, with the mid levels
  below its own. ``teacher``: the tuned workdir's teacher, for the report."""
  lv = levels(schedule)
  n = int(num_steps)
  mids = tuple(float(x) for x in mid_sigmas) or default_mid_sigmas(lv, n)
  if len(mids) != n - 1:
    raise ConfigError(f"consistency.mid_sigmas={mids} has {len(mids)} levels; "
                      f"consistency.num_steps={n} takes {n - 1}")
  lo, hi = float(lv.sigma_min), float(lv.sigma_max)
  if any(not lo < m < hi for m in mids) or any(a <= b for a, b in zip(mids, mids[1:])):
    raise ConfigError(f"consistency.mid_sigmas={mids} must decrease within the schedule's "
                      f"({lo:.4g}, {hi:.4g})")
  start = hi if t_start is None else float(sigma_at(lv, t_start))
  sigmas = (start,) + tuple(m for m in mids if m < start)
  ts = tuple(float(t) for t in np.asarray(timestep_at(lv, jnp.asarray(sigmas))))
  return Plan(sigmas, ts, clip_x0=bool(clip_x0), from_noise=t_start is None,
              teacher=str(teacher or ""))


def run_plan(plan: Plan, model, schedule: diffusion.Schedule, prediction_type: str, params,
             x_start, key, labels=None) -> jax.Array:
  """Samples of ``plan`` (traceable: the body of ``generate.Sampler``'s and ``sampler``'s
  functions); ``x_start``: VP noise, or the input at ``plan.sigmas[0]``."""
  lv = levels(schedule)
  return sample(model_net(model, params, labels), lv, prediction_type, x_start, key,
                plan.sigmas[1:], plan.clip_x0, None if plan.from_noise else plan.sigmas[0])


def sampler(plan: Plan, model, schedule: diffusion.Schedule, prediction_type: str):
  """A jitted ``(params, x_T, key, labels) -> images`` of ``plan`` on one device (the
  network predicts ``prediction_type``)."""
  pt = prediction_type

  @jax.jit
  def run(params, x_T, key, labels=None):
    return run_plan(plan, model, schedule, pt, params, x_T, key, labels)
  return run
