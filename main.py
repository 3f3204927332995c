"""ddpm_jax command line: train, sample, interpolate, reconstruct, eval.

  python main.py --config configs/quickstart.py --workdir runs/quickstart
  python main.py --mode=sample --workdir runs/quickstart

--mode=sample without --config uses the config saved with the workdir's checkpoint;
``--config.a.b=value`` flags still override its fields.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "default.py")
config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file.", lock_config=False)
flags.DEFINE_string("workdir", "runs/", "Run folder: checkpoints, logs and samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "interpolate", "reconstruct", "eval"],
                  "train; sample (grid, PNGs, NPZ, GIFs); interpolate (slerp between noise "
                  "seeds); reconstruct (DDIM inversion of held-out images and back); eval "
                  "(bits/dim, per-timestep loss, sample metrics, FID given Inception weights).")
FLAGS = flags.FLAGS


def _config():
  """The --config file, or for non-train modes without --config the workdir's saved config."""
  from ddpm_jax import checkpoint as ckpt_lib
  if FLAGS.mode == "train" or FLAGS["config"].present:
    return FLAGS.config
  mngr = ckpt_lib.make_manager(FLAGS.workdir, read_only=True, async_save=False)
  if mngr.latest_step() is None:
    raise SystemExit(f"error: no checkpoint in {ckpt_lib.checkpoint_dir(FLAGS.workdir)!r}; "
                     f"train first: python main.py --config CONFIG --workdir {FLAGS.workdir}")
  config = ckpt_lib.restore_config(mngr)
  _fill_missing(config, FLAGS.config)  # fields added since the run was started
  for path, value in config_flags.get_override_values(FLAGS["config"]).items():
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _fill_missing(config, defaults):
  for key, value in defaults.items():
    if key not in config:
      config[key] = value
    elif hasattr(value, "items") and hasattr(config[key], "items"):
      _fill_missing(config[key], value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ddpm_jax import parallel
  parallel.maybe_initialize_distributed()
  import jax

  from ddpm_jax import config_lib, run_utils, sample, train
  logging.info("JAX %s: %d processes, %d devices (%s)", jax.__version__, jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  try:
    config = _config()
    if config.training.get("compilation_cache", False):
      run_utils.enable_compilation_cache()  # sampling modes reuse compiled samplers too
    if FLAGS.mode == "train":
      train.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "sample":
      print(sample.sample_and_save(config, FLAGS.workdir))
    elif FLAGS.mode == "interpolate":
      print(sample.interpolate_and_save(config, FLAGS.workdir))
    elif FLAGS.mode == "reconstruct":
      print(sample.reconstruct_and_save(config, FLAGS.workdir))
    elif FLAGS.mode == "eval":
      from ddpm_jax import evaluate
      evaluate.evaluate(config, FLAGS.workdir)
  except (config_lib.ConfigError, sample.NoCheckpointError, train.DivergenceError) as e:
    raise SystemExit(f"error: {e}") from None
  except Exception as e:
    from ddpm_jax import datasets, inception
    if isinstance(e, (datasets.DatasetError, run_utils.WorkdirLocked, inception.WeightsError)):
      raise SystemExit(f"error: {e}") from None
    raise


if __name__ == "__main__":
  sys.exit(app.run(main))
