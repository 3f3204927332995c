"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", EDM2: Section 3 and Appendix C; reference code NVlabs/edm2
training/phema.py and reconstruct_phema.py).

Training tracks power-function EMAs of the parameters, one per relative standard deviation
``training.posthoc_ema_sigma_rels`` (the paper's two: 0.05 and 0.10), and writes snapshots
of them every ``training.posthoc_ema_every_steps`` steps to ``<workdir>/posthoc_ema/<step>``.
Afterwards the EMA of any other relative length is a linear combination of the snapshots,
found by least squares over their averaging profiles (``reconstruct``): the EMA length is
chosen after training, without retraining.

Time is the optimizer's update count t (updates applied; skipped non-finite steps do not
advance it), and theta_t the parameters after update t. A power-function EMA with exponent
gamma averages theta over the profile p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on
[0, t] (eq. 121), whose relative standard deviation (its std over its length) is sigma_rel
(eq. 123). It is tracked with ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t,
beta_t = (1 - 1/t)^(gamma + 1) (eq. 127), which puts exactly the weight
(i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1) on theta_i (``step_weights``): the integral of
p_t over (i-1, i]. So a tracked EMA *is* the profile average of the piecewise-constant
trajectory theta(tau) = theta_i on (i-1, i], which makes the paper's continuous inner
products (eq. 151) exact for it.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from ddpm_jax import checkpoint as ckpt_lib
from ddpm_jax import config_lib, fs, parallel
from ddpm_jax import state as state_lib
from ddpm_jax.errors import ConfigError, NoCheckpointError, UserError

SNAPSHOT_DIR = "posthoc_ema"  # <workdir>/posthoc_ema/<step>/: orbax steps, never rotated
INFO_FILE = "posthoc_ema.json"  # in a reconstructed workdir: what it was made from
MAX_SIGMA_REL = float(np.sqrt(1 / 12))  # gamma -> 0 (a uniform average): sigma_rel -> 1/sqrt(12)


# ----------------------------------------------------------------------------- the math

def gamma_to_sigma_rel(gamma):
  """sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))) (EDM2 eq. 123)."""
  g = np.float64(gamma)
  return np.sqrt((g + 1) / (g + 2) ** 2 / (g + 3))


def sigma_rel_to_gamma(sigma_rel):
  """The exponent gamma of relative std ``sigma_rel``: the largest real root of
  gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0 (EDM2 eq. 126,
  Algorithm 2), eq. 123 squared and multiplied out. Scalars or arrays."""
  s = np.float64(sigma_rel)
  inv = s.reshape(-1) ** -2
  g = [np.roots([1, 7, 16 - x, 12 - x]).real.max() for x in inv]
  return np.float64(g).reshape(s.shape)


def beta(gamma, t):
  """beta_t = (1 - 1/t)^(gamma + 1) (EDM2 eq. 127): the decay of update t (t = 1, 2, ...);
  beta_1 = 0, so the EMA starts at theta_1."""
  return (1 - 1 / np.float64(t)) ** (np.float64(gamma) + 1)


def step_weights(t: int, gamma) -> np.ndarray:
  """The weights (i = 1..t) the per-step update (eq. 127) puts on theta_i after t updates:
  (1 - beta_i) prod_{j>i} beta_j = (i^(g+1) - (i-1)^(g+1)) / t^(g+1), since
  prod_{j=i+1..t} (1 - 1/j) = i/t. They sum to 1 (telescoping) and approach the paper's
  continuous weights (g+1) i^g / t^(g+1) as i grows."""
  i, g1 = np.arange(1, t + 1, dtype=np.float64), np.float64(gamma) + 1
  return (i ** g1 - (i - 1) ** g1) / np.float64(t) ** g1


def profile_inner(a_t, a_gamma, b_t, b_gamma):
  """<p_a, p_b> = integral over [0, min(a_t, b_t)] of two power-function profiles
  (EDM2 eq. 151, Algorithm 3): (g_a+1)(g_b+1) (a_t/b_t)^e / ((g_a+g_b+1) max(a_t, b_t)) with
  e = g_b if a_t < b_t else -g_a. Broadcasts."""
  a_t, b_t = np.float64(a_t), np.float64(b_t)
  ga, gb = np.float64(a_gamma), np.float64(b_gamma)
  e = np.where(a_t < b_t, gb, -ga)
  return (ga + 1) * (gb + 1) * (a_t / b_t) ** e / ((ga + gb + 1) * np.maximum(a_t, b_t))


def solve_coefficients(in_t, in_sigma_rel, out_t, out_sigma_rel) -> np.ndarray:
  """Coefficients X [n_in, n_out] with sum_i X[i, j] snapshot_i ~ the EMA of
  ``out_sigma_rel[j]`` at time ``out_t``: least squares in L2 over the profiles, i.e. the
  normal equations A X = B with A the snapshots' Gram matrix and B their inner products with
  the targets (EDM2 Algorithm 3, eqs. 146-151); each column is then scaled to sum to 1 (the
  reference code's normalisation: the result is an average, whatever the residual)."""
  in_t, in_s = np.broadcast_arrays(np.float64(in_t), np.float64(in_sigma_rel))
  out_t, out_s = np.broadcast_arrays(np.float64(out_t), np.float64(out_sigma_rel))
  col = lambda x: x.reshape(-1, 1)  # noqa: E731
  row = lambda x: x.reshape(1, -1)  # noqa: E731
  in_g, out_g = sigma_rel_to_gamma(in_s), sigma_rel_to_gamma(out_s)
  A = profile_inner(col(in_t), col(in_g), row(in_t), row(in_g))
  B = profile_inner(col(in_t), col(in_g), row(out_t), row(out_g))
  X = np.linalg.solve(A, B)
  return X / X.sum(axis=0, keepdims=True)


def update(profiles, params, count, gammas):
  """The power-function EMAs after the update that follows ``count`` applied updates
  (t = count + 1, eq. 127), inside the train step. 1 - beta is computed as
  -expm1((g+1) log1p(-1/t)): ``1 - (1 - 1/t)^(g+1)`` loses all its digits in float32 once
  1/t nears the float32 epsilon (t ~ 1e6 steps: a 6% error in the new parameters' weight)."""
  t = jnp.asarray(count).astype(jnp.float32) + 1.0
  out = []
  for prof, g in zip(profiles, gammas):
    log_beta = (float(g) + 1.0) * jnp.log1p(-1.0 / t)  # -inf at t = 1: beta 0, weight 1
    b, w = jnp.exp(log_beta), -jnp.expm1(log_beta)
    out.append(jax.tree.map(lambda e, p: b * e + w * p, prof, params))  # noqa: B023
  return tuple(out)


# ----------------------------------------------------------------------------- config

def sigma_rels(config) -> tuple:
  """The tracked relative stds (``training.posthoc_ema_sigma_rels``); () when off."""
  return tuple(float(s) for s in config.training.posthoc_ema_sigma_rels)


def gammas(config) -> tuple:
  return tuple(float(g) for g in sigma_rel_to_gamma(np.array(sigma_rels(config))))


def check_sigma_rel(s: float, what: str) -> None:
  if not 0 < s < MAX_SIGMA_REL:
    raise ConfigError(f"{what}={s!r}: a relative EMA length must lie in (0, "
                      f"{MAX_SIGMA_REL:.4f}) (EDM2 uses 0.05 and 0.10)")


def check_config(config) -> None:
  """Raises ConfigError for unusable post-hoc EMA settings (nothing to check when off)."""
  rels = sigma_rels(config)
  if not rels:
    return
  for s in rels:
    check_sigma_rel(s, "training.posthoc_ema_sigma_rels")
  if len(set(rels)) != len(rels):
    raise ConfigError(f"training.posthoc_ema_sigma_rels={rels} repeats a value: each profile "
                      f"must differ, or the reconstruction has no unique solution")
  every, k = int(config.training.posthoc_ema_every_steps), config.training.steps_per_dispatch
  if every < 1 or every % k:
    raise ConfigError(f"training.posthoc_ema_every_steps={every} must be a positive multiple "
                      f"of training.steps_per_dispatch ({k})")


def check_resume(config, saved) -> None:
  """A run resumes only with the post-hoc EMA profiles it was started with (``saved``: the
  checkpoint's config dict): the profiles average the whole history from step 0."""
  old = tuple(float(s) for s in saved.get("training", {}).get("posthoc_ema_sigma_rels", ()))
  new = sigma_rels(config)
  if old != new:
    raise ConfigError(
        f"the workdir's checkpoint was made with training.posthoc_ema_sigma_rels={old} but the "
        f"config has {new}: post-hoc EMA profiles average the run from step 0, so they cannot "
        f"be added, dropped or changed mid-run; use another --workdir or set "
        f"--config.training.posthoc_ema_sigma_rels='{old}'")


# ----------------------------------------------------------------------------- snapshots

def snapshot_dir(workdir: str) -> str:
  return fs.join(fs.normalize(workdir), SNAPSHOT_DIR)


def _manager(workdir: str, read_only: bool) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None, create=not read_only, read_only=read_only,
      enable_async_checkpointing=False, **({"save_interval_steps": 0} if read_only else {}))
  return ocp.CheckpointManager(snapshot_dir(workdir), options=options, item_handlers={
      "profiles": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})


class Snapshots:
  """Writes the tracked profiles every ``posthoc_ema_every_steps`` steps and at the end.

  Each is an orbax step (written to a temporary folder and renamed when complete, local or
  gs://), saved synchronously before the checkpoint of the same step: every snapshot up to
  the newest checkpoint is on disk whole, and a resumed run (which starts at that
  checkpoint) rewrites the later ones, from the same state, bit for bit. A step already
  there (written by a run that was killed after it) is replaced, never duplicated."""

  def __init__(self, config, workdir: str):
    check_config(config)
    self.every = int(config.training.posthoc_ema_every_steps)
    self.last = int(config.training.num_train_steps)
    self.sigma_rels = sigma_rels(config)
    self.mngr = _manager(workdir, read_only=False)

  @classmethod
  def for_run(cls, config, workdir: str) -> Snapshots | None:
    return cls(config, workdir) if sigma_rels(config) else None

  def due(self, step: int) -> bool:
    return step % self.every == 0 or step >= self.last

  def save(self, step: int, host_state) -> None:
    """Writes the snapshot of ``step`` (every process takes part: an orbax save)."""
    meta = dict(step=int(step), updates=int(state_lib.updates_applied(host_state.opt_state)),
                sigma_rels=list(self.sigma_rels))
    if step in self.mngr.all_steps():
      self.mngr.delete(step)
    self.mngr.save(step, args=ocp.args.Composite(
        profiles=ocp.args.StandardSave(tuple(host_state.posthoc_ema)),
        meta=ocp.args.JsonSave(meta)), force=True)
    self.mngr.wait_until_finished()


def snapshot_steps(workdir: str) -> list[int]:
  """The steps of ``workdir``'s post-hoc EMA snapshots, oldest first ([] if none)."""
  if not fs.exists(snapshot_dir(workdir)):
    return []
  return sorted(_manager(workdir, read_only=True).all_steps())


def read_meta(workdir: str, steps=None) -> list[dict]:
  """Each snapshot's {step, updates, sigma_rels}, oldest first."""
  mngr = _manager(workdir, read_only=True)
  steps = sorted(mngr.all_steps()) if steps is None else steps
  return [dict(mngr.restore(s, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
          for s in steps]


def read_profiles(config, workdir: str, step: int) -> tuple:
  """The snapshot of ``step``: one parameter tree per tracked sigma_rel (host numpy)."""
  mngr = _manager(workdir, read_only=True)
  n = len(read_meta(workdir, [step])[0]["sigma_rels"])
  params = state_lib.abstract_train_state(_without_posthoc(config)).params
  target = tuple(params for _ in range(n))
  restored = mngr.restore(step, args=ocp.args.Composite(
      profiles=ocp.args.StandardRestore(target)))
  return tuple(jax.device_get(restored.profiles))


# ----------------------------------------------------------------------------- reconstruction

def reconstruct_params(config, workdir: str, sigma_rels_out, step: int | None = None,
                       from_sigma_rels=None):
  """(list of parameter trees, info): the EMA of each of ``sigma_rels_out`` at snapshot
  ``step`` (default: the newest), from the snapshots up to it, in one pass over them.
  ``from_sigma_rels``: use only the tracked profiles of these lengths (default: all).

  For a sweep (``eval`` over several lengths) pass them all: each snapshot is read once.
  ``info``: {step, updates, sigma_rels, snapshots: [[step, sigma_rel, coefficient per
  output], ...]}. Raises NoCheckpointError when the run has no snapshots."""
  outs = [float(s) for s in sigma_rels_out]
  for s in outs:
    check_sigma_rel(s, "sigma_rel")
  metas = read_meta(workdir) if snapshot_steps(workdir) else []
  if not metas:
    raise NoCheckpointError(f"no post-hoc EMA snapshots in {snapshot_dir(workdir)!r}: train "
                            f"with --config.training.posthoc_ema_sigma_rels='(0.05, 0.1)'")
  steps = [m["step"] for m in metas]
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise UserError(f"no post-hoc EMA snapshot of step {step} in {snapshot_dir(workdir)!r} "
                    f"(there are: {', '.join(map(str, steps))})")
  out_t = next(m["updates"] for m in metas if m["step"] == step)
  used = [m for m in metas if m["step"] <= step and m["updates"] > 0]  # t = 0: no profile yet
  if not used:
    raise UserError(f"the post-hoc EMA snapshots of {workdir!r} up to step {step} were all "
                    f"taken before the first applied update: nothing to average")
  keep = lambda s: from_sigma_rels is None or any(  # noqa: E731
      np.isclose(s, f) for f in from_sigma_rels)
  inputs = [(m, j, s) for m in used for j, s in enumerate(m["sigma_rels"]) if keep(s)]
  if not inputs:
    raise UserError(f"no snapshot of {workdir!r} tracks the profiles {from_sigma_rels}")
  X = solve_coefficients([m["updates"] for m, _, _ in inputs], [s for _, _, s in inputs],
                         out_t, outs)
  acc, row = None, 0
  for m in used:
    profs = read_profiles(config, workdir, m["step"])
    for prof in (profs[j] for mm, j, _ in inputs if mm is m):
      c = X[row]
      row += 1
      terms = [jax.tree.map(lambda p, ci=ci: ci * np.asarray(p, np.float64), prof) for ci in c]
      acc = terms if acc is None else [jax.tree.map(np.add, a, b) for a, b in zip(acc, terms)]
  params = [jax.tree.map(lambda a: a.astype(np.float32), a) for a in acc]
  info = dict(step=step, updates=int(out_t), sigma_rels=outs,
              snapshots=[[m["step"], s, *X[i].tolist()] for i, (m, _, s) in enumerate(inputs)])
  return params, info


def _without_posthoc(config):
  """A copy of ``config`` (its missing fields filled in) with post-hoc EMA off."""
  c = config_lib.with_defaults(config)
  c.training.posthoc_ema_sigma_rels = ()
  return c


def reconstruct(config, workdir: str, sigma_rel: float, out_workdir: str,
                step: int | None = None, from_sigma_rels=None) -> dict:
  """Writes ``out_workdir``: the run's config (post-hoc EMA off) and one checkpoint, at the
  snapshot's step, whose ``ema_params`` (and ``params``: the raw weights stay in the run's
  own checkpoints) are the EMA of relative length ``sigma_rel`` reconstructed from
  ``workdir``'s snapshots, and ``posthoc_ema.json`` saying how. --mode=sample/eval/export
  read it as any workdir. ``config``: the run's (its newest checkpoint's). Returns the info
  written. Single-process (run it on one host)."""
  workdir, out_workdir = fs.normalize(workdir), fs.normalize(out_workdir)
  if out_workdir == workdir:
    raise UserError("the reconstruction needs its own output workdir, not the run's")
  out_mngr = ckpt_lib.make_manager(out_workdir, max_to_keep=None, async_save=False)
  if out_mngr.all_steps():
    raise UserError(f"{ckpt_lib.checkpoint_dir(out_workdir)!r} already holds checkpoints: "
                    f"choose an empty output workdir")
  (params,), info = reconstruct_params(config, workdir, [sigma_rel], step, from_sigma_rels)
  out_config = _without_posthoc(config)
  tx = state_lib.make_optimizer(out_config)
  st = state_lib.TrainState(step=np.asarray(info["step"], np.int32), params=params,
                            ema_params=params, opt_state=jax.device_get(tx.init(params)))
  ckpt_lib.save(out_mngr, info["step"], st, out_config, force=True)
  out_mngr.wait_until_finished()
  info = dict(info, workdir=workdir, sigma_rel=float(sigma_rel))
  ckpt_lib.write_config_json(out_workdir, out_config)
  fs.write_text(fs.join(out_workdir, INFO_FILE), json.dumps(info, indent=1))
  if parallel.is_main():
    logging.info("post-hoc EMA sigma_rel=%g at step %d from %d snapshots written to %s",
                 sigma_rel, info["step"], len(info["snapshots"]), out_workdir)
  return info
