"""Progressive distillation (Salimans & Ho 2022): rounds that halve the sampling steps.

Round r trains a student to take in one DDIM step what its teacher takes in two: the
teacher is the previous round's EMA parameters (round 1: any workdir this project trained,
any parameterisation, with or without classes), frozen; the student starts as a copy. A
round is an ordinary training run of ``train.train_and_evaluate`` in its own workdir,
``<workdir>/steps<N>`` (N the student's step count), so it has every guarantee of the
trainer: exact resume after a kill, agreed stops on several processes, ``gs://``,
progress and TensorBoard. The rounds run in order; a finished round is skipped, an
interrupted one resumes.

Each round pins its teacher at its first start, before training: ``<round>/teacher.json``
names the teacher (round 1: ``distill.teacher``; later rounds: the previous round's
folder, relative to the workdir, so a moved workdir still resumes), the checkpoint step
read and a sha256 of its parameters (``params_digest``). A resumed round reads exactly
that step, so a teacher that trained on meanwhile does not mix two teachers into one
student; another teacher, a pinned step that is gone, or one whose parameters changed is
refused with one line before anything is written.

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

import hashlib
import json

import jax
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
    teacher, student = (timesteps.distilled_grid(num_timesteps, k) for k in (n, n // 2))
    if not np.array_equal(teacher[::2], student):  # rounding of T/n broke the nesting
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


PIN_FILE = "teacher.json"  # in a round's folder: the teacher it started with


def params_digest(params) -> str:
  """sha256 of a parameter tree: each leaf's path, dtype, shape and bytes, in tree order
  (what tells one teacher from another at the same step)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    a = np.ascontiguousarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}\n".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _read_pin(round_workdir: str) -> dict | None:
  path = fs.join(round_workdir, PIN_FILE)
  if not fs.exists(path):
    return None
  try:
    pin = json.loads(fs.read_text(path))
    return {"teacher": str(pin["teacher"]), "step": int(pin["step"]),
            "digest": str(pin["digest"])}
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"{path} is unreadable ({type(e).__name__}: {e}): it pins this run's "
                      f"teacher; restore it, or delete {round_workdir} to start it "
                      f"over") from e


def _legacy_teacher(round_workdir: str, field: str = "distill.round_teacher") -> str | None:
  """The teacher a round that has checkpoints but no pin (an older version) was started
  with, from its saved config's ``field``; None for a round not started."""
  if not fs.exists(ckpt_lib.checkpoint_dir(round_workdir)):
    return None
  mngr = ckpt_lib.make_manager(round_workdir, read_only=True, async_save=False)
  if mngr.latest_step() is None:
    return None
  saved, _ = ckpt_lib.newest_config(mngr, round_workdir)
  section, leaf = field.split(".")
  named = saved.get(section, {}).get(leaf)
  return fs.normalize(named) if named else ""


def pinned_teacher(round_workdir: str, name: str, teacher_dir: str, teacher_config,
                   flag: str = "distill.teacher", saved_field: str = "distill.round_teacher"):
  """(params, step) of a round's teacher: at the round's first start the teacher's newest
  checkpoint (EMA by its ``sampling.use_ema``), pinned in ``<round>/teacher.json`` before
  training; afterwards exactly the pinned step, checked against the pin's digest.

  ``name`` is what the pin records for the teacher (its workdir, or the previous round's
  folder). ``flag``: the config field that names the teacher (for the messages);
  ``saved_field``: where a run's saved config names it (consistency tuning pins its teacher
  too: ``consistency.teacher`` both). Raises ConfigError, before anything is written, for
  another teacher, a pinned step that is gone, or one whose parameters differ. Every
  process calls this: they all
  read the pin before any of them can write it (``load_params`` waits for all of them)."""
  pin, where = _read_pin(round_workdir), fs.join(round_workdir, PIN_FILE)
  restart = f"use another --workdir, or delete {round_workdir} to start it over"
  if pin is None:
    legacy = _legacy_teacher(round_workdir, saved_field)
    if legacy is not None and legacy != fs.normalize(teacher_dir):
      raise ConfigError(f"{round_workdir} was started with teacher {legacy or '(unknown)'}, "
                        f"not {teacher_dir}: {restart}")
    params, step = ckpt_lib.load_params(teacher_config, teacher_dir)
    if legacy is not None:
      logging.warning("%s has checkpoints but no %s (an older version): pinning its teacher "
                      "at the newest step, %d", round_workdir, PIN_FILE, step)
    record = {"teacher": name, "step": int(step), "digest": params_digest(params)}
    parallel.process_0_then_all("pin the teacher", lambda: fs.write_json(where, record))
    return params, step
  if pin["teacher"] != name:
    raise ConfigError(f"{round_workdir} was started with teacher {pin['teacher']} (see "
                      f"{where}), not {name}: set --config.{flag}={pin['teacher']} "
                      f"to resume it, or {restart}")
  mngr = ckpt_lib.make_manager(teacher_dir, read_only=True, async_save=False)
  if pin["step"] not in mngr.all_steps():
    raise ConfigError(f"the teacher's checkpoint {pin['step']} that {round_workdir} started "
                      f"with (see {where}) is gone from {ckpt_lib.checkpoint_dir(teacher_dir)}"
                      f": the run cannot go on with the same teacher; {restart}")
  params, step = ckpt_lib.load_params(teacher_config, teacher_dir, step=pin["step"])
  if params_digest(params) != pin["digest"]:
    raise ConfigError(f"the teacher's checkpoint {step} in {ckpt_lib.checkpoint_dir(teacher_dir)}"
                      f" is not the one {round_workdir} started with (its parameters' digest "
                      f"differs from {where}'s): {restart}")
  return params, step


def saved_config(workdir: str):
  """The config saved with a workdir's newest checkpoint, with today's defaults filled in."""
  mngr = ckpt_lib.make_manager(workdir, read_only=True, async_save=False)
  saved, _ = ckpt_lib.newest_config(mngr, workdir)
  return config_lib.with_defaults(saved)


def distill(config, workdir: str, overrides: dict | None = None) -> str | None:
  """Runs the rounds into ``<workdir>/steps<N>``; returns the last round's workdir, or None
  when a round was stopped (by a signal: the same command resumes it)."""
  workdir = fs.normalize(workdir)
  if not config.distill.teacher:
    raise ConfigError("set --config.distill.teacher=WORKDIR: the trained run to distill")
  teacher_dir = fs.normalize(config.distill.teacher)
  teacher_config = saved_config(teacher_dir)
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
    teacher_params, teacher_step = pinned_teacher(out, name, teacher_dir, teacher_config)
    if parallel.is_main():
      logging.info("round %d's teacher: %s at step %d (pinned in %s)", r, teacher_dir,
                   teacher_step, fs.join(out, PIN_FILE))
    model = models.create_model(cfg)
    schedule = diffusion.make_schedule(cfg.diffusion.schedule, cfg.diffusion.num_timesteps)
    state = train.train_and_evaluate(
        cfg, out, objectives.distillation(cfg, model, schedule, teacher_config, teacher_params))
    if int(state.step) < cfg.training.num_train_steps:
      return None  # stopped: the trainer said so; rerunning resumes this round
    teacher_dir, teacher_config = out, cfg
  return out
