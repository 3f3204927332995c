"""Post-hoc EMA (EDM2): the paper's formulas, the tracked profiles against the parameter
history, the reconstruction against a directly tracked EMA, snapshots across a kill."""

import json
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ddpm_jax import checkpoint as ckpt_lib
from ddpm_jax import datasets, diffusion, evaluate, models, parallel, train
from ddpm_jax import posthoc_ema as pe
from ddpm_jax import state as state_lib
from ddpm_jax.errors import ConfigError
from tests import cli
from tests.conftest import tiny_config


def test_gamma_and_sigma_rel_round_trip_and_match_the_profiles_own_std():
  rels = np.array([0.01, 0.05, 0.075, 0.10, 0.20, 0.28])
  gammas = pe.sigma_rel_to_gamma(rels)
  np.testing.assert_allclose(pe.gamma_to_sigma_rel(gammas), rels, rtol=1e-10)
  # the paper's pair (EDM2 Sec. 3: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94)
  np.testing.assert_allclose(pe.sigma_rel_to_gamma(np.array([0.05, 0.10])), [16.97, 6.94],
                             atol=0.005)
  # sigma_rel is the std of the profile p(tau) = (g+1) tau^g on [0, 1] (its length 1),
  # by quadrature, independent of eq. 123's closed form
  tau = (np.arange(200_000) + 0.5) / 200_000
  for g, s in zip(gammas, rels):
    p = (g + 1) * tau ** g / 200_000
    mean = np.sum(p * tau)
    np.testing.assert_allclose(np.sqrt(np.sum(p * (tau - mean) ** 2)), s, rtol=1e-4)


def test_profile_inner_products_match_quadrature():
  """EDM2 eq. 151 against the integral of two profiles p_t(tau) = (g+1) tau^g / t^(g+1)."""
  tau = (np.arange(400_000) + 0.5) / 400_000 * 50
  p = lambda t, g: np.where(tau <= t, (g + 1) * tau ** g / t ** (g + 1), 0.0)  # noqa: E731
  pairs = [((20, 6.9), (50, 16.9)), ((50, 6.9), (20, 16.9)), ((30, 3.0), (30, 9.0))]
  for (a, ga), (b, gb) in pairs:
    quad = np.sum(p(a, ga) * p(b, gb)) * (50 / 400_000)
    np.testing.assert_allclose(pe.profile_inner(a, ga, b, gb), quad, rtol=1e-4)


def test_tracked_power_ema_is_the_explicit_weighted_average_of_the_history():
  """After t updates the per-step EMA (eq. 127) is sum_i w_i theta_i with
  w_i = (i^(g+1) - (i-1)^(g+1)) / t^(g+1), the integral of (g+1) tau^g / t^(g+1) over (i-1, i]."""
  rng = np.random.default_rng(0)
  T, g = 40, pe.sigma_rel_to_gamma(0.10)
  history = rng.normal(size=(T, 5)).cumsum(0)  # a drifting trajectory theta_1..theta_T
  upd = jax.jit(lambda prof, p, c: pe.update(prof, p, c, (g,)))
  prof = (np.zeros(5, np.float32),)
  for i in range(T):
    prof = upd(prof, history[i].astype(np.float32), np.int32(i))
  w = pe.step_weights(T, g)
  np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-12)
  np.testing.assert_allclose(prof[0], w @ history, rtol=2e-5, atol=2e-5)
  # the weights approach the paper's continuous ones, (g+1) i^g / t^(g+1)
  np.testing.assert_allclose(w[-1], (g + 1) * T ** g / T ** (g + 1), rtol=0.25)


def test_the_new_parameters_weight_stays_exact_late_in_a_run():
  """1 - beta_t at t ~ 2e6 in float32: the naive 1 - (1 - 1/t)^(g+1) rounds 1 - 1/t."""
  g = pe.sigma_rel_to_gamma(0.05)
  for count in (2_000_000, 5_000_000):
    new = pe.update((np.float32(0.0),), np.float32(1.0), np.int32(count), (g,))[0]
    np.testing.assert_allclose(new, 1 - pe.beta(g, count + 1), rtol=1e-5)


def test_reconstructing_a_tracked_profile_picks_its_own_snapshot():
  ts = np.repeat([10, 20, 30, 40], 2)
  rels = np.tile([0.05, 0.10], 4)
  X = pe.solve_coefficients(ts, rels, 40, [0.10, 0.05])
  np.testing.assert_allclose(X[:, 0], np.eye(8)[7], atol=1e-9)
  np.testing.assert_allclose(X[:, 1], np.eye(8)[6], atol=1e-9)


# ----------------------------------------------------------------------------- a real run

RELS = (0.05, 0.10, 0.075)  # two profiles as the paper's, and a third tracked directly
RUN = {"training.posthoc_ema_sigma_rels": RELS, "training.posthoc_ema_every_steps": 2,
       "training.num_train_steps": 6, "training.checkpoint_every_steps": 3,
       "training.keep_checkpoints": 0}


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def test_reconstruction_equals_a_directly_tracked_ema_on_a_short_run():
  """The real (pmapped: the trainer's program, compiled once for this file) train step tracks
  0.05, 0.10 and, directly, 0.075; 0.075 reconstructed from the others' snapshots matches it
  within the bound the least-squares residual allows: with r the residual step weights (they
  sum to 0), |recon - direct| <= ||r||_1 * range(theta) / 2 per coordinate. One step is
  non-finite: it must not advance the profiles."""
  config = tiny_config(**RUN)
  model = models.create_model(config)
  schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
  tx = state_lib.make_optimizer(config)
  state_r = parallel.replicate(state_lib.create_train_state(config, model, tx,
                                                            jax.random.key(0)))
  p_step = train.make_p_train_step(config, model, schedule, tx)
  requests = parallel.requests_array()
  rng = np.random.default_rng(0)
  history, snaps = [], []
  for i in range(40):
    x = rng.uniform(-1, 1, (4, 1, 2, 8, 8, 3)).astype(np.float32)  # [devices, k, B/dev, ...]
    if i == 15:
      x[0, 0, 0, 0, 0, 0] = np.nan
      before = parallel.unreplicate(state_r.posthoc_ema)
    state_r, m, _ = p_step(state_r, parallel.shard(x), jax.random.key(1), requests)
    state = parallel.unreplicate(state_r)
    if i == 15:
      assert int(np.asarray(m["skipped"])[0, 0]) == 1
      for a, b in zip(jax.tree.leaves(state.posthoc_ema), jax.tree.leaves(before)):
        np.testing.assert_array_equal(a, b)
      continue
    history.append(_flat(state.params))
    if len(history) % 6 == 0 or i == 39:
      snaps.append((len(history), [_flat(p) for p in state.posthoc_ema[:2]]))
  history = np.stack(history).astype(np.float64)
  T = len(history)
  assert T == 39 == int(state_lib.updates_applied(state.opt_state))
  g = pe.sigma_rel_to_gamma(np.array(RELS))
  direct = _flat(state.posthoc_ema[2])
  np.testing.assert_allclose(direct, pe.step_weights(T, g[2]) @ history, rtol=1e-5, atol=1e-6)
  in_t = [t for t, _ in snaps for _ in range(2)]
  in_s = [0.05, 0.10] * len(snaps)
  profs = [p for _, ps in snaps for p in ps]
  X = pe.solve_coefficients(in_t, in_s, T, [0.075])[:, 0]
  recon = sum(x * p.astype(np.float64) for x, p in zip(X, profs))
  W = np.zeros(T)
  for x, t, s in zip(X, in_t, in_s):
    W[:t] += x * pe.step_weights(t, pe.sigma_rel_to_gamma(s))
  r = W - pe.step_weights(T, g[2])
  assert np.abs(r).sum() < 0.05  # the two profiles' snapshots span the target closely
  bound = np.abs(r).sum() * np.ptp(history, axis=0) / 2 + 1e-6  # + float32 rounding
  assert np.all(np.abs(recon - direct) <= bound)
  assert np.abs(recon - direct).max() < 0.1 * np.abs(_flat(state.posthoc_ema[1]) - direct).max()


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, data_dir):
  """An uninterrupted 6-step run: snapshots 2, 4, 6; checkpoints 3, 6."""
  config = tiny_config(**{"data.data_dir": data_dir, **RUN})
  workdir = str(tmp_path_factory.mktemp("phema") / "full")
  return config, workdir, train.train_and_evaluate(config, workdir)


def _snapshots(config, workdir):
  return {s: pe.read_profiles(config, workdir, s) for s in pe.snapshot_steps(workdir)}


def test_snapshots_survive_a_kill_and_resume_bitwise(full_run, tmp_path):
  """A run killed after checkpoint 3, with snapshot 6 half-written and snapshot 4 written (here
  with other values, to see it rewritten), resumes to the uninterrupted run's snapshots and
  state bit for bit: nothing lost, nothing duplicated."""
  config, full, full_state = full_run
  killed = str(tmp_path / "killed")
  shutil.copytree(full, killed)
  shutil.rmtree(os.path.join(killed, "checkpoints", "6"))
  snap = os.path.join(killed, pe.SNAPSHOT_DIR)
  os.rename(os.path.join(snap, "6"), os.path.join(snap, "6.orbax-checkpoint-tmp-1"))
  mngr = pe._manager(killed, read_only=False)
  four = pe.read_profiles(config, killed, 4)
  meta = pe.read_meta(killed, [4])[0]
  mngr.delete(4)
  mngr.save(4, args=ocp.args.Composite(
      profiles=ocp.args.StandardSave(jax.tree.map(lambda x: x + 1, four)),
      meta=ocp.args.JsonSave(meta)), force=True)
  mngr.wait_until_finished()
  resumed = train.train_and_evaluate(config, killed)
  assert pe.snapshot_steps(killed) == pe.snapshot_steps(full) == [2, 4, 6]
  assert pe.read_meta(killed) == pe.read_meta(full)
  a, b = _snapshots(config, killed), _snapshots(config, full)
  for s in (2, 4, 6):
    for x, y in zip(jax.tree.leaves(a[s]), jax.tree.leaves(b[s])):
      np.testing.assert_array_equal(x, y)
  assert isinstance(resumed, state_lib.PosthocTrainState)
  for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(full_state)):
    np.testing.assert_array_equal(x, y)


def test_reconstruct_writes_a_workdir_that_sampling_reads(full_run, tmp_path):
  config, full, full_state = full_run
  out = str(tmp_path / "out")
  info = pe.reconstruct(config, full, 0.10, out)
  assert info["step"] == 6 and info["updates"] == 6
  saved = json.loads(open(os.path.join(out, "config.json")).read())
  assert saved["training"]["posthoc_ema_sigma_rels"] == []
  out_config, _ = ckpt_lib.newest_config(ckpt_lib.make_manager(out, read_only=True), out)
  params, step = ckpt_lib.load_params(out_config, out)
  assert step == 6
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(full_state.posthoc_ema[1])):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)  # its own snapshot, coefficient 1
  # 0.075 from the 0.05 and 0.10 snapshots: the solved combination of the stored profiles,
  # nearer the directly tracked 0.075 than either input is
  (mid,), info = pe.reconstruct_params(config, full, [0.075], from_sigma_rels=(0.05, 0.10))
  assert [row[:2] for row in info["snapshots"]] == [[s, r] for s in (2, 4, 6)
                                                    for r in (0.05, 0.10)]
  X = pe.solve_coefficients([2, 2, 4, 4, 6, 6], [0.05, 0.10] * 3, 6, [0.075])[:, 0]
  want = sum(x * _flat(p[j]).astype(np.float64) for x, (p, j) in zip(
      X, [(pe.read_profiles(config, full, s), j) for s in (2, 4, 6) for j in (0, 1)]))
  np.testing.assert_allclose(_flat(mid), want, rtol=1e-6, atol=1e-7)
  direct = _flat(full_state.posthoc_ema[2])
  err = np.abs(_flat(mid) - direct).max()
  assert err < min(np.abs(_flat(p) - direct).max() for p in full_state.posthoc_ema[:2])


def test_the_mode_writes_the_reconstruction_where_it_says(full_run, tmp_path):
  """``--mode=posthoc_ema --sigma_rel=0.1`` prints its new workdir (the default under the run)
  last, and that workdir's checkpoint is ``reconstruct``'s: the tracked 0.10 profile."""
  config, full, full_state = full_run
  job = cli.run(cli.main_py("--mode=posthoc_ema", "--workdir", full, "--sigma_rel=0.1",
                            cwd=tmp_path), timeout=300)
  out = os.path.join(full, "posthoc_ema_0.1")
  assert job.output.strip().splitlines()[-1] == out, job.output[-2000:]
  out_config, _ = ckpt_lib.newest_config(ckpt_lib.make_manager(out, read_only=True), out)
  params, step = ckpt_lib.load_params(out_config, out)
  assert step == 6
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(full_state.posthoc_ema[1])):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_eval_sweeps_lengths_as_evaluating_each_reconstruction_would(full_run, tmp_path,
                                                                     monkeypatch):
  """``eval.posthoc_ema_sigma_rels``: one report per length, each equal to evaluating that
  length's reconstructed workdir as a plain checkpoint (the same bound, loss and samples);
  the summary ranks the lengths by the best number they all have. The data is prepared once
  for the whole call, its held-out and training splits opened from it (with a gs:// data_dir
  each preparation is a step all processes take together)."""
  config, full, _ = full_run
  sweep = str(tmp_path / "sweep")
  shutil.copytree(full, sweep)
  c = tiny_config(**{"data.data_dir": config.data.data_dir, **RUN,
                     "eval.posthoc_ema_sigma_rels": (0.10, 0.05), "eval.checkpoints": "none",
                     "eval.num_samples": 8})
  prepared = []
  get_builder = datasets.get_builder
  monkeypatch.setattr(datasets, "get_builder", lambda cfg: prepared.append(1) or get_builder(cfg))
  reports = evaluate.evaluate(c, sweep)
  assert len(prepared) == 1
  monkeypatch.undo()
  assert [r["posthoc_ema"]["sigma_rel"] for r in reports] == [0.10, 0.05]
  pe.reconstruct(config, full, 0.05, str(tmp_path / "r05"))
  plain = tiny_config(**{"data.data_dir": config.data.data_dir,  # the bound only: no sampler
                         "eval.num_samples": 0})
  (direct,) = evaluate.evaluate(plain, str(tmp_path / "r05"))
  for k in ("bits_per_dim", "bits_per_dim_stderr", "val_loss_per_t_bucket"):
    assert reports[1][k] == direct[k], k
  assert reports[0]["bits_per_dim"] != reports[1]["bits_per_dim"]  # two different models
  summary = json.loads(open(os.path.join(sweep, "eval", "6_posthoc_ema.json")).read())
  ranked = [row[summary["ranked_by"]] for row in summary["lengths"]]
  assert summary["ranked_by"] == "fd_random_conv" and ranked == sorted(ranked)
  assert sorted(row["sigma_rel"] for row in summary["lengths"]) == [0.05, 0.10]
  for s in ("0.1", "0.05"):
    assert os.path.exists(os.path.join(sweep, "eval", f"6_posthoc_ema_{s}.json"))


def test_the_profiles_cannot_change_mid_run(full_run, tmp_path):
  config, full, _ = full_run
  other = tiny_config(**{"data.data_dir": config.data.data_dir, **RUN,
                         "training.posthoc_ema_sigma_rels": (0.05, 0.2)})
  with pytest.raises(ConfigError, match="posthoc_ema_sigma_rels=.*mid-run"):
    train.train_and_evaluate(other, full)


def test_off_by_default_the_train_state_is_unchanged():
  """Checkpoints of runs without post-hoc EMA keep their exact pytree."""
  st = state_lib.abstract_train_state(tiny_config())
  assert type(st) is state_lib.TrainState
  assert ckpt_lib._paths_top(st) == ["ema_params", "opt_state", "params", "step"]


@pytest.mark.parametrize("bad,match", [
    ({"training.posthoc_ema_sigma_rels": (0.05, 0.3)}, r"lie in \(0, 0.2887\)"),
    ({"training.posthoc_ema_sigma_rels": (0.1, 0.1)}, "repeats a value"),
    ({"training.posthoc_ema_sigma_rels": (0.1,), "training.posthoc_ema_every_steps": 3,
      "training.steps_per_dispatch": 2}, "positive multiple of training.steps_per_dispatch"),
])
def test_bad_settings_fail_with_one_line(bad, match):
  with pytest.raises(ConfigError, match=match) as e:
    pe.check_config(tiny_config(**bad))
  assert "\n" not in str(e.value)
