"""Evaluation: the bound's estimator, FID/KID/precision-recall maths, the Inception port
and its weights file, colour and memorisation statistics, and the offline extractor."""

import io
import math
import os
import pickle
import sys
import types
import zipfile
from collections import OrderedDict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddpm_jax import bound, datasets, diffusion, evaluate, features, inception, metrics

# ------------------------------------------------------------------ bits/dim estimator

def test_bound_exact_sum_matches_closed_form_and_stratified_estimate_is_unbiased():
  """Gaussian data N(mu, s^2) with the exact denoiser: the exact (K=0) bound minus its
  decoder term equals the closed form (prior KL + sum over t >= 1 of
  D coef1_t^2 Var(x0 | x_t) / (2 posterior_var_t)); the stratified estimate (K=8) of
  the same images agrees with the exact bound within its standard error."""
  from tests import analytic
  T, mu, sd, n, d = 200, 0.1, 0.4, 512, 3
  s = diffusion.make_schedule("linear", T)
  eps_fn = analytic.gaussian_eps_fn(s, mu, sd)
  term = bound.make_term_fn(s, lambda p, y=None: eps_fn)
  x0 = mu + sd * jax.random.normal(jax.random.key(0), (n, d))
  key = jax.random.key(1)
  exact = bound.bound_per_image(s, term, None, x0, key, 0)
  decoder = np.asarray(term(None, x0, jnp.zeros((n,), jnp.int32),
                            jax.random.normal(jax.random.fold_in(key, 1), x0.shape)), np.float64)
  ab = np.asarray(s.alphas_cumprod, np.float64)
  t = np.arange(1, T)
  sig2 = 1 - ab[t]
  var_x0 = sd**2 * sig2 / (ab[t] * sd**2 + sig2)
  kl = d * np.asarray(s.posterior_mean_coef1, np.float64)[t] ** 2 * var_x0 / (
      2 * np.asarray(s.posterior_variance, np.float64)[t])
  a2, v = ab[-1], 1 - ab[-1]
  prior = d * 0.5 * (-1 - np.log(v) + v + a2 * (mu**2 + sd**2))
  got = (exact - decoder).mean()
  se = (exact - decoder).std() / math.sqrt(n)
  assert abs(got - (kl.sum() + prior)) < 4 * se + 1e-3, (got, kl.sum() + prior, se)

  est = bound.bound_per_image(s, term, None, x0, jax.random.key(2), 8)
  diff = est - exact  # paired: same images
  assert abs(diff.mean()) < 4 * diff.std() / math.sqrt(n) + 1e-4, (diff.mean(), diff.std())
  assert est.std() < 3 * exact.std()  # stratification keeps the spread of the estimate modest


def test_strata_cover_every_timestep_once():
  for T, k in ((1000, 16), (100, 4), (10, 16)):
    b = bound.strata(T, k)
    assert b[0] == 1 and b[-1] == T and np.all(np.diff(b) > 0) and len(b) - 1 <= k
    t, w = bound.stratified_timesteps(jax.random.key(0), 500, T, k)
    assert w.sum() == T - 1
    assert np.all((t >= b[:-1, None]) & (t < b[1:, None]))


def test_bits_per_dim_falls_as_training_goes_on(config):
  """Tiny model on the built-in faces: the held-out bound after 60 steps is lower than at
  initialisation, by more than 4 paired standard errors (same images, t and noise).
  (8x8 images and T=100 keep it quick; such a loose bound stays above 8 bits/dim here.
  The reference run in docs/results.md shows real faces well below 8.)"""
  from ddpm_jax import input_pipeline, models, train
  from ddpm_jax import state as state_lib
  config.training.batch_size = 16
  model = models.create_model(config)
  s = diffusion.make_schedule("linear", config.diffusion.num_timesteps)
  tx = state_lib.make_optimizer(config)
  state = state_lib.create_train_state(config, model, tx, jax.random.key(0))
  step = jax.jit(train.make_train_step(config, model, s, tx, axis_name=None))
  batches = input_pipeline.TrainBatches(datasets.get_source(config, "train"), 16, seed=0)
  held = jnp.asarray(next(input_pipeline.eval_batches(
      datasets.get_source(config, "test"), 32, 32)))
  term = bound.make_term_fn(s, evaluate.eps_fn_for(config, model, s))

  def bpd(params):
    nats = bound.bound_per_image(s, term, params, held, jax.random.key(7), 8)
    return nats / (np.prod(held.shape[1:]) * math.log(2))

  before = bpd(state.params)
  for i in range(60):
    x = next(batches)
    state, _ = step(state, jnp.asarray(x.reshape((-1,) + x.shape[-3:])), jax.random.key(i))
  batches.close()
  after = bpd(state.params)
  diff = before - after
  assert np.isfinite(after).all()
  assert diff.mean() > 4 * diff.std() / math.sqrt(len(diff)), (before.mean(), after.mean())


# ------------------------------------------------------------------------- FID maths

def test_frechet_distance_matches_scipy_and_the_diagonal_closed_form():
  scipy_linalg = pytest.importorskip("scipy.linalg")
  rng = np.random.default_rng(0)
  d = 6
  a, b = rng.standard_normal((d, d)), rng.standard_normal((d, d))
  s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  covmean = scipy_linalg.sqrtm(s1 @ s2).real
  want = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), want, rtol=1e-8)
  v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
  diag = float(((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum())
  np.testing.assert_allclose(metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)),
                             diag, rtol=1e-10)
  assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_kid_is_unbiased_mmd_and_near_zero_for_one_distribution():
  rng = np.random.default_rng(1)
  x, y = rng.standard_normal((40, 5)), rng.standard_normal((40, 5)) + 0.5
  k = lambda a, b: (a @ b.T / 5 + 1) ** 3  # noqa: E731
  m = 40
  want = ((k(x, x).sum() - np.trace(k(x, x))) / (m * (m - 1))
          + (k(y, y).sum() - np.trace(k(y, y))) / (m * (m - 1)) - 2 * k(x, y).mean())
  got, _ = metrics.kid(x, y, num_subsets=3, subset_size=40)  # subsets = the whole sets
  np.testing.assert_allclose(got, want, rtol=1e-10)
  same_a, same_b = rng.standard_normal((500, 5)), rng.standard_normal((500, 5))
  mean, std = metrics.kid(same_a, same_b, subset_size=200)
  shifted, _ = metrics.kid(same_a, same_b + 0.5, subset_size=200)
  assert abs(mean) < 3 * std + 1e-3 and shifted > 10 * max(abs(mean), std)


def test_precision_recall_of_known_sets():
  rng = np.random.default_rng(2)
  real = np.concatenate([rng.standard_normal((300, 2)) - 5, rng.standard_normal((300, 2)) + 5])
  pr = metrics.precision_recall(real, real)
  assert pr["precision"] == 1.0 and pr["recall"] == 1.0
  one_mode = rng.standard_normal((300, 2)) + 5  # samples cover one of the two modes
  pr = metrics.precision_recall(real, one_mode)
  assert pr["precision"] > 0.9 and 0.4 < pr["recall"] < 0.6
  far = rng.standard_normal((300, 2)) + 50
  pr = metrics.precision_recall(real, far)
  assert pr["precision"] == 0.0 and pr["recall"] == 0.0


def test_colour_stats_and_nearest_neighbours():
  rng = np.random.default_rng(3)
  data = rng.integers(20, 200, (50, 8, 8, 3), dtype=np.uint8)
  shifted = data.copy()
  shifted[..., 0] += 10
  c = metrics.colour_stats(shifted, data)
  np.testing.assert_allclose(c["R"]["sample_mean"] - c["R"]["data_mean"], 10)
  np.testing.assert_allclose(c["R"]["w1"], 10, rtol=1e-9)
  assert c["G"]["w1"] == 0 and c["B"]["w1"] == 0
  dist, idx = metrics.nearest_neighbours(data[[7, 3]], data)
  np.testing.assert_array_equal(idx, [7, 3])
  assert np.all(dist < 1e-3)
  # One level off in every pixel: RMS distance 1/255 in [0, 1] units.
  dist, _ = metrics.nearest_neighbours(data[:1] + 1, data)
  np.testing.assert_allclose(dist, [1 / 255], rtol=1e-3)


# ------------------------------------------------------------ extractors, Inception

def test_random_conv_extractor_is_fixed_and_tells_data_from_noise(config):
  """The offline extractor's weights come from numpy's PCG64 stream (golden sum: it must
  not change silently), its features are deterministic, and on real (built-in) faces
  held-out images lie inside the data's manifold while noise does not."""
  from ddpm_jax import images, input_pipeline
  p = features.random_conv_params()
  assert [w.shape for w in p] == [(3, 3, 3, 32), (3, 3, 32, 64), (3, 3, 64, 128),
                                  (3, 3, 128, 256), (3, 3, 256, 512)]
  # He-normal: E|w| = sqrt(2 / 27) sqrt(2 / pi) per weight, 864 weights -> ~187.6.
  assert abs(float(np.abs(p[0]).sum()) / (864 * math.sqrt(2 / 27) * math.sqrt(2 / math.pi))
             - 1) < 0.05
  np.testing.assert_allclose(float(np.abs(p[0]).sum()), 192.10846, rtol=1e-6)  # this stream
  ext = features.random_conv(batch_size=32)
  train = np.concatenate([images.to_uint8(x) for x in input_pipeline.eval_batches(
      datasets.get_source(config, "train"), 64, 192)])
  test = np.concatenate([images.to_uint8(x) for x in input_pipeline.eval_batches(
      datasets.get_source(config, "test"), 64, 64)])
  f1, f2 = ext(train), ext(train[:50])
  np.testing.assert_array_equal(f1[:50], f2)  # batch padding does not change features
  noise = np.random.default_rng(0).integers(0, 256, test.shape, dtype=np.uint8)
  real = metrics.precision_recall(f1, ext(test))
  fake = metrics.precision_recall(f1, ext(noise))
  assert real["precision"] > 0.5 and fake["precision"] < 0.1, (real, fake)


def _corrupt_npz(path, how: str) -> None:
  data = open(path, "rb").read()
  if how == "truncated":  # a torn write: the zip's directory is missing
    open(path, "wb").write(data[:len(data) // 2])
  elif how == "garbage":  # not a zip at all (np.load would try it as a pickle)
    open(path, "wb").write(b"\x80\x04 not an npz file" * 20)
  elif how == "no_features":
    np.savez(open(path, "wb"), other=np.zeros(3))
  elif how == "wrong_shape":  # another N's or another extractor's features
    np.savez(open(path, "wb"), features=np.zeros((3, 7), np.float32))


@pytest.mark.parametrize("how", ["truncated", "garbage", "no_features", "wrong_shape"])
def test_a_corrupt_reference_feature_cache_is_rebuilt_with_one_warning(tmp_path, how, caplog):
  """The cache in <data_dir>/ddpm_jax_stats only saves time: a file that does not read as
  this reference's features (torn, foreign, another shape) used to break every eval; now
  it is computed again, with one warning, and the rewritten cache reads back."""
  from tests.conftest import tiny_config
  config = tiny_config(**{"data.data_dir": str(tmp_path)})
  ext = features.random_conv(batch_size=16)
  ref_u8 = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
  want = evaluate.reference_features(config, ext, ref_u8)
  [name] = os.listdir(tmp_path / "ddpm_jax_stats")
  path = tmp_path / "ddpm_jax_stats" / name
  _corrupt_npz(path, how)
  with caplog.at_level("WARNING"):
    got = evaluate.reference_features(config, ext, ref_u8)
  np.testing.assert_array_equal(got, want)
  warned = [r for r in caplog.records if "feature cache" in r.getMessage()]
  assert len(warned) == 1 and name in warned[0].getMessage()
  np.testing.assert_array_equal(np.load(path)["features"], want)  # rewritten, readable
  caplog.clear()
  np.testing.assert_array_equal(evaluate.reference_features(config, ext, ref_u8), want)
  assert not [r for r in caplog.records if "feature cache" in r.getMessage()]


def _torch_named(params):
  """Our Inception params -> pytorch-fid's state dict names and layouts (inverse mapping)."""
  sd = OrderedDict()
  inv = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [k.key for k in path]
    base, leaf_name = ".".join(names[:-1]), names[-1]
    if leaf_name == "kernel":
      sd[f"{base}.conv.weight"] = np.ascontiguousarray(np.transpose(np.asarray(leaf),
                                                                    (3, 2, 0, 1)))
    else:
      sd[f"{base}.bn.{inv[leaf_name]}"] = np.asarray(leaf)
      if leaf_name == "var":
        sd[f"{base}.bn.num_batches_tracked"] = np.array(0, np.int64)
  sd["fc.weight"] = np.zeros((1008, 2048), np.float32)
  sd["fc.bias"] = np.zeros((1008,), np.float32)
  return sd


def _write_torch_file(path, sd, legacy, monkeypatch):
  """Writes ``sd`` the way ``torch.save`` does (zip or legacy stream), without torch: a
  stand-in ``torch`` module supplies the two globals the pickle refers to."""
  torch_mod, utils_mod = types.ModuleType("torch"), types.ModuleType("torch._utils")

  def _rebuild_tensor_v2(*args):
    raise AssertionError("never called when writing")

  _rebuild_tensor_v2.__module__ = "torch._utils"
  _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
  types_by_dtype = {}
  for name, dt in (("FloatStorage", np.float32), ("LongStorage", np.int64)):
    cls = type(name, (), {"__module__": "torch"})
    setattr(torch_mod, name, cls)
    types_by_dtype[np.dtype(dt)] = cls
  utils_mod._rebuild_tensor_v2 = _rebuild_tensor_v2
  torch_mod._utils = utils_mod
  monkeypatch.setitem(sys.modules, "torch", torch_mod)
  monkeypatch.setitem(sys.modules, "torch._utils", utils_mod)

  class Storage:
    def __init__(self, arr, key):
      self.arr, self.key = arr, key

  class Tensor:
    def __init__(self, arr, key):
      # The storage holds the elements in memory order; strides index into it.
      assert arr.flags.c_contiguous or arr.flags.f_contiguous
      self.arr, self.storage = arr, Storage(arr.ravel(order="K"), key)

    def __reduce_ex__(self, proto):
      strides = tuple(s // self.arr.itemsize for s in self.arr.strides)
      return (_rebuild_tensor_v2, (self.storage, 0, self.arr.shape, strides, False, OrderedDict()))

  storages = {}

  class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
      if isinstance(obj, Storage):
        storages[obj.key] = obj.arr
        pid = ("storage", types_by_dtype[obj.arr.dtype], obj.key, "cpu", obj.arr.size)
        return pid + ((None,) if legacy else ())
      return None

  obj = OrderedDict((k, Tensor(np.asarray(v), str(i))) for i, (k, v) in enumerate(sd.items()))
  buf = __import__("io").BytesIO()
  if legacy:
    for x in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True, "protocol_version": 1001}):
      pickle.dump(x, buf, protocol=2)
    Pickler(buf, protocol=2).dump(obj)
    keys = sorted(storages)
    pickle.dump(keys, buf, protocol=2)
    for k in keys:
      buf.write(np.int64(storages[k].size).tobytes())
      buf.write(np.ascontiguousarray(storages[k]).tobytes())
    open(path, "wb").write(buf.getvalue())
  else:
    Pickler(buf, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("archive/data.pkl", buf.getvalue())
      z.writestr("archive/version", "3\n")
      for k, arr in storages.items():
        z.writestr(f"archive/data/{k}", np.ascontiguousarray(arr).tobytes())


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_file_reader_round_trips_both_formats(tmp_path, monkeypatch, legacy):
  rng = np.random.default_rng(4)
  base = rng.standard_normal((3, 4)).astype(np.float32)
  sd = OrderedDict(a=rng.standard_normal((2, 3, 4, 5)).astype(np.float32),
                   b=np.arange(7, dtype=np.int64), transposed=base.T)  # non-contiguous
  path = str(tmp_path / "w.pth")
  _write_torch_file(path, sd, legacy, monkeypatch)
  monkeypatch.delitem(sys.modules, "torch")
  got = inception.read_torch_file(path)
  assert set(got) == set(sd)
  for k in sd:
    np.testing.assert_array_equal(got[k], sd[k])


def test_inception_plumbing_with_random_weights(tmp_path, monkeypatch):
  """Random weights written as pytorch-fid's state dict load back into the same network
  (sha256 checked); FID of a set with itself is ~0, and of a different set it is not."""
  params = inception.random_params(0)
  path = str(tmp_path / "inception.pth")
  _write_torch_file(path, _torch_named(params), False, monkeypatch)
  monkeypatch.delitem(sys.modules, "torch")
  with pytest.raises(inception.WeightsError, match="sha256"):
    inception.load_params(path)  # the official prefix 6726825d does not match
  with pytest.raises(inception.WeightsError, match="not found"):
    inception.load_params(str(tmp_path / "missing.pth"))
  loaded, digest = inception.load_params(path, inception.sha256(path))
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))
  ext = features.inception(path, digest, batch_size=8)
  assert ext.fingerprint == f"inception_{digest[:16]}"
  rng = np.random.default_rng(5)
  imgs = rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
  f = ext(imgs)
  assert f.shape == (8, 2048) and np.isfinite(f).all()
  np.testing.assert_array_equal(ext(imgs[:3]), f[:3])  # batch padding changes nothing
  other = ext(np.clip(imgs.astype(int) + 80, 0, 255).astype(np.uint8))
  mu, sig = metrics.gaussian_stats(f)
  # ~0 up to the square roots of rank-deficient (8 images, 2048-d) covariances.
  assert abs(metrics.frechet_distance(mu, sig, mu, sig)) < 1e-5 * np.trace(sig)
  mu2, sig2 = metrics.gaussian_stats(other)
  assert metrics.frechet_distance(mu, sig, mu2, sig2) > 1e-3 * np.trace(sig)


def test_resize_matches_torch_bilinear_on_a_ramp():
  """Half-pixel-centre bilinear without antialiasing, edges clamped: upsampling a 2-pixel
  ramp [0, 1] by 4 gives torch's F.interpolate(align_corners=False) values."""
  x = jnp.asarray([0.0, 1.0]).reshape(1, 1, 2, 1) * jnp.ones((1, 2, 1, 1))
  out = np.asarray(inception.resize_bilinear(x, 8))[0, 0, :, 0]
  # Source coordinate of output j: (j + 0.5) / 4 - 0.5, clamped to [0, 1].
  want = np.clip((np.arange(8) + 0.5) / 4 - 0.5, 0, 1)
  np.testing.assert_allclose(out, want, atol=1e-6)


def test_weights_error_for_a_non_torch_file(tmp_path):
  p = tmp_path / "junk.pth"
  p.write_bytes(os.urandom(100))
  with pytest.raises(inception.WeightsError):
    inception.read_torch_file(str(p))


class _Payload:
  """Pickles as a call to os.system (harmless: it would create a marker file)."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["legacy_magic", "legacy_sys_info", "legacy_keys",
                                   "legacy_state_dict", "zip_state_dict"])
def test_a_weights_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path, where):
  """A crafted weights file whose pickles call os.system, in each place a pickle is read
  (the legacy header objects too): one clear UserError, and the command never ran. Its
  sha256 is the expected one here, as a forged file's prefix could be."""
  from ddpm_jax.errors import UserError
  marker = tmp_path / "MARKER"
  bad = _Payload(marker)
  path = tmp_path / "evil.pth"
  header = [0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}]
  buf = io.BytesIO()
  if where.startswith("legacy"):
    if where == "legacy_magic":
      header[0] = bad
    if where == "legacy_sys_info":
      header[2] = {"little_endian": bad}
    for x in header:
      pickle.dump(x, buf, protocol=2)
    pickle.dump(OrderedDict(a=bad) if where == "legacy_state_dict" else OrderedDict(), buf,
                protocol=2)
    pickle.dump([bad] if where == "legacy_keys" else [], buf, protocol=2)
    path.write_bytes(buf.getvalue())
  else:
    pickle.dump(OrderedDict(a=bad), buf, protocol=2)
    with zipfile.ZipFile(path, "w") as z:
      z.writestr("archive/data.pkl", buf.getvalue())
  with pytest.raises(UserError) as err:
    inception.load_params(str(path), inception.sha256(str(path)))
  assert isinstance(err.value, inception.WeightsError)
  assert "system" in str(err.value) and "\n" not in str(err.value), str(err.value)
  assert not marker.exists()
  # The pickles do run code when read without restriction (the test would see it).
  if where == "zip_state_dict":
    pickle.loads(buf.getvalue())
    assert marker.exists()


def test_a_conditional_model_is_validated_with_its_labels_and_unconditionally_beside():
  """Validation loss and bits/dim measure what is trained (each image's label); the null
  label's branch is reported beside them, not instead."""
  import jax
  import jax.numpy as jnp

  from ddpm_jax import datasets, diffusion, models, validation
  from ddpm_jax import evaluate as ev
  from tests.conftest import tiny_config
  config = tiny_config(**{"model.num_classes": 3, "eval.timesteps_per_image": 2})
  model = models.create_model(config)
  params = models.init_params(model, jax.random.key(1), 8, 3)
  # A network whose output depends on the label: at initialisation the class embedding,
  # each residual branch's last convolution and the output layer are zero; perturb them all.
  leaves, tree = jax.tree.flatten(params)
  params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(jax.random.key(i), x.shape)
                                     for i, x in enumerate(leaves)])
  rng = np.random.default_rng(0)
  source = datasets.ArraySource(rng.integers(0, 255, (6, 8, 8, 3), np.uint8),
                                      np.array([0, 1, 2, 0, 1, 2], np.int32), ("a", "b", "c"))
  schedule = diffusion.make_schedule("linear", config.diffusion.num_timesteps)
  vl = validation.ValidationLoss(config, model, schedule, source, 6, 4)
  out = vl(params)
  assert vl.conditional and {"all", "uncond_all"} <= set(out)
  # The same numbers by hand: labelled, then null-labelled.
  def by_hand(labels):
    losses = [diffusion.per_example_loss(
        schedule, lambda xt, tt, y=y: models.apply(model, params, xt, tt, y), x,
        jnp.asarray(vl.t[i * 4:i * 4 + len(x)]), z, config.model.prediction_type)
        for i, (x, z, y) in enumerate(zip(vl.batches, vl.noise, labels))]
    return float(np.concatenate([np.asarray(v) for v in losses]).mean())
  np.testing.assert_allclose(out["all"], by_hand(vl.labels), rtol=1e-5)
  np.testing.assert_allclose(out["uncond_all"], by_hand([vl.null_labels(x) for x in vl.batches]),
                             rtol=1e-5)
  assert abs(out["all"] - out["uncond_all"]) > 1e-4
  term = bound.make_term_fn(schedule, ev.eps_fn_for(config, model, schedule))
  report = ev.bound_report(config, schedule, term, params, vl.batches, 0, labels=vl.labels,
                           null_labels=[vl.null_labels(x) for x in vl.batches])
  assert report["conditioned_on"] == "each image's label"
  assert np.isfinite(report["bits_per_dim_uncond"])
  assert report["bits_per_dim"] != report["bits_per_dim_uncond"]
