"""Progressive distillation (Salimans & Ho 2022): rounds that halve the sampling steps.

Round r trains a student to take in one DDIM step what its teacher takes in two: the
teacher is the previous round's EMA parameters (round 1: any workdir this project trained,
any parameterisation, with or without classes), frozen; the student starts as a copy. A
round is an ordinary training run of ``train.train_and_evaluate`` in its own workdir,
``<workdir>/steps<N>`` (N the student's step count), so it has every guarantee of the
trainer: exact resume after a kill, agreed stops on several processes, ``gs://``,
progress and TensorBoard. The rounds run in order; a finished round is skipped, an
interrupted one resumes.

Each round pins its teacher at its first start, before training
(``pinning.pinned_teacher``): ``<round>/teacher.json`` names the teacher (round 1:
``distill.teacher``; later rounds: the previous round's folder, relative to the workdir, so
a moved workdir still resumes), the checkpoint step read and a sha256 of its parameters. A
resumed round reads exactly that step, so a teacher that trained on meanwhile does not mix
two teachers into one student; another teacher, a pinned step that is gone, or one whose
parameters changed is refused with one line before anything is written.

Time grid: N + 1 levels ``timesteps.distilled_grid(T, N)``, the trailing timesteps from T-1
and then the data (-1): evenly spaced, both ends kept, so the student's grid (N/2 steps)
is every other level of the teacher's. A student's workdir samples with DDIM (eta 0) on
exactly its grid without extra flags (its saved config says so).

Target (Salimans & Ho, Algorithm 2). For z_t = alpha_t x + sigma_t eps at a student level
t, the teacher's two deterministic DDIM steps t -> t' -> t'' give z_t''; the x0 that one
DDIM step from t takes to exactly z_t'' is

    x~ = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t),

and the student minimises w_t ||x~ - x^_student(z_t)||^2.

Parameterisation and weighting (the paper's section 4): an epsilon-predicting student
recovers x^ = (z - sigma eps^)/alpha, which amplifies its errors by 1/alpha (about 160 at
t = T-1 of the linear schedule): at 4 steps its first step, from pure noise, is mostly that
error. So the student predicts v (x^ = alpha z - sigma v^, errors scaled by sigma <= 1;
``distill.prediction_type``) and the loss is "truncated SNR" weighted, w_t = max(SNR_t, 1)
(``distill.weighting``; "snr_plus_one" is ||v~ - v^||^2), which does not vanish at high
noise where a few-step sampler makes its largest moves. An epsilon teacher's weights
start the v student (v = alpha eps - sigma x0): right where noise is low (v ~ eps), wrong
where it is high (v ~ -x0), which the first round, at many steps, has to relearn; a v
teacher's student starts exactly as its teacher.
"""

from __future__ import annotations

import numpy as np
from absl import logging

from ddpm_jax import checkpoint as ckpt_lib
from ddpm_jax import (
  config_lib,
  diffusion,
  fs,
  models,
  objectives,
  parallel,
  pinning,
  timesteps,
  train,
)
from ddpm_jax.errors import ConfigError

# Sections a round takes from the distillation config; the rest (model, data, diffusion,
# sampling) come from the teacher's saved config.
OWN_SECTIONS = ("training", "optim", "eval", "distill")


# ------------------------------------------------------------------ rounds

def round_steps(config) -> list[int]:
  """Teacher step counts of the rounds: start_steps, start_steps/2, ... > end_steps."""
  d = config.distill
  start, end = int(d.start_steps), int(d.end_steps)
  if end < 1 or start <= end or start % end or (start // end) & (start // end - 1):
    raise ConfigError(f"distill.start_steps={start} must be end_steps={end} times a power of "
                      f"two (each round halves the steps), e.g. 64 and 4")
  out, n = [], start
  while n > end:
    out.append(n)
    n //= 2
  return out


def check(config, num_timesteps: int) -> None:
  d = config.distill
  if not d.teacher:
    raise ConfigError("set --config.distill.teacher=WORKDIR: the trained run to distill")
  if d.prediction_type not in diffusion.PREDICTION_TYPES:
    raise ConfigError(f"distill.prediction_type={d.prediction_type!r}: use one of "
                      f"{diffusion.PREDICTION_TYPES}")
  if d.weighting not in objectives.WEIGHTINGS:
    raise ConfigError(f"distill.weighting={d.weighting!r}: use one of {objectives.WEIGHTINGS}")
  for n in round_steps(config):
    if n > num_timesteps:
      raise ConfigError(f"distill.start_steps={n} exceeds diffusion.num_timesteps="
                        f"{num_timesteps}")
    coarse, fine = (timesteps.distilled_grid(num_timesteps, k) for k in (n // 2, n))
    if not np.array_equal(fine[::2], coarse):  # rounding of T/n broke the nesting
      raise ConfigError(f"the {n}-step grid of T={num_timesteps} does not contain the "
                        f"{n // 2}-step one: pick distill.start_steps dividing T")


def _round_name(student_steps: int) -> str:
  return f"steps{student_steps}"


def round_dir(workdir: str, student_steps: int) -> str:
  return fs.join(workdir, _round_name(student_steps))


def round_config(config, teacher_config, teacher_dir: str, round_index: int, teacher_steps: int,
                 overrides: dict):
  """A round's full config: the teacher's model, data, diffusion and sampling; training,
  optim, eval and distill from ``config``; the student's parameterisation and sampler; then
  the command line's ``overrides`` ({"a.b": value}), which win."""
  c = config_lib.with_defaults(teacher_config)
  for section in OWN_SECTIONS:
    c[section] = config[section].copy_and_resolve_references()
  d, s = c.distill, c.sampling
  d.round, d.teacher_steps, d.round_teacher = round_index, teacher_steps, teacher_dir
  c.model.prediction_type = d.prediction_type
  s.sampler, s.spacing, s.num_steps, s.eta = "ddim", "trailing", teacher_steps // 2, 0.0
  s.clip_x0 = bool(config.sampling.clip_x0)
  config_lib.apply_overrides(c, overrides, skip_sections=OWN_SECTIONS)  # those are in config
  return c


def objective(config, model, schedule, teacher_config, teacher_params):
  """A round's objective (``objectives.distillation``) from its config and its teacher's."""
  d = config.distill
  return objectives.distillation(
      model, schedule, config.model.prediction_type, models.create_model(teacher_config),
      teacher_params, teacher_config.model.prediction_type, teacher_steps=int(d.teacher_steps),
      weighting=d.weighting, clip_x0=bool(config.sampling.clip_x0))


def distill(config, workdir: str, overrides: dict | None = None) -> str | None:
  """Runs the rounds into ``<workdir>/steps<N>``; returns the last round's workdir, or None
  when a round was stopped (by a signal: the same command resumes it)."""
  workdir = fs.normalize(workdir)
  if not config.distill.teacher:
    raise ConfigError("set --config.distill.teacher=WORKDIR: the trained run to distill")
  teacher_dir = fs.normalize(config.distill.teacher)
  teacher_config = ckpt_lib.saved_config(teacher_dir)
  check(config, teacher_config.diffusion.num_timesteps)
  steps = round_steps(config)
  out = None
  for r, n in enumerate(steps, start=1):
    out = round_dir(workdir, n // 2)
    cfg = round_config(config, teacher_config, teacher_dir, r, n, overrides or {})
    if parallel.is_main():
      logging.info("distillation round %d of %d: %d -> %d steps, teacher %s, into %s", r,
                   len(steps), n, n // 2, teacher_dir, out)
    name = teacher_dir if r == 1 else _round_name(n)  # the previous round's folder
    teacher_params, teacher_step = pinning.pinned_teacher(out, name, teacher_dir,
                                                          teacher_config)
    if parallel.is_main():
      logging.info("round %d's teacher: %s at step %d (pinned in %s)", r, teacher_dir,
                   teacher_step, fs.join(out, pinning.PIN_FILE))
    model = models.create_model(cfg)
    schedule = diffusion.make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
    state = train.train_and_evaluate(
        cfg, out, objective(cfg, model, schedule, teacher_config, teacher_params))
    if int(state.step) < cfg.training.num_train_steps:
      return None  # stopped: the trainer said so; rerunning resumes this round
    teacher_dir, teacher_config = out, cfg
  return out
