"""Consistency tuning, the driver (``--mode=consistency``): ECT's objective in the trainer's
``train.Objective`` slot, and the run that tunes a trained workdir into a 1-2 call model.

The math (levels, the consistency function, the loss's pieces, sampling) is
``ddpm_jax/consistency.py``'s, a building block that generation reads too; this module
holds what needs the trainer and the teacher's workdir.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import logging

from ddpm_jax import config_lib, diffusion, distill, fs, models, parallel, train
from ddpm_jax import consistency as cm
from ddpm_jax.errors import ConfigError

# Sections a tuning run takes from its own config (defaults: configs/default.py's
# ``consistency``, ECT's ct_train.py / run_ecm.sh CIFAR-10 settings); the rest (model, data,
# diffusion, sampling) come from the teacher's saved config.
OWN_SECTIONS = ("training", "optim", "eval", "consistency")


def double_every(config) -> int:
  """Steps per stage of the gap schedule (ECT's --double, in steps; 0: num_train_steps // 8,
  ECT's 8 stages: --double 250 ticks of 100 iterations in 200k iterations)."""
  d = int(config.consistency.double_every_steps)
  return d if d > 0 else max(int(config.training.num_train_steps) // 8, 1)


def consistency_objective(config, model, schedule: diffusion.Schedule,
                          teacher_params=None) -> train.Objective:
  """The train-step objective of ECT. ``loss(params, x0, labels, example_keys, dropout_key,
  extra, step)``: the trainer hands it the optimizer step (``uses_step``), whose gap stage
  is ``step // double_every(config)``, so one run follows the whole schedule and a resumed
  one is where it left off. Example i draws sigma_t from ``fold_in(key_i, 0)`` and its
  noise as every objective does (``train.example_noise``); the reported timestep is
  sigma_t's nearest. ``init_params``: the teacher's."""
  lv = cm.levels(schedule)
  prediction_type = config.model.prediction_type
  cc = config.consistency
  p_mean, p_std = float(cc.p_mean), float(cc.p_std)
  q, k, b, c = float(cc.q), float(cc.k), float(cc.b), float(cc.c)
  every = double_every(config)

  def loss(params, x0, labels, example_keys, dropout_key, extra, step):
    del extra
    sig_t = jax.vmap(
        lambda key: cm.sample_sigma(jax.random.fold_in(key, 0), lv, p_mean, p_std))(example_keys)
    sig_r = cm.sigma_r(sig_t, cm.stage_of(step, every), lv.sigma_min, q, k, b)
    noise = train.example_noise(example_keys, x0.shape[1:])
    net = cm.model_net(model, params, labels, train=True, dropout_key=dropout_key)
    losses = cm.ect_losses(net, lv, prediction_type, x0.astype(jnp.float32), noise, sig_t,
                           sig_r, c)
    return losses, cm.int_timestep(lv, sig_t)

  return train.Objective(loss, init_params=teacher_params, uses_step=True)


# ------------------------------------------------------------------ the driver

def tune_config(config, teacher_config, overrides: dict):
  """The tuning run's config: the teacher's model, data, diffusion and sampling; training,
  optim, eval and consistency from ``config``; then the command line's ``overrides``."""
  c = config_lib.with_defaults(teacher_config)
  own = config_lib.with_defaults(config)
  for section in OWN_SECTIONS:
    c[section] = own[section].copy_and_resolve_references()
  config_lib.apply_overrides(c, overrides, skip_sections=OWN_SECTIONS)  # those are in config
  return c


def tune(config, workdir: str, overrides: dict | None = None) -> str | None:
  """ECT of ``consistency.teacher`` into ``workdir`` (``--mode=consistency``): one
  ``train_and_evaluate`` run, the gap's stage computed from the step inside the loss, so
  exact resume, agreed stops, progress and TensorBoard are the trainer's. Returns the
  workdir, or None when stopped (by a signal: the same command resumes). The teacher is
  pinned in ``<workdir>/teacher.json`` as a distillation round's is (``distill.pinned_teacher``):
  a resumed run reads exactly that step."""
  workdir = fs.normalize(workdir)
  teacher = config_lib.with_defaults(config).consistency.teacher
  if not teacher:
    raise ConfigError("set --config.consistency.teacher=WORKDIR: the trained run to tune")
  teacher_dir = fs.normalize(teacher)
  if teacher_dir == workdir:
    raise ConfigError(f"--workdir={workdir} is the teacher itself: tune into another workdir")
  teacher_config = distill.saved_config(teacher_dir)
  cfg = tune_config(config, teacher_config, overrides or {})
  cfg.consistency.teacher = teacher_dir
  teacher_params, teacher_step = distill.pinned_teacher(workdir, teacher_dir, teacher_dir,
                                                        teacher_config, "consistency.teacher",
                                                        "consistency.teacher")
  if parallel.is_main():
    logging.info("consistency tuning of %s (step %d, pinned in %s) into %s: %d steps, the gap "
                 "shrinking every %d", teacher_dir, teacher_step,
                 fs.join(workdir, distill.PIN_FILE), workdir, cfg.training.num_train_steps,
                 double_every(cfg))
  model = models.create_model(cfg)
  schedule = diffusion.make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
  state = train.train_and_evaluate(cfg, workdir,
                                   consistency_objective(cfg, model, schedule, teacher_params))
  return workdir if int(state.step) >= int(cfg.training.num_train_steps) else None
