"""Checkpoints with orbax-checkpoint's CheckpointManager (the ``args=`` API).

A checkpoint holds the train state (step, params, EMA params, optimizer state) and
the config as JSON. Orbax writes each checkpoint into a temporary folder and
finalises it when complete, so a save interrupted part-way is never listed. The
workdir may be local or ``gs://``.

A checkpoint that no longer restores (a truncated file, a partial copy) is moved to
``<workdir>/checkpoints_unreadable/<step>`` with one warning, and the newest one
that restores is used instead (``restore_newest``).
"""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from ddpm_jax import fs, parallel
from ddpm_jax.errors import NoCheckpointError


def checkpoint_dir(workdir: str) -> str:
  return fs.join(fs.normalize(workdir), "checkpoints")


def make_manager(workdir: str, *, max_to_keep: int | None = 3, keep_period: int | None = None,
                 async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else max_to_keep, keep_period=keep_period or None,
      create=not read_only, enable_async_checkpointing=async_save, read_only=read_only,
      **({"save_interval_steps": 0} if read_only else {}))
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "config"))


def save(manager: ocp.CheckpointManager, step: int, state, config, *, force: bool = False) -> bool:
  """Saves host state (numpy pytree) and config at ``step``; async if the manager is."""
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(config.to_dict())), force=force)


def _abstract(template):
  return jax.tree.map(lambda x: x if isinstance(x, jax.ShapeDtypeStruct)
                      else jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), template)


def restore(manager: ocp.CheckpointManager, template, step: int | None = None):
  """Restores the state at ``step`` (default: latest) into ``template``'s structure."""
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(template))))
  return jax.device_get(restored.state)


def _set_aside(workdir: str, step: int) -> str:
  dst = fs.join(fs.normalize(workdir), "checkpoints_unreadable", f"{step}-{int(time.time())}")
  fs.move(fs.join(checkpoint_dir(workdir), str(step)), dst)
  return dst


def _quiet_closed_loop_callbacks() -> None:
  """After a failed read, tensorstore's callbacks for the other reads of that restore reach
  orbax's closed event loop, and each prints a traceback ("Event loop is closed", through
  sys.unraisablehook): dozens of them, burying the one real cause. Those, and only those,
  are dropped."""
  import sys
  hook = sys.unraisablehook
  if getattr(hook, "_ddpm_jax", False):
    return

  def quiet(unraisable):
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
      return
    hook(unraisable)
  quiet._ddpm_jax = True
  sys.unraisablehook = quiet


def restore_newest(manager: ocp.CheckpointManager, workdir: str, template,
                   steps: list[int] | None = None):
  """(state, step) of the newest checkpoint that restores; (None, None) if there is none.

  Each newer checkpoint that fails to restore is moved aside (by process 0; every
  process sees the same files, so all fail on the same ones) with one warning.
  ``steps`` limits the candidates.
  """
  candidates = sorted(manager.all_steps() if steps is None else steps, reverse=True)
  _quiet_closed_loop_callbacks()
  for step in candidates:
    try:
      return restore(manager, template, step), step
    except Exception as e:  # noqa: BLE001  (any failure to read means unusable)
      cause = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
      dst = parallel.process_0_then_all(f"set aside checkpoint {step}",
                                        lambda s=step: _set_aside(workdir, s))
      logging.warning("checkpoint %d in %s cannot be read (%s: %s); moved it to %s and using "
                      "the newest one before it", step, checkpoint_dir(workdir),
                      type(e).__name__, cause, dst or "checkpoints_unreadable/")
      manager.reload()
  return None, None


def restore_config(manager: ocp.CheckpointManager, step: int | None = None):
  """The config saved with a checkpoint, as a ConfigDict."""
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return ml_collections.ConfigDict(_tuples(restored.config))


def newest_config(manager: ocp.CheckpointManager, workdir: str):
  """(config, step) of the newest checkpoint whose config reads; raises NoCheckpointError."""
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return restore_config(manager, step), step
    except Exception as e:  # noqa: BLE001
      logging.warning("the config of checkpoint %d cannot be read (%s); trying older ones",
                      step, type(e).__name__)
  raise NoCheckpointError(f"no checkpoint in {checkpoint_dir(workdir)!r}: train first with "
                          f"`python main.py --config CONFIG --workdir {workdir}`")


def _tuples(d):
  """JSON turns tuples into lists; configs use tuples for sequences."""
  if isinstance(d, dict):
    return {k: _tuples(v) for k, v in d.items()}
  if isinstance(d, list):
    return tuple(_tuples(v) for v in d)
  return d


def write_config_json(workdir: str, config) -> None:
  fs.write_json(fs.join(workdir, "config.json"), config.to_dict())
