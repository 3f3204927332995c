"""The one progress display: a tqdm bar on a terminal, plain lines in a log file.

Only process 0 shows progress (``enabled=jax.process_index() == 0`` by default).
"""

from __future__ import annotations

import sys
import time


class Progress:
  """Progress over ``total`` units (steps, batches, images, network calls).

  On a terminal: a tqdm bar. Otherwise a line every ``log_every`` units (default:
  about every tenth of the total) and at the end, with the rate and the time left.
  ``per_unit``, a (count, name) pair such as (batch_size, "img"), adds a second rate.
  """

  def __init__(self, total: int, desc: str, unit: str = "it", *, initial: int = 0,
               log_every: int | None = None, per_unit: tuple[int, str] | None = None,
               enabled: bool | None = None):
    if enabled is None:
      import jax
      enabled = jax.process_index() == 0
    self.total, self.desc, self.unit, self.per_unit = total, desc, unit, per_unit
    self.log_every = log_every or max(1, total // 10)
    self.enabled = enabled
    self.done = initial
    self._t0, self._n0 = time.time(), initial
    self._bar = None
    if enabled and sys.stderr.isatty():
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def update(self, n: int = 1, postfix: dict | None = None) -> None:
    before, self.done = self.done, self.done + n
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.update(n)
      if postfix:
        self._bar.set_postfix(postfix, refresh=False)
      return
    if self.done // self.log_every > before // self.log_every or self.done >= self.total:
      print(self.line(postfix), flush=True)

  def line(self, postfix: dict | None = None) -> str:
    dt = max(time.time() - self._t0, 1e-9)
    rate = (self.done - self._n0) / dt
    eta = (self.total - self.done) / rate if rate > 0 else float("nan")
    parts = [f"{self.desc}: {self.unit} {self.done}/{self.total}", f"{rate:.2f} {self.unit}/s"]
    if self.per_unit:
      parts.append(f"{rate * self.per_unit[0]:.1f} {self.per_unit[1]}/s")
    parts.append(f"eta {eta / 60:.1f} min")
    if postfix:
      parts.append(" ".join(f"{k}={v}" for k, v in postfix.items()))
    return " | ".join(parts)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
