"""Remat and gradient accumulation change memory, never the numbers: the same parameters,
loss and gradients with remat; the same update from k microbatches as from the whole batch;
per-example dropout, so 1 and 4 devices agree with dropout on; resume stays bitwise exact."""

import jax
import numpy as np
import pytest

from ddpm_jax import config_lib, diffusers_io, models, objectives, parallel, train
from tests.conftest import tiny_config
from tests.test_train import batch, setup

ON = {"model.dropout": 0.1}  # dropout on: its masks must follow the example too


def _leaves_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _setup(config):
  """test_train's set-up with every parameter moved off its initial value: at init the
  zero-initialised output convs block the gradient of everything before them, so no
  gradient would depend on dropout (or remat) at all; a trained model's do."""
  model, schedule, tx, state = setup(config)
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(11), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape, p.dtype)
                                     for p, k in zip(leaves, keys)])
  return model, schedule, tx, state.replace(params=params, ema_params=params)


def _grads(config, params=None, x=None, dropout_fold=3):
  model, schedule, tx, state = _setup(config)
  objective = objectives.denoising(model, schedule, config.model.prediction_type)
  x = batch(8) if x is None else x
  keys = jax.random.split(jax.random.key(5), 8)
  dropout_keys = jax.vmap(lambda k: jax.random.fold_in(k, dropout_fold))(keys)
  fn = jax.jit(lambda p: train.accumulated_grads(
      objective, p, (x, None, keys, dropout_keys), None, config.training.microbatches))
  return fn(state.params if params is None else params)


@pytest.mark.parametrize("attention", ["softmax", "linear"])
def test_remat_keeps_every_parameter_name_and_shape(attention):
  """Checkpoints and the diffusers export address parameters by name: the tree a remat model
  builds when training (train=True, where remat applies) is the plain model's."""
  trees = {}
  for remat in models.REMATS:
    c = tiny_config(**{"model.remat": remat, "model.attention": attention, **ON})
    init = models.create_model(c).init
    x, t = np.zeros((1, 8, 8, 3), np.float32), np.zeros((1,), np.int32)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    trees[remat] = jax.eval_shape(lambda r: init(r, x, t, train=True), rngs)["params"]  # noqa: B023
  assert (jax.tree.map(lambda s: s.shape, trees["block"])
          == jax.tree.map(lambda s: s.shape, trees["none"]))
  if attention == "softmax":  # the export maps every tensor of a remat model
    c = tiny_config(**{"model.remat": "block"})
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), trees["block"])
    assert len(diffusers_io.to_diffusers(zeros, c)) == len(jax.tree.leaves(zeros))


@pytest.fixture(scope="module")
def plain():
  """The reference the equivalences compare with, computed once: the plain model's (no
  remat, one microbatch, one device) gradients and its state after two single steps."""
  return {"grads": _grads(tiny_config(**ON)), "steps": _two_single_steps(tiny_config(**ON))}


def test_remat_gives_the_same_loss_and_gradients_on_one_device(plain):
  loss0, g0, losses0, _ = plain["grads"]
  loss1, g1, losses1, _ = _grads(tiny_config(**{"model.remat": "block", **ON}))
  np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
  np.testing.assert_allclose(losses1, losses0, rtol=1e-5)
  _leaves_close(g1, g0)
  assert float(loss0) > 0.1  # a real loss, not a degenerate zero


def _two_pmap_steps(config):
  model, schedule, tx, state = _setup(config)
  p_step = train.make_p_train_step(config, model, schedule, tx)
  sr = parallel.replicate(state)
  for seed in (0, 1):
    sr, m, _ = p_step(sr, parallel.shard(batch(8, seed=seed).reshape(4, 1, 2, 8, 8, 3)),
                      jax.random.key(3), parallel.requests_array())
  return parallel.unreplicate(sr), m


def _two_single_steps(config):
  model, schedule, tx, state = _setup(config)
  step = jax.jit(train.make_train_step(config, model, schedule, tx, axis_name=None))
  for seed in (0, 1):
    state, m = step(state, batch(8, seed=seed), jax.random.key(3))
  return state, m


def test_remat_under_pmap_on_four_devices_equals_no_remat():
  plain, m0 = _two_pmap_steps(tiny_config(**ON))
  remat, m1 = _two_pmap_steps(tiny_config(**{"model.remat": "block", **ON}))
  np.testing.assert_allclose(m1["loss"], m0["loss"], rtol=1e-6)
  _leaves_close(remat, plain, rtol=1e-4)  # Adam amplifies ulp noise


def test_k_microbatches_give_the_whole_batch_update(plain):
  """Gradients of 4 microbatches = the whole batch's; after 2 steps (the first has lr 0 in
  warmup) params, Adam moments, EMA and the loss buckets agree; the step counts once."""
  loss0, g0, losses0, t0 = plain["grads"]
  loss4, g4, losses4, t4 = _grads(tiny_config(**{"training.microbatches": 4, **ON}))
  np.testing.assert_allclose(loss4, loss0, rtol=1e-6)
  np.testing.assert_array_equal(t4, t0)  # same t per example, same order
  np.testing.assert_allclose(losses4, losses0, rtol=1e-5)
  _leaves_close(g4, g0)
  whole, mw = plain["steps"]
  micro, mm = _two_single_steps(tiny_config(**{"training.microbatches": 4, **ON}))
  assert int(micro.step) == int(whole.step) == 2
  # Adam divides by sqrt(v): where a gradient is tiny the reassociated sums' ulp noise grows
  # to ~1e-3 relative in the update (the gradients themselves agree to 1e-5 above)
  _leaves_close(micro, whole, rtol=1e-3, atol=1e-5)
  np.testing.assert_array_equal(mm["loss_bucket_count"], mw["loss_bucket_count"])
  np.testing.assert_allclose(mm["loss_bucket_sum"], mw["loss_bucket_sum"], rtol=1e-5)


def test_four_devices_equal_one_device_with_dropout_on(plain):
  """Dropout is per example: splitting the batch over 4 devices drops the same units. (That
  the comparison can see dropout at all: other masks give other gradients.)"""
  _, g, _, _ = plain["grads"]
  _, g_other, _, _ = _grads(tiny_config(**ON), dropout_fold=4)
  assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(g),
                                                         jax.tree.leaves(g_other))) > 1e-3
  one, m1 = plain["steps"]
  four, m4 = _two_pmap_steps(tiny_config(**ON))
  np.testing.assert_allclose(m4["loss"][0, 0], m1["loss"], rtol=1e-5)
  _leaves_close(four, one, rtol=1e-3, atol=1e-5)  # Adam's ulp amplification, as above


def test_resume_is_bitwise_exact_with_remat_and_microbatches(tmp_path, data_dir):
  """As tests/test_train.py's resume test (a killed run restarts from its last checkpoint:
  a run that ended there), with remat, 2 microbatches a device and dropout on."""
  over = {"data.data_dir": data_dir, "training.checkpoint_every_steps": 2,
          "model.remat": "block", "training.microbatches": 2, **ON}
  full = train.train_and_evaluate(tiny_config(**over, **{"training.num_train_steps": 4}),
                                  str(tmp_path / "full"))
  train.train_and_evaluate(tiny_config(**over, **{"training.num_train_steps": 2}),
                           str(tmp_path / "resumed"))
  resumed = train.train_and_evaluate(tiny_config(**over, **{"training.num_train_steps": 4}),
                                     str(tmp_path / "resumed"))
  assert int(resumed.step) == int(full.step) == 4
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(full)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad,match", [
    ({"training.microbatches": 3}, r"microbatches=3 must be a divisor of the per-device batch 2"
                                   r".*microbatches=2"),
    ({"training.microbatches": 0}, r"microbatches=0 must be a divisor.*microbatches=1"),
    ({"model.remat": "level"}, r"model.remat='level': use one of"),
])
def test_bad_remat_or_microbatches_fail_with_one_line(bad, match):
  with pytest.raises(config_lib.ConfigError, match=match) as e:
    config_lib.validate(tiny_config(**bad), num_devices=4)
  assert "\n" not in str(e.value)


# google/ddpm-celebahq-256's unet config.json (as tests/test_diffusers_io.py's DDPM256_CONFIG).
CELEBAHQ_UNET = {
    "act_fn": "silu", "attention_head_dim": None,
    "block_out_channels": [128, 128, 256, 256, 512, 512],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3,
    "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
    "out_channels": 3, "sample_size": 256, "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4}


def test_anime256_is_ddpm_256_and_fine_tunes_an_imported_celebahq_checkpoint():
  from configs import anime128, anime256
  c = anime256.get_config()
  m = models.create_model(c)
  params = jax.eval_shape(lambda: models.init_params(m, jax.random.key(0), 256))
  assert models.count_params(params) == 113_673_219
  imported, _ = diffusers_io.config_from_diffusers(CELEBAHQ_UNET, None)
  config_lib.check_compatible(c, imported.to_dict())  # a workdir from --mode=import resumes
  for cfg in (c, anime128.get_config()):
    config_lib.validate(cfg, num_devices=1)
    cfg.training.microbatches = 1  # a v4-32's 16 chips, as the docstrings say
    config_lib.validate(cfg, num_devices=16)
