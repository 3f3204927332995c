"""Input pipeline: batches from a data source (``ddpm_jax.datasets.get_source``), in a
deterministic order, per-process shards.

The order of training examples is a pure function of (seed, step): for example
``i = step * global_batch + j`` of the run, epoch ``e = i // N`` uses the permutation
``default_rng([seed, e]).permutation(N)``. Process ``p`` of ``P`` reads positions
``[p * B/P, (p+1) * B/P)`` of each global batch, so processes read disjoint
examples that together cover each epoch, and a resumed run sees exactly the
batches an uninterrupted one would. Flips are drawn from ``default_rng([seed, step])``.

Batches come out shaped ``[local_devices, per_device_batch, H, W, C]``, float32 in [-1, 1].
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from typing import Iterator

import numpy as np

from ddpm_jax import config_lib, images
from ddpm_jax.datasets.sources import Source, TfdsArraySource
from ddpm_jax.errors import DatasetError


class TrainBatches:
  """Deterministic, per-process-sharded, prefetched training batches, starting at any step.

  Args:
    source: the training split.
    global_batch: batch over all processes and devices.
    seed: data seed.
    start_step: the step of the first batch produced (a resumed run passes its step).
    random_flip: flip horizontally with probability 1/2.
    process_index, process_count, local_devices: this process's place in the job.
    num_workers: decoding threads.
    prefetch: batches prepared ahead.
    with_labels: batches are {"image": ..., "label": [local_devices, B/dev] int32}.
    num_processes: > 0: decode in this many worker processes (each reopens the records),
      which scales with cores where threads are held back by the GIL; the batches are
      the same either way. Needs a source prepared as ArrayRecords.
  """

  def __init__(self, source: Source, global_batch: int, *, seed: int = 0, start_step: int = 0,
               random_flip: bool = True, process_index: int = 0, process_count: int = 1,
               local_devices: int = 1, num_workers: int = 8, prefetch: int = 2,
               with_labels: bool = False, num_processes: int = 0):
    config_lib.check_batch_size(global_batch, process_count * local_devices,
                                "training.batch_size")
    if len(source) == 0:
      raise DatasetError("the training split is empty: check data.dataset and "
                         "data.train_split")
    self.source, self.global_batch, self.seed = source, global_batch, seed
    self.random_flip, self.with_labels = random_flip, with_labels
    self.local_batch = global_batch // process_count
    self.process_index, self.local_devices = process_index, local_devices
    self.step = start_step
    self._perms: dict[int, np.ndarray] = {}
    self._pool = concurrent.futures.ThreadPoolExecutor(num_workers)
    self._procs = None
    if num_processes > 0 and getattr(source, "spec", None):
      import multiprocessing
      self._procs = concurrent.futures.ProcessPoolExecutor(
          num_processes, mp_context=multiprocessing.get_context("spawn"),
          initializer=_worker_open, initargs=(source.spec,))
      self._num_processes = num_processes
    self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, daemon=True)
    self._thread.start()

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
      self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
    return self._perms[epoch]

  def indices(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """This process's example indices and flip flags for ``step``."""
    n = len(self.source)
    start = step * self.global_batch + self.process_index * self.local_batch
    pos = np.arange(start, start + self.local_batch, dtype=np.int64)
    idx = np.array([self._perm(int(e))[int(p)] for e, p in zip(pos // n, pos % n)])
    flips = np.random.default_rng([self.seed, step]).random(self.global_batch) < 0.5
    flips = flips[self.process_index * self.local_batch:][:self.local_batch]
    return idx, flips & self.random_flip

  def _read(self, idx):
    """(uint8 images, labels) of examples ``idx``, in order."""
    if self._procs is None:
      examples = list(self._pool.map(self.source.example, idx))
      return np.stack([img for img, _ in examples]), [label for _, label in examples]
    parts = [self._procs.submit(_worker_read, chunk)
             for chunk in np.array_split(idx, self._num_processes) if len(chunk)]
    results = [f.result() for f in parts]
    return (np.concatenate([r[0] for r in results]), [y for r in results for y in r[1]])

  def make_batch(self, step: int):
    idx, flips = self.indices(step)
    imgs, labels = self._read(idx)
    imgs = np.where(flips[:, None, None, None], imgs[:, :, ::-1], imgs)
    x = images.to_float(imgs)
    x = x.reshape((self.local_devices, -1) + x.shape[1:])
    if not self.with_labels:
      return x
    labels = np.array(labels, np.int32)
    return {"image": x, "label": labels.reshape(self.local_devices, -1)}

  def _produce(self):
    step = self.step
    while not self._stop.is_set():
      try:
        item = self.make_batch(step)
      except Exception as e:  # surfaced to the consumer
        item = e
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      step += 1

  def __iter__(self) -> Iterator[np.ndarray]:
    return self

  def __next__(self) -> np.ndarray:
    item = self._queue.get()
    if isinstance(item, Exception):
      raise item
    self.step += 1
    return item

  def close(self):
    self._stop.set()
    self._pool.shutdown(wait=False, cancel_futures=True)
    if self._procs is not None:
      self._procs.shutdown(wait=False, cancel_futures=True)


_WORKER_SOURCE = None


def _worker_open(spec: dict) -> None:
  """In a reader process: open the records once. Stop signals are the trainer's to handle
  (a Ctrl-C reaches the whole process group): the readers end when it closes the pool."""
  import signal
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  global _WORKER_SOURCE
  _WORKER_SOURCE = TfdsArraySource.from_spec(spec)


def _worker_read(indices) -> tuple[np.ndarray, list]:
  examples = [_WORKER_SOURCE.example(int(i)) for i in indices]
  return np.stack([img for img, _ in examples]), [label for _, label in examples]


def eval_batches(source: Source, batch_size: int, num_examples: int | None = None,
                 num_workers: int = 8, with_labels: bool = False) -> Iterator:
  """The first ``num_examples`` of a split in order, as float32 [-1, 1] (B, H, W, C) batches;
  with ``with_labels``, (images, int32 labels (B,)) pairs."""
  n = len(source) if num_examples is None else min(num_examples, len(source))
  with concurrent.futures.ThreadPoolExecutor(num_workers) as pool:
    for start in range(0, n, batch_size):
      exs = list(pool.map(source.example, range(start, min(start + batch_size, n))))
      imgs = images.to_float(np.stack([img for img, _ in exs]))
      yield (imgs, np.array([y for _, y in exs], np.int32)) if with_labels else imgs
