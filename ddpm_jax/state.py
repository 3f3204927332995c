"""The train state and its optimizer: what a checkpoint holds, and how to rebuild its shape."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from ddpm_jax import models


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: train steps taken (skipped non-finite ones included)
  params: Any
  ema_params: Any
  opt_state: Any


@flax.struct.dataclass
class PosthocTrainState(TrainState):
  """A train state that also tracks post-hoc EMA profiles (``training.posthoc_ema_sigma_rels``
  set): a subclass, so that with it off the pytree (and every checkpoint) stays TrainState's
  exactly; ``state.replace`` keeps the class."""
  posthoc_ema: Any  # tuple: one power-function EMA of params per sigma_rel (posthoc_ema.py)


def posthoc_sigma_rels(config) -> tuple:
  return tuple(config.training.posthoc_ema_sigma_rels)


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


def updates_applied(opt_state) -> jax.Array:
  """The optimizer's own update count: steps whose update was applied (skipped ones not).

  The learning-rate schedule inside the optimizer runs on this count, so the EMA
  warm-up and the logged learning rate use it too.
  """
  counts = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
            if path and getattr(path[-1], "name", None) == "count"]
  if not counts:
    raise ValueError("the optimizer state has no update count")
  return counts[0]


def ema_decay_at(count, config):
  """EMA decay for the update after ``count`` applied updates: fixed, or
  min(decay, (1 + n) / (10 + n)) with warm-up."""
  decay = config.training.ema_decay
  if config.training.ema_warmup:
    n = jnp.asarray(count).astype(jnp.float32)
    decay = jnp.minimum(decay, (1.0 + n) / (10.0 + n))
  return decay


def create_train_state(config, model, tx, key) -> TrainState:
  """A fresh state on the host (numpy leaves): params initialised from ``key``."""
  @jax.jit
  def init(key):
    params = models.init_params(model, key, config.data.image_size, config.data.num_channels)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                       ema_params=params, opt_state=tx.init(params))
    rels = posthoc_sigma_rels(config)
    return with_posthoc(state, len(rels)) if rels else state
  return jax.device_get(init(key))


def with_posthoc(state: TrainState, num_profiles: int) -> PosthocTrainState:
  """``state`` with ``num_profiles`` post-hoc EMA profiles, each a copy of its params (the
  first update's beta is 0, so the starting value never counts)."""
  return PosthocTrainState(step=state.step, params=state.params, ema_params=state.ema_params,
                           opt_state=state.opt_state,
                           posthoc_ema=tuple(state.params for _ in range(num_profiles)))


def abstract_train_state(config) -> TrainState:
  """The shapes and dtypes of ``config``'s train state, without computing it (restore template)."""
  model, tx = models.create_model(config), make_optimizer(config)
  return jax.eval_shape(lambda: create_train_state(config, model, tx, jax.random.key(0)))
