"""Conditional generation, guidance, inpainting and image-to-image: against analytic denoisers
(closed forms), then a short class-conditional training run and every generation mode."""

import json
import os

import flax.linen as nn
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


def _toy_cond_eps_fn(x, t, y):
  """Any function of (x, t, y) with distinct values per label (null = 3 included)."""
  return jnp.sin(3 * x + y[:, None]) * (t[:, None] + 1) / 50.0 + 0.1 * y[:, None]


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, 2.0, 3.0, 7.5])
def test_guided_eps_is_exactly_uncond_plus_w_times_the_difference(w):
  """eps = eps(x, null) + w (eps(x, y) - eps(x, null)), checked against the two branches
  called directly, at several w (a scale of w + 1, w / 2 or w - 1 is off at all but one);
  the w = 0 and w = 1 shortcuts give what the general (doubled batch) path gives."""
  x = jax.random.normal(jax.random.key(0), (6, 3))
  t = jnp.arange(6, dtype=jnp.int32) * 7
  labels = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)
  cond = np.asarray(_toy_cond_eps_fn(x, t, labels), np.float64)
  uncond = np.asarray(_toy_cond_eps_fn(x, t, jnp.full_like(labels, 3)), np.float64)
  assert np.abs(cond - uncond).mean() > 0.2  # the branches differ
  want = uncond + w * (cond - uncond)
  got = sampling.guided_eps_fn(_toy_cond_eps_fn, labels, 3, w)(x, t)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  general = sampling.guided_eps_fn(_toy_cond_eps_fn, labels, 3, w, shortcuts=False)(x, t)
  np.testing.assert_allclose(general, want, rtol=1e-5, atol=1e-6)
  if w in (0.0, 1.0):
    np.testing.assert_allclose(got, general, rtol=1e-6, atol=1e-7)


def test_a_guided_sampler_runs_on_the_guided_eps(schedule):
  """Through a whole sampler: guidance at w = 3 is the sampler on the hand-made guided eps."""
  x = jax.random.normal(jax.random.key(1), (8, 3))
  labels = jnp.arange(8, dtype=jnp.int32) % 3
  guided = sampling.guided_eps_fn(_toy_cond_eps_fn, labels, 3, 3.0)
  by_hand = lambda x, t: (_toy_cond_eps_fn(x, t, jnp.full_like(labels, 3))  # noqa: E731
                          + 3.0 * (_toy_cond_eps_fn(x, t, labels)
                                   - _toy_cond_eps_fn(x, t, jnp.full_like(labels, 3))))
  for sampler in ("ddim", "dpm_solver++"):
    a = sampling.sample(sampler, guided, schedule, x, jax.random.key(2), num_steps=10,
                        clip_x0=True)
    b = sampling.sample(sampler, by_hand, schedule, x, jax.random.key(2), num_steps=10,
                        clip_x0=True)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


class LabelNet(nn.Module):
  """A toy class-conditional network with the U-Net's call signature (seconds to compile):
  out = w x + embed(y) + 0.01 t, one embedding row per label and the null row num_classes."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, t, y, train=False):
    e = nn.Embed(self.num_classes + 1, x.shape[-1],
                 embedding_init=nn.initializers.normal(1.0))(y)
    w = self.param("w", nn.initializers.ones, ())
    return w * x + e[:, None, None, :] + 0.01 * t[:, None, None, None]


@pytest.fixture(scope="module")
def conditional_net():
  """(config, a LabelNet of 3 classes (null label 3), its parameters)."""
  config = tiny_config(**{"model.num_classes": 3})
  model = LabelNet(3)
  x, t = jnp.zeros((1, 8, 8, 3)), jnp.zeros((1,), jnp.int32)
  params = model.init({"params": jax.random.key(0)}, x, t, t)["params"]
  return config, model, params


def test_unconditional_branch_of_the_model_is_the_null_label(conditional_net):
  """make_eps_fn's w = 0 is the network at label num_classes (the null row the label dropout
  trains), w = 1 at the asked labels; both differ from every other label."""
  from ddpm_jax import generate, models
  config, model, params = conditional_net
  schedule = diffusion.make_schedule("linear", 100)
  x = jax.random.normal(jax.random.key(3), (4, 8, 8, 3))
  t = jnp.full((4,), 50, jnp.int32)
  labels = jnp.array([0, 1, 2, 1], jnp.int32)
  net = {y: np.asarray(models.apply(model, params, x, t, jnp.full((4,), y, jnp.int32)))
         for y in range(4)}
  uncond = generate.make_eps_fn(model, schedule, params, config.model.prediction_type, labels,
                                  0.0)(x, t)
  np.testing.assert_allclose(uncond, net[3], rtol=1e-5, atol=1e-5)
  for y in range(3):
    assert np.abs(net[y] - net[3]).max() > 1e-3  # a wrong null label would show
  cond = generate.make_eps_fn(model, schedule, params, config.model.prediction_type, labels,
                                1.0)(x, t)
  want = np.stack([net[int(y)][i] for i, y in enumerate(labels)])
  np.testing.assert_allclose(cond, want, rtol=1e-5, atol=1e-5)


def test_label_dropout_replaces_the_documented_share_with_the_null_label(conditional_net):
  """The train step's labels: example i (global index) is dropped to the null label
  num_classes when uniform(fold_in(example_key_i, 2)) < label_dropout (docs/architecture.md).
  The step's loss equals the loss recomputed with exactly those labels, and differs from
  the loss with no dropout, another share dropped, or another null label."""
  from ddpm_jax import models, train
  from ddpm_jax import state as state_lib
  _, model, params = conditional_net
  rate, B = 0.3, 64
  config = tiny_config(**{"model.num_classes": 3, "training.label_dropout": rate})
  schedule = diffusion.make_schedule("linear", config.diffusion.num_timesteps)
  tx = state_lib.make_optimizer(config)
  st = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                            opt_state=tx.init(params))
  x0 = jax.random.uniform(jax.random.key(5), (B, 8, 8, 3), minval=-1, maxval=1)
  labels = jnp.arange(B, dtype=jnp.int32) % 3
  key = jax.random.key(6)
  step = jax.jit(train.make_train_step(config, model, schedule, tx, axis_name=None))
  _, metrics = step(st, {"image": x0, "label": labels}, key)

  example_key = train.step_key(key, st.step)
  keys = jax.vmap(lambda i: jax.random.fold_in(example_key, i))(jnp.arange(B))
  t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 0), (), 0, 100,
                                            dtype=jnp.int32))(keys)
  noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), (8, 8, 3)))(keys)
  u = np.asarray(jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 2)))(keys))

  def loss_with(drop, null):
    y = jnp.where(jnp.asarray(drop), null, labels)
    fn = lambda x, tt: models.apply(model, st.params, x, tt, y)  # noqa: E731
    return float(diffusion.per_example_loss(schedule, fn, x0, t, noise, "epsilon").mean())

  assert 0.15 < (u < rate).mean() < 0.45  # about the share asked for, in this batch
  np.testing.assert_allclose(float(metrics["loss"]), loss_with(u < rate, 3), rtol=1e-5)
  for drop, null in ((u < 0, 3), (u < rate / 2, 3), (u < rate, 2), (u < rate, 0)):
    assert abs(loss_with(drop, null) - float(metrics["loss"])) > 1e-4 * float(metrics["loss"])


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


@pytest.mark.parametrize("sampler,resample", [("ddpm", 1), ("ddpm", 3), ("ddim", 1),
                                              ("ddim", 3), ("dpm_solver++", 1)])
def test_known_pixels_of_every_x_t_are_the_known_image_noised_to_that_level(sampler, resample):
  """Inpainting, step by step: after the step to level t, the known pixels of x_t are
  sqrt(ab_t) c + sqrt(1 - ab_t) z with fresh noise z: mean sqrt(ab_t) c, std sqrt(1 - ab_t),
  uncorrelated from one step to the next; after the last step exactly c. A short schedule
  makes neighbouring levels far apart (a paste at t+1 or 2t shows), and every step is
  recorded."""
  T, c = 10, 0.8
  sched = diffusion.make_schedule("cosine", T)
  eps_fn = analytic.gaussian_eps_fn(sched, 0.0, 0.5)
  known = jnp.tile(jnp.array([[c, 0.0]]), (N, 1))
  mask = jnp.tile(jnp.array([[1.0, 0.0]]), (N, 1))
  x_T = jax.random.normal(jax.random.key(0), (N, 2))
  out, frames = sampling.sample(sampler, eps_fn, sched, x_T, jax.random.key(1), num_steps=T,
                                eta=1.0, known=known, mask=mask, resample_steps=resample,
                                num_frames=T)
  ts = sampling.timesteps_used(sampler, sched, T)
  assert ts.tolist() == list(range(T - 1, -1, -1))
  ab = np.asarray(sched.alphas_cumprod, np.float64)
  z = []
  for i, t_prev in enumerate(ts - 1):
    x_known = np.asarray(frames[i, 0, :, 0], np.float64)
    if t_prev < 0:
      np.testing.assert_array_equal(x_known, np.float32(c))  # the data: the known values
      continue
    z.append((x_known - np.sqrt(ab[t_prev]) * c) / np.sqrt(1 - ab[t_prev]))
    assert abs(z[-1].mean()) < 5 / np.sqrt(N), (t_prev, z[-1].mean())
    assert abs(z[-1].std() - 1) < 5 / np.sqrt(2 * N), (t_prev, z[-1].std())
  corr = np.corrcoef(np.stack(z))[np.triu_indices(len(z), 1)]
  assert np.abs(corr).max() < 5 / np.sqrt(N), corr.round(2)  # fresh noise at every step
  np.testing.assert_array_equal(np.asarray(out)[:, 0], np.float32(c))


@pytest.mark.parametrize("strength", [0.02, 0.5])
@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver++"])
def test_img2img_one_step_is_the_exact_posterior_mean_at_t_start(schedule, strength, sampler):
  """SDEdit at a small and a middle strength with one step (what the CLI takes at strength
  0.02 and 50 steps): the model is called once, at t_start, and the result is the exact
  E[x0 | x_t] of Gaussian data at that level. A sampler that ignores t_start (starts at
  T-1) or starts elsewhere (2 t_start) gives another shrinkage."""
  from ddpm_jax.modes import t_start_of
  from ddpm_jax.timesteps import steps_from
  mean, std = 0.3, 0.5
  eps_fn = analytic.gaussian_eps_fn(schedule, mean, std)
  t = t_start_of(strength, 1000)
  assert t == {0.02: 19, 0.5: 499}[strength]
  inputs = jnp.linspace(-1, 1, 64).reshape(16, 4)
  x_t = diffusion.q_sample(schedule, inputs, jnp.full((16,), t, jnp.int32),
                           jax.random.normal(jax.random.key(2), inputs.shape))
  steps = steps_from(50, t, 1000)
  assert steps == max(1, round(50 * strength))
  if strength == 0.02:
    assert steps == 1  # one step, not none: the model sees the input
  out = sampling.sample(sampler, eps_fn, schedule, x_t, jax.random.key(3), num_steps=1,
                        t_start=t)
  want = analytic.gaussian_posterior_mean(schedule, x_t, t, mean, std)
  np.testing.assert_allclose(out, want, atol=1e-4)
  assert np.abs(want - np.asarray(x_t)).max() > 1e-3  # the step does something


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_img2img_stochastic_runs_have_the_posterior_mean_on_average(schedule, sampler):
  """DDPM (all t_start + 1 steps) and DDIM with eta = 1: each step's mean is the exact
  E[x_prev | x_t] for the exact denoiser, so averaged over the sampler's noise the result
  from a fixed x_t is E[x0 | x_t], for Gaussian data, whatever the number of steps."""
  mean, std, t = 0.3, 0.5, 19
  eps_fn = analytic.gaussian_eps_fn(schedule, mean, std)
  row = jnp.array([-1.3, -0.4, 0.3, 1.2])
  x_t = jnp.tile(row, (N, 1))
  out = np.asarray(sampling.sample(sampler, eps_fn, schedule, x_t, jax.random.key(4),
                                   num_steps=5, eta=1.0, t_start=t))
  want = analytic.gaussian_posterior_mean(schedule, row, t, mean, std)
  ab = float(schedule.alphas_cumprod[t])
  post_std = std * np.sqrt((1 - ab) / (ab * std**2 + 1 - ab))
  assert np.abs(out.mean(0) - want).max() < 5 * post_std / np.sqrt(N) + 1e-4, (out.mean(0), want)


def test_img2img_at_strength_one_is_sampling_and_small_strength_stays_close(schedule):
  """Strength 1 starts from q(x_T-1 | input), practically pure noise: the outputs match
  unconditional sampling with the same sampler in distribution, whatever the input. A
  small strength keeps the outputs near the input."""
  from ddpm_jax.modes import t_start_of
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
  # Any strength > 0 takes at least one step, at its t_start, with every sampler and spacing.
  from ddpm_jax.modes import t_start_of
  from ddpm_jax.timesteps import steps_from
  for strength in (1e-9, 0.004, 0.01, 0.02, 0.05, 0.3):
    t = t_start_of(strength, 100)
    n = steps_from(5, t, 100)
    assert n >= 1
    for sampler in sampling.SAMPLERS:
      for spacing in ("auto",) + sampling.SPACINGS:
        assert sampling.timesteps_used(sampler, sched, n, spacing, t_start=t)[0] == t


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
  from ddpm_jax import datasets
  src = datasets.get_source(config, "train", with_labels=True)
  xs, ys = zip(*(src.example(i) for i in range(len(src))))
  x, y = np.stack(xs).reshape(len(xs), -1).astype(np.float64), np.array(ys)
  means = np.stack([x[y == k].mean(0) for k in range(3)])
  return lambda u8: np.argmin(((u8.reshape(len(u8), -1)[:, None] - means[None]) ** 2).sum(-1), 1)


def test_guided_samples_show_the_asked_class_more_often_than_unguided(conditional):
  from ddpm_jax import checkpoint as ckpt_lib
  from ddpm_jax import diffusion as diff
  from ddpm_jax import generate, images, models
  config, workdir = conditional
  assert json.load(open(os.path.join(workdir, "classes.json"))) == ["black", "blonde", "blue"]
  classify = hair_classifier(config)
  model = models.create_model(config)
  schedule = diff.make_schedule("linear", config.diffusion.num_timesteps)
  params, _ = ckpt_lib.load_params(config, workdir)
  labels = generate.parse_labels("all", ("black", "blonde", "blue"), 96)
  acc = {}
  for w in (0.0, 3.0):
    config.sampling.guidance_scale = w
    x, _ = generate.generate(config, generate.Sampler(config, model, schedule), params, 96,
                             labels=labels, show_progress=False)
    acc[w] = float((classify(images.to_uint8(x)) == labels).mean())
  assert acc[0.0] < 0.5 and acc[3.0] > 0.6 and acc[3.0] > acc[0.0] + 0.2, acc  # chance: 1/3


def test_generation_modes_on_the_conditional_model(conditional, tmp_path):
  from ddpm_jax import modes
  config, workdir = conditional
  config.sampling.guidance_scale = 3.0
  config.sampling.num_frames = 0
  config.sampling.labels = "blue"
  out = sample_dir = modes.sample_and_save(config, workdir)
  used = json.load(open(os.path.join(out, "sampling.json")))
  assert set(used["labels"]) == {"blue"} and used["guidance_scale"] == 3.0
  assert (np.load(os.path.join(out, "samples.npz"))["labels"] == 2).all()
  assert used["settings"]["sampling"]["labels"] == "blue"
  # The raw (not EMA) parameters of the same checkpoint, same name otherwise: the EMA
  # samples stay; the same settings again reuse their folder.
  ema_images = np.load(os.path.join(out, "samples.npz"))["images"]
  config.sampling.use_ema = False
  raw = modes.sample_and_save(config, workdir)
  assert raw == out + "-2"
  np.testing.assert_array_equal(np.load(os.path.join(out, "samples.npz"))["images"], ema_images)
  assert json.load(open(os.path.join(raw, "sampling.json")))["use_ema"] is False
  config.sampling.use_ema = True
  assert modes.sample_and_save(config, workdir) == out

  # A model that can reconstruct: DDIM inversion and back comes close to the held-out images.
  rec = modes.reconstruct_and_save(config, workdir)
  report = json.load(open(os.path.join(rec, "error.json")))
  # 17.7 dB here (20 steps, 300 training steps); decoding unrelated noise scores 8.5.
  assert report["psnr_db"] > 15 and report["num_images"] == 8, report

  inputs = tmp_path / "inputs"
  inputs.mkdir()
  for i in range(3):  # any size and format, resized like training data
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 30, 3), np.uint8)).save(
        inputs / f"im{i}.{'png' if i else 'jpg'}")
  config.sampling.inputs = str(inputs)
  config.sampling.mask = "strokes"
  config.sampling.resample_steps = 2
  out = modes.inpaint_and_save(config, workdir)
  d = np.load(os.path.join(out, "inpaint.npz"))
  m = d["masks"]
  assert d["results"].shape == (3, 8, 8, 3) and 0 < m.mean() < 1
  np.testing.assert_array_equal(d["results"][m], d["originals"][m])  # known pixels exactly
  for name in ("originals.png", "masked.png", "results.png", "grid.png"):
    assert os.path.exists(os.path.join(out, name))

  # Strength 1 is sampling: the same seed gives the first samples of --mode=sample (the same
  # noise, labels and timesteps; the inputs enter x_T only as sqrt(alpha_bar_99) = 0.006 x).
  config.sampling.strength = 1.0
  one = modes.img2img_and_save(config, workdir)
  assert json.load(open(os.path.join(one, "sampling.json")))["timesteps"] == used["timesteps"]
  plain = np.load(os.path.join(sample_dir, "samples.npz"))["samples"][:3]
  assert np.abs(np.load(os.path.join(one, "img2img.npz"))["samples"] - plain).max() < 0.05

  config.sampling.strength = 0.3
  out = modes.img2img_and_save(config, workdir)
  used = json.load(open(os.path.join(out, "sampling.json")))
  assert used["t_start"] == 29 and used["timesteps"][0] == 29 and used["num_steps"] == 6
  assert np.load(os.path.join(out, "img2img.npz"))["results"].shape == (3, 8, 8, 3)

  out = modes.interpolate_images_and_save(config, workdir, num_points=5)
  strip = np.load(os.path.join(out, "interpolation.npz"))["images"]
  assert strip.shape == (1, 5, 8, 8, 3)  # one pair (the third input is left out)


def test_modes_work_on_a_copy_and_say_each_forced_setting_once(caplog):
  from ddpm_jax import modes
  config = tiny_config(**{"sampling.eta": 0.5, "sampling.sampler": "dpm_solver_pp"})
  del config.sampling["resample_steps"]  # as in a config saved by an older version
  with caplog.at_level("INFO"):
    used = modes.mode_config(config, "reconstruct", eta=0.0, sampler="ddim")
  assert config.sampling.eta == 0.5 and config.sampling.sampler == "dpm_solver_pp"  # untouched
  assert "resample_steps" not in config.sampling
  assert used.sampling.eta == 0.0 and used.sampling.sampler == "ddim"
  assert used.sampling.resample_steps == 5  # from configs/default.py
  said = [r.getMessage() for r in caplog.records if "--mode=reconstruct uses" in r.getMessage()]
  assert said == ["--mode=reconstruct uses sampling.eta=0.0 (the config has 0.5)",
                  "--mode=reconstruct uses sampling.sampler='ddim' (the config has "
                  "'dpm_solver++')"], said
  assert modes.mode_config(config, "sample").sampling.sampler == "dpm_solver++"  # one name


def test_dpm_solver_alias_with_resampling_is_one_clear_line(tmp_path):
  """Inpainting with sampler=dpm_solver_pp (the alias) and resample_steps > 1: a ConfigError
  before anything is loaded, the same as with the canonical name; the samplers say the same."""
  from ddpm_jax import config_lib, modes
  from ddpm_jax.errors import ConfigError
  for name in ("dpm_solver++", "dpm_solver_pp"):
    config = tiny_config(**{"sampling.sampler": name, "sampling.resample_steps": 3})
    config_lib.validate(config)  # a valid config: only inpainting cannot resample with it
    with pytest.raises(ConfigError, match="multistep") as err:
      modes.inpaint_and_save(config, str(tmp_path / "nothing_here"))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="multistep"):
      sampling.sample(name, lambda x, t: x, diffusion.make_schedule("linear", 100),
                      jnp.zeros((1, 2)), jax.random.key(0), known=jnp.zeros((1, 2)),
                      mask=jnp.ones((1, 2)), resample_steps=3)
  with pytest.raises(ConfigError, match="unknown sampling.sampler"):
    config_lib.validate(tiny_config(**{"sampling.sampler": "dpm"}))
  assert sampling.resolve_spacing("dpm_solver_pp", "auto") == "logsnr"


def test_sampling_json_counts_every_step_ddpm_takes():
  """DDPM takes all T steps (t_start + 1 for img2img), whatever sampling.num_steps says."""
  from ddpm_jax import generate, models, modes
  config = tiny_config(**{"sampling.sampler": "ddpm", "sampling.num_steps": 5})
  model = models.create_model(config)
  sched = diffusion.make_schedule("linear", 100)
  report = modes.settings_report(config, generate.Sampler(config, model, sched).plan, 7,
                                 "sample")
  assert report["num_steps"] == 100 == len(report["timesteps"])
  assert report["timesteps"] == list(range(99, -1, -1))
  plan = generate.plan_for(config, sched, t_start=29)
  report = modes.settings_report(config, generate.Sampler(config, model, sched, plan).plan, 7,
                                 "img2img")
  assert report["num_steps"] == 30 and report["timesteps"][0] == 29
  assert report["settings"]["sampling"]["num_steps"] == 5  # and every setting is recorded
  assert report["settings"]["sampling"]["use_ema"] is True and report["settings"]["mode"] == \
      "img2img"


def test_a_sampler_of_a_config_without_some_sections_takes_their_defaults():
  """Sampler is a public entry: a library user's config that lacks whole sections
  (``consistency``, written before consistency tuning existed) and fields samples as the
  complete one does, with the defaults."""
  from ddpm_jax import config_lib, generate, models
  full = config_lib.with_defaults(tiny_config(**{"sampling.num_steps": 4}))
  partial = tiny_config(**{"sampling.num_steps": 4})
  with partial.unlocked():
    del partial["consistency"], partial.sampling["clip_x0"]
  assert "consistency" not in partial
  sched = diffusion.make_schedule("linear", 100)
  model = models.create_model(full)
  x = jnp.zeros((1, 8, 8, 3))
  params = model.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32))["params"]
  ours, theirs = generate.Sampler(partial, model, sched), generate.Sampler(full, model, sched)
  assert ours.plan == theirs.plan
  assert "consistency" not in partial  # the caller's config is left as it was
  np.testing.assert_array_equal(ours(params, np.arange(4), seed=0, batch_key=0)[0],
                                theirs(params, np.arange(4), seed=0, batch_key=0)[0])


def test_earlier_results_with_other_settings_are_never_overwritten(tmp_path):
  """``unclaimed``: a folder (or an eval report) made with other settings is kept, the new
  results go to name-2, name-3, ...; the same settings reuse their own folder."""
  from ddpm_jax import fs
  from ddpm_jax.writers import unclaimed
  base = str(tmp_path / "samples" / "step4_ddim5_eta0_seed0")
  folder = lambda k: base if k == 1 else f"{base}-{k}"  # noqa: E731
  record = lambda d: os.path.join(d, "sampling.json")  # noqa: E731
  ema, raw = {"sampling": {"use_ema": True}}, {"sampling": {"use_ema": False}}
  assert unclaimed(folder, record, ema) == base  # nothing there yet
  fs.write_json(record(base), {"settings": ema})
  assert unclaimed(folder, record, ema) == base  # the same settings: the same folder
  assert unclaimed(folder, record, raw) == base + "-2"
  fs.write_json(record(base + "-2"), {"settings": raw})
  assert unclaimed(folder, record, raw) == base + "-2"
  assert unclaimed(folder, record, {"sampling": {"use_ema": True, "labels": "blue"}}) == \
      base + "-3"
  os.makedirs(tmp_path / "old")  # a folder without a record (an older version's): kept too
  assert unclaimed(lambda k: str(tmp_path / ("old" if k == 1 else f"old-{k}")), record,
                   ema) == str(tmp_path / "old-2")
  stem = str(tmp_path / "eval" / "4")  # eval reports: <step>.json, then <step>-2.json
  fs.write_json(stem + ".json", {"settings": ema})
  assert unclaimed(lambda k: stem if k == 1 else f"{stem}-{k}", lambda p: p + ".json",
                   raw) == stem + "-2"


def test_masks_built_in_and_from_files(tmp_path):
  from ddpm_jax import modes
  from ddpm_jax.errors import ConfigError, InputError
  centre = modes.builtin_mask("center", 8, 0)
  assert centre[4, 4] == 0 and centre[0, 0] == 1 and centre.mean() == 0.75
  assert modes.builtin_mask("left", 8, 0)[:, :4].sum() == 0
  strokes = modes.builtin_mask("strokes", 32, 0)
  assert 0.2 < strokes.mean() < 0.99 and not np.array_equal(
      strokes, modes.builtin_mask("strokes", 32, 1))
  with pytest.raises(ConfigError, match="sampling.mask"):
    modes.builtin_mask("circle", 8, 0)
  (tmp_path / "masks").mkdir()
  Image.fromarray(np.tile(np.array([0, 255], np.uint8).repeat(8), (16, 1))).save(
      tmp_path / "masks" / "a.png")
  config = tiny_config(**{"sampling.mask_dir": str(tmp_path / "masks")})
  m = modes.load_masks(config, ["x/a.jpg"])
  assert m.shape == (1, 8, 8, 1) and m[0, :, :4].sum() == 0 and m[0, :, 4:].min() == 1
  with pytest.raises(InputError, match="no mask named b"):
    modes.load_masks(config, ["x/b.png"])
  with pytest.raises(InputError, match="needs input images"):
    modes.input_files(None)
  (tmp_path / "bad.png").write_text("not an image")
  with pytest.raises(InputError, match="cannot read .*bad.png"):
    modes.load_inputs([str(tmp_path / "bad.png")], 8)


def test_load_params_gives_the_ema_or_the_raw_parameters_as_sampling_use_ema_says(conditional):
  """After 300 steps at ema_decay 0.99 the EMA and the raw parameters of the checkpoint
  differ; ``load_params`` returns exactly the EMA ones with ``sampling.use_ema`` and the raw
  ones without (checked against the checkpoint restored directly), for every mode and eval."""
  from ddpm_jax import checkpoint as ckpt_lib
  from tests import cli
  config, workdir = conditional
  config = config.copy_and_resolve_references()
  step, state = cli.final_state(workdir, config)
  gap = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(state.params),
                                                        jax.tree.leaves(state.ema_params)))
  assert gap > 1e-3, gap  # the two are told apart
  for use_ema, want in ((True, state.ema_params), (False, state.params)):
    config.sampling.use_ema = use_ema
    params, got_step = ckpt_lib.load_params(config, workdir)
    assert got_step == step == STEPS
    cli.assert_same_state(params, want)


def test_img2img_at_a_small_strength_stays_within_that_levels_noise_of_the_input(conditional,
                                                                                tmp_path):
  """SDEdit from t = strength * T: x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, and one DDIM step
  (what 20 steps over T = 100 give at t = 1) returns clip((x_t - sqrt(1 - ab) eps_hat) /
  sqrt(ab)) = clip(x0 + sqrt((1 - ab) / ab) (eps - eps_hat)). Clipping to [-1, 1] only moves
  it towards x0, so RMS(result - x0) <= sqrt((1 - ab) / ab) (RMS(eps) + RMS(eps_hat)) <=
  3 sqrt((1 - ab) / ab) for a network whose eps estimates have an RMS under 2. Inputs noised
  to T-1 whatever the strength would give a result about as far from them as noise is;
  strength 1 (a sample: the input is 0.6% of x_T) lies beyond the bound too."""
  from ddpm_jax import datasets, images, modes
  config, workdir = conditional
  config = config.copy_and_resolve_references()
  config.sampling.guidance_scale = 1.0  # the conditional branch: eps_hat of the trained net
  config.sampling.num_frames = 0
  src = datasets.get_source(config, config.data.eval_split)
  inputs = tmp_path / "held_out"
  inputs.mkdir()
  for i in range(8):
    Image.fromarray(src.example(i)[0]).save(inputs / f"im{i}.png")
  config.sampling.inputs = str(inputs)
  schedule = diffusion.make_schedule("linear", config.diffusion.num_timesteps)

  def distance(strength):
    config.sampling.strength = strength
    out = modes.img2img_and_save(config, workdir)
    d = np.load(os.path.join(out, "img2img.npz"))
    used = json.load(open(os.path.join(out, "sampling.json")))
    rms = float(np.sqrt(np.mean((d["samples"] - images.to_float(d["inputs"])) ** 2)))
    return used["t_start"], used["num_steps"], rms

  t, steps, small = distance(0.02)
  assert (t, steps) == (1, 1)  # the one-step case of the bound
  ab = float(schedule.alphas_cumprod[t])
  bound = 3 * np.sqrt((1 - ab) / ab)  # 0.19 here (ab = 0.996); 0.057 seen
  assert small < bound, (small, bound)
  t, _, large = distance(1.0)
  assert t == 99 and large > bound, (large, bound)  # 0.75 seen


def test_eval_samples_of_a_conditional_model_carry_the_held_out_labels(conditional,
                                                                       monkeypatch):
  """Eval samples a conditional model as the held-out images are labelled; unlabelled, every
  sample was the null label twice through guidance (both halves of the doubled batch the
  same), so the guided samples showed each class at chance."""
  from ddpm_jax import datasets, evaluate
  config, workdir = conditional
  config = config.copy_and_resolve_references()
  config.sampling.guidance_scale = 3.0
  config.eval.num_samples = 48
  config.eval.num_reference = 48
  config.eval.name = "labels"
  seen = []
  real = evaluate.sample_metrics
  monkeypatch.setattr(evaluate, "sample_metrics",
                      lambda c, s, ref: (seen.append(s), real(c, s, ref))[1])
  report = evaluate.evaluate(config, workdir)[0]
  assert report["sample_labels"].startswith("the held-out images' labels in turn")
  src = datasets.get_source(config, config.data.eval_split, with_labels=True)
  n = min(config.eval.num_examples, len(src))
  held_out = np.array([src.example(i)[1] for i in range(n)])
  wanted = np.resize(held_out, 48)
  acc = float((hair_classifier(config)(seen[0]) == wanted).mean())
  assert acc > 0.6, acc  # chance: 1/3
