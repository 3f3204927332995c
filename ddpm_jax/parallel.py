"""The one place that parallelises, and where multi-host decisions are made.

Devices: training and sampling use ``jax.pmap`` over the local devices of every
process with the axis name ``AXIS``; collectives over that axis span all devices of
all processes.

Processes (a TPU pod slice, a multi-node GPU job, ``python -m ddpm_jax.launch``):
every process runs the same command, and nothing that ends in a collective is
decided by one process alone:
  * host-side requests in the train loop (stop on a signal, save because a clock
    says so) ride along with the next train step and are combined with ``agree``
    (a ``pmax`` over all devices); every process reads back the same value and acts
    at the same step;
  * work only process 0 does (preparing data, taking the workdir lock) goes through
    ``process_0_then_all``: the others wait for its outcome and raise its error;
  * only process 0 writes logs, samples and reports (``is_main``);
  * a process that dies is noticed by the others through the coordination service's
    heartbeat (``DDPM_JAX_HEARTBEAT_TIMEOUT_S``, default 60 s) or at once by a
    failing collective; they then exit non-zero;
  * on an outcome every process shares (an error decided together, a stop during
    start-up), process 0 leaves last (``leave_together``): the others need its
    coordination service until they are out.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable, NamedTuple, NoReturn

import jax
import numpy as np

from ddpm_jax import config_lib, errors

AXIS = "batch"
HEARTBEAT_TIMEOUT_S = 60
# How long processes wait for each other to join (a slow host, a VM still booting).
INIT_TIMEOUT_S = 600


def is_main() -> bool:
  """True on the process that writes files and logs (process 0)."""
  return jax.process_index() == 0


def check_batch_size(global_batch: int, what: str = "training.batch_size") -> int:
  """Returns the per-device batch, or raises a clear error if it does not divide."""
  return config_lib.check_batch_size(global_batch, jax.device_count(), what)


def pmap(fn: Callable, *, in_axes=0, donate_argnums=()) -> Callable:
  """``jax.pmap`` over local devices with axis name ``AXIS``."""
  return jax.pmap(fn, axis_name=AXIS, in_axes=in_axes, donate_argnums=donate_argnums)


def _local_sharding():
  """Splits a leading axis of length local_device_count over the local devices."""
  # Named like pmap's own output sharding, so pmapped functions see one input sharding
  # (an input with another mesh would make them compile again).
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def replicate(tree):
  """Copies a host pytree onto every local device (leading axis = local devices)."""
  n, sharding = jax.local_device_count(), _local_sharding()
  return jax.tree.map(
      lambda x: jax.device_put(np.broadcast_to(np.asarray(x)[None], (n,) + np.shape(x)),
                               sharding), tree)


def unreplicate(tree):
  """Takes the first local device's copy of a replicated pytree, as host numpy arrays.

  Copies that device's buffer: indexing the array (``x[0]``) would run an XLA
  computation over the local devices, whose collectives deadlocked with gloo when
  another process was in a different collective (seen with 2 devices per process).
  The copy is a real one: on CPU ``np.asarray`` may alias the device buffer, which the
  next (donating) train step overwrites while an async checkpoint still writes it.
  """
  return jax.tree.map(lambda x: np.array(x.addressable_data(0), copy=True)[0], tree)


def shard(batch: np.ndarray):
  """Puts a host batch [local_devices, ...] onto the local devices, one slice each (async)."""
  if jax.process_count() > 1:
    return batch  # pmap assembles the global array from each process's local part
  return jax.device_put(batch, _local_sharding())


def allgather(x: np.ndarray) -> np.ndarray:
  """Concatenates every process's ``x`` (same shape on each) along axis 0, in process order."""
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x)).reshape((-1,) + x.shape[1:])


# Requests that one process may make and all must act on together: stop (save, then leave),
# save (a clock says so), abort (process 0 lost the workdir lock: leave without writing).
REQUESTS = ("stop", "save", "abort")  # Agreed's fields, in order


def requests_array(**requests: bool) -> np.ndarray:
  """This process's requests, one row per local device, to pass into a pmapped step."""
  row = np.array([bool(requests.get(name, False)) for name in REQUESTS], np.int32)
  return np.broadcast_to(row, (jax.local_device_count(), len(REQUESTS)))


def agree(requests):
  """Inside a pmapped function: the requests of every device of every process, combined."""
  return jax.lax.pmax(requests, AXIS)


class Agreed(NamedTuple):
  """Requests every process agreed on (the same on each); ``a | b`` combines two."""
  stop: bool = False
  save: bool = False
  abort: bool = False

  def __or__(self, other: Agreed) -> Agreed:
    return Agreed(*(a or b for a, b in zip(self, other)))


def read_agreed(agreed) -> Agreed:
  """The combined requests (identical on every process)."""
  row = np.asarray(jax.device_get(agreed))[0]
  return Agreed(*(bool(row[i]) for i in range(len(REQUESTS))))


_calls: dict[str, int] = {}


def _client():
  from jax._src import distributed
  return distributed.global_state.client


def _key(name: str) -> str:
  """A key for the ``n``-th call named ``name``: every process makes the same calls in order."""
  n = _calls[name] = _calls.get(name, 0) + 1
  return f"ddpm_jax/{name}/{n}"


def _wait_for(key: str, timeout_s: float, what: str) -> str:
  """The value of ``key`` once some process sets it; polls, so signals are handled meanwhile.

  A peer that died ends the wait too: the coordination service's error propagates.
  """
  deadline = time.monotonic() + timeout_s
  client = _client()
  while True:
    try:
      return client.key_value_try_get(key)
    except Exception as e:  # noqa: BLE001  (NOT_FOUND until set; anything else is real)
      if "NOT_FOUND" not in str(e) and "not found" not in str(e).lower():
        raise
    if time.monotonic() > deadline:
      raise errors.UserError(f"process {jax.process_index()} waited {timeout_s:.0f} s for "
                             f"{what} and gave up; see the other processes' logs")
    time.sleep(0.1)


def exchange(name: str, value: str, timeout_s: float = 1800) -> list[str]:
  """Every process's ``value``, in process order (each process calls it once, in step).

  Host-side agreement through the coordination service's key-value store: no device
  computation, so it works while devices are busy or before any are used.
  """
  if jax.process_count() == 1:
    return [value]
  key = _key(name)
  _client().key_value_set(f"{key}/{jax.process_index()}", value)
  return [_wait_for(f"{key}/{i}", timeout_s, f"process {i} at {name!r}")
          for i in range(jax.process_count())]


def process_0_then_all(name: str, fn: Callable, timeout_s: float = 4 * 3600):
  """Runs ``fn`` on process 0 while the others wait (at most ``timeout_s``) for its outcome.

  The others raise process 0's ``UserError`` (same class, same message), or a
  RuntimeError if it failed otherwise. Returns ``fn()``'s result on process 0 and
  None elsewhere. Every process must make the same calls in the same order.
  """
  if jax.process_count() == 1:
    return fn()
  key = _key(name)
  if is_main():
    try:
      out = fn()
    except errors.UserError as e:
      _client().key_value_set(key, f"user\t{type(e).__name__}\t{e}")
      raise
    except BaseException as e:
      _client().key_value_set(key, f"crash\t{type(e).__name__}\t{e}")
      raise
    _client().key_value_set(key, "ok")
    return out
  status = _wait_for(key, timeout_s, f"process 0 to finish {name!r}")
  if status == "ok":
    return None
  kind, cls, msg = status.split("\t", 2)
  if kind == "user":
    raise getattr(errors, cls, errors.UserError)(msg)
  raise errors.UserError(f"process 0 failed during {name!r} ({cls}: {msg}); see its log")


# How long process 0 waits for the others to leave (``leave_together``); at most half the
# heartbeat timeout, so that a process gone first is not declared dead while process 0 waits.
LEAVE_TIMEOUT_S = 30.0
# After the last flag, so that its process is gone (os._exit) before the service goes.
LEAVE_GRACE_S = 1.0
_heartbeat_timeout_s = HEARTBEAT_TIMEOUT_S


def leave_together(status: int) -> NoReturn:
  """Ends this process with ``status`` (``os._exit``, no shutdown barrier) after an outcome
  every process shares (a UserError decided together, a stop during start-up).

  Process 0 runs the coordination service, and a process whose service goes away is
  aborted by JAX's client (SIGABRT, a crash dump instead of the one line). So process 0
  leaves last: every other process flags ``ddpm_jax/left/<i>`` in the key-value store and
  leaves at once, never touching the service again; process 0 waits for every flag, at
  most ``LEAVE_TIMEOUT_S`` (30 s, or half the heartbeat timeout if less), then
  ``LEAVE_GRACE_S`` more, and leaves. A process more than that late to its flag (or
  going another way) may still see the service go. Output is flushed first.
  """
  _test_delay()
  sys.stdout.flush()
  sys.stderr.flush()
  if jax.process_count() > 1:
    try:
      if is_main():
        _wait_for_others_to_leave(min(LEAVE_TIMEOUT_S, _heartbeat_timeout_s / 2))
      else:
        _client().key_value_set(f"ddpm_jax/left/{jax.process_index()}", "1")
    except Exception:  # noqa: BLE001  (the service is gone or failing: leave anyway)
      pass
  os._exit(status)


def _wait_for_others_to_leave(timeout_s: float) -> None:
  """Process 0: until every other process has flagged that it leaves, or ``timeout_s``."""
  deadline = time.monotonic() + timeout_s
  others = {f"ddpm_jax/left/{i}" for i in range(1, jax.process_count())}
  while time.monotonic() < deadline:
    if others <= {k for k, _ in _client().key_value_dir_get("ddpm_jax/left/")}:
      time.sleep(LEAVE_GRACE_S)
      return
    time.sleep(0.05)


def _test_delay() -> None:
  """Tests only: ``DDPM_JAX_TEST_SLOW_LEAVE=<process>:<seconds>`` makes that process late
  to ``leave_together`` (a slow host)."""
  who, _, seconds = os.environ.get("DDPM_JAX_TEST_SLOW_LEAVE", "").partition(":")
  if who and int(who) == jax.process_index():
    time.sleep(float(seconds))


def _explicit_launch(env) -> bool:
  """The environment names the job's processes itself (``ddpm_jax.launch``, a user)."""
  return bool(env.get("JAX_COORDINATOR_ADDRESS"))


def initialize_distributed(env=None) -> None:
  """Joins this process to its multi-process job, if it is part of one.

  Which job is JAX's own decision (``jax.distributed.initialize()`` with no arguments):
  a Cloud TPU VM slice (the GCE metadata server), GKE TPU variables, SLURM, Open MPI,
  or explicit ``JAX_COORDINATOR_ADDRESS`` (+ ``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``,
  as ``ddpm_jax.launch`` sets them). Where JAX finds no cluster (a laptop, one GPU
  box) the process runs alone.
  """
  env = os.environ if env is None else env
  kwargs = {}
  if _explicit_launch(env) and env.get("JAX_NUM_PROCESSES") and env.get("JAX_PROCESS_ID"):
    kwargs = dict(num_processes=int(env["JAX_NUM_PROCESSES"]),
                  process_id=int(env["JAX_PROCESS_ID"]))
  global _heartbeat_timeout_s
  _heartbeat_timeout_s = int(env.get("DDPM_JAX_HEARTBEAT_TIMEOUT_S", HEARTBEAT_TIMEOUT_S))
  try:
    jax.distributed.initialize(
        heartbeat_timeout_seconds=_heartbeat_timeout_s,
        initialization_timeout=int(env.get("DDPM_JAX_INIT_TIMEOUT_S", INIT_TIMEOUT_S)),
        **kwargs)
  except ValueError as e:
    # JAX found no cluster and no coordinator was named: a single-process run.
    if "coordinator_address should be defined" not in str(e):
      raise
    return
  _start_together(float(env.get("DDPM_JAX_INIT_TIMEOUT_S", INIT_TIMEOUT_S)))


def _start_together(timeout_s: float) -> None:
  """CPU collectives (gloo) set up their connections at the first collective, and a process
  that gets there more than 30 s after another (a slow host, a compile that took longer
  under load) fails it ("Gloo context initialization failed: DEADLINE_EXCEEDED"), which
  aborted whole jobs. So every process first waits for the others (up to ``timeout_s``)
  and then runs one tiny collective over all devices; later collectives wait for a late
  process as long as it takes (a dead one ends them at once)."""
  if jax.process_count() == 1 or jax.devices()[0].platform != "cpu":
    return
  exchange("start", "ready", timeout_s)
  ones = np.ones((jax.local_device_count(), 1), np.float32)
  jax.pmap(lambda x: jax.lax.psum(x, "all"), axis_name="all")(ones).block_until_ready()
