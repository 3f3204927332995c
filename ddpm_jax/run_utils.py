"""Run plumbing: process set-up for entry points, the workdir lock, signals, metric writers,
the compilation cache. Paths go through ``ddpm_jax.fs`` (local or ``gs://``)."""

from __future__ import annotations

import contextlib
import json
import logging as py_logging
import os
import signal
import socket
import time
import uuid

from absl import logging

from ddpm_jax import fs
from ddpm_jax.errors import WorkdirLocked


def set_process_defaults() -> None:
  """Environment defaults for entry points (``main.py``, benchmarks); call before importing JAX.

  A variable the user set always wins:
    * XLA:CPU's YNNPACK fusions off on jaxlib 0.10 (they made our convolutions slower
      on x86: a 32x32 U-Net's train step 0.81 s -> 0.67 s without; docs/benchmarks.md);
    * ``EPATH_USE_TF=false``: ``gs://`` through gcsfs, one client for every path;
    * ``TF_CPP_MIN_LOG_LEVEL=2``, ``TF_ENABLE_ONEDNN_OPTS=0``: TensorFlow's C++
      start-up chatter off (TensorFlow only prepares data here).
  """
  import importlib.metadata
  flags = os.environ.get("XLA_FLAGS", "")
  try:
    jaxlib = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    jaxlib = ""
  if jaxlib.startswith("0.10.") and "xla_cpu_experimental_ynn_fusion_type" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_experimental_ynn_fusion_type=").strip()
  os.environ.setdefault("EPATH_USE_TF", "false")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # TF only decodes images here


# Library warnings that say nothing a user can act on.
_NOISE = (("tensorflow_datasets", "OpenCV is not installed"),
          ("tensorflow_datasets", "has no dataset_info.json"),
          ("tensorflow_datasets", "Using custom data configuration"),
          ("orbax", "Given directory is read only"))


class _OwnInfoOnly(py_logging.Filter):
  """Lets through warnings and errors (but known noise), and INFO lines from ddpm_jax and
  main.py only."""

  def filter(self, record):
    path = record.pathname.replace(os.sep, "/")
    if "/ddpm_jax/" in path or path.endswith("/main.py"):
      return True
    if record.levelno < py_logging.WARNING:
      return False
    message = record.getMessage()
    return not any(lib in path and text in message for lib, text in _NOISE)


def quiet_libraries(verbosity: int) -> None:
  """At the default verbosity, library INFO lines (orbax's checkpoint internals, ...) stay
  off the console; ``--verbosity=1`` shows them."""
  handler = logging.get_absl_handler()
  for f in list(handler.filters):
    if isinstance(f, _OwnInfoOnly):
      handler.removeFilter(f)
  if verbosity < 1:
    handler.addFilter(_OwnInfoOnly())
    for name in ("gcsfs", "google", "urllib3", "fsspec"):
      py_logging.getLogger(name).setLevel(py_logging.ERROR)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """``<workdir>/trainer.lock``, held by process 0 of a running trainer (local or gs://).

  It names the holder's host and pid and the time it was last refreshed (every
  ``REFRESH_S`` while training). A lock is live if its holder runs on this host, or,
  from another host, if it was refreshed within ``STALE_S``. A dead holder's lock
  (SIGKILL, a lost VM) is taken over; from another host after ``STALE_S``.
  """
  REFRESH_S = 60.0
  STALE_S = 300.0

  def __init__(self, workdir: str):
    self.workdir = fs.normalize(workdir)
    self.path = fs.join(self.workdir, "trainer.lock")
    self.me = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex}
    self._refreshed = 0.0
    self.held = False

  def _read(self) -> dict | None:
    try:
      text = fs.read_text(self.path).strip()
    except (FileNotFoundError, OSError):
      return None
    try:
      holder = json.loads(text)
      return holder if isinstance(holder, dict) else {"host": self.me["host"], "pid": holder}
    except ValueError:
      return {"host": self.me["host"], "pid": int(text)} if text.isdigit() else None

  def _live(self, h: dict) -> bool:
    if h.get("id") == self.me["id"]:
      return False
    if h.get("host") == self.me["host"]:
      pid = int(h.get("pid") or 0)
      return bool(pid) and pid != os.getpid() and _pid_alive(pid)
    return time.time() - float(h.get("time", 0)) < self.STALE_S

  def _write(self) -> None:
    self._refreshed = time.time()
    fs.write_text(self.path, json.dumps({**self.me, "time": self._refreshed}))

  def acquire(self) -> None:
    fs.makedirs(self.workdir)
    while True:
      holder = self._read()
      if holder is not None and self._live(holder):
        where = f"pid {holder.get('pid')} on {holder.get('host')}"
        raise WorkdirLocked(f"workdir {self.workdir!r} is in use by a running trainer ({where}); "
                            f"stop it or use another --workdir")
      if fs.is_remote(self.path):
        self._write()
        break
      with contextlib.suppress(FileNotFoundError):
        if holder is not None:
          os.remove(self.path)  # stale: its owner is gone
      try:  # atomic on local disk: two trainers starting at once cannot both win
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        continue
      os.close(fd)
      self._write()
      break
    self.held = True

  def refresh(self) -> None:
    if self.held and time.time() - self._refreshed > self.REFRESH_S:
      self._write()

  def release(self) -> None:
    if self.held:
      holder = self._read()
      if holder is None or holder.get("id") == self.me["id"]:
        fs.remove(self.path)
      self.held = False


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
    logging.warning("%s received: every process will save a checkpoint at the same step "
                    "and stop", self.signal)

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)

  def __bool__(self):
    return self.signal is not None


class EventFile:
  """TensorBoard event records written through ``fs`` (no TensorFlow needed): scalars, images.

  On an object store each flush rewrites the current file; past ``ROLL_BYTES`` a new
  file is started, so a flush never uploads more than that.
  """
  ROLL_BYTES = 8 << 20

  def __init__(self, logdir: str):
    self.logdir = logdir
    self._file = None

  def _open(self):
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter
    name = (f"events.out.tfevents.{time.time():.6f}.{socket.gethostname()}.{os.getpid()}."
            f"{uuid.uuid4().hex[:6]}")
    self._file = fs.GrowingFile(fs.join(self.logdir, name), keep_existing=False)
    self._records = RecordWriter(self._file)
    self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _write(self, event) -> None:
    self._records.write(event.SerializeToString())

  def add(self, step: int, values: list) -> None:
    from tensorboard.compat.proto import event_pb2, summary_pb2
    if self._file is None or (fs.is_remote(self.logdir) and self._file.size() > self.ROLL_BYTES):
      if self._file is not None:
        self._file.flush()
      self._open()
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                summary=summary_pb2.Summary(value=values)))

  def scalars(self, step: int, scalars: dict) -> None:
    from tensorboard.compat.proto import summary_pb2
    self.add(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                    for k, v in scalars.items()])

  def image(self, step: int, tag: str, image) -> None:
    from tensorboard.compat.proto import summary_pb2

    from ddpm_jax import images
    img = summary_pb2.Summary.Image(height=image.shape[0], width=image.shape[1],
                                    colorspace=image.shape[2],
                                    encoded_image_string=images.png_bytes(image))
    self.add(step, [summary_pb2.Summary.Value(tag=tag, image=img)])

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()


class MetricWriter:
  """Scalars and images to TensorBoard event files, scalars to ``metrics.jsonl``.

  Only process 0 writes; other processes get a writer that does nothing. With ``name``
  (e.g. "eval") the events go to ``tensorboard/<name>`` and the lines to
  ``<name>/metrics.jsonl``, so TensorBoard shows them as a separate run. Remote files
  are uploaded at most every ``flush_every_s`` seconds and on ``flush``/``close``.
  """

  def __init__(self, workdir: str, enabled: bool = True, name: str = "",
               flush_every_s: float = 30.0):
    self.enabled = enabled
    self._remote = fs.is_remote(workdir)
    self._flush_every_s, self._flushed = flush_every_s, time.time()
    if enabled:
      self._tb = EventFile(fs.join(workdir, "tensorboard", name) if name
                           else fs.join(workdir, "tensorboard"))
      self._jsonl = fs.GrowingFile(fs.join(workdir, name, "metrics.jsonl") if name
                                   else fs.join(workdir, "metrics.jsonl"))

  def scalars(self, step: int, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) if not isinstance(v, int) else v for k, v in scalars.items()}
    self._tb.scalars(step, scalars)
    line = json.dumps({"step": int(step), "time": time.time(), **scalars}) + "\n"
    self._jsonl.write(line.encode())
    self._maybe_flush()

  def image(self, step: int, tag: str, image) -> None:
    if self.enabled:
      self._tb.image(step, tag, image)
      self._maybe_flush()

  def _maybe_flush(self):
    if not self._remote or time.time() - self._flushed > self._flush_every_s:
      self.flush()

  def flush(self):
    if self.enabled:
      self._tb.flush()
      self._jsonl.flush()
      self._flushed = time.time()

  def close(self):
    self.flush()


def enable_compilation_cache(path: str | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache (``~/.cache/ddpm_jax/jax_compilation_cache``)
  unless the user configured one."""
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
