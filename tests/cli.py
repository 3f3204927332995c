"""Running the command line in tests: ``main.py`` or the launcher, output read as it comes."""

import os
import re
import subprocess
import sys
import threading
import time

from tests.conftest import REPO


def env(**extra) -> dict:
  """The test session's environment (4 forced CPU devices, its compilation cache) + extra."""
  e = dict(os.environ, PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="3")
  e.update(extra)
  return e


def tiny_flags(data_dir, *extra):
  return ["--config", os.path.join(REPO, "configs", "tiny.py"),
          f"--config.data.data_dir={data_dir}", *extra]


class Job:
  """A running command whose merged output lines are collected by a thread."""

  def __init__(self, args, cwd, extra_env=None):
    self.start = time.time()
    self.proc = subprocess.Popen(args, cwd=cwd, env=env(**(extra_env or {})),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines: list[str] = []
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self):
    for line in iter(self.proc.stdout.readline, ""):
      self.lines.append(line)

  @property
  def output(self) -> str:
    return "".join(self.lines)

  def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
    """The first output line matching ``pattern``; fails if the job ends without one."""
    rx = re.compile(pattern)
    seen = 0
    while time.time() - self.start < timeout:
      for line in self.lines[seen:]:
        if m := rx.search(line):
          return m
      seen = len(self.lines)
      if self.proc.poll() is not None and len(self.lines) == seen:
        self._reader.join(timeout=5)
        if not any(rx.search(x) for x in self.lines):
          raise AssertionError(f"exited {self.proc.returncode} without {pattern!r}:\n"
                               + self.output[-4000:])
      time.sleep(0.05)
    raise TimeoutError(f"no {pattern!r} in {timeout} s:\n" + self.output[-4000:])

  def finish(self, timeout: float = 600) -> int:
    self.proc.wait(timeout=timeout)
    self._reader.join(timeout=10)
    return self.proc.returncode

  def pids(self, n: int) -> list[int]:
    """The pids of the launcher's ``n`` processes, in process order."""
    return [int(self.wait_for(rf"launch: process {i} pid (\d+)").group(1)) for i in range(n)]


def main_py(*args, cwd, extra_env=None) -> Job:
  return Job([sys.executable, os.path.join(REPO, "main.py"), *args], cwd, extra_env)


def launch(processes: int, devices: int, *args, cwd, extra_env=None,
           cluster: str = "explicit") -> Job:
  """The launcher; it gives each process ``devices`` CPU devices (replacing the 4 forced here).

  ``cluster``: how the processes find the job (see ``ddpm_jax.launch``): explicit variables,
  a rehearsed Cloud TPU VM slice (``gce-tpu``: metadata servers) or GKE (``gke-tpu``).
  """
  return Job([sys.executable, "-m", "ddpm_jax.launch", "--processes", str(processes),
              "--devices-per-process", str(devices), "--cluster", cluster, "--", *args], cwd,
             extra_env)


def statuses(job: Job) -> dict[int, str]:
  """Each process's own exit, as the launcher reports it: {0: "status 0", 1: "signal SIGKILL"}."""
  return {int(i): what for i, what in
          re.findall(r"launch: process (\d+) exited with (status -?\d+|signal \w+)", job.output)}


def run(job: Job, timeout: float = 600) -> Job:
  """Waits for ``job`` and fails with its output unless it exited 0."""
  rc = job.finish(timeout)
  assert rc == 0, f"exit {rc}\n{job.output[-4000:]}"
  return job


def final_state(workdir, config):
  """(step, host TrainState) of the newest checkpoint in ``workdir``."""
  from ddpm_jax import checkpoint as ckpt_lib
  from ddpm_jax import state as state_lib
  mngr = ckpt_lib.make_manager(str(workdir), read_only=True, async_save=False)
  return mngr.latest_step(), ckpt_lib.restore(mngr, state_lib.abstract_train_state(config))


def assert_same_state(a, b):
  import jax
  import numpy as np
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
