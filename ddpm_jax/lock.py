"""The workdir lock: ``<workdir>/trainer.lock`` keeps a second trainer out of a run folder,
on local disk (flock) and on a bucket (generation preconditions)."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

from absl import logging

from ddpm_jax import fs
from ddpm_jax.errors import WorkdirLocked


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
