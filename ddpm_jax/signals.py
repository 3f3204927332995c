"""Stop signals: SIGTERM/SIGINT become a request the train loop agrees on, or, during
start-up, a stop within seconds."""

from __future__ import annotations

import _thread
import gc
import os
import signal
import threading
import time

from absl import logging

from ddpm_jax.errors import StoppedEarly


class StopRequest:
  """Turns SIGTERM/SIGINT into a flag the train loop checks; a second SIGINT interrupts at once.

  During start-up (``started()`` not yet called: restoring, preparing data, compiling)
  there is nothing new to save, and a Spot VM's notice is about 30 s, so a signal stops
  the process at once: ``StoppedEarly`` is raised in the main thread, and if the main
  thread is stuck in a long native call (an XLA compile) a watcher thread ends the
  process after ``HARD_STOP_S`` (``on_hard_stop`` runs first, e.g. to release a lock).

  Python drops an exception raised where it cannot propagate (a gc callback such as
  JAX's, a ``__del__``), printing "Exception ignored"; the signal often lands there
  during start-up. So inside a gc callback the handler defers: the watcher calls it
  again (``_thread.interrupt_main``) every ``RERAISE_S`` until it runs outside one and
  raises. (Dropped elsewhere, the hard stop ends the process.)
  """
  HARD_STOP_S = 5.0
  RERAISE_S = 0.1

  def __init__(self, on_hard_stop=None):
    self.signal = None
    self._old = {}
    self._starting = True
    self._on_hard_stop = on_hard_stop
    self._wakeup = None
    self._deferred = False
    self._message = ""

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._old[sig] = signal.signal(sig, self._handle)
    return self

  def started(self) -> None:
    """The first train step ran: from now on a signal is agreed and saved at a step."""
    self._starting = False
    self._deferred = False  # a signal deferred until now: the loop saves and stops

  def _handle(self, signum, frame):
    if self._deferred:  # called again by the watcher (or a second signal)
      if _in_gc_callback(frame):
        return
      self._deferred = False
      raise StoppedEarly(self._message)
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signal = signal.Signals(signum).name
    if self._starting:
      self._message = (f"{self.signal} received during start-up, before the first step: "
                       f"stopped; nothing new to save (the same command resumes)")
      if self._wakeup is not None and _in_gc_callback(frame):
        self._deferred = True  # raised here, it would be dropped
        return
      raise StoppedEarly(self._message)
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
      if self._deferred:
        _thread.interrupt_main(data[0])
      time.sleep(self.RERAISE_S)
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


def _in_gc_callback(frame) -> bool:
  """Whether ``frame`` runs inside one of ``gc.callbacks``, where exceptions are dropped."""
  codes = {getattr(cb, "__code__", None) for cb in gc.callbacks}
  while frame is not None:
    if frame.f_code in codes:
      return True
    frame = frame.f_back
  return False
