"""Checkpoints with orbax-checkpoint's CheckpointManager (the ``args=`` API).

A checkpoint holds the train state (step, params, EMA params, optimizer state) and
the config as JSON. Orbax writes each checkpoint into a temporary folder and
finalises it when complete, so a save interrupted part-way is never listed. The
workdir may be local or ``gs://``.

What happens when a checkpoint does not restore (``restore_newest``), decided once for
all processes of a job:
  * its bytes are bad (a truncated or missing file, unparsable metadata), on a retry too:
    the trainer (the holder of the workdir lock, and only it) moves it to
    ``<workdir>/checkpoints_unreadable/<step>-<time>`` with one warning and uses the newest
    one before it; a reader (sampling, eval, a distillation's teacher) skips it with a
    warning and moves nothing, and a step that is gone meanwhile (deleted by the live
    trainer's rotation) is skipped without one. A trainer whose every checkpoint is bad
    stops rather than start from scratch, and keeps stopping while
    ``checkpoints_unreadable/`` holds what was set aside and ``checkpoints/`` nothing;
  * it does not fit the config (a changed optimizer or model setting): one line naming
    the setting, nothing moved;
  * any other error (permission, network, out of memory): one line, nothing moved.
Sampling and eval restore the parameters only, so optimizer settings cannot matter to them.
"""

from __future__ import annotations

import contextlib
import json
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from ddpm_jax import config_lib, fs, parallel, state
from ddpm_jax.errors import ConfigError, NoCheckpointError, UserError


def checkpoint_dir(workdir: str) -> str:
  return fs.join(fs.normalize(workdir), "checkpoints")


def make_manager(workdir: str, *, max_to_keep: int | None = 3, keep_period: int | None = None,
                 async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else max_to_keep, keep_period=keep_period or None,
      create=not read_only, enable_async_checkpointing=async_save, read_only=read_only,
      **({"save_interval_steps": 0} if read_only else {}))
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers={
      "state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()})


def _reader(workdir: str) -> ocp.CheckpointManager:
  """A read-only manager private to this process: its reads wait for no other process.

  A manager shared by the processes of a job synchronises them inside each call (orbax's
  barriers); a process whose read failed before such a barrier then left the others
  waiting there for good. Every process reads whole arrays onto its own host anyway, and
  the outcomes are combined afterwards (``parallel.exchange``)."""
  me = jax.process_index()
  options = ocp.CheckpointManagerOptions(
      read_only=True, create=False, save_interval_steps=0, enable_async_checkpointing=False,
      multiprocessing_options=ocp.options.MultiprocessingOptions(
          primary_host=me, active_processes={me},
          barrier_sync_key_prefix=f"ddpm_jax_reader_{me}"))
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_handlers={
      "state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()})


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
  dst = fs.join(fs.normalize(workdir), UNREADABLE, f"{step}-{int(time.time())}")
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


# tensorstore status codes that mean the stored bytes are bad (a truncated or missing data
# file: "OUT_OF_RANGE: Requested byte range ... is not valid", "FAILED_PRECONDITION:
# Truncated Zstd-compressed stream", "DATA_LOSS: ..."), not that reading them failed.
_BAD_BYTES = ("OUT_OF_RANGE", "DATA_LOSS", "FAILED_PRECONDITION", "NOT_FOUND")


def is_corrupt(e: BaseException) -> bool:
  """True if ``e`` says a checkpoint's bytes are bad; False for every other failure
  (permissions, network, memory, structure), which must never cost a checkpoint."""
  if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError, EOFError, FileNotFoundError)):
    return True
  text = str(e).lstrip()
  return isinstance(e, ValueError) and text.startswith(_BAD_BYTES)


def first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:300]}" if text else type(e).__name__


def _paths(tree) -> dict:
  """{('params', 'Conv_0', 'kernel'): (shape, dtype)} for a pytree of arrays or metadata."""
  def name(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(name(k) for k in path): (tuple(x.shape), np.dtype(x.dtype))
          for path, x in leaves}


def _mismatch(template: dict, saved: dict, parts) -> str | None:
  """The first difference between ``template`` and ``saved`` (paths -> shape/dtype) under
  the top-level ``parts``, in words; None if they match."""
  for part in parts:
    want = {p: v for p, v in template.items() if p[0] == part}
    have = {p: v for p, v in saved.items() if p[0] == part}
    for p in sorted(set(want) | set(have)):
      where = "/".join(p)
      if p not in have:
        return f"the checkpoint has no {where}"
      if p not in want:
        return f"the checkpoint has {where}, which this config does not"
      if want[p] != have[p]:
        return (f"{where} is {have[p][0]} {have[p][1]} in the checkpoint but "
                f"{want[p][0]} {want[p][1]} with this config")
  return None


_SETTINGS = {"opt_state": "the optimizer settings (optim.*)",
             "params": "the network settings (model.*, data.image_size)",
             "ema_params": "the network settings (model.*, data.image_size)",
             "posthoc_ema": "the post-hoc EMA profiles (training.posthoc_ema_sigma_rels)"}


class _Outcome:
  """One process's attempt at one step: ok (with the state), corrupt, incompatible, error."""

  def __init__(self, kind: str, message: str = "", state=None):
    self.kind, self.message, self.state = kind, message, state


def _attempt(manager, step: int, template, parts, retries: int) -> _Outcome:
  """Reads checkpoint ``step`` into ``template``'s structure, classifying any failure."""
  mine = _paths(template)
  for attempt in range(retries + 1):
    try:
      meta = manager.item_metadata(step)["state"]
      if meta is None:
        raise FileNotFoundError(f"no state metadata in checkpoint {step}")
      saved = _paths(meta.tree if hasattr(meta, "tree") else meta)
      diff = _mismatch(mine, saved, parts)
      if diff is not None:
        return _Outcome("incompatible", diff)
      if set(parts) == {p[0] for p in mine}:
        target = _abstract(template)
      else:  # only ``parts`` are wanted: the rest is read as saved, whatever it is
        target = dict(jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype),
                                   meta.tree if hasattr(meta, "tree") else meta))
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target)))
      state = jax.device_get(restored.state)
      return _Outcome("ok", state=state)
    except Exception as e:  # noqa: BLE001  (classified: only bad bytes cost a checkpoint)
      if "Structure mismatch" in str(e):
        return _Outcome("incompatible", first_line(e))
      if attempt == retries:
        return _Outcome("corrupt" if is_corrupt(e) else "error", first_line(e))
      time.sleep(min(2.0 * (attempt + 1), 10.0))
      manager.reload()
  raise AssertionError("unreachable")


def restore_newest(manager: ocp.CheckpointManager, workdir: str, template,
                   steps: list[int] | None = None, parts=None, retries: int = 2,
                   set_aside: bool = False):
  """(state, step) of the newest checkpoint that restores; (None, None) if there is none.

  ``parts`` (e.g. ("params", "ema_params")) restores only those top-level fields of the
  train state and returns a dict; by default the whole ``template`` (a TrainState).
  Every process of a job tries the same step and they agree on the outcome (the
  module docstring says what each outcome does). ``steps`` limits the candidates.
  ``set_aside``: damaged checkpoints are moved out of the way; only the holder of the
  workdir lock may pass it (a reader beside a live trainer must never move its files).
  Raises ConfigError if a checkpoint does not fit the config and UserError if one
  cannot be read for a reason other than bad bytes, on every process.
  """
  candidates = sorted(manager.all_steps() if steps is None else steps, reverse=True)
  seen = parallel.exchange("checkpoint steps", ",".join(map(str, candidates)))
  if len(set(seen)) > 1:
    raise UserError(f"the processes of this job see different checkpoints in "
                    f"{checkpoint_dir(workdir)} ({'; '.join(seen)}): is the workdir shared "
                    f"by every host?")
  parts = tuple(parts or _paths_top(template))
  _quiet_closed_loop_callbacks()
  reader = _reader(workdir) if jax.process_count() > 1 else manager
  moved = []
  for step in candidates:
    mine = _attempt(reader, step, template, parts, retries)
    if mine.kind != "ok" and not set_aside and not _step_exists(workdir, step):
      mine = _Outcome("gone", mine.message)
    outcomes = [o.split("\t", 1) for o in parallel.exchange(
        f"restore {step}", f"{mine.kind}\t{mine.message}")]
    kinds = [k for k, _ in outcomes]
    if all(k == "ok" for k in kinds):
      state = mine.state
      if parts != tuple(_paths_top(template)):
        state = {p: state[p] for p in parts}
      return state, step
    if "gone" in kinds:  # rotated away by the live trainer while we read it
      logging.info("checkpoint %d in %s was deleted while being read; using an older one",
                   step, checkpoint_dir(workdir))
      continue
    first = next(i for i, k in enumerate(kinds) if k != "ok")
    where = f" (process {first})" if len(kinds) > 1 else ""
    if "incompatible" in kinds:
      i = kinds.index("incompatible")
      msg = outcomes[i][1]
      top = next((k for k in _SETTINGS if f" {k}/" in f" {msg}"), None)
      raise ConfigError(
          f"checkpoint {step} in {checkpoint_dir(workdir)} does not fit this config: {msg}"
          + (f"; {_SETTINGS[top]} differ from the run's" if top else "")
          + "; nothing was changed: use the run's settings (see its config.json) or another "
          "--workdir")
    if "error" in kinds:
      i = kinds.index("error")
      raise UserError(
          f"checkpoint {step} in {checkpoint_dir(workdir)} could not be read{where}: "
          f"{outcomes[i][1]}; nothing was changed (this is not a sign of a bad checkpoint: "
          f"check access to the workdir, free memory, then rerun)")
    cause = outcomes[first][1]
    if not set_aside:
      logging.warning("checkpoint %d in %s cannot be read (%s%s); using the newest one "
                      "before it (left in place: only the trainer moves checkpoints)", step,
                      checkpoint_dir(workdir), cause, where)
      continue
    dst = parallel.process_0_then_all(f"set aside checkpoint {step}",
                                      lambda s=step: _set_aside(workdir, s))
    logging.warning("checkpoint %d in %s is damaged (%s%s); moved it to %s and using the newest "
                    "one before it", step, checkpoint_dir(workdir), cause, where,
                    dst or "checkpoints_unreadable/")
    moved.append(step)
    manager.reload()
    reader.reload()
  if set_aside and steps is None and (moved or set_aside_steps(workdir)):
    raise UserError(
        f"no checkpoint in {checkpoint_dir(workdir)} reads and "
        f"{fs.join(fs.normalize(workdir), UNREADABLE)}/ holds the damaged ones set aside "
        f"(steps {', '.join(map(str, moved or set_aside_steps(workdir)))}): not starting "
        f"from step 0 on my own. Copy a good checkpoint back into checkpoints/, or move "
        f"{UNREADABLE}/ out of the workdir to start this run again from step 0")
  return None, None


UNREADABLE = "checkpoints_unreadable"


def set_aside_steps(workdir: str) -> list[int]:
  """The steps of the checkpoints set aside in ``<workdir>/checkpoints_unreadable/``."""
  folder = fs.join(fs.normalize(workdir), UNREADABLE)
  if not fs.exists(folder):
    return []
  steps = []
  for name in fs.listdir(folder):
    head = name.rstrip("/").rsplit("/", 1)[-1].split("-", 1)[0]
    if head.isdigit():
      steps.append(int(head))
  return sorted(set(steps), reverse=True)


def _step_exists(workdir: str, step: int) -> bool:
  try:
    return fs.exists(fs.join(checkpoint_dir(workdir), str(step)))
  except Exception:  # noqa: BLE001  (cannot tell: treat it as there)
    return True


def _paths_top(template) -> list[str]:
  """The top-level field names of a train state (or dict)."""
  return sorted({p[0] for p in _paths(template)})


def restore_config(manager: ocp.CheckpointManager, step: int | None = None):
  """The config saved with a checkpoint, as a ConfigDict."""
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  return ml_collections.ConfigDict(_tuples(restored.config))


def newest_config(manager: ocp.CheckpointManager, workdir: str):
  """(config, step) of the newest checkpoint whose config reads; raises NoCheckpointError
  if there is no checkpoint, UserError if there are some and no config of them reads."""
  steps = sorted(manager.all_steps(), reverse=True)
  errors = []
  for step in steps:
    try:
      return restore_config(manager, step), step
    except Exception as e:  # noqa: BLE001
      logging.warning("the config of checkpoint %d cannot be read (%s); trying older ones",
                      step, type(e).__name__)
      errors.append(f"{step}: {first_line(e)}")
  if steps:
    raise UserError(f"the config of no checkpoint in {checkpoint_dir(workdir)!r} can be read "
                    f"({'; '.join(errors)[:400]}): check access to the workdir; a damaged "
                    f"checkpoint can be moved out of checkpoints/")
  raise NoCheckpointError(f"no checkpoint in {checkpoint_dir(workdir)!r}: train first with "
                          f"`python main.py --config CONFIG --workdir {workdir}`")


def saved_config(workdir: str):
  """The config a workdir's run was saved with (its newest readable checkpoint's), with the
  fields added since filled in from today's defaults: the one reader of a saved config."""
  saved, _ = newest_config(make_manager(workdir, read_only=True, async_save=False), workdir)
  return config_lib.with_defaults(saved)


def _tuples(d):
  """JSON turns tuples into lists; configs use tuples for sequences."""
  if isinstance(d, dict):
    return {k: _tuples(v) for k, v in d.items()}
  if isinstance(d, list):
    return tuple(_tuples(v) for v in d)
  return d


def write_config_json(workdir: str, config) -> None:
  fs.write_json(fs.join(workdir, "config.json"), config.to_dict())


def load_params(config, workdir: str, step: int | None = None):
  """The (EMA, if ``sampling.use_ema``) parameters of the newest readable checkpoint (or of
  ``step``), and its step: what sampling and eval need, nothing of the optimizer. Damaged
  checkpoints are set aside only while no trainer holds the workdir (``_lock_if_free``)."""
  mngr = make_manager(workdir, read_only=True, async_save=False)
  template = state.abstract_train_state(config)
  with _lock_if_free(workdir) as may_move:
    restored, step = restore_newest(mngr, workdir, template, None if step is None else [step],
                                    parts=("params", "ema_params"), set_aside=may_move)
  if restored is None:
    raise NoCheckpointError(f"no readable checkpoint in {checkpoint_dir(workdir)!r}: "
                            f"train first with `python main.py --config CONFIG --workdir "
                            f"{workdir}`")
  return restored["ema_params" if config.sampling.use_ema else "params"], step


@contextlib.contextmanager
def _lock_if_free(workdir: str):
  """Yields True, holding the workdir lock, if no trainer holds it (then a reader may set
  damaged checkpoints aside: nobody else is using them), False otherwise: a live trainer
  rotates its checkpoints, and what a reader sees fail may be one just deleted."""
  from ddpm_jax import lock as lock_lib
  lock = lock_lib.WorkdirLock(workdir)

  def take() -> str:
    try:
      lock.acquire()
      return "1"
    except Exception:  # noqa: BLE001  (held by a trainer, or not writable: move nothing)
      return "0"
  got = parallel.exchange("reader lock", take() if parallel.is_main() else "")[0] == "1"
  try:
    yield got
  finally:
    lock.release()


CLASSES_FILE = "classes.json"  # a class-conditional run's class names, in label order


def save_class_names(workdir: str, names) -> None:
  fs.write_json(fs.join(workdir, CLASSES_FILE), list(names))


def class_names(workdir: str, num_classes: int) -> tuple:
  """The run's class names (``<workdir>/classes.json``), or "0", "1", ... without the file."""
  path = fs.join(workdir, CLASSES_FILE)
  if fs.exists(path):
    return tuple(json.loads(fs.read_text(path)))
  return tuple(str(i) for i in range(num_classes))
