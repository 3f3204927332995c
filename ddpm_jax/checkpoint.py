"""Checkpoints with orbax-checkpoint's CheckpointManager (the ``args=`` API).

A checkpoint holds the train state (step, params, EMA params, optimizer state) and
the config as JSON. Orbax writes each checkpoint into a temporary folder and renames
it when complete, so a save interrupted part-way is never listed as a valid step.
"""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), "checkpoints")


def make_manager(workdir: str, *, max_to_keep: int = 3, keep_period: int | None = None,
                 async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep, keep_period=keep_period or None, create=not read_only,
      enable_async_checkpointing=async_save, read_only=read_only)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=("state", "config"))


def save(manager: ocp.CheckpointManager, step: int, state, config, *, force: bool = False) -> bool:
  """Saves host state (numpy pytree) and config at ``step``; async if the manager is."""
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      config=ocp.args.JsonSave(config.to_dict())), force=force)


def restore(manager: ocp.CheckpointManager, template, step: int | None = None):
  """Restores the state at ``step`` (default: latest) into ``template``'s structure."""
  step = manager.latest_step() if step is None else step
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype)
                          if not isinstance(x, jax.ShapeDtypeStruct) else x, template)
  restored = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract)))
  return jax.device_get(restored.state)


def restore_config(manager: ocp.CheckpointManager, step: int | None = None):
  """The config saved with a checkpoint, as a ConfigDict."""
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return ml_collections.ConfigDict(_tuples(restored.config))


def _tuples(d):
  """JSON turns tuples into lists; configs use tuples for sequences."""
  if isinstance(d, dict):
    return {k: _tuples(v) for k, v in d.items()}
  if isinstance(d, list):
    return tuple(_tuples(v) for v in d)
  return d


def write_config_json(workdir: str, config) -> None:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config.to_dict(), f, indent=2, default=str)
