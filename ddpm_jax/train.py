"""Training: the train state, one pure train step, and the loop around it.

``make_train_step`` returns a pure ``train_step(state, batch, key) -> (state, metrics)``.
Per-step randomness is derived with ``fold_in`` from the base key, the step and the
example's global index (dropout: the device index): nothing random is stored, and a
resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddpm_jax import diffusion, models, parallel

NUM_LOSS_BUCKETS = 10


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates applied so far (skipped ones included)
  params: Any
  ema_params: Any
  opt_state: Any


def make_lr_schedule(config) -> optax.Schedule:
  o, total = config.optim, config.training.num_train_steps
  warmup = max(int(o.warmup_steps), 0)
  if o.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, max(warmup, 1),
                                              max(total, warmup + 1), end_value=0.0)
  if warmup == 0:
    return optax.constant_schedule(o.learning_rate)
  return optax.linear_schedule(0.0, o.learning_rate, warmup)  # constant after warmup


def make_optimizer(config) -> optax.GradientTransformation:
  """Adam(W) with linear warmup, optional cosine decay and global-norm clipping."""
  o = config.optim
  lr = make_lr_schedule(config)
  if o.optimizer == "adamw":
    opt = optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  else:
    opt = optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps)
  if o.grad_clip_norm:
    opt = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), opt)
  return opt


def create_train_state(config, model, tx, key) -> TrainState:
  """A fresh state on the host (numpy leaves): params initialised from ``key``."""
  @jax.jit
  def init(key):
    params = models.init_params(model, key, config.data.image_size, config.data.num_channels)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      ema_params=params, opt_state=tx.init(params))
  return jax.device_get(init(key))


def ema_decay_at(step, config):
  """EMA decay for the update at ``step``: fixed, or min(decay, (1+n)/(10+n)) with warmup."""
  decay = config.training.ema_decay
  if config.training.get("ema_warmup", False):
    step = step.astype(jnp.float32)
    decay = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return decay


def _global_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(config, model, schedule: diffusion.Schedule, tx,
                    axis_name: str | None = parallel.AXIS):
  """Builds ``train_step(state, batch, key) -> (state, metrics)``.

  ``batch`` is (B, H, W, C) in [-1, 1]. Under ``pmap`` with ``axis_name``,
  gradients and metrics are averaged over all devices; with ``axis_name=None``
  the step runs on one device. Non-finite loss or gradients skip the update
  (params, EMA and optimizer state are kept) and count in ``metrics['skipped']``.
  """
  T = schedule.num_timesteps
  prediction_type = config.model.prediction_type
  lr_fn = make_lr_schedule(config)

  def train_step(state: TrainState, batch, key):
    # Per-example t and noise come from (key, step, global example index), so the same
    # global batch gets the same draws on 1 device or many; dropout is per device.
    key, dropout_key = jax.random.split(jax.random.fold_in(key, state.step))
    B = batch.shape[0]
    device = jax.lax.axis_index(axis_name) if axis_name is not None else 0
    example_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(device * B + jnp.arange(B))
    t = jax.vmap(lambda k: jax.random.randint(k, (), 0, T, dtype=jnp.int32))(
        jax.vmap(lambda k: jax.random.fold_in(k, 0))(example_keys))
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), batch.shape[1:]))(
        example_keys)
    dropout_key = jax.random.fold_in(dropout_key, device)

    def loss_fn(params):
      model_fn = lambda x, tt: model.apply({"params": params}, x, tt, train=True,  # noqa: E731
                                           rngs={"dropout": dropout_key})
      losses = diffusion.per_example_loss(schedule, model_fn, batch, t, noise, prediction_type)
      return losses.mean(), losses

    (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    bucket = t * NUM_LOSS_BUCKETS // T
    bucket_sum = jax.ops.segment_sum(losses, bucket, NUM_LOSS_BUCKETS)
    bucket_count = jax.ops.segment_sum(jnp.ones_like(losses), bucket, NUM_LOSS_BUCKETS)
    if axis_name is not None:
      grads, loss = jax.lax.pmean((grads, loss), axis_name)
      bucket_sum, bucket_count = jax.lax.psum((bucket_sum, bucket_count), axis_name)
    grad_norm = _global_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    decay = ema_decay_at(state.step, config)
    new_ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                           state.ema_params, new_params)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
    new_state = TrainState(step=state.step + 1,
                           params=keep(new_params, state.params),
                           ema_params=keep(new_ema, state.ema_params),
                           opt_state=keep(new_opt_state, state.opt_state))
    metrics = dict(loss=loss, grad_norm=grad_norm, param_norm=_global_norm(new_state.params),
                   learning_rate=jnp.asarray(lr_fn(state.step), jnp.float32),
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
    def one_step(state, batches, key):
      state, metrics = train_step(state, batches[0], key)
      return state, jax.tree.map(lambda m: m[None], metrics)
    return one_step

  def multi_step(state, batches, key):
    return jax.lax.scan(lambda s, b: train_step(s, b, key), state, batches, unroll=True)
  return multi_step


def make_p_train_step(config, model, schedule, tx):
  """The pmapped k-step function: (replicated state, [devices, k, B, ...] batch, key)."""
  step = make_multi_step(make_train_step(config, model, schedule, tx),
                         config.training.steps_per_dispatch)
  return parallel.pmap(step, in_axes=(0, 0, None), donate_argnums=(0,))


def summarize_metrics(metrics) -> dict:
  """Host metrics of one dispatch (device 0, k steps) -> flat dict of floats."""
  m = jax.tree.map(lambda x: np.asarray(x)[0], metrics)  # device 0; all devices agree
  out = {k: float(np.mean(m[k])) for k in ("loss", "grad_norm", "param_norm",
                                           "learning_rate", "ema_decay")}
  out["skipped"] = int(np.sum(m["skipped"]))
  out["last_skipped"] = int(m["skipped"][-1])
  sums, counts = m["loss_bucket_sum"].sum(0), m["loss_bucket_count"].sum(0)
  for i in range(NUM_LOSS_BUCKETS):
    if counts[i]:
      out[f"loss_t{i}"] = float(sums[i] / counts[i])
  return out


def train_and_evaluate(config, workdir: str) -> TrainState:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint if there is one.

  Stops cleanly (checkpoint saved) at the end, on SIGTERM/SIGINT, or after
  ``training.max_bad_steps`` consecutive non-finite steps (exit with an error then).
  Returns the final host state.
  """
  import contextlib
  import os
  import time

  from absl import logging

  from ddpm_jax import checkpoint as ckpt_lib
  from ddpm_jax import config_lib, images, input_pipeline, run_utils
  from ddpm_jax import sample as sample_lib

  config_lib.validate(config, jax.device_count())
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  t = config.training
  if t.compilation_cache:
    run_utils.enable_compilation_cache()
  os.makedirs(workdir, exist_ok=True)
  mngr = ckpt_lib.make_manager(workdir, max_to_keep=t.keep_checkpoints,
                               keep_period=t.keep_period or None)
  latest = mngr.latest_step()
  if latest is not None:
    config_lib.check_compatible(config, ckpt_lib.restore_config(mngr, latest).to_dict())

  lock = run_utils.workdir_lock(workdir) if is_main else contextlib.nullcontext()
  with lock, run_utils.StopRequest() as stop:
    if is_main:
      ckpt_lib.write_config_json(workdir, config)
    model = models.create_model(config)
    schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    tx = make_optimizer(config)
    init_key, train_key = jax.random.split(jax.random.key(t.seed))
    state = create_train_state(config, model, tx, init_key)
    if latest is not None:
      state = ckpt_lib.restore(mngr, state, latest)
      logging.info("resumed from step %d in %s", latest, ckpt_lib.checkpoint_dir(workdir))
    step = int(state.step)
    logging.info("model: %s parameters", f"{models.count_params(state.params):,}")

    source = input_pipeline.get_source(config, config.data.train_split)
    batches = input_pipeline.TrainBatches(
        source, t.batch_size, seed=t.seed, start_step=step, random_flip=config.data.random_flip,
        process_index=jax.process_index(), process_count=jax.process_count(),
        local_devices=jax.local_device_count(), num_workers=config.data.num_workers)
    p_step = make_p_train_step(config, model, schedule, tx)
    state_r = parallel.replicate(state)
    writer = run_utils.MetricWriter(workdir, enabled=is_main)
    progress = run_utils.Progress(t.num_train_steps, step, t.log_every_steps, t.batch_size,
                                  desc="train", enabled=is_main)
    grid_sampler = (sample_lib.Sampler(config, model, schedule)
                    if t.sample_every_steps and is_main else None)
    val_loss = None
    if t.get("eval_every_steps", 0) and is_main:
      from ddpm_jax import evaluate
      ev = evaluate.settings(config)
      val_loss = evaluate.ValidationLoss(
          config, model, schedule, input_pipeline.get_source(config, config.data.eval_split),
          ev["num_examples"], ev["batch_size"])

    def save(at_step):
      host = parallel.unreplicate(state_r)
      if not all(np.isfinite(x).all() for x in jax.tree.leaves(host.params)):
        logging.error("parameters at step %d are not finite: not saved", at_step)
        return
      ckpt_lib.save(mngr, at_step, host, config, force=True)

    k = t.steps_per_dispatch
    last_save_time, pending, bad_streak = time.time(), None, 0
    rate = {"time": time.time(), "step": step}  # throughput since the last logged step
    try:
      while step < t.num_train_steps and not stop:
        batch = np.stack([next(batches) for _ in range(k)], axis=1)
        state_r, metrics = p_step(state_r, parallel.shard(batch), train_key)
        step += k
        if pending is not None:  # read the previous dispatch's metrics while this one runs
          bad_streak = _report(pending, writer, progress, t, bad_streak, mngr, rate)
        pending = (step, metrics)
        minutes = (time.time() - last_save_time) / 60
        due = step % t.checkpoint_every_steps == 0 or (
            t.checkpoint_every_minutes and minutes > t.checkpoint_every_minutes)
        if due or step >= t.num_train_steps:
          save(step)
          last_save_time = time.time()
        if grid_sampler is not None and step % t.sample_every_steps == 0:
          grid = grid_sampler.grid(parallel.unreplicate(state_r.ema_params), num=16)
          writer.image(step, "samples/ema", grid)
          images.save_png(os.path.join(workdir, "samples", "during_training", f"step{step}.png"),
                          grid)
        if val_loss is not None and step % t.eval_every_steps == 0:
          vl = val_loss(parallel.unreplicate(state_r.ema_params))
          writer.scalars(step, {f"val/loss_{k}": v for k, v in vl.items()})
      if pending is not None:
        _report(pending, writer, progress, t, bad_streak, mngr, rate)
      if stop and mngr.latest_step() != step:
        save(step)
    finally:
      mngr.wait_until_finished()
      batches.close()
      progress.close()
      writer.close()
    if stop:
      logging.warning("stopped by %s at step %d; the same command resumes", stop.signal, step)
    return parallel.unreplicate(state_r)


class DivergenceError(RuntimeError):
  pass


def _report(pending, writer, progress, t, bad_streak, mngr, rate):
  """Logs one dispatch's metrics; returns the updated count of consecutive skipped steps."""
  import time
  step, metrics = pending
  m = summarize_metrics(metrics)
  bad_streak = bad_streak + m["skipped"] if m["last_skipped"] else 0
  if step % t.log_every_steps < t.steps_per_dispatch or step >= t.num_train_steps or bad_streak:
    now = time.time()
    m["steps_per_s"] = (step - rate["step"]) / max(now - rate["time"], 1e-9)
    m["images_per_s"] = m["steps_per_s"] * t.batch_size
    rate.update(time=now, step=step)
    m.pop("last_skipped")
    writer.scalars(step, m)
  if bad_streak >= t.max_bad_steps:
    raise DivergenceError(
        f"training diverged: {bad_streak} consecutive steps with non-finite loss or gradients "
        f"up to step {step}; the last good checkpoint is step {mngr.latest_step()}. Lower "
        f"--config.optim.learning_rate or check the data, then rerun to resume from it.")
  progress.update(step, t.steps_per_dispatch, {"loss": f"{m['loss']:.4f}"})
  return bad_streak
