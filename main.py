"""ddpm_jax command line: train, sample, and the other modes below.

  python main.py --config configs/quickstart.py --workdir runs/quickstart
  python main.py --mode=sample --workdir runs/quickstart

Modes other than train use the config saved with the workdir's checkpoint unless
--config is given; ``--config.a.b=value`` flags override its fields either way.
Every process of a multi-host job runs the same command (see README).
"""

import sys

if sys.version_info < (3, 11):  # noqa: UP036  checked before any import that needs 3.11
  sys.exit(f"error: ddpm_jax needs Python >= 3.11, not {sys.version.split()[0]} (docs/tpu_pod.md)")

import os

from absl import app, flags, logging
from ml_collections import config_flags

from ddpm_jax import run_utils

run_utils.set_process_defaults()  # before JAX starts: XLA flags, gs:// client, TF log level

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
MODES = {
    "train": "train, resuming from the workdir's newest checkpoint",
    "sample": "grid, PNGs, NPZ and denoising GIFs",
    "interpolate": "slerp between noise seeds",
    "reconstruct": "DDIM inversion of held-out images and back",
    "inpaint": "fill masked regions of sampling.inputs (RePaint)",
    "img2img": "SDEdit: noise sampling.inputs to sampling.strength and denoise",
    "interpolate_images": "DDIM-invert pairs of sampling.inputs, slerp, decode",
    "eval": "bits/dim, per-timestep loss, sample metrics (FID given Inception weights)",
    "prepare": "prepare data.dataset's records into data.data_dir (local or gs://) and stop",
    "distill": "progressive distillation of distill.teacher into <workdir>/steps<N> students",
    "export": "the workdir's model as a diffusers DDPMPipeline folder (--out; EMA unless "
              "--config.sampling.use_ema=false)",
    "import": "a diffusers UNet2DModel folder (--model) as a new workdir's step-0 checkpoint",
}
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file.", lock_config=False)
flags.DEFINE_string("workdir", "runs/", "Run folder (local or gs://): checkpoints, logs, samples.")
flags.DEFINE_string("out", None, "--mode=export: the pipeline folder (<workdir>/diffusers).")
flags.DEFINE_string("model", None, "--mode=import: a diffusers pipeline or UNet2DModel folder.")
flags.DEFINE_enum("mode", "train", list(MODES), "; ".join(f"{k}: {v}" for k, v in MODES.items()))
FLAGS = flags.FLAGS


def _config():
  """The --config file, or for non-train modes without --config the workdir's saved config."""
  from ddpm_jax import checkpoint as ckpt_lib
  from ddpm_jax import config_lib
  if FLAGS.mode in ("train", "prepare", "distill", "import") or FLAGS["config"].present:
    return FLAGS.config
  mngr = ckpt_lib.make_manager(FLAGS.workdir, read_only=True, async_save=False)
  config, _ = ckpt_lib.newest_config(mngr, FLAGS.workdir)
  config_lib.fill_missing(config, FLAGS.config)  # fields added since the run was started
  for path, value in config_flags.get_override_values(FLAGS["config"]).items():
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _run(mode: str, config, workdir: str) -> None:
  from ddpm_jax import evaluate, modes, parallel, train
  if mode == "train":
    train.train_and_evaluate(config, workdir)
  elif mode == "prepare":
    from ddpm_jax import datasets
    where = datasets.prepare(config)
    if parallel.is_main():
      print(where)  # the last line: where the records are
  elif mode == "distill":
    from ddpm_jax import distill
    out = distill.distill(config, workdir, config_flags.get_override_values(FLAGS["config"]))
    if out is not None and parallel.is_main():
      print(out)  # the last line: the last student's workdir
  elif mode == "eval":
    evaluate.evaluate(config, workdir)
  elif mode in ("export", "import"):
    _diffusers(mode, config, workdir)
  else:
    out = modes.MODES[mode](config, workdir)
    if parallel.is_main():
      print(out)  # the last line: where the files are


def _diffusers(mode: str, config, workdir: str) -> None:
  """--mode=export / import (ddpm_jax.diffusers_io), on one process."""
  import jax

  from ddpm_jax import diffusers_io, fs
  from ddpm_jax.errors import ConfigError
  if jax.process_count() > 1:
    raise ConfigError(f"--mode={mode} runs on one process: run it on one host, without the "
                      f"launcher")
  if mode == "export":
    print(diffusers_io.export_pipeline(config, workdir, FLAGS.out or fs.join(
        fs.normalize(workdir), "diffusers"), use_ema=config.sampling.use_ema))
  else:
    if not FLAGS.model:
      raise ConfigError("--mode=import needs --model=DIR, a diffusers pipeline folder or "
                        "its unet/ folder")
    diffusers_io.import_unet(FLAGS.model, workdir)
    print(fs.normalize(workdir))  # the last line: the new workdir


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run_utils.quiet_libraries(FLAGS.verbosity)
  from ddpm_jax import parallel
  parallel.initialize_distributed()
  import jax

  from ddpm_jax.errors import StoppedEarly, UserError
  logging.info("JAX %s: %d processes, %d devices (%s)", jax.__version__, jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  from ddpm_jax import config_lib
  try:
    config = _config()
    if config_lib.setting(config, "training.compilation_cache"):
      run_utils.enable_compilation_cache()  # sampling modes reuse compiled samplers too
    _run(FLAGS.mode, config, FLAGS.workdir)
  except UserError as e:
    _exit(f"error: {e}", multi=jax.process_count() > 1, together=True)
  except StoppedEarly as e:
    # Mid-way through start-up (TensorFlow half imported, compiles, data threads) interpreter
    # shutdown took 5-20 s and crashed (exit 139); before the first step nothing is being
    # saved and the lock is released, so leave at once.
    _exit(f"warning: {e}", multi=jax.process_count() > 1, status=0, together=True,
          at_once=True)
  except BaseException as e:
    if jax.process_count() <= 1:
      raise
    where = f"process {jax.process_index()} of {jax.process_count()}"
    rerun = ("once every process has stopped, rerun the same command on every host to resume "
             "from the last checkpoint")
    if _lost_a_peer(e):
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      _exit(f"error: {where} lost contact with another process of this job, which probably "
            f"died (see its log): {first[:300]}; {rerun}", multi=True)
    import traceback
    traceback.print_exc()
    _exit(f"error: {where} failed (above); {rerun}", multi=True)


def _lost_a_peer(e: BaseException) -> bool:
  """A failed collective or coordination-service call: another process went away."""
  text = f"{type(e).__name__}: {e}"
  return any(s in text for s in ("Gloo", "Connection closed by peer", "Connection reset by peer",
                                  "coordination service", "DEADLINE_EXCEEDED", "UNAVAILABLE"))


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


if __name__ == "__main__":
  _check_config_file(sys.argv)
  app.run(main)
