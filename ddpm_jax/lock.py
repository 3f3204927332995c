"""The workdir lock: ``<workdir>/trainer.lock`` keeps a second trainer out of a run folder,
on local disk (flock) and on a bucket (generation preconditions)."""

from __future__ import annotations

import contextlib
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


def _holder(text: str) -> dict:
  """A lock file's content as a dict ({} if torn or foreign)."""
  try:
    holder = json.loads(text)
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


class WorkdirLock:
  """``<workdir>/trainer.lock``, held by process 0 of a running trainer (local or gs://).

  Local disk: an ``flock`` on the file, held while the trainer runs and dropped by the
  kernel when its process ends however it ends; the file's content (host, pid) is only
  for the message a second trainer gets, so a torn or empty file or a reused pid cannot
  matter. A lock file deleted under a live trainer (by hand, a ``/tmp`` cleaner, ``rsync
  --delete``) would let a second trainer in, so ``check`` (before every write of the run)
  compares the locked file with the one at the path: a missing file is taken again, another
  trainer's file means this one has lost the lock. ``release`` removes the file only if it
  is still the one this trainer locked. ``flock`` is exact on local disks; on a network
  mount it holds only where the mount passes locks to a server shared by every host (NFS
  with its lock manager); with NFS ``nolock``, gcsfuse or other FUSE stores it is
  host-local, and two hosts can both hold it: give such runs a ``gs://`` workdir instead.

  Object store: the lock object is created only if absent (a generation precondition),
  so of trainers starting together exactly one wins. Its holder rewrites it every
  ``REFRESH_S`` from a thread, from the moment it is taken, each time on the condition
  that it is still the generation it wrote last. A conditional write that fails (412 or
  404) is not yet a lost lock: the reply of an earlier attempt that did succeed may have
  been lost, so the object is read, and if it is still ours (our id) the holder carries
  on; only another trainer's id means the lock is lost (``lost`` turns true and the
  trainer stops before writing anything). A lock not rewritten for ``STALE_S`` (its
  holder is gone), or whose holder ran on this host and is dead, is taken over, again on
  a generation condition. Its age is measured on one clock, the store's: the object's
  ``updated`` time against that of a probe object written now, never against this
  host's clock, so a host whose clock is off cannot take over a live lock.
  """
  REFRESH_S = 60.0
  STALE_S = 300.0
  LOCAL_REFRESH_S = 10.0

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

  def _refused(self, text: str, age_s: float | None = None) -> WorkdirLocked:
    holder = _holder(text)
    where = (f"pid {holder.get('pid')} on {holder.get('host')}" if holder
             else "a trainer whose lock file is unreadable")
    if age_s is None:
      return WorkdirLocked(f"workdir {self.workdir!r} is in use by a running trainer ({where});"
                           f" stop it or use another --workdir")
    return WorkdirLocked(
        f"workdir {self.workdir!r} is in use by a running trainer ({where}; its lock was "
        f"refreshed {age_s:.0f} s ago): stop it or use another --workdir; if its machine is "
        f"gone, rerun after the lock is {self.STALE_S:.0f} s old and it is taken over")

  def acquire(self) -> None:
    if fs.is_remote(self.path):  # an object store has no folders to make
      self._acquire_remote()
    else:
      fs.makedirs(self.workdir)
      self._acquire_local()
    self.held = True

  # Local disk.
  def _lock_local(self) -> int | None:
    """Opens and flocks the file at the path; the fd, or None if a live process holds it."""
    import fcntl
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError:
        os.close(fd)
        return None
      if self._is_path_of(fd):
        break
      os.close(fd)  # the file we locked was removed meanwhile (a holder releasing it)
    os.ftruncate(fd, 0)
    os.pwrite(fd, self._info(), 0)
    return fd

  def _is_path_of(self, fd: int) -> bool:
    """True if the lock file's path still names the file open as ``fd``."""
    try:
      st = os.stat(self.path)
    except FileNotFoundError:
      return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

  def _acquire_local(self) -> None:
    fd = self._lock_local()
    if fd is None:
      with open(self.path, errors="replace") as f:
        text = f.read()
      raise self._refused(text)
    self._fd = fd

  def _verify_local(self) -> None:
    """Still the holder of the file at the path? A file nobody holds (ours deleted, or one
    put there by hand) is locked again; one that a live process holds means we lost."""
    if self._is_path_of(self._fd):
      return
    fd = self._lock_local()
    if fd is None:
      self.lost = True
      logging.error("the workdir lock %s was deleted and taken by another trainer: this one "
                    "stops without writing anything more", self.path)
      return
    logging.warning("the workdir lock %s was deleted while this trainer held it; it is taken "
                    "again", self.path)
    os.close(self._fd)
    self._fd = fd

  # Object store.
  def _bucket(self):
    from google.cloud import storage
    if not hasattr(WorkdirLock, "_client"):
      WorkdirLock._client = storage.Client()
    return WorkdirLock._client.bucket(self.path.split("://", 1)[1].partition("/")[0])

  def _blob(self, suffix: str = ""):
    name = self.path.split("://", 1)[1].partition("/")[2]
    return self._bucket().blob(name + suffix)

  def _age_s(self, blob) -> float:
    """How long ago ``blob`` was last written, on the store's clock: a probe object is
    written now and the two ``updated`` times compared."""
    probe = self._blob(".clock")
    probe.upload_from_string(b"")
    age = probe.updated.timestamp() - blob.updated.timestamp()
    with contextlib.suppress(Exception):
      probe.delete()
    return age

  def _stale(self, blob, text: str) -> tuple[bool, float | None]:
    """(is the lock stale, its age in s on the store's clock or None if not measured)."""
    holder = _holder(text)
    if holder.get("host") == self.me["host"] and holder.get("pid") and not _pid_alive(
        int(holder["pid"])):
      return True, None
    age = self._age_s(blob)
    return age > self.STALE_S, age

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
      if _holder(text).get("id") == self.me["id"]:  # our own write, whose reply was lost
        self._generation = blob.generation
        break
      stale, age = self._stale(blob, text)
      if not stale:
        raise self._refused(text, age)
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
    """Rewrites a remote lock if it is still ours (verifies a local one); marks it ``lost``
    otherwise."""
    if not self.held or self.lost:
      return
    with self._refreshing:
      if fs.is_remote(self.path):
        self._refresh()
      else:
        self._verify_local()

  def _refresh(self) -> None:
    from google.api_core import exceptions
    blob = self._blob()
    try:
      blob.upload_from_string(self._info(), if_generation_match=self._generation)
      self._generation = blob.generation
    except (exceptions.PreconditionFailed, exceptions.NotFound):
      self._after_refused_refresh(blob)
    except Exception as e:  # noqa: BLE001  (a network blip: try again at the next refresh)
      logging.warning("could not refresh the workdir lock %s (%s); trying again in %.0f s",
                      self.path, type(e).__name__, self.REFRESH_S)

  def _after_refused_refresh(self, blob) -> None:
    """A conditional rewrite was refused: is the object still ours (an earlier attempt
    whose reply was lost succeeded), gone (deleted by hand: take it again) or another's?"""
    from google.api_core import exceptions
    try:
      try:
        blob.reload()
        text = blob.download_as_bytes(if_generation_match=blob.generation).decode(
            errors="replace")
      except exceptions.NotFound:
        blob.upload_from_string(self._info(), if_generation_match=0)
        self._generation = blob.generation
        logging.warning("the workdir lock %s was deleted while this trainer held it; it is "
                        "taken again", self.path)
        return
    except exceptions.PreconditionFailed:
      text = ""  # written by someone else in between
    except Exception as e:  # noqa: BLE001  (cannot tell yet: ask again at the next refresh)
      logging.warning("could not read the workdir lock %s (%s); trying again in %.0f s",
                      self.path, type(e).__name__, self.REFRESH_S)
      return
    if _holder(text).get("id") == self.me["id"]:
      self._generation = blob.generation
      return
    self.lost = True
    logging.error("the workdir lock %s was taken by another trainer: this one stops without "
                  "writing anything more", self.path)

  def is_lost(self) -> bool:
    """``lost``, verified first for a local lock (a stat: cheap enough for every step)."""
    if self.held and not self.lost and not fs.is_remote(self.path):
      self.refresh()
    return self.lost

  def check(self) -> None:
    """Raises WorkdirLocked if the lock is lost; it is verified (on a bucket: refreshed)
    first. Call before writing into the workdir."""
    self.refresh()
    if self.lost:
      raise WorkdirLocked(f"another trainer took over the workdir {self.workdir!r} (its lock "
                          f"was taken from this one): stopped without writing")

  def release(self) -> None:
    if not self.held:
      return
    self.held = False
    self._stop.set()
    if self._fd is not None:
      if self._is_path_of(self._fd):  # never another trainer's file
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
