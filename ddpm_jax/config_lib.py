"""Config checks that run before any work: each problem is one line saying what to change."""

from __future__ import annotations

import functools
import math

from ddpm_jax import diffusion, sampling
from ddpm_jax.errors import ConfigError

__all__ = ["ConfigError", "validate", "check_compatible", "fill_missing", "defaults",
           "with_defaults", "complete", "apply_overrides"]


@functools.lru_cache(maxsize=1)
def _default_config():
  from configs import default  # the one source of defaults (shipped with the package)
  return default.get_config()


def defaults():
  """A fresh copy of ``configs/default.py``'s config: every field and its default."""
  return _default_config().copy_and_resolve_references()


def with_defaults(config):
  """A copy of ``config`` with the fields it lacks taken from ``configs/default.py``."""
  out = config.copy_and_resolve_references()
  fill_missing(out, defaults())  # a fresh copy: nothing of the shared one is handed out
  return out


REMATS = ("none", "block")  # model.remat: no rematerialisation, or each residual/attention block


def complete(config, num_devices: int = 1, training: bool = True):
  """The config boundary: a copy of ``config`` with every field (defaults filled in from
  ``configs/default.py``) and validated for ``num_devices``; ConfigError for the first
  problem. Idempotent: ``complete(complete(c)) == complete(c)``. Public entry points call it
  once; code below them reads plain attributes."""
  out = with_defaults(config)
  _validate(out, num_devices, training)
  return out


def apply_overrides(config, overrides: dict, skip_sections=()) -> None:
  """Sets each dotted ``{"a.b": value}`` of ``overrides`` (the command line's
  ``--config.a.b=value`` flags) on ``config`` in place, but those under ``skip_sections``.
  The one loop that applies overrides."""
  for path, value in overrides.items():
    if path.split(".")[0] in skip_sections:
      continue
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value


def feature_map_sizes(image_size: int, num_levels: int) -> list[int]:
  return [image_size // 2**i for i in range(num_levels)]


def check_batch_size(value: int, num_devices: int, what: str) -> int:
  """The batch per device; ConfigError (with the fix) unless ``value`` is a positive multiple
  of ``num_devices``. The one place this rule is checked."""
  if value <= 0 or value % num_devices:
    raise ConfigError(
        f"{what}={value} must be a positive multiple of the number of devices ({num_devices}); "
        f"set --config.{what}={max(num_devices, value // num_devices * num_devices)}")
  return value // num_devices


def validate(config, num_devices: int = 1, training: bool = True) -> None:
  """Raises ConfigError for the first problem found in ``config``; ``training=False`` (the
  generation and eval modes) skips what only training uses (its batch on these devices)."""
  _validate(with_defaults(config), num_devices, training)  # as complete() leaves it


def _validate(config, num_devices: int, training: bool) -> None:
  """``validate`` of a config that has every field."""
  d, m, s, o = config.data, config.model, config.sampling, config.optim
  levels = len(m.ch_mult)
  if levels < 1:
    raise ConfigError("model.ch_mult must have at least one level")
  if d.image_size <= 0 or d.image_size % 2 ** (levels - 1):
    raise ConfigError(
        f"data.image_size={d.image_size} must be divisible by 2**(len(model.ch_mult)-1) = "
        f"{2 ** (levels - 1)} (model.ch_mult={tuple(m.ch_mult)} downsamples {levels - 1} times)")
  sizes = feature_map_sizes(d.image_size, levels)
  for r in m.attn_resolutions:
    if r not in sizes:
      raise ConfigError(f"model.attn_resolutions has {r}, but the feature maps of a "
                        f"{d.image_size}x{d.image_size} image are {sizes}; pick from those")
  for mult in m.ch_mult:
    if (m.ch * mult) % m.num_groups:
      raise ConfigError(f"model.ch * ch_mult = {m.ch * mult} is not divisible by "
                        f"model.num_groups={m.num_groups}")
  if config.model.dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"model.dtype={m.dtype!r}: use 'float32' or 'bfloat16'")
  if m.prediction_type not in diffusion.PREDICTION_TYPES:
    raise ConfigError(f"model.prediction_type={m.prediction_type!r}: use one of "
                      f"{diffusion.PREDICTION_TYPES}")
  if config.diffusion.schedule not in diffusion.SCHEDULES:
    raise ConfigError(f"unknown diffusion.schedule={config.diffusion.schedule!r}: use one of "
                      f"{diffusion.SCHEDULES}")
  if config.diffusion.num_timesteps < 2:
    raise ConfigError("diffusion.num_timesteps must be at least 2")
  try:
    diffusion.named_betas(config.diffusion.schedule, config.diffusion.num_timesteps)
  except ValueError as e:
    raise ConfigError(f"diffusion.num_timesteps={config.diffusion.num_timesteps}: {e}") from None
  if training:
    _validate_training(config, num_devices)
    k = config.training.microbatches
    per_device = config.training.batch_size // num_devices
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or per_device % k:
      near = k if isinstance(k, int) and not isinstance(k, bool) else 1
      fix = max(d for d in range(1, per_device + 1) if per_device % d == 0 and d <= max(near, 1))
      raise ConfigError(f"training.microbatches={k!r} must be a divisor of the per-device batch "
                        f"{per_device} (training.batch_size over {num_devices} devices): set "
                        f"--config.training.microbatches={fix}")
  if config.model.remat not in REMATS:
    raise ConfigError(f"model.remat={m.remat!r}: use one of {REMATS}")
  check_batch_size(s.batch_size, num_devices, "sampling.batch_size")
  if o.optimizer not in ("adam", "adamw"):
    raise ConfigError(f"optim.optimizer={o.optimizer!r}: use 'adam' or 'adamw'")
  if o.lr_schedule not in ("constant", "cosine"):
    raise ConfigError(f"optim.lr_schedule={o.lr_schedule!r}: use 'constant' or 'cosine'")
  sampling.canonical_sampler(s.sampler)  # ConfigError for an unknown name
  spacings = (sampling.AUTO_SPACING,) + sampling.SPACINGS
  if s.spacing not in spacings:
    raise ConfigError(f"unknown sampling.spacing={s.spacing!r}: use one of {spacings}")
  if s.sampler != "ddpm" and not 1 <= s.num_steps <= config.diffusion.num_timesteps:
    raise ConfigError(f"sampling.num_steps={s.num_steps} must be in "
                      f"[1, diffusion.num_timesteps={config.diffusion.num_timesteps}]")
  if s.eta < 0:
    raise ConfigError(f"sampling.eta={s.eta} must be >= 0 (0: deterministic DDIM, 1: DDPM's "
                      f"posterior variance)")
  if s.ddpm_variance not in ("small", "large"):
    raise ConfigError(f"sampling.ddpm_variance={s.ddpm_variance!r}: use 'small' or 'large'")
  _validate_generation(config)


# Training counts: (field, least value, what the value means). A count of 0 is "off" only
# where the loop reads it so (``train._SideWork``, ``keep_period``, ``keep_checkpoints``);
# ``log_every_steps`` and ``checkpoint_every_steps`` divide the step (0 is refused: a run
# that saves only at its end sets ``checkpoint_every_steps`` to ``num_train_steps``).
_TRAINING_COUNTS = (
    ("num_train_steps", 1, "the step the run ends at"),
    ("steps_per_dispatch", 1, "train steps per device call"),
    ("log_every_steps", 1, "a metrics line every N steps; N = num_train_steps logs only the "
                           "last step"),
    ("checkpoint_every_steps", 1, "a checkpoint every N steps; N = num_train_steps saves only "
                                  "at the end (and every checkpoint_every_minutes)"),
    ("keep_checkpoints", 0, "the newest N checkpoints are kept; 0 keeps every one"),
    ("keep_period", 0, "0 = none"),
    ("sample_every_steps", 0, "0 = never"),
    ("eval_every_steps", 0, "0 = never"),
    ("max_bad_steps", 1, "consecutive non-finite steps before stopping"),
)


def _validate_training(config, num_devices: int) -> None:
  """What only training reads: counts, the optimizer's numbers, the batch on these devices.
  Runs before any data preparation or compilation, so a bad value costs nothing."""
  t = config.training
  check_batch_size(t.batch_size, num_devices, "training.batch_size")
  for name, least, meaning in _TRAINING_COUNTS:
    value = config.training[name]
    if value < least:
      raise ConfigError(f"training.{name}={value} must be >= {least} ({meaning})")
  for name in ("checkpoint_every_steps", "num_train_steps"):
    if t[name] % t.steps_per_dispatch:
      raise ConfigError(f"training.{name}={t[name]} must be a multiple of "
                        f"training.steps_per_dispatch={t.steps_per_dispatch}")
  _check_number(config, "optim.learning_rate", lambda v: v > 0, "> 0 (the peak learning rate)")
  _check_number(config, "optim.warmup_steps", lambda v: v >= 0, ">= 0 (0: no warmup)")
  _check_number(config, "optim.weight_decay", lambda v: v >= 0, ">= 0")
  _check_number(config, "optim.b1", lambda v: 0 <= v < 1, "in [0, 1)")
  _check_number(config, "optim.b2", lambda v: 0 <= v < 1, "in [0, 1)")
  _check_number(config, "optim.eps", lambda v: v > 0, "> 0")
  if config.optim.grad_clip_norm is not None:
    _check_number(config, "optim.grad_clip_norm", lambda v: v >= 0, ">= 0 (0 or None: no clipping)")
  _check_number(config, "training.ema_decay", lambda v: 0 <= v <= 1, "in [0, 1]")
  _check_number(config, "training.checkpoint_every_minutes", lambda v: v >= 0, ">= 0 (0 = never)")


def _check_number(config, path: str, ok, rule: str) -> None:
  """ConfigError unless the field at ``path`` is a finite number for which ``ok`` holds
  (NaN fails every comparison, so it is named apart: "nan must be > 0" reads oddly)."""
  section, field = path.split(".")
  value = config[section][field]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ConfigError(f"{path}={value!r} must be a finite number {rule}")
  if not ok(value):
    raise ConfigError(f"{path}={value!r} must be {rule}")


def _validate_generation(config) -> None:
  if config.model.num_classes < 0:
    raise ConfigError("model.num_classes must be >= 0 (0 = unconditional)")
  for field, allowed in (("time_conditioning", ("add", "scale_shift")),
                         ("attention", ("softmax", "linear")), ("resample", ("conv", "pool"))):
    value = config.model[field]
    if value not in allowed:
      raise ConfigError(f"model.{field}={value!r}: use one of {allowed}")
  label_dropout = config.training.label_dropout
  if not 0.0 <= label_dropout < 1.0:
    raise ConfigError(f"training.label_dropout={label_dropout} must be in [0, 1)")
  guidance_scale = config.sampling.guidance_scale
  if guidance_scale < 0:
    raise ConfigError(f"sampling.guidance_scale={guidance_scale} must be >= 0 (0: "
                      f"unconditional, 1: conditional, > 1: guided)")
  resample_steps = config.sampling.resample_steps
  if resample_steps < 1:
    raise ConfigError(f"sampling.resample_steps={resample_steps} must be >= 1")
  strength = config.sampling.strength
  if not 0.0 < strength <= 1.0:
    raise ConfigError(f"sampling.strength={strength} must be in (0, 1]")


# Fields that fix the shapes and meaning of the parameters in a checkpoint.
ARCHITECTURE_FIELDS = (
    ("model", ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "num_heads",
               "num_groups", "prediction_type", "num_classes", "time_conditioning",
               "attention", "resample", "downsample_padding")),
    ("data", ("image_size", "num_channels")),
    ("diffusion", ("schedule", "num_timesteps")),
)


def check_compatible(config, saved) -> None:
  """Raises ConfigError if ``config`` cannot continue from a checkpoint made with ``saved``."""
  for section, fields in ARCHITECTURE_FIELDS:
    for f in fields:
      new, old = config[section].get(f), saved.get(section, {}).get(f)
      norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
      if old is not None and norm(new) != norm(old):
        raise ConfigError(
            f"the workdir's checkpoint was made with {section}.{f}={norm(old)!r} but the config "
            f"has {norm(new)!r}: use another --workdir or set --config.{section}.{f}={norm(old)!r}")


def fill_missing(config, defaults) -> None:
  """Adds fields of ``defaults`` that ``config`` lacks (configs saved by older versions), in
  place; ``configs/default.py`` is the one source of defaults."""
  for key, value in defaults.items():
    if key not in config:
      config[key] = value
    elif hasattr(value, "items") and hasattr(config[key], "items"):
      fill_missing(config[key], value)
