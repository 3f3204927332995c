"""Run plumbing: process set-up for entry points, the workdir lock, signals, metric writers,
the compilation cache. Paths go through ``ddpm_jax.fs`` (local or ``gs://``)."""

from __future__ import annotations

import json
import logging as py_logging
import os
import signal
import socket
import threading
import time
import uuid

from absl import logging

from ddpm_jax import fs
from ddpm_jax.errors import StoppedEarly, WorkdirLocked


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

  Local disk: an ``flock`` on the file, held while the trainer runs and dropped by the
  kernel when its process ends however it ends; the file's content (host, pid) is only
  for the message a second trainer gets, so a torn or empty file or a reused pid cannot
  matter.

  Object store: the lock object is created only if absent (a generation precondition),
  so of trainers starting together exactly one wins. Its holder rewrites it every
  ``REFRESH_S`` from a thread, from the moment it is taken, each time on the condition
  that it is still the generation it wrote last; a lock not rewritten for ``STALE_S``
  (its holder is gone), or whose holder ran on this host and is dead, is taken over,
  again on a generation condition. A holder whose rewrite finds another generation has
  lost the lock: ``lost`` turns true and the trainer stops before writing anything.
  """
  REFRESH_S = 60.0
  STALE_S = 300.0

  def __init__(self, workdir: str):
    self.workdir = fs.normalize(workdir)
    self.path = fs.join(self.workdir, "trainer.lock")
    self.me = {"host": socket.gethostname(), "pid": os.getpid(), "id": uuid.uuid4().hex}
    self.REFRESH_S = float(os.environ.get("DDPM_JAX_LOCK_REFRESH_S", self.REFRESH_S))
    self.held = False
    self.lost = False
    self._fd = None
    self._generation = None
    self._stop = threading.Event()
    self._refreshing = threading.Lock()
    self._thread = None

  def _info(self) -> bytes:
    return json.dumps({**self.me, "time": time.time()}).encode()

  def _refused(self, text: str) -> WorkdirLocked:
    try:
      holder = json.loads(text)
      where = f"pid {holder.get('pid')} on {holder.get('host')}"
    except (ValueError, AttributeError, TypeError):
      where = "a trainer whose lock file is unreadable"
    return WorkdirLocked(f"workdir {self.workdir!r} is in use by a running trainer ({where}); "
                         f"stop it or use another --workdir")

  def acquire(self) -> None:
    fs.makedirs(self.workdir)
    if fs.is_remote(self.path):
      self._acquire_remote()
    else:
      self._acquire_local()
    self.held = True

  # Local disk.
  def _acquire_local(self) -> None:
    import fcntl
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:
        with open(self.path, errors="replace") as f:
          text = f.read()
        os.close(fd)
        raise self._refused(text) from None
      try:  # the file we locked may have been removed by a holder releasing it just now
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, self._info(), 0)
    self._fd = fd

  # Object store.
  def _blob(self):
    from google.cloud import storage
    bucket, _, name = self.path.split("://", 1)[1].partition("/")
    if not hasattr(WorkdirLock, "_client"):
      WorkdirLock._client = storage.Client()
    return WorkdirLock._client.bucket(bucket).blob(name)

  def _stale(self, blob, text: str) -> bool:
    try:
      holder = json.loads(text)
    except ValueError:
      holder = {}
    if not isinstance(holder, dict):
      holder = {}
    if holder.get("host") == self.me["host"] and holder.get("pid") and not _pid_alive(
        int(holder["pid"])):
      return True
    age = time.time() - blob.updated.timestamp()  # the store's clock, not the holder's
    return age > self.STALE_S

  def _acquire_remote(self) -> None:
    from google.api_core import exceptions
    blob = self._blob()
    while True:
      try:
        blob.upload_from_string(self._info(), if_generation_match=0)
        self._generation = blob.generation
        break
      except exceptions.PreconditionFailed:
        pass
      try:
        blob.reload()
        text = blob.download_as_bytes(if_generation_match=blob.generation).decode(
            errors="replace")
      except (exceptions.NotFound, exceptions.PreconditionFailed):
        continue  # released or replaced meanwhile: look again
      if not self._stale(blob, text):
        raise self._refused(text)
      try:  # take over the stale lock, unless someone else just did
        blob.upload_from_string(self._info(), if_generation_match=blob.generation)
        self._generation = blob.generation
        break
      except exceptions.PreconditionFailed:
        continue
    self._thread = threading.Thread(target=self._keep_fresh, daemon=True,
                                    name="workdir-lock")
    self._thread.start()

  def _keep_fresh(self) -> None:
    while not self._stop.wait(self.REFRESH_S):
      self.refresh()

  def refresh(self) -> None:
    """Rewrites a remote lock if it is still ours; marks it ``lost`` otherwise."""
    if not self.held or self.lost or not fs.is_remote(self.path):
      return
    with self._refreshing:
      self._refresh()

  def _refresh(self) -> None:
    from google.api_core import exceptions
    blob = self._blob()
    try:
      blob.upload_from_string(self._info(), if_generation_match=self._generation)
      self._generation = blob.generation
    except (exceptions.PreconditionFailed, exceptions.NotFound):
      self.lost = True
      logging.error("the workdir lock %s was taken by another trainer: this one stops without "
                    "writing anything more", self.path)
    except Exception as e:  # noqa: BLE001  (a network blip: try again at the next refresh)
      logging.warning("could not refresh the workdir lock %s (%s); trying again in %.0f s",
                      self.path, type(e).__name__, self.REFRESH_S)

  def check(self) -> None:
    """Raises WorkdirLocked if the lock is lost; on a bucket it is verified (and refreshed)
    first. Call before writing into the workdir."""
    self.refresh()
    if self.lost:
      raise WorkdirLocked(f"another trainer took over the workdir {self.workdir!r} (its lock "
                          f"was not refreshed in time): stopped without writing")

  def release(self) -> None:
    if not self.held:
      return
    self.held = False
    self._stop.set()
    if self._fd is not None:
      import contextlib
      with contextlib.suppress(FileNotFoundError):
        os.remove(self.path)  # while still locked: the next trainer finds no file or its own
      os.close(self._fd)
      self._fd = None
    elif not self.lost and self._generation is not None:
      from google.api_core import exceptions
      try:
        self._blob().delete(if_generation_match=self._generation)
      except (exceptions.PreconditionFailed, exceptions.NotFound):
        pass


class StopRequest:
  """Turns SIGTERM/SIGINT into a flag the train loop checks; a second SIGINT interrupts at once.

  During start-up (``started()`` not yet called: restoring, preparing data, compiling)
  there is nothing new to save, and a Spot VM's notice is about 30 s, so a signal stops
  the process at once: ``StoppedEarly`` is raised in the main thread, and if the main
  thread is stuck in a long native call (an XLA compile) a watcher thread ends the
  process after ``HARD_STOP_S`` (``on_hard_stop`` runs first, e.g. to release a lock).
  """
  HARD_STOP_S = 5.0

  def __init__(self, on_hard_stop=None):
    self.signal = None
    self._old = {}
    self._starting = True
    self._on_hard_stop = on_hard_stop
    self._wakeup = None

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def started(self) -> None:
    """The first train step ran: from now on a signal is agreed and saved at a step."""
    self._starting = False

  def _handle(self, signum, frame):
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name
    if self._starting:
      raise StoppedEarly(f"{self.signal} received during start-up, before the first step: "
                         f"stopped; nothing new to save (the same command resumes)")
    logging.warning("%s received: every process will save a checkpoint at the same step "
                    "and stop", self.signal)

  def watch_native_calls(self) -> None:
    """Starts the watcher for signals that arrive while the main thread is in native code."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    try:
      old = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    except ValueError:  # not the main thread
      return
    self._wakeup = (r, w, old)
    threading.Thread(target=self._watch, args=(r,), daemon=True, name="stop-watch").start()

  def _watch(self, r: int) -> None:
    data = b""
    while not data or data[0] not in (signal.SIGTERM, signal.SIGINT):
      try:
        data = os.read(r, 1)
      except OSError:
        return
      if not data:
        return
    deadline = time.time() + self.HARD_STOP_S
    while time.time() < deadline:
      if not self._starting or self._wakeup is None:
        return  # handled in Python (StoppedEarly raised or the loop took it)
      time.sleep(0.1)
    if self._starting and self._wakeup is not None:
      import sys
      print(f"warning: {signal.Signals(data[0]).name} received during start-up (in a long "
            f"native call): stopped; nothing new to save (the same command resumes)",
            file=sys.stderr, flush=True)
      if self._on_hard_stop is not None:
        self._on_hard_stop()
      os._exit(0)

  def __exit__(self, *exc):
    if self._wakeup is not None:
      r, w, old = self._wakeup
      self._wakeup = None
      signal.set_wakeup_fd(old)
      os.close(w)
      os.close(r)
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
    self.before_write = None  # e.g. the workdir lock's check: raises if writing is not allowed
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

  def drop_after(self, step: int) -> None:
    """Removes ``metrics.jsonl`` lines of steps after ``step`` (a resumed run logs them again),
    so that every step's line is there exactly once after any interruption."""
    if self.enabled:
      self._jsonl.keep_lines(lambda line: json.loads(line).get("step", 0) <= step)

  def _maybe_flush(self):
    if not self._remote or time.time() - self._flushed > self._flush_every_s:
      self.flush()

  def flush(self):
    if self.enabled:
      if self.before_write is not None:
        self.before_write()
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
