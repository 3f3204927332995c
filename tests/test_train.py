"""Train step: pmap equals one device, loss falls, checkpoints round-trip, resume is exact."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import checkpoint as ckpt_lib
from ddpm_jax import diffusion, models, parallel, train
from ddpm_jax import state as state_lib
from tests.conftest import tiny_config


def setup(config):
  model = models.create_model(config)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  tx = state_lib.make_optimizer(config)
  state = state_lib.create_train_state(config, model, tx, jax.random.key(0))
  return model, schedule, tx, state


def batch(n, size=8, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def test_four_devices_equal_one_device_on_the_same_global_batch():
  assert jax.local_device_count() == 4, "conftest forces 4 CPU devices"
  config = tiny_config()
  model, schedule, tx, state = setup(config)
  x, key = batch(8), jax.random.key(3)
  single = jax.jit(train.make_train_step(config, model, schedule, tx, axis_name=None))
  s1, m1 = single(state, x, key)
  s1, m1 = single(s1, batch(8, seed=1), key)
  p_step = train.make_p_train_step(config, model, schedule, tx)
  sr = parallel.replicate(state)
  for seed in (0, 1):
    sr, m4, agreed = p_step(sr, parallel.shard(batch(8, seed=seed).reshape(4, 1, 2, 8, 8, 3)),
                            key, parallel.requests_array(save=seed == 1))
    assert parallel.read_agreed(agreed) == parallel.Agreed(stop=False, save=seed == 1)
  s4 = parallel.unreplicate(sr)
  np.testing.assert_allclose(float(m4["loss"][0, 0]), float(m1["loss"]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(s4.ema_params), jax.tree.leaves(s1.ema_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert int(s4.step) == int(s1.step) == 2


def test_loss_decreases_on_a_tiny_run():
  config = tiny_config(**{"optim.learning_rate": 3e-3, "optim.warmup_steps": 0})
  model, schedule, tx, state = setup(config)
  step = jax.jit(train.make_train_step(config, model, schedule, tx, axis_name=None))
  x = batch(32)
  x = np.where(x > 0, 0.8, -0.8).astype(np.float32)  # a few sharp images to fit
  losses = []
  for i in range(60):
    state, m = step(state, x, jax.random.key(i))
    losses.append(float(m["loss"]))
  assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), losses


def test_non_finite_step_is_skipped_and_the_optimizer_count_stands_still():
  config = tiny_config(**{"optim.warmup_steps": 10, "training.ema_decay": 0.999})
  model, schedule, tx, state = setup(config)
  step = jax.jit(train.make_train_step(config, model, schedule, tx, axis_name=None))
  bad = batch(8)
  bad[0, 0, 0, 0] = np.nan
  new, m = step(state, bad, jax.random.key(0))
  assert int(m["skipped"]) == 1 and int(new.step) == 1
  assert int(state_lib.updates_applied(new.opt_state)) == 0
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
    if np.ndim(a):
      np.testing.assert_array_equal(a, b)
  # The next (good) step is the optimizer's first: learning rate and EMA warm-up at n = 0.
  _, m = step(new, batch(8), jax.random.key(0))
  assert int(m["skipped"]) == 0
  lr = state_lib.make_lr_schedule(config)
  np.testing.assert_allclose(float(m["learning_rate"]), float(lr(0)))
  np.testing.assert_allclose(float(m["ema_decay"]), 0.1)  # min(0.999, 1/10)


def test_ema_decay_follows_the_warmup_formula():
  config = tiny_config(**{"training.ema_decay": 0.999, "training.ema_warmup": True})
  for n, want in ((0, 0.1), (10, 11 / 20), (100000, 0.999)):
    np.testing.assert_allclose(float(state_lib.ema_decay_at(jnp.int32(n), config)), want,
                               rtol=1e-6)


def test_ema_is_the_warmed_up_average_of_the_new_parameters():
  config = tiny_config(**{"training.ema_decay": 0.999})
  model, schedule, tx, state = setup(config)
  state = state.replace(ema_params=jax.tree.map(lambda p: p + 1.0, state.params))  # ema != p
  step = jax.jit(train.make_train_step(config, model, schedule, tx, axis_name=None))
  s1, m = step(state, batch(8), jax.random.key(0))
  d = 0.1  # min(0.999, (1 + 0) / (10 + 0))
  np.testing.assert_allclose(float(m["ema_decay"]), d)
  for e0, e1, p1 in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(s1.ema_params),
                        jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(e1, d * e0 + (1 - d) * p1, rtol=1e-6, atol=1e-6)


def test_gradients_are_clipped_to_the_global_norm():
  """The configured optimizer (what the train step applies) clips: Adam's first moment after
  one update is (1 - b1) g, so its global norm shows the clipped gradient (Adam's update
  itself is scale-free, so the parameters could not show it)."""
  params = {"a": np.ones((3, 4), np.float32), "b": np.zeros((5,), np.float32)}
  grads = {"a": np.full((3, 4), 2.0, np.float32), "b": np.full((5,), -1.0, np.float32)}
  raw = float(np.sqrt(12 * 4.0 + 5 * 1.0))
  for clip in (1e-3, 0.0):
    config = tiny_config(**{"optim.grad_clip_norm": clip})
    tx = state_lib.make_optimizer(config)
    _, opt_state = tx.update(grads, tx.init(params), params)
    mu = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
          if "mu" in jax.tree_util.keystr(path)]
    norm = float(np.sqrt(sum(np.sum(np.square(x)) for x in mu))) / (1 - config.optim.b1)
    np.testing.assert_allclose(norm, clip or raw, rtol=1e-4)


def test_saves_asked_for_by_the_clock_are_agreed_and_not_repeated(tmp_path, data_dir):
  """checkpoint_every_minutes ~ 0: every dispatch asks for a save. The request rides with the
  step and is acted on one dispatch later; one made before a save is answered by it, so
  saves come every 2 steps, not every step."""
  config = tiny_config(**{"data.data_dir": data_dir, "training.num_train_steps": 7,
                          "training.checkpoint_every_steps": 7,
                          "training.checkpoint_every_minutes": 1e-9,
                          "training.keep_checkpoints": 10})
  train.train_and_evaluate(config, str(tmp_path))
  assert sorted(int(s) for s in os.listdir(tmp_path / "checkpoints")) == [2, 4, 6, 7]


def test_a_run_prepares_its_data_once_for_training_and_the_held_out_loss(tmp_path, data_dir,
                                                                        monkeypatch):
  """The train split and the held-out split (``training.eval_every_steps``) open from one
  preparation: with a gs:// data_dir each preparation is a step every process takes."""
  from ddpm_jax import datasets
  prepared, get_builder = [], datasets.get_builder
  monkeypatch.setattr(datasets, "get_builder", lambda c: prepared.append(1) or get_builder(c))
  config = tiny_config(**{"data.data_dir": data_dir, "training.num_train_steps": 2,
                          "training.eval_every_steps": 2})
  train.train_and_evaluate(config, str(tmp_path))
  assert len(prepared) == 1
  assert any('"val/loss_' in line for line in open(tmp_path / "metrics.jsonl"))  # it evaluated


def test_checkpoint_save_restore_is_identical(tmp_path):
  config = tiny_config()
  model, schedule, tx, state = setup(config)
  step = jax.jit(train.make_train_step(config, model, schedule, tx, axis_name=None))
  state, _ = step(state, batch(8), jax.random.key(0))  # non-trivial optimizer state
  state = jax.device_get(state)
  mngr = ckpt_lib.make_manager(str(tmp_path), async_save=True)
  ckpt_lib.save(mngr, 1, state, config)
  mngr.wait_until_finished()
  fresh = ckpt_lib.make_manager(str(tmp_path), read_only=True)
  assert fresh.latest_step() == 1
  restored = ckpt_lib.restore(fresh, jax.eval_shape(lambda: state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
    assert np.asarray(a).dtype == np.asarray(b).dtype
  assert ckpt_lib.restore_config(fresh).to_dict() == config.to_dict()


def test_resumed_run_is_bitwise_equal_to_an_uninterrupted_one(tmp_path, data_dir):
  config = tiny_config(**{"data.data_dir": data_dir, "training.num_train_steps": 4,
                          "training.checkpoint_every_steps": 2, "model.dropout": 0.1})
  full = train.train_and_evaluate(config, str(tmp_path / "full"))
  half = tiny_config(**{"data.data_dir": data_dir, "training.num_train_steps": 2,
                        "training.checkpoint_every_steps": 2, "model.dropout": 0.1})
  train.train_and_evaluate(half, str(tmp_path / "resumed"))
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert int(resumed.step) == int(full.step) == 4
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full)):
    np.testing.assert_array_equal(a, b)
  assert os.path.exists(tmp_path / "full" / "metrics.jsonl")


def test_multi_step_dispatch_equals_single_steps():
  config = tiny_config()
  model, schedule, tx, state = setup(config)
  ts = train.make_train_step(config, model, schedule, tx, axis_name=None)
  xs = np.stack([batch(8, seed=i) for i in range(3)])
  s_multi, m = jax.jit(train.make_multi_step(ts, 3))(state, xs, jax.random.key(0))
  s = state
  for i in range(3):
    s, _ = jax.jit(ts)(s, xs[i], jax.random.key(0))
  assert m["loss"].shape == (3,)
  for a, b in zip(jax.tree.leaves(s_multi), jax.tree.leaves(s)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # Adam amplifies ulp noise


@pytest.mark.parametrize("bad,match", [
    ({"data.image_size": 12, "model.ch_mult": (1, 2, 2, 2)}, "must be divisible by"),
    ({"training.batch_size": 6}, r"batch_size=6 must be a positive multiple of .* \(4\)"),
    ({"model.attn_resolutions": (5,)}, "feature maps"),
    ({"diffusion.schedule": "sigmoid"}, "unknown diffusion.schedule"),
    ({"sampling.sampler": "euler"}, "unknown sampling.sampler"),
])
def test_invalid_configs_fail_with_one_line(bad, match):
  from ddpm_jax import config_lib
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    config_lib.validate(tiny_config(**bad), jax.device_count())
  assert "\n" not in str(e.value)


def test_absurd_learning_rate_is_stopped_and_the_last_checkpoint_still_samples(tmp_path,
                                                                                data_dir):
  from ddpm_jax import modes as sample_lib
  config = tiny_config(**{"data.data_dir": data_dir, "optim.learning_rate": 1e30,
                          "optim.warmup_steps": 0, "optim.grad_clip_norm": 0.0,
                          "training.num_train_steps": 50, "training.checkpoint_every_steps": 1,
                          "training.max_bad_steps": 3})
  with pytest.raises(train.DivergenceError, match=r"consecutive steps .* the last good checkpoint"
                     r" is step \d+"):
    train.train_and_evaluate(config, str(tmp_path))
  mngr = ckpt_lib.make_manager(str(tmp_path), read_only=True)
  assert mngr.latest_step() is not None and mngr.latest_step() < 50
  lines = [__import__("json").loads(x) for x in open(tmp_path / "metrics.jsonl")]
  assert sum(x["skipped"] for x in lines) >= 3
  config.sampling.num_frames = 0
  out = sample_lib.sample_and_save(config, str(tmp_path))
  imgs = np.load(os.path.join(out, "samples.npz"))["samples"]
  assert imgs.shape == (8, 8, 8, 3) and np.isfinite(imgs).all()
