"""The one place that parallelises: device meshes for pmap, sharding and replication.

Training and sampling use ``jax.pmap`` over the local devices of every process with
the axis name ``AXIS``; collectives over that axis span all devices of all processes.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

AXIS = "batch"


def check_batch_size(global_batch: int, what: str = "training.batch_size") -> int:
  """Returns the per-device batch, or raises a clear error if it does not divide."""
  n = jax.device_count()
  if global_batch <= 0 or global_batch % n:
    raise ValueError(f"{what}={global_batch} must be a positive multiple of the number of "
                     f"devices ({n}); set --config.{what}={max(n, global_batch // n * n)}")
  return global_batch // n


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
  """Takes device 0's copy of a replicated pytree, as host numpy arrays."""
  return jax.device_get(jax.tree.map(lambda x: x[0], tree))


def shard(batch: np.ndarray):
  """Puts a host batch [local_devices, ...] onto the local devices, one slice each (async)."""
  if jax.process_count() > 1:
    return batch  # pmap assembles the global array from each process's local part
  return jax.device_put(batch, _local_sharding())


def is_multi_host_launch(env=None) -> bool:
  """True when the environment says several processes make up this job."""
  import os
  env = os.environ if env is None else env
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if "," in env.get("TPU_WORKER_HOSTNAMES", ""):  # Cloud TPU VM pod slice
    return True
  return any(int(env.get(k, "1") or 1) > 1 for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))


def maybe_initialize_distributed() -> None:
  """Calls ``jax.distributed.initialize()`` for multi-host jobs (TPU pods: no arguments).

  Single-host runs skip it.
  """
  if is_multi_host_launch():
    jax.distributed.initialize()
