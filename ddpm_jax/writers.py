"""Metric writers: TensorBoard event files (without TensorFlow) and ``metrics.jsonl``,
through ``ddpm_jax.fs`` (local or ``gs://``); and ``unclaimed``, the rule by which the
modes' and eval's outputs never overwrite results made with other settings."""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import time
import uuid

from absl import logging

from ddpm_jax import fs, parallel


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
    so that every step's line is there exactly once after any interruption. A line that is
    not ours (not a JSON object with a numeric step: an edit, a crash's garbage) is dropped
    with a warning, as a torn last line is: it never blocks a restart, and what is left reads
    line by line."""
    if self.enabled:
      self._jsonl.keep_lines(lambda line: _logged_step(line, self._jsonl.path) <= step)

  def _maybe_flush(self):
    if not self._remote or time.time() - self._flushed > self._flush_every_s:
      self.flush()

  def flush(self, strict: bool = False):
    """Writes what is pending. On a store that does not answer, the lines stay pending for
    the next flush (a warning), unless ``strict`` (before a checkpoint: the caller retries)."""
    if self.enabled:
      if self.before_write is not None:
        self.before_write()
      try:
        self._tb.flush()
        self._jsonl.flush()
      except Exception as e:
        if strict or not self._remote or not fs.is_transient(e):
          raise
        logging.warning("could not write the logs to the store (%s); they are kept and "
                        "written at the next flush", type(e).__name__)
        return
      self._flushed = time.time()

  def close(self):
    self.flush(strict=True)


def _logged_step(line: bytes, path: str) -> float:
  """The step of a ``metrics.jsonl`` line; +inf (dropped) with a warning for a foreign one."""
  try:
    record = json.loads(line)
  except ValueError:  # not JSON (UnicodeDecodeError is a ValueError too)
    record = None
  step = record.get("step") if isinstance(record, dict) else None
  if isinstance(step, bool) or not isinstance(step, (int, float)) or step != step:
    logging.warning("%s: dropped a line that is not a metrics record: %.80r", path, line)
    return math.inf
  return step


def unclaimed(candidate, record_of, settings: dict) -> str:
  """``candidate(1)``, or ``candidate(2)``, ...: the first output path that is new or was
  written with the same ``settings`` (its record ``record_of(path)`` says so), so that
  earlier results made with other settings are never overwritten."""
  want = json.loads(json.dumps(settings))
  for k in itertools.count(1):
    path = candidate(k)
    record = record_of(path)
    if not fs.exists(record) and not fs.exists(path):
      break
    if fs.exists(record):
      try:
        if json.loads(fs.read_text(record)).get("settings") == want:
          break
      except (ValueError, AttributeError):  # unreadable or not ours: leave it alone
        pass
  if k > 1 and parallel.is_main():
    logging.warning("%s holds results made with other settings: writing to %s instead",
                    candidate(1), path)
  return path
