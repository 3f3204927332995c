"""Run plumbing: workdir lock, signals, metric writers, progress, compilation cache."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time

from absl import logging


class WorkdirLocked(RuntimeError):
  pass


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds ``<workdir>/trainer.lock`` (with our pid); refuses a workdir a live trainer holds.

  A lock left by a dead process (SIGKILL, preemption) is taken over.
  """
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "trainer.lock")
  while True:
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      break
    except FileExistsError:
      try:
        with open(path) as f:
          pid = int(f.read().strip() or 0)
      except (OSError, ValueError):
        pid = 0
      if pid and pid != os.getpid() and _pid_alive(pid):
        raise WorkdirLocked(f"workdir {workdir!r} is in use by a running trainer (pid {pid}); "
                            f"stop it or use another --workdir") from None
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)  # stale: its owner is gone
  with os.fdopen(fd, "w") as f:
    f.write(str(os.getpid()))
  try:
    yield
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)


class StopRequest:
  """Turns SIGTERM/SIGINT into a flag the loop checks; a second SIGINT interrupts at once."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name
    logging.warning("%s received: saving a checkpoint and stopping", self.signal)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def __bool__(self):
    return self.signal is not None


class MetricWriter:
  """Scalars and images to TensorBoard event files and scalars to ``metrics.jsonl``.

  Only process 0 writes; other processes get a writer that does nothing. With ``name``
  (e.g. "eval") the events go to ``tensorboard/<name>`` and the lines to
  ``<name>/metrics.jsonl``, so TensorBoard shows them as a separate run.
  """

  def __init__(self, workdir: str, enabled: bool = True, name: str = ""):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if enabled:
      from ddpm_jax.input_pipeline import hide_accelerators_from_tf
      hide_accelerators_from_tf()
      from flax.metrics import tensorboard
      self._tb = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard", name))
      os.makedirs(os.path.join(workdir, name), exist_ok=True)
      self._jsonl = open(os.path.join(workdir, name, "metrics.jsonl"), "a")

  def scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    for k, v in scalars.items():
      self._tb.scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n")
    self._jsonl.flush()

  def image(self, step: int, tag: str, image) -> None:
    if self.enabled:
      self._tb.image(tag, image, step)

  def flush(self):
    if self.enabled:
      self._tb.flush()

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


class Progress:
  """A tqdm bar on a terminal; plain log lines every ``log_every`` steps otherwise."""

  def __init__(self, total: int, initial: int, log_every: int, batch_size: int, desc: str,
               enabled: bool = True):
    self.total, self.log_every, self.batch_size = total, log_every, batch_size
    self.enabled = enabled
    self.tty = enabled and sys.stderr.isatty()
    self._bar = None
    self._t0, self._s0 = time.time(), initial
    if self.tty:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

  def update(self, step: int, n: int, postfix: dict | None = None):
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.update(n)
      if postfix:
        self._bar.set_postfix(postfix, refresh=False)
      return
    if step % self.log_every < n or step == self.total:
      dt = max(time.time() - self._t0, 1e-9)
      rate = (step - self._s0) / dt
      eta = (self.total - step) / rate if rate > 0 else float("nan")
      extra = " ".join(f"{k}={v}" for k, v in (postfix or {}).items())
      print(f"step {step}/{self.total} | {rate:.2f} steps/s | {rate * self.batch_size:.1f} img/s "
            f"| eta {eta / 60:.1f} min | {extra}", flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()


def enable_compilation_cache(path: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache unless the user configured one."""
  import jax
  if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
  path = path or os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")),
                              "ddpm_jax", "jax_compilation_cache")
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
