"""Consistency tuning, the driver (``--mode=consistency``): the run that tunes a trained
workdir into a 1-2 call model with ECT's objective (``objectives.consistency_tuning``).

The math (levels, the consistency function, the loss's pieces, sampling) is
``ddpm_jax/consistency.py``'s, a building block that generation reads too; this module
holds what needs the trainer and the teacher's workdir.
"""

from __future__ import annotations

from absl import logging

from ddpm_jax import checkpoint as ckpt_lib
from ddpm_jax import config_lib, diffusion, fs, models, objectives, parallel, pinning, train
from ddpm_jax import consistency as cm
from ddpm_jax.errors import ConfigError

# Sections a tuning run takes from its own config (defaults: configs/default.py's
# ``consistency``, ECT's ct_train.py / run_ecm.sh CIFAR-10 settings); the rest (model, data,
# diffusion, sampling) come from the teacher's saved config.
OWN_SECTIONS = ("training", "optim", "eval", "consistency")


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


def settings(config) -> cm.Settings:
  """ECT's settings of a tuning run's config; ``consistency.double_every_steps`` 0 is
  ``num_train_steps // 8`` (ECT's 8 stages: --double 250 ticks of 100 iterations in 200k)."""
  cc = config.consistency
  d = int(cc.double_every_steps)
  every = d if d > 0 else max(int(config.training.num_train_steps) // 8, 1)
  return cm.Settings(float(cc.p_mean), float(cc.p_std), float(cc.q), float(cc.k),
                     float(cc.b), float(cc.c), every)


def objective(config, model, schedule, teacher_params=None):
  """The tuning run's objective (``objectives.consistency_tuning``) from its config."""
  return objectives.consistency_tuning(model, schedule, config.model.prediction_type,
                                       settings(config), teacher_params)


def tune(config, workdir: str, overrides: dict | None = None) -> str | None:
  """ECT of ``consistency.teacher`` into ``workdir`` (``--mode=consistency``): one
  ``train_and_evaluate`` run, the gap's stage computed from the step inside the loss, so
  exact resume, agreed stops, progress and TensorBoard are the trainer's. Returns the
  workdir, or None when stopped (by a signal: the same command resumes). The teacher is
  pinned in ``<workdir>/teacher.json`` as a distillation round's is
  (``pinning.pinned_teacher``): a resumed run reads exactly that step."""
  workdir = fs.normalize(workdir)
  named = config_lib.with_defaults(config).consistency.teacher
  if not named:
    raise ConfigError("set --config.consistency.teacher=WORKDIR: the trained run to tune")
  teacher_dir = fs.normalize(named)
  if teacher_dir == workdir:
    raise ConfigError(f"--workdir={workdir} is the teacher itself: tune into another workdir")
  teacher_config = ckpt_lib.saved_config(teacher_dir)
  cfg = tune_config(config, teacher_config, overrides or {})
  cfg.consistency.teacher = teacher_dir
  teacher_params, teacher_step = pinning.pinned_teacher(
      workdir, teacher_dir, teacher_dir, teacher_config, "consistency.teacher",
      "consistency.teacher")
  if parallel.is_main():
    logging.info("consistency tuning of %s (step %d, pinned in %s) into %s: %d steps, the gap "
                 "shrinking every %d", teacher_dir, teacher_step,
                 fs.join(workdir, pinning.PIN_FILE), workdir, cfg.training.num_train_steps,
                 settings(cfg).double_every)
  model = models.create_model(cfg)
  schedule = diffusion.make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
  state = train.train_and_evaluate(cfg, workdir, objective(cfg, model, schedule, teacher_params))
  return workdir if int(state.step) >= int(cfg.training.num_train_steps) else None
