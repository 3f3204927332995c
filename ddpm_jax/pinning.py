"""A frozen teacher that a run learns from (a distillation round, consistency tuning),
pinned at the run's first start: ``<workdir>/teacher.json`` records the teacher's name, the
checkpoint step read and a sha256 of its parameters (``params_digest``), so a resumed run
reads exactly that step and a teacher that trained on meanwhile, or changed, is refused
with one line before anything is written."""

from __future__ import annotations

import hashlib
import json

import jax
import numpy as np
from absl import logging

from ddpm_jax import checkpoint as ckpt_lib
from ddpm_jax import fs, parallel
from ddpm_jax.errors import ConfigError

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
