"""Training: one pure train step, and the loop around it.

``make_train_step`` returns a pure ``train_step(state, batch, key) -> (state, metrics)``.
Per-step randomness is derived with ``fold_in`` from the base key, the step and the
example's global index (dropout too, per example): nothing random is stored, and a
resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from ddpm_jax import checkpoint as ckpt_lib
from ddpm_jax import (
  config_lib,
  datasets,
  diffusion,
  fs,
  generate,
  images,
  input_pipeline,
  models,
  objectives,
  parallel,
  posthoc_ema,
  progress,
  signals,
  validation,
  writers,
)
from ddpm_jax import lock as lock_lib
from ddpm_jax import state as state_lib
from ddpm_jax.errors import ConfigError, DivergenceError, StoreUnavailable, WorkdirLocked
from ddpm_jax.state import TrainState

__all__ = ["TrainState", "DivergenceError", "make_train_step", "make_p_train_step",
           "train_and_evaluate"]


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def step_key(key, step):
  """The key of step ``step``'s examples. Example i of the global batch folds in i, and its
  dropout key is ``fold_in(its key, 3)``, so the same global batch draws the same t, noise
  and dropout masks on 1 device or many, in one batch or in microbatches."""
  return jax.random.split(jax.random.fold_in(key, step))[0]


def accumulated_grads(objective: objectives.Objective, params, examples, extra, k: int, step=None):
  """(mean loss, mean gradient, per-example losses, t) of ``examples`` = (x0, labels,
  example keys, dropout keys), computed over k equal microbatches in order, one after
  another, and averaged: the whole batch's values (up to float rounding) at the activation
  memory of one microbatch plus a gradient buffer. ``lax.scan`` (a loop XLA cannot run
  out of order, unlike an unrolled one, whose microbatch forwards could all be live at
  once) slices the microbatches and stacks their losses; ``fori_loop`` would need dynamic
  slices by hand for the same loop. ``step``: handed to an objective that ``uses_step``."""
  at_step = {"step": jnp.asarray(step, jnp.int32)} if objective.uses_step else {}

  def loss_fn(p, mb):
    x0, labels, example_keys, dropout_keys = mb
    losses, t = objective.loss(p, x0, labels, example_keys, dropout_keys, extra, **at_step)
    return losses.mean(), (losses, t)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if k == 1:
    (loss, (losses, t)), grads = grad_fn(params, examples)
    return loss, grads, losses, t

  def body(acc, mb):
    (loss, (losses, t)), grads = grad_fn(params, mb)
    return jax.tree.map(jnp.add, acc, grads), (loss, losses, t)

  split = jax.tree.map(lambda a: a.reshape((k, a.shape[0] // k) + a.shape[1:]), examples)
  grads, (loss, losses, t) = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), split)
  return loss.mean(), jax.tree.map(lambda g: g / k, grads), losses.reshape(-1), t.reshape(-1)


def make_train_step(config, model, schedule: diffusion.Schedule, tx,
                    axis_name: str | None = parallel.AXIS,
                    objective: objectives.Objective | None = None):
  """Builds ``train_step(state, batch, key, extra=None) -> (state, metrics)``.

  ``batch`` is (B, H, W, C) in [-1, 1], or {"image": ..., "label": (B,)} for a
  class-conditional model. ``objective`` is L_simple unless given (distillation passes
  its own; ``extra`` is its ``Objective.extra``). Under ``pmap`` with ``axis_name``,
  gradients and metrics are averaged over all devices; with ``axis_name=None`` the step
  runs on one device. Non-finite loss or gradients skip the update (params, EMA and
  optimizer state are kept, so the optimizer's update count, the learning rate and the
  EMA warm-up stand still) and count in ``metrics['skipped']``; ``state.step`` counts
  every step. ``training.microbatches`` = k splits each device's batch into k microbatches
  whose gradients are averaged (``accumulated_grads``) before the one update, EMA step and
  NaN check of the step.
  """
  T = schedule.num_timesteps
  objective = objective or objectives.denoising(model, schedule, config.model.prediction_type)
  lr_fn = state_lib.make_lr_schedule(config)
  label_dropout = float(config.training.label_dropout)
  microbatches = int(config.training.microbatches)

  def train_step(state: TrainState, batch, key, extra=None):
    x0, labels = ((batch["image"], batch.get("label")) if isinstance(batch, dict)
                  else (batch, None))
    B = x0.shape[0]
    device = jax.lax.axis_index(axis_name) if axis_name is not None else 0
    key = step_key(key, state.step)
    example_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(device * B + jnp.arange(B))
    dropout_keys = jax.vmap(lambda k: jax.random.fold_in(k, 3))(example_keys)
    if model.num_classes:  # classifier-free guidance: some labels become the null label
      null = models.null_labels(model.num_classes, B)
      labels = null if labels is None else labels
      drop = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 2)) < label_dropout)(
          example_keys)
      labels = jnp.where(drop, null, labels)
    else:
      labels = None

    loss, grads, losses, t = accumulated_grads(
        objective, state.params, (x0, labels, example_keys, dropout_keys), extra, microbatches,
        **({"step": state.step} if objective.uses_step else {}))
    bucket_sum, bucket_count = validation.bucket_sums(losses, t, T)
    if axis_name is not None:
      grads, loss = jax.lax.pmean((grads, loss), axis_name)
      bucket_sum, bucket_count = jax.lax.psum((bucket_sum, bucket_count), axis_name)
    grad_norm = _global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    count = state_lib.updates_applied(state.opt_state)  # updates applied so far
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    decay = state_lib.ema_decay_at(count, config)
    new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                           state.ema_params, new_params)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    new_state = state.replace(step=state.step + 1,  # replace: a PosthocTrainState stays one
                              params=keep(new_params, state.params),
                              ema_params=keep(new_ema, state.ema_params),
                              opt_state=keep(new_opt_state, state.opt_state))
    if isinstance(state, state_lib.PosthocTrainState):  # power-function EMAs, EDM2 eq. 127
      new_state = new_state.replace(posthoc_ema=keep(posthoc_ema.update(
          state.posthoc_ema, new_params, count, posthoc_ema.gammas(config)), state.posthoc_ema))
    metrics = dict(loss=loss, grad_norm=grad_norm, param_norm=_global_norm(new_state.params),
                   learning_rate=jnp.asarray(lr_fn(count), jnp.float32),
                   ema_decay=jnp.asarray(decay, jnp.float32),
                   skipped=1 - ok.astype(jnp.int32),
                   loss_bucket_sum=bucket_sum, loss_bucket_count=bucket_count)
    return new_state, metrics

  return train_step


def make_multi_step(train_step, k: int):
  """Runs ``train_step`` over a leading axis of k batches: k steps per device call.

  k = 1 calls the step directly; k > 1 uses an unrolled ``lax.scan``. XLA:CPU
  (jaxlib 0.10.2) ran a small U-Net's step ~35x slower (28 s vs 0.8 s) when the
  backward pass sat inside a scan under pmap, so the direct call is the default.
  """
  if k == 1:
    def one_step(state, batches, key, extra=None):
      state, metrics = train_step(state, jax.tree.map(lambda b: b[0], batches), key, extra)
      return state, jax.tree.map(lambda m: m[None], metrics)
    return one_step

  def multi_step(state, batches, key, extra=None):
    return jax.lax.scan(lambda s, b: train_step(s, b, key, extra), state, batches, unroll=True)
  return multi_step


def make_p_train_step(config, model, schedule, tx, objective: objectives.Objective | None = None):
  """The pmapped k-step function: (replicated state, [devices, k, B, ...] batches, key,
  [devices, len(parallel.REQUESTS)] requests) -> (state, metrics, agreed requests).
  The objective's ``extra`` arrays are put on the devices once, here."""
  multi = make_multi_step(make_train_step(config, model, schedule, tx, objective=objective),
                          config.training.steps_per_dispatch)

  def step_and_agree(state, batches, key, requests, extra):
    state, metrics = multi(state, batches, key, extra)
    return state, metrics, parallel.agree(requests)
  p_step = parallel.pmap(step_and_agree, in_axes=(0, 0, None, 0, 0), donate_argnums=(0,))
  extra = objective.extra if objective is not None else None
  extra_r = parallel.replicate(extra) if extra is not None else None
  return lambda state, batches, key, requests: p_step(state, batches, key, requests, extra_r)


def summarize_metrics(metrics, num_timesteps: int) -> dict:
  """Host metrics of one dispatch (device 0, k steps) -> flat dict of floats."""
  m = jax.tree.map(lambda x: np.asarray(x)[0], metrics)  # device 0; all devices agree
  out = {k: float(np.mean(m[k])) for k in ("loss", "grad_norm", "param_norm",
                                           "learning_rate", "ema_decay")}
  out["skipped"] = int(np.sum(m["skipped"]))
  out["last_skipped"] = int(m["skipped"][-1])
  buckets = validation.bucket_means(m["loss_bucket_sum"].sum(0), m["loss_bucket_count"].sum(0),
                                    num_timesteps)
  out.update({f"loss_{name}": v for name, v in buckets.items()})
  return out


def _check_classes(names, num_classes: int, workdir: str, is_main: bool) -> None:
  """The data's classes must be the model's; their names go to <workdir>/classes.json."""
  if len(names) != num_classes:
    raise ConfigError(f"the dataset has {len(names)} classes ({', '.join(names)}) but "
                      f"model.num_classes={num_classes}: set --config.model.num_classes="
                      f"{len(names)}")
  if is_main:
    ckpt_lib.save_class_names(workdir, names)


def train_and_evaluate(config, workdir: str,
                       objective: objectives.Objective | None = None) -> TrainState:
  """Trains ``config`` in ``workdir``, resuming from its newest readable checkpoint.

  ``objective``: what to minimise, L_simple unless given (``ddpm_jax/objectives.py``).

  Every process of a multi-host job runs this. Stops cleanly (checkpoint saved, on
  every process at the same step) at the end, on SIGTERM/SIGINT to any process, or
  after ``training.max_bad_steps`` consecutive non-finite steps (DivergenceError).
  Returns the final host state.
  """
  config = config_lib.complete(config, jax.device_count())
  posthoc_ema.check_config(config)
  workdir = fs.normalize(workdir)
  is_main = parallel.is_main()
  parallel.process_0_then_all("check the workdir", lambda: fs.check_writable(workdir, "--workdir"))
  t = config.training
  mngr = ckpt_lib.make_manager(workdir, max_to_keep=t.keep_checkpoints or None,  # 0: keep all
                               keep_period=t.keep_period or None)
  if mngr.latest_step() is not None:
    saved, _ = ckpt_lib.newest_config(mngr, workdir)
    config_lib.check_compatible(config, saved.to_dict())
    posthoc_ema.check_resume(config, saved.to_dict())

  lock = lock_lib.WorkdirLock(workdir)
  with signals.StopRequest(on_hard_stop=lock.release) as stop:
    stop.watch_native_calls()
    parallel.process_0_then_all("workdir lock", lock.acquire)
    try:
      return _train(config, workdir, mngr, lock, stop, is_main, objective)
    finally:
      lock.release()


def _train(config, workdir, mngr, lock, stop, is_main, objective):
  t = config.training
  model = models.create_model(config)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  tx = state_lib.make_optimizer(config)
  init_key, train_key = jax.random.split(jax.random.key(t.seed))
  state = state_lib.create_train_state(config, model, tx, init_key)
  if objective is not None and objective.init_params is not None:  # a student: its teacher
    init = jax.device_get(objective.init_params)
    state = state.replace(params=init, ema_params=init, opt_state=jax.device_get(tx.init(init)))
    if isinstance(state, state_lib.PosthocTrainState):
      state = state.replace(posthoc_ema=tuple(init for _ in state.posthoc_ema))
  restored, latest = ckpt_lib.restore_newest(mngr, workdir, state, set_aside=True)
  if restored is not None:
    state = restored
    logging.info("resumed from step %d in %s", latest, ckpt_lib.checkpoint_dir(workdir))
  step = int(state.step)
  if is_main:  # after the restore: a start refused there leaves the run's config.json alone
    ckpt_lib.write_config_json(workdir, config)
    if step == 0:
      _keep_old_metrics(workdir)
  logging.info("model: %s parameters", f"{models.count_params(state.params):,}")

  data = datasets.prepare_data(config)  # once: the train and held-out splits open from it
  source = data.source(config.data.train_split, with_labels=model.num_classes > 0)
  if model.num_classes:
    _check_classes(source.class_names, model.num_classes, workdir, is_main)
  batches = input_pipeline.TrainBatches(
      source, t.batch_size, seed=t.seed, start_step=step, random_flip=config.data.random_flip,
      process_index=jax.process_index(), process_count=jax.process_count(),
      local_devices=jax.local_device_count(), num_workers=config.data.num_workers,
      with_labels=model.num_classes > 0, num_processes=config.data.get("num_processes", 0))
  writer = writers.MetricWriter(workdir, enabled=is_main)
  writer.before_write = lock.check
  writer.drop_after(step)  # lines a killed run logged past its last checkpoint come again
  run = _Run(config, workdir, mngr, lock, stop, writer, step, parallel.replicate(state),
             make_p_train_step(config, model, schedule, tx, objective), train_key, batches,
             _SideWork(config, model, schedule, source, data))
  try:
    agreed = run.loop()
  except BaseException:
    _close_quietly(mngr, batches, run.bar, writer)  # the first error is the one to tell
    raise
  run.with_store_retries("finish writing the last checkpoint", mngr.wait_until_finished)
  batches.close()
  run.bar.close()
  run.with_store_retries("write the logs", writer.close)
  if agreed.stop:
    who = stop.signal or "a stop signal to another process of this job"
    logging.warning("stopped by %s at step %d (checkpoint saved); the same command resumes",
                    who, run.step)
  return parallel.unreplicate(run.state_r)


def _close_quietly(mngr, batches, bar, writer) -> None:
  """Cleans up after an error without raising another one in its place."""
  for what, fn in (("the checkpoint being written", mngr.wait_until_finished),
                   ("the input pipeline", batches.close), ("the progress bar", bar.close),
                   ("the logs", writer.close)):
    try:
      fn()
    except Exception as e:  # noqa: BLE001
      logging.warning("while stopping: could not finish %s (%s)", what, type(e).__name__)


# How long a trainer waits for a store that does not answer (seconds, over every try of one
# save, beyond the clients' own retries); several processes do not retry (a save is a
# collective): they stop with the same line.
STORE_RETRY_S = float(os.environ.get("DDPM_JAX_STORE_RETRY_S", 300))


def with_store_retries(what: str, fn, workdir: str, latest_step: Callable[[], int | None],
                       retry_s: float | None = None):
  """``fn()``, tried again with backoff (5 s doubling to 60 s) while the store does not
  answer (``fs.is_transient``), on one process up to ``retry_s`` (default STORE_RETRY_S);
  then StoreUnavailable: one line naming the newest checkpoint and how to resume."""
  retry_s = STORE_RETRY_S if retry_s is None else retry_s
  start, delay = time.monotonic(), 5.0
  while True:
    try:
      return fn()
    except Exception as e:
      if not fs.is_transient(e):
        raise
      waited = time.monotonic() - start
      if jax.process_count() > 1 or waited + delay > retry_s:
        latest = latest_step()
        raise StoreUnavailable(
            f"could not {what} in {workdir} ({ckpt_lib.first_line(e)}), for {waited:.0f} s "
            f"after the storage client's own retries: the newest checkpoint is "
            f"{'step ' + str(latest) if latest is not None else 'none yet'}; rerun the same "
            f"command to resume once the store answers") from None
      logging.warning("could not %s (%s); trying again in %.0f s", what,
                      ckpt_lib.first_line(e), delay)
      time.sleep(delay)
      delay = min(2 * delay, 60.0)


def _keep_old_metrics(workdir: str) -> None:
  """A run that starts from step 0 over an earlier run's ``metrics.jsonl`` (its checkpoints
  deleted or moved by hand) keeps that file as ``metrics-<time>.jsonl`` rather than
  truncate it to nothing."""
  path = fs.join(workdir, "metrics.jsonl")
  if fs.exists(path) and fs.read_bytes(path).strip():
    dst = fs.join(workdir, f"metrics-{int(time.time())}.jsonl")
    fs.move(path, dst)
    logging.warning("starting from step 0: the earlier metrics.jsonl of %s is kept as %s",
                    workdir, dst)


class _Dispatch(NamedTuple):
  """One dispatched group of train steps whose results are read one dispatch later."""
  step: int  # the step after it
  metrics: Any  # on the devices
  agreed: Any  # the requests every process made with it, combined (on the devices)
  last_save_step: int  # the latest save when it was dispatched


class _SideWork:
  """EMA sample grids every ``training.sample_every_steps`` and the held-out loss every
  ``training.eval_every_steps`` (off when 0)."""

  def __init__(self, config, model, schedule, source, data: datasets.Prepared):
    t = config.training
    self.config = config
    self.grid_sampler = generate.Sampler(config, model, schedule) if t.sample_every_steps else None
    self.grid_labels = (generate.parse_labels("all", source.class_names, 16)
                        if model.num_classes else None)
    self.val_loss = None
    if t.get("eval_every_steps", 0):
      self.val_loss = validation.ValidationLoss(
          config, model, schedule,
          data.source(config.data.eval_split, with_labels=model.num_classes > 0),
          config.eval.num_examples, config.eval.batch_size)

  def __call__(self, step: int, state_r, writer, workdir: str) -> None:
    t = self.config.training
    if self.grid_sampler is not None and step % t.sample_every_steps == 0:
      grid = self.grid_sampler.grid(parallel.unreplicate(state_r.ema_params), num=16,
                                    labels=self.grid_labels)
      if parallel.is_main():
        writer.image(step, "samples/ema", grid)
        images.save_png(fs.join(workdir, "samples", "during_training", f"step{step}.png"),
                        grid)
    if self.val_loss is not None and step % t.eval_every_steps == 0:
      vl = self.val_loss(parallel.unreplicate(state_r.ema_params))
      writer.scalars(step, {f"val/loss_{name}": v for name, v in vl.items()})


class _Run:
  """The train loop of one start: dispatch, report one dispatch late, save, side work."""

  def __init__(self, config, workdir, mngr, lock, stop, writer, step, state_r, p_step,
               train_key, batches, side_work):
    self.config, self.t, self.workdir = config, config.training, workdir
    self.mngr, self.lock, self.stop, self.writer = mngr, lock, stop, writer
    self.step, self.state_r, self.p_step, self.train_key = step, state_r, p_step, train_key
    self.batches, self.side_work = batches, side_work
    self.snapshots = posthoc_ema.Snapshots.for_run(config, workdir)  # None when off
    self.bar = progress.Progress(self.t.num_train_steps, "train", "step", initial=step,
                                 log_every=self.t.log_every_steps,
                                 per_unit=(self.t.batch_size, "img"))
    self.rate_time, self.rate_step = time.time(), step  # throughput since the last log
    self.bad_streak = 0  # consecutive non-finite steps
    self.last_save_step, self.last_save_time = step, time.time()

  def loop(self) -> parallel.Agreed:
    t, pending, agreed = self.t, None, parallel.Agreed()
    while self.step < t.num_train_steps and not agreed.stop:
      dispatched = self.dispatch()
      agreed = self.report(pending) if pending is not None else parallel.Agreed()
      pending = dispatched
      self.abort_if_asked(agreed)
      self.snapshot()  # before the checkpoint of its step: see posthoc_ema.Snapshots
      if (self.step % t.checkpoint_every_steps == 0 or self.step >= t.num_train_steps
          or agreed.save or agreed.stop):
        agreed |= self.report(pending)  # the checkpoint's own step is logged with it
        pending = None
        self.abort_if_asked(agreed)
        self.save()
      self.side_work(self.step, self.state_r, self.writer, self.workdir)
    if pending is not None:
      self.report(pending)
    if agreed.stop and self.mngr.latest_step() != self.step:
      self.save()
    return agreed

  def dispatch(self) -> _Dispatch:
    """Runs the next ``steps_per_dispatch`` steps with this process's requests."""
    t, k = self.t, self.t.steps_per_dispatch
    batch = jax.tree.map(lambda *b: np.stack(b, axis=1), *[next(self.batches) for _ in range(k)])
    minutes = (time.time() - self.last_save_time) / 60
    requests = parallel.requests_array(
        stop=bool(self.stop),
        save=bool(t.checkpoint_every_minutes) and minutes > t.checkpoint_every_minutes,
        abort=parallel.is_main() and self.lock.is_lost())
    self.state_r, metrics, agreed = self.p_step(
        self.state_r, jax.tree.map(parallel.shard, batch), self.train_key, requests)
    self.stop.started()
    self.step += k
    return _Dispatch(self.step, metrics, agreed, self.last_save_step)

  def report(self, d: _Dispatch) -> parallel.Agreed:
    """Logs a dispatch's metrics; returns the requests every process agreed on with it (a
    save request made before the latest save is dropped: that save answered it)."""
    t = self.t
    agreed = parallel.read_agreed(d.agreed)
    agreed = agreed._replace(save=agreed.save and d.last_save_step == self.last_save_step)
    m = summarize_metrics(d.metrics, self.config.diffusion.num_timesteps)
    self.bad_streak = self.bad_streak + m["skipped"] if m["last_skipped"] else 0
    if (d.step % t.log_every_steps < t.steps_per_dispatch or d.step >= t.num_train_steps
        or self.bad_streak):
      now = time.time()
      m["steps_per_s"] = (d.step - self.rate_step) / max(now - self.rate_time, 1e-9)
      m["images_per_s"] = m["steps_per_s"] * t.batch_size
      self.rate_time, self.rate_step = now, d.step
      m.pop("last_skipped")
      self.writer.scalars(d.step, m)
    if self.bad_streak >= t.max_bad_steps:
      raise DivergenceError(
          f"training diverged: {self.bad_streak} consecutive steps with non-finite loss or "
          f"gradients up to step {d.step}; "
          + (f"the last good checkpoint is step {self.mngr.latest_step()}"
             if self.mngr.latest_step() is not None else "no checkpoint was saved before")
          + ". Lower --config.optim.learning_rate or check the data, then rerun to resume "
          "from the last good checkpoint.")
    self.bar.update(t.steps_per_dispatch, {"loss": f"{m['loss']:.4f}"})
    return agreed

  def save(self) -> None:
    """Saves the current step (every process takes part; process 0 writes the logs)."""
    if parallel.is_main():
      self.lock.check()  # a trainer that lost its lock writes nothing
    host = parallel.unreplicate(self.state_r)
    if not all(np.isfinite(x).all() for x in jax.tree.leaves(host.params)):
      logging.error("parameters at step %d are not finite: not saved", self.step)
      return
    self.with_store_retries(f"save checkpoint {self.step}", lambda: ckpt_lib.save(
        self.mngr, self.step, host, self.config, force=True))
    self.last_save_step, self.last_save_time = self.step, time.time()
    # remote logs: lines before a checkpoint are never lost
    self.with_store_retries("write the logs", lambda: self.writer.flush(strict=True))

  def snapshot(self) -> None:
    """Writes the post-hoc EMA snapshot of this step, if one is due (every process)."""
    if self.snapshots is None or not self.snapshots.due(self.step):
      return
    if parallel.is_main():
      self.lock.check()  # a trainer that lost its lock writes nothing
    host = parallel.unreplicate(self.state_r)
    self.with_store_retries(f"save the post-hoc EMA snapshot {self.step}",
                            lambda: self.snapshots.save(self.step, host))

  def with_store_retries(self, what: str, fn):
    return with_store_retries(what, fn, self.workdir, self.mngr.latest_step)

  def abort_if_asked(self, agreed: parallel.Agreed) -> None:
    if agreed.abort:  # on every process at the same step, before anything is written
      raise WorkdirLocked(f"another trainer took over the workdir {self.workdir!r} (it took "
                          f"the lock from this one): stopped at step {self.step} without "
                          f"writing")
