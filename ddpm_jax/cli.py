"""The command line: train, sample, and the other modes of ``MODES``.

  ddpm-jax --config configs/quickstart.py --workdir runs/quickstart
  ddpm-jax --mode=sample --workdir runs/quickstart

(``python main.py ...`` in a clone is the same command.) Modes other than train use the
config saved with the workdir's checkpoint unless --config is given; ``--config.a.b=value``
flags override its fields either way. Every process of a multi-host job runs the same command
(see README). Errors are triaged by type: a ``UserError`` is one line and exit 1, a stop
during start-up (``StoppedEarly``) one line and exit 0, a lost peer of a multi-process job
one line and exit 1; anything else is a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import run_utils


@dataclasses.dataclass(frozen=True)
class Mode:
  """One mode of the command line. ``run(config, workdir)`` returns the line process 0 prints
  last (where the outputs are), or None. ``own_config``: the --config file (or the default)
  is the config, never the workdir's saved one. ``one_process``: refused under the launcher."""
  help: str
  run: Callable
  own_config: bool = False
  one_process: bool = False


def _train(config, workdir):
  from ddpm_jax import train
  train.train_and_evaluate(config, workdir)


def _prepare(config, workdir):
  from ddpm_jax import datasets
  del workdir
  return datasets.prepare(config)  # where the records are


def _distill(config, workdir):
  from ddpm_jax import distill
  return distill.distill(config, workdir, _overrides())  # the last student's workdir


def _consistency(config, workdir):
  from ddpm_jax import consistency_tuning
  return consistency_tuning.tune(config, workdir, _overrides())  # the tuned workdir


def _eval(config, workdir):
  from ddpm_jax import evaluate
  evaluate.evaluate(config, workdir)


def _export(config, workdir):
  from ddpm_jax import diffusers_io, fs
  out = FLAGS.out or fs.join(fs.normalize(workdir), "diffusers")
  return diffusers_io.export_pipeline(config, workdir, out, use_ema=config.sampling.use_ema)


def _import(config, workdir):
  from ddpm_jax import diffusers_io, fs
  from ddpm_jax.errors import ConfigError
  del config
  if not FLAGS.model:
    raise ConfigError("--mode=import needs --model=DIR, a diffusers pipeline folder or its "
                      "unet/ folder")
  diffusers_io.import_unet(FLAGS.model, workdir)
  return fs.normalize(workdir)  # the new workdir


def _posthoc_ema(config, workdir):
  from ddpm_jax import fs, posthoc_ema
  from ddpm_jax.errors import ConfigError
  if FLAGS.sigma_rel is None:
    raise ConfigError("--mode=posthoc_ema needs --sigma_rel=S, the relative EMA length to "
                      "reconstruct (e.g. 0.1; EDM2's best lie in 0.02-0.2)")
  workdir = fs.normalize(workdir)
  out = FLAGS.out or fs.join(workdir, f"posthoc_ema_{FLAGS.sigma_rel:g}")
  posthoc_ema.reconstruct(config, workdir, FLAGS.sigma_rel, out)
  return fs.normalize(out)  # the new workdir: --mode=sample/eval/export read it


def _generation(name: str) -> Callable:
  """A mode of ``ddpm_jax.modes`` (imported when it runs): returns where the files are."""
  def run(config, workdir):
    from ddpm_jax import modes
    return modes.MODES[name](config, workdir)
  return run


MODES = {
    "train": Mode("train, resuming from the workdir's newest checkpoint", _train,
                  own_config=True),
    "sample": Mode("grid, PNGs, NPZ and denoising GIFs", _generation("sample")),
    "interpolate": Mode("slerp between noise seeds", _generation("interpolate")),
    "reconstruct": Mode("DDIM inversion of held-out images and back",
                        _generation("reconstruct")),
    "inpaint": Mode("fill masked regions of sampling.inputs (RePaint)", _generation("inpaint")),
    "img2img": Mode("SDEdit: noise sampling.inputs to sampling.strength and denoise",
                    _generation("img2img")),
    "interpolate_images": Mode("DDIM-invert pairs of sampling.inputs, slerp, decode",
                               _generation("interpolate_images")),
    "eval": Mode("bits/dim, per-timestep loss, sample metrics (FID given Inception weights)",
                 _eval),
    "prepare": Mode("prepare data.dataset's records into data.data_dir (local or gs://) and "
                    "stop", _prepare, own_config=True),
    "distill": Mode("progressive distillation of distill.teacher into <workdir>/steps<N> "
                    "students", _distill, own_config=True),
    "consistency": Mode("consistency tuning (ECT) of consistency.teacher into a 1-2 call "
                        "model in the workdir", _consistency, own_config=True),
    "export": Mode("the workdir's model as a diffusers DDPMPipeline folder (--out; EMA unless "
                   "--config.sampling.use_ema=false)", _export, one_process=True),
    "posthoc_ema": Mode("the EMA of relative length --sigma_rel reconstructed from the run's "
                        "post-hoc EMA snapshots, as a new workdir (--out; "
                        "<workdir>/posthoc_ema_<sigma_rel>)", _posthoc_ema, one_process=True),
    "import": Mode("a diffusers UNet2DModel folder (--model) as a new workdir's step-0 "
                   "checkpoint", _import, own_config=True, one_process=True),
}

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                               "configs", "default.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file.", lock_config=False)
flags.DEFINE_string("workdir", "runs/", "Run folder (local or gs://): checkpoints, logs, samples.")
flags.DEFINE_string("out", None, "--mode=export: the pipeline folder (<workdir>/diffusers); "
                    "--mode=posthoc_ema: the new workdir.")
flags.DEFINE_float("sigma_rel", None, "--mode=posthoc_ema: the relative EMA length to make.")
flags.DEFINE_string("model", None, "--mode=import: a diffusers pipeline or UNet2DModel folder.")
flags.DEFINE_enum("mode", "train", list(MODES),
                  "; ".join(f"{k}: {m.help}" for k, m in MODES.items()))
FLAGS = flags.FLAGS


def _overrides() -> dict:
  """The command line's ``--config.a.b=value`` flags, as {"a.b": value}."""
  return config_flags.get_override_values(FLAGS["config"])


def _config(mode: Mode):
  """The --config file, or for a mode that reads the workdir's run without --config, the
  workdir's saved config (fields added since filled in) with the command line's overrides;
  either with every field of ``configs/default.py`` (each mode completes and validates it)."""
  from ddpm_jax import checkpoint as ckpt_lib
  from ddpm_jax import config_lib
  if mode.own_config or FLAGS["config"].present:
    return config_lib.with_defaults(FLAGS.config)
  config = ckpt_lib.saved_config(FLAGS.workdir)  # fields added since: the defaults
  config_lib.apply_overrides(config, _overrides())
  return config


def _run(name: str, config, workdir: str) -> None:
  import jax

  from ddpm_jax import parallel
  from ddpm_jax.errors import ConfigError
  mode = MODES[name]
  if mode.one_process and jax.process_count() > 1:
    raise ConfigError(f"--mode={name} runs on one process: run it on one host, without the "
                      f"launcher")
  out = mode.run(config, workdir)
  if out is not None and (mode.one_process or parallel.is_main()):
    print(out)  # the last line: where the outputs are


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run_utils.quiet_libraries(FLAGS.verbosity)
  from ddpm_jax import parallel
  parallel.initialize_distributed()
  import jax

  from ddpm_jax.errors import LOCKED_EXIT_STATUS, StoppedEarly, UserError, WorkdirLocked
  logging.info("JAX %s: %d processes, %d devices (%s)", jax.__version__, jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  multi = jax.process_count() > 1
  try:
    from ddpm_jax import tpu_vm
    tpu_vm.check_backend(FLAGS.mode)  # no training on the host CPU of a TPU VM
    config = _config(MODES[FLAGS.mode])
    if config.training.compilation_cache:
      run_utils.enable_compilation_cache()  # sampling modes reuse compiled samplers too
    _run(FLAGS.mode, config, FLAGS.workdir)
  except WorkdirLocked as e:  # "try again later": the pod runner waits for a stale lock
    _exit(f"error: {e}", multi=multi, status=LOCKED_EXIT_STATUS, together=True)
  except UserError as e:
    _exit(f"error: {e}", multi=multi, together=True)
  except StoppedEarly as e:
    # Mid-way through start-up (TensorFlow half imported, compiles, data threads) interpreter
    # shutdown took 5-20 s and crashed (exit 139); before the first step nothing is being
    # saved and the lock is released, so leave at once.
    _exit(f"warning: {e}", multi=multi, status=0, together=True, at_once=True)
  except BaseException as e:
    if not multi:
      raise
    where = f"process {jax.process_index()} of {jax.process_count()}"
    rerun = ("once every process has stopped, rerun the same command on every host to resume "
             "from the last checkpoint")
    if lost_a_peer(e):
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      _exit(f"error: {where} lost contact with another process of this job, which probably "
            f"died (see its log): {first[:300]}; {rerun}", multi=True)
    import traceback
    traceback.print_exc()
    _exit(f"error: {where} failed (above); {rerun}", multi=True)


# What the runtime says when a collective or the coordination service loses a peer. JAX raises
# these as its runtime error type (``jax.errors.JaxRuntimeError``) with the transport's words.
_PEER_LOST = ("Gloo", "Connection closed by peer", "Connection reset by peer",
              "coordination service", "DEADLINE_EXCEEDED", "UNAVAILABLE")


def lost_a_peer(e: BaseException) -> bool:
  """A failed collective or coordination-service call: another process went away. Only JAX's
  runtime errors (and the RuntimeError they derive from) are read; nothing else is a peer."""
  if not isinstance(e, RuntimeError):
    return False
  text = f"{type(e).__name__}: {e}"
  return any(s in text for s in _PEER_LOST)


def _exit(message: str, multi: bool, status: int = 1, together: bool = False,
          at_once: bool = False) -> None:
  """One line on stderr, exit ``status``. With several processes, skip the shutdown barrier:
  a peer that died or went another way would hold it for minutes. ``together``: an outcome
  every process shares; process 0 leaves last (see ``parallel.leave_together``).
  ``at_once``: skip interpreter shutdown too (``os._exit`` after flushing logs)."""
  print(message, file=sys.stderr, flush=True)
  if multi or at_once:
    logging.flush()
    sys.stdout.flush()
    if multi and together:
      from ddpm_jax import parallel
      parallel.leave_together(status)
    os._exit(status)
  raise SystemExit(status)


def _check_config_file(argv) -> None:
  """A --config file that does not exist: one line, before flag parsing prints tracebacks."""
  for i, arg in enumerate(argv):
    path = None
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    if path is not None:
      path = path.split(":", 1)[0]  # config files may take an argument after ':'
      if not os.path.isfile(path):
        raise SystemExit(f"error: config file {path!r} not found (try configs/quickstart.py "
                         f"or configs/default.py)")


def run() -> None:
  """The console entry point (``ddpm-jax``) and ``main.py``'s body."""
  run_utils.set_process_defaults()  # before JAX starts: XLA flags, gs:// client, TF log level
  _check_config_file(sys.argv)
  app.run(main)
