"""Errors a user can fix: the CLI (``ddpm_jax/cli.py``) turns every ``UserError`` into one
line, no traceback."""


class UserError(Exception):
  """A problem with the user's config, data, workdir or files; the message says what to do."""


class ConfigError(UserError, ValueError):
  """An unusable config; the message names the field and the fix."""


class DatasetError(UserError, ValueError):
  """A dataset that cannot be used as configured."""


class NoCheckpointError(UserError, FileNotFoundError):
  """The workdir has no (usable) checkpoint."""


# The exit status of a trainer refused by a held workdir lock (sysexits' EX_TEMPFAIL: "try
# again later"): a lost VM's lock goes stale after 5 minutes, so the pod runner waits and
# reruns rather than counting it as a failed run (``ddpm_jax/pod.py``, same value).
LOCKED_EXIT_STATUS = 75


class WorkdirLocked(UserError, RuntimeError):
  """Another trainer holds the workdir (exit status ``LOCKED_EXIT_STATUS``)."""


class WeightsError(UserError, ValueError):
  """The Inception weights file is missing, corrupt or not the expected one."""


class InputError(UserError, ValueError):
  """Input images or masks for a generation mode cannot be used."""


class DivergenceError(UserError, RuntimeError):
  """Training produced non-finite steps ``training.max_bad_steps`` times in a row."""


class StoreUnavailable(UserError, OSError):
  """The workdir's store (a bucket) did not answer for longer than the trainer waits."""


class StoppedEarly(BaseException):
  """A stop signal during start-up: nothing new to save; the CLI exits 0 with its message.

  A BaseException so that no ``except Exception`` on the way swallows it."""
