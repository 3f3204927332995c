"""What a train step minimises: the objectives, apart from the trainer that runs them.

``Objective`` is the slot of ``train.make_train_step``: a per-example loss of (params, x0,
labels, example keys, dropout keys, extra[, step]). Three fill it: ``denoising`` (L_simple,
Ho et al. 2020; the default), ``distillation`` (a progressive-distillation round, Salimans
& Ho 2022) and ``consistency_tuning`` (ECT, Geng et al. 2025). Each example draws its
timestep from ``fold_in(its key, 0)`` and its noise from ``fold_in(its key, 1)``
(``example_noise``), so a loss does not depend on how the batch is split.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from ddpm_jax import consistency as cm
from ddpm_jax import diffusion, generate, models, sampling, timesteps
from ddpm_jax.errors import ConfigError

WEIGHTINGS = ("truncated_snr", "snr_plus_one")


class Objective(NamedTuple):
  """What a train step minimises. ``loss(params, x0, labels, example_keys, dropout_key,
  extra) -> (losses (B,), t (B,))``: per-example losses and the timestep each was drawn
  at (for the per-timestep loss buckets); example ``i`` draws its randomness from
  ``example_keys[i]`` only, its dropout from ``dropout_key[i]`` (one key per example, for
  ``models.apply``), so a loss never depends on how the batch is split into devices or
  microbatches. ``extra``: arrays the loss reads besides the parameters (a
  distillation teacher's), put on every device once. ``init_params``: parameters to
  start from instead of fresh ones (a student starts as its teacher). ``uses_step``: the
  loss also takes ``step=``, the optimizer step being taken (a traced int32 scalar, from
  ``state.step``: the same in every microbatch, its own in each step of a dispatch), for
  objectives whose schedule moves with training (consistency tuning's gap)."""
  loss: Callable
  extra: Any = None
  init_params: Any = None
  uses_step: bool = False


def example_noise(example_keys, shape) -> jax.Array:
  """Each example's Gaussian noise of ``shape``, from ``fold_in(its key, 1)`` (any objective)."""
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), shape))(example_keys)


def denoising(model, schedule: diffusion.Schedule, prediction_type: str) -> Objective:
  """L_simple: t uniform in [0, T), the network's prediction (``prediction_type``) against
  its target."""
  T = schedule.num_timesteps

  def loss(params, x0, labels, example_keys, dropout_key, extra):
    del extra
    t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0, T,
                                              dtype=jnp.int32))(example_keys)
    noise = example_noise(example_keys, x0.shape[1:])
    model_fn = lambda x, tt: models.apply(model, params, x, tt, labels,  # noqa: E731
                                          train=True, dropout_key=dropout_key)
    return diffusion.per_example_loss(schedule, model_fn, x0, t, noise, prediction_type), t

  return Objective(loss)


# ------------------------------------------------------------------ progressive distillation

def _alpha_sigma(schedule, t, shape):
  """(alpha_t, sigma_t) per example, shaped to broadcast against ``shape``; t = -1: (1, 0)."""
  ab = diffusion.alpha_bar_at(schedule, t).reshape(t.shape + (1,) * (len(shape) - t.ndim))
  return jnp.sqrt(ab), jnp.sqrt(1.0 - ab)


def two_step_target(schedule: diffusion.Schedule, z_t, t, t_end, z_end):
  """x~: the x0 with which one deterministic DDIM step from (z_t, t) lands exactly on z_end
  at ``t_end`` < t (per example). At t_end = -1 it is z_end itself."""
  (a, s), (a2, s2) = _alpha_sigma(schedule, t, z_t.shape), _alpha_sigma(schedule, t_end, z_t.shape)
  ratio = s2 / s
  return (z_end - ratio * z_t) / (a2 - ratio * a)


def loss_weight(schedule: diffusion.Schedule, t, weighting: str):
  """w_t of the x-space loss: max(SNR_t, 1) ("truncated_snr") or SNR_t + 1 ("snr_plus_one")."""
  ab = schedule.alphas_cumprod[t]
  snr = ab / (1.0 - ab)
  if weighting == "truncated_snr":
    return jnp.maximum(snr, 1.0)
  if weighting == "snr_plus_one":
    return snr + 1.0
  raise ConfigError(f"distill.weighting={weighting!r}: use one of {WEIGHTINGS}")


def teacher_two_steps(schedule, eps_fn, z, grid, j, clip_x0: bool):
  """The teacher's two deterministic DDIM steps (``sampling.ddim_step``, the sampler's own
  update) from level 2j of ``grid`` to 2j+2: (t, t_end, z_end)."""
  t, t_mid, t_end = grid[2 * j], grid[2 * j + 1], grid[2 * j + 2]
  x0, eps = sampling.pred_x0_eps(eps_fn, schedule, z, t, clip_x0)
  z_mid = sampling.ddim_step(schedule, x0, eps, t_mid)
  x0, eps = sampling.pred_x0_eps(eps_fn, schedule, z_mid, t_mid, clip_x0)
  return t, t_end, sampling.ddim_step(schedule, x0, eps, t_end)


def distillation(model, schedule, prediction_type: str, teacher_model, teacher_params,
                 teacher_prediction_type: str, *, teacher_steps: int, weighting: str,
                 clip_x0: bool) -> Objective:
  """A progressive-distillation round's objective: ``teacher_steps`` -> half (Salimans &
  Ho 2022, Algorithm 2; ``ddpm_jax/distill.py`` runs the rounds, ``distill.objective``
  builds this from a round's config). The student predicts ``prediction_type``, the frozen
  teacher ``teacher_prediction_type``; ``weighting``: ``loss_weight``'s; ``clip_x0``: the
  teacher's DDIM steps clip their x0 as the sampler does."""
  n_teacher = int(teacher_steps)
  grid = jnp.asarray(timesteps.distilled_grid(schedule.num_timesteps, n_teacher))

  def loss(params, x0, labels, example_keys, dropout_key, teacher):
    j = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0, n_teacher // 2,
                                              dtype=jnp.int32))(example_keys)
    noise = example_noise(example_keys, x0.shape[1:])
    t = grid[2 * j]
    z = diffusion.q_sample(schedule, x0, t, noise)
    eps_fn = generate.make_eps_fn(teacher_model, schedule, teacher, teacher_prediction_type,
                                  labels)
    _, t_end, z_end = teacher_two_steps(schedule, eps_fn, z, grid, j, clip_x0)
    target = jax.lax.stop_gradient(two_step_target(schedule, z, t, t_end, z_end))
    pred = models.apply(model, params, z, t, labels, train=True,
                        dropout_key=dropout_key).astype(jnp.float32)
    x0_pred = diffusion.prediction_to_x0(schedule, z, t, pred, prediction_type)
    mse = jnp.mean(jnp.square(x0_pred - target), axis=tuple(range(1, x0.ndim)))
    return loss_weight(schedule, t, weighting) * mse, t

  return Objective(loss, extra=teacher_params, init_params=teacher_params)


# ------------------------------------------------------------------ consistency tuning (ECT)

def consistency_tuning(model, schedule: diffusion.Schedule, prediction_type: str,
                       settings: cm.Settings, teacher_params=None) -> Objective:
  """ECT's objective (``ddpm_jax/consistency.py`` has its pieces and ``Settings``;
  ``ddpm_jax/consistency_tuning.py`` runs it). ``loss(params, x0, labels, example_keys,
  dropout_key, extra, step)``: the trainer hands it the optimizer step (``uses_step``),
  whose gap stage is ``step // settings.double_every``, so one run follows the whole
  schedule and a resumed one is where it left off. Example i draws sigma_t from
  ``fold_in(key_i, 0)`` and its noise as every objective does (``example_noise``); the
  reported timestep is sigma_t's nearest. ``init_params``: the teacher's."""
  lv = cm.levels(schedule)
  p_mean, p_std, q, k, b, c, every = settings

  def loss(params, x0, labels, example_keys, dropout_key, extra, step):
    del extra
    sig_t = jax.vmap(
        lambda key: cm.sample_sigma(jax.random.fold_in(key, 0), lv, p_mean, p_std))(example_keys)
    sig_r = cm.sigma_r(sig_t, cm.stage_of(step, every), lv.sigma_min, q, k, b)
    noise = example_noise(example_keys, x0.shape[1:])
    net = cm.model_net(model, params, labels, train=True, dropout_key=dropout_key)
    losses = cm.ect_losses(net, lv, prediction_type, x0.astype(jnp.float32), noise, sig_t,
                           sig_r, c)
    return losses, cm.int_timestep(lv, sig_t)

  return Objective(loss, init_params=teacher_params, uses_step=True)
