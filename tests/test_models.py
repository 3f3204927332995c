"""The U-Net: the DDPM CIFAR-10 parameter count, attention over positions, shapes."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import cifar10
from ddpm_jax import models
from tests.conftest import tiny_config


def test_cifar10_config_has_the_ddpm_parameter_count():
  config = cifar10.get_config()
  model = models.create_model(config)
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), 32))
  assert models.count_params(shapes) == 35_746_307


def test_output_shape_and_dtype():
  config = tiny_config()
  model = models.create_model(config)
  params = jax.jit(lambda k: models.init_params(model, k, 8))(jax.random.key(0))
  x = jnp.ones((3, 8, 8, 3))
  y = jax.jit(model.apply, static_argnames="train")({"params": params}, x,
                                                   jnp.array([0, 5, 99]), train=False)
  assert y.shape == x.shape and y.dtype == jnp.float32


def assert_attends_over_positions(block):
  """Without positional input, attention over spatial positions commutes with any
  permutation of the positions; attention that mixed pixels and channels would not."""
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  params = block.init(jax.random.key(1), x)
  # Give the zero-initialised output projection weights, so the block is not identity.
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
  perm = np.random.default_rng(0).permutation(16)
  permute = lambda a: a.reshape(2, 16, 8)[:, perm].reshape(2, 4, 4, 8)  # noqa: E731
  np.testing.assert_allclose(block.apply(params, permute(x)), permute(block.apply(params, x)),
                             atol=1e-5)
  # And each output position depends on other positions (it is attention, not a 1x1 conv).
  x2 = x.at[:, 0, 0].add(1.0)
  assert float(jnp.abs(block.apply(params, x2) - block.apply(params, x))[:, 3, 3].max()) > 1e-4


def test_attention_attends_over_positions():
  assert_attends_over_positions(models.AttnBlock(num_heads=2, num_groups=4))


def test_timestep_embedding_is_the_ddpm_sinusoid():
  emb = models.timestep_embedding(jnp.array([0, 7]), 8)
  freqs = np.exp(-np.log(10000) * np.arange(4) / 3)
  want = np.concatenate([np.sin(7 * freqs), np.cos(7 * freqs)])
  np.testing.assert_allclose(emb[1], want, rtol=1e-5)
  np.testing.assert_allclose(emb[0], [0] * 4 + [1] * 4)


def test_dropout_is_active_only_in_training():
  config = tiny_config(**{"model.dropout": 0.5})
  model = models.create_model(config)
  params = jax.tree.map(lambda p: p + 0.05, models.init_params(model, jax.random.key(0), 8))
  x, t = jnp.ones((2, 8, 8, 3)), jnp.array([3, 4])
  ev = [model.apply({"params": params}, x, t, train=False) for _ in range(2)]
  np.testing.assert_array_equal(ev[0], ev[1])
  tr = [model.apply({"params": params}, x, t, train=True, rngs={"dropout": jax.random.key(i)})
        for i in range(2)]
  assert float(jnp.abs(tr[0] - tr[1]).max()) > 0


def test_notebook_config_is_the_notebooks_size_and_blocks():
  from configs import anime_notebook
  config = anime_notebook.get_config()
  model = models.create_model(config)
  shapes = jax.eval_shape(lambda: models.init_params(model, jax.random.key(0), 64))
  assert models.count_params(shapes) == 6_212_099  # about 6M, the notebook's size
  names = set(jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(shapes))
  assert any("LinearAttnBlock" in n for n in names) and any("AttnBlock_0" in n for n in names)
  # scale and shift: the time projection has 2 x channels
  assert shapes["ResBlock_0"]["temb_proj"]["kernel"].shape == (256, 128)


def test_linear_attention_attends_over_positions():
  assert_attends_over_positions(models.LinearAttnBlock(num_heads=2, head_dim=4, num_groups=4))


def test_class_conditional_model_uses_its_label_and_a_null_label():
  config = tiny_config(**{"model.num_classes": 3})
  model = models.create_model(config)
  params = jax.tree.map(lambda p: p + 0.05, models.init_params(model, jax.random.key(0), 8))
  assert params["class_emb"]["embedding"].shape == (4, 32)  # 3 classes + the null label
  x, t = jnp.ones((3, 8, 8, 3)), jnp.array([5, 5, 5])
  out = models.apply(model, params, x, t, jnp.array([0, 1, 3]))
  assert float(jnp.abs(out[0] - out[1]).max()) > 1e-4  # the label matters
  np.testing.assert_allclose(models.apply(model, params, x, t)[2], out[2], atol=1e-6)  # None=null
