"""Conditional generation, guidance, inpainting and image-to-image: against analytic denoisers
(closed forms), then a short class-conditional training run and every generation mode."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ddpm_jax import diffusion, sampling
from tests import analytic
from tests.conftest import tiny_config

N = 4000


@pytest.fixture(scope="module")
def schedule():
  return diffusion.make_schedule("linear", 1000)


def mixture_denoiser(schedule, weights, means, stds):
  """cond_eps_fn(x, t, y): component y's exact denoiser; y = len(weights) is the null label,
  the whole mixture's. Records the batch shapes it is traced with."""
  parts = [analytic.gaussian_eps_fn(schedule, m, s) for m, s in zip(means, stds)]
  mix = analytic.mixture_eps_fn(schedule, weights, means, stds)
  shapes = []

  def cond_eps_fn(x, t, y):
    shapes.append(x.shape)
    out = mix(x, t)
    for k, part in enumerate(parts):
      out = jnp.where((y == k)[:, None], part(x, t), out)
    return out
  return cond_eps_fn, shapes


def guided_samples(schedule, cond_eps_fn, w, label=1, sampler="ddim"):
  labels = jnp.full((N,), label, jnp.int32)
  eps_fn = sampling.guided_eps_fn(cond_eps_fn, labels, 2, w)
  x_T = jax.random.normal(jax.random.key(0), (N, 1))
  return np.asarray(sampling.sample(sampler, eps_fn, schedule, x_T, jax.random.key(1),
                                    num_steps=1000, eta=1.0)).ravel()


def test_guidance_moves_samples_to_the_chosen_component_as_the_closed_form_says(schedule):
  """Two well-separated components. Closed forms: w=0 samples the mixture (half on each
  side, the mixture's mean), w=1 the chosen component exactly (its mean and std). w=3
  keeps every sample on the chosen side and pushes past it, away from the other component
  (guided eps = eps_k + 2 (eps_k - eps_mix) extrapolates), and narrower."""
  w8, mu, s = [0.5, 0.5], [-0.6, 0.6], [0.15, 0.15]
  cond, shapes = mixture_denoiser(schedule, w8, mu, s)
  se = s[1] / np.sqrt(N)
  x0 = guided_samples(schedule, cond, 0.0)
  m, sd = analytic.mixture_moments(w8, mu, s)
  assert abs((x0 > 0).mean() - 0.5) < 0.05 and abs(x0.mean() - m) < 5 * sd / np.sqrt(N)
  x1 = guided_samples(schedule, cond, 1.0)
  assert (x1 > 0).mean() == 1.0
  assert abs(x1.mean() - mu[1]) < 5 * se and abs(x1.std() - s[1]) < 0.006, (x1.mean(), x1.std())
  x3 = guided_samples(schedule, cond, 3.0)
  assert (x3 > 0).mean() == 1.0
  assert x3.mean() > mu[1] + 5 * se and x3.std() < s[1] - 0.005, (x3.mean(), x3.std())
  # Guided (w not 0 or 1): one network call per step, on the doubled batch.
  assert (2 * N, 1) in shapes and (N, 1) in shapes  # traces of w=3 and of w=0/1
  assert not [x for x in shapes if x not in ((N, 1), (2 * N, 1))]


def test_guidance_raises_the_share_of_the_chosen_class_where_classes_overlap(schedule):
  w8, mu, s = [0.5, 0.5], [-0.2, 0.2], [0.25, 0.25]
  cond, _ = mixture_denoiser(schedule, w8, mu, s)
  share = [(guided_samples(schedule, cond, w) > 0).mean() for w in (0.0, 1.0, 3.0)]
  # Closed form at w = 0 and 1: P(x > 0) under the mixture and under N(0.2, 0.25^2).
  from scipy.stats import norm
  np.testing.assert_allclose(share[0], 0.5, atol=0.03)
  np.testing.assert_allclose(share[1], norm.cdf(0.2 / 0.25), atol=0.03)
  assert share[2] > share[1] + 0.05  # guidance sharpens toward the chosen class


def test_inpainting_keeps_known_pixels_and_fills_from_the_conditional(schedule):
  """2-D Gaussian data with correlation rho: knowing x_0 = c, x_1 ~ N(rho c, 1 - rho^2).
  Known pixels come out exactly; with RePaint resampling the filled pixel has the
  conditional's moments, which plain replacement (no resampling) misses."""
  rho, c = 0.8, 1.0
  eps_fn = analytic.gaussian_cov_eps_fn(schedule, [0.0, 0.0], [[1.0, rho], [rho, 1.0]])
  known = jnp.tile(jnp.array([[c, 0.0]]), (N, 1))
  mask = jnp.tile(jnp.array([[1.0, 0.0]]), (N, 1))
  x_T = jax.random.normal(jax.random.key(0), (N, 2))
  run = lambda u: np.asarray(sampling.sample(  # noqa: E731
      "ddpm", eps_fn, schedule, x_T, jax.random.key(1), known=known, mask=mask,
      resample_steps=u))
  x = run(10)
  assert np.all(x[:, 0] == c)
  want_mean, want_std = rho * c, np.sqrt(1 - rho**2)
  assert abs(x[:, 1].mean() - want_mean) < 5 * want_std / np.sqrt(N) + 0.01
  assert abs(x[:, 1].std() - want_std) < 0.03
  plain = run(1)
  assert np.all(plain[:, 0] == c)
  assert abs(plain[:, 1].mean() - want_mean) > 5 * abs(x[:, 1].mean() - want_mean)


def test_img2img_at_strength_one_is_sampling_and_small_strength_stays_close(schedule):
  """Strength 1 starts from q(x_T-1 | input), practically pure noise: the outputs match
  unconditional sampling with the same sampler in distribution, whatever the input. A
  small strength keeps the outputs near the input."""
  from ddpm_jax.sample import t_start_of
  mean, std = 0.3, 0.5
  eps_fn = analytic.gaussian_eps_fn(schedule, mean, std)
  inputs = jnp.full((N, 4), -0.4)  # far from the data's mean, same value everywhere
  noise = jax.random.normal(jax.random.key(2), inputs.shape)

  def img2img(strength):
    t = t_start_of(strength, 1000)
    x_t = diffusion.q_sample(schedule, inputs, jnp.full((N,), t, jnp.int32), noise)
    return t, np.asarray(sampling.sample("ddim", eps_fn, schedule, x_t, jax.random.key(3),
                                         num_steps=max(1, round(50 * strength)), eta=1.0,
                                         t_start=t))
  t, out = img2img(1.0)
  plain = np.asarray(sampling.sample("ddim", eps_fn, schedule,
                                     jax.random.normal(jax.random.key(4), inputs.shape),
                                     jax.random.key(5), num_steps=50, eta=1.0))
  assert t == 999
  se = plain.std() / np.sqrt(plain.size)
  assert abs(out.mean() - plain.mean()) < 5 * np.sqrt(2) * se + 0.01  # (input at 0.006 x -0.4)
  assert abs(out.std() - plain.std()) < 0.01
  t, out = img2img(0.02)
  assert t == 19 and np.abs(out - -0.4).mean() < 0.15
  assert t_start_of(0.5, 1000) == 499 and t_start_of(1e-9, 1000) == 0


def test_timesteps_of_a_shortened_run():
  sched = diffusion.make_schedule("linear", 100)
  assert sampling.timesteps_used("ddpm", sched, 0, t_start=9).tolist() == list(range(9, -1, -1))
  ts = sampling.timesteps_used("ddim", sched, 5, "uniform", t_start=49)
  assert ts[0] == 49 and ts[-1] == 0 and len(ts) == 5


# ------------------------------------------------------------------ a class-conditional model

STEPS = 300
OVERRIDES = {"data.dataset": "cartoon_faces/hair_tiny", "model.num_classes": 3,
             "model.ch": 16, "model.num_groups": 8, "training.num_train_steps": STEPS,
             "training.checkpoint_every_steps": STEPS, "training.batch_size": 32,
             "training.log_every_steps": 100, "training.ema_decay": 0.99,
             "optim.learning_rate": 2e-3, "optim.warmup_steps": 20, "sampling.num_steps": 20}


@pytest.fixture(scope="module")
def conditional(tmp_path_factory, data_dir):
  from ddpm_jax import train
  workdir = str(tmp_path_factory.mktemp("conditional"))
  config = tiny_config(**{"data.data_dir": data_dir, **OVERRIDES})
  train.train_and_evaluate(config, workdir)
  return config, workdir


def hair_classifier(config):
  """Nearest class mean over the pixels of the labelled training images (98% on held-out
  images at 8x8), as a check of the class a sample shows."""
  from ddpm_jax import input_pipeline
  src = input_pipeline.get_source(config, "train", with_labels=True)
  xs, ys = zip(*(src.example(i) for i in range(len(src))))
  x, y = np.stack(xs).reshape(len(xs), -1).astype(np.float64), np.array(ys)
  means = np.stack([x[y == k].mean(0) for k in range(3)])
  return lambda u8: np.argmin(((u8.reshape(len(u8), -1)[:, None] - means[None]) ** 2).sum(-1), 1)


def test_guided_samples_show_the_asked_class_more_often_than_unguided(conditional):
  from ddpm_jax import diffusion as diff
  from ddpm_jax import generate, images, models
  config, workdir = conditional
  assert json.load(open(os.path.join(workdir, "classes.json"))) == ["black", "blonde", "blue"]
  classify = hair_classifier(config)
  model = models.create_model(config)
  schedule = diff.make_schedule("linear", config.diffusion.num_timesteps)
  params, _ = generate.load_params(config, workdir)
  labels = generate.parse_labels("all", ("black", "blonde", "blue"), 96)
  acc = {}
  for w in (0.0, 3.0):
    config.sampling.guidance_scale = w
    x, _ = generate.generate(config, generate.Sampler(config, model, schedule), params, 96,
                             labels=labels, show_progress=False)
    acc[w] = float((classify(images.to_uint8(x)) == labels).mean())
  assert acc[0.0] < 0.5 and acc[3.0] > 0.6 and acc[3.0] > acc[0.0] + 0.2, acc  # chance: 1/3


def test_generation_modes_on_the_conditional_model(conditional, tmp_path):
  from ddpm_jax import sample
  config, workdir = conditional
  config.sampling.guidance_scale = 3.0
  config.sampling.num_frames = 0
  config.sampling.labels = "blue"
  out = sample.sample_and_save(config, workdir)
  used = json.load(open(os.path.join(out, "sampling.json")))
  assert set(used["labels"]) == {"blue"} and used["guidance_scale"] == 3.0
  assert (np.load(os.path.join(out, "samples.npz"))["labels"] == 2).all()

  inputs = tmp_path / "inputs"
  inputs.mkdir()
  for i in range(3):  # any size and format, resized like training data
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 30, 3), np.uint8)).save(
        inputs / f"im{i}.{'png' if i else 'jpg'}")
  config.sampling.inputs = str(inputs)
  config.sampling.mask = "strokes"
  config.sampling.resample_steps = 2
  out = sample.inpaint_and_save(config, workdir)
  d = np.load(os.path.join(out, "inpaint.npz"))
  m = d["masks"]
  assert d["results"].shape == (3, 8, 8, 3) and 0 < m.mean() < 1
  np.testing.assert_array_equal(d["results"][m], d["originals"][m])  # known pixels exactly
  for name in ("originals.png", "masked.png", "results.png", "grid.png"):
    assert os.path.exists(os.path.join(out, name))

  config.sampling.strength = 0.3
  out = sample.img2img_and_save(config, workdir)
  used = json.load(open(os.path.join(out, "sampling.json")))
  assert used["t_start"] == 29 and used["timesteps"][0] == 29 and used["num_steps"] == 6
  assert np.load(os.path.join(out, "img2img.npz"))["results"].shape == (3, 8, 8, 3)

  out = sample.interpolate_images_and_save(config, workdir, num_points=5)
  strip = np.load(os.path.join(out, "interpolation.npz"))["images"]
  assert strip.shape == (1, 5, 8, 8, 3)  # one pair (the third input is left out)


def test_masks_built_in_and_from_files(tmp_path):
  from ddpm_jax import sample
  from ddpm_jax.errors import ConfigError, InputError
  centre = sample.builtin_mask("center", 8, 0)
  assert centre[4, 4] == 0 and centre[0, 0] == 1 and centre.mean() == 0.75
  assert sample.builtin_mask("left", 8, 0)[:, :4].sum() == 0
  strokes = sample.builtin_mask("strokes", 32, 0)
  assert 0.2 < strokes.mean() < 0.99 and not np.array_equal(
      strokes, sample.builtin_mask("strokes", 32, 1))
  with pytest.raises(ConfigError, match="sampling.mask"):
    sample.builtin_mask("circle", 8, 0)
  (tmp_path / "masks").mkdir()
  Image.fromarray(np.tile(np.array([0, 255], np.uint8).repeat(8), (16, 1))).save(
      tmp_path / "masks" / "a.png")
  config = tiny_config(**{"sampling.mask_dir": str(tmp_path / "masks")})
  m = sample.load_masks(config, ["x/a.jpg"])
  assert m.shape == (1, 8, 8, 1) and m[0, :, :4].sum() == 0 and m[0, :, 4:].min() == 1
  with pytest.raises(InputError, match="no mask named b"):
    sample.load_masks(config, ["x/b.png"])
  with pytest.raises(InputError, match="needs input images"):
    sample.input_files(None)
  (tmp_path / "bad.png").write_text("not an image")
  with pytest.raises(InputError, match="cannot read .*bad.png"):
    sample.load_inputs([str(tmp_path / "bad.png")], 8)
