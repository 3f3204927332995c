"""On PYTHONPATH of a rehearsed Cloud TPU VM worker (``ddpm_jax.launch --cluster gce-tpu``) only.

With no TPU chip attached, importing JAX sets ``TPU_SKIP_MDS_QUERY=1``, which tells JAX's
``GceTpuCluster`` not to ask the metadata server about the slice. On a real slice the
variable is never set; removing it right after the import makes
``jax.distributed.initialize()`` detect the slice through the (simulated) metadata
server exactly as on the real thing.

The rehearsed slice trains on the CPU on purpose, which ``ddpm_jax.tpu_vm`` refuses on a TPU
VM (the metadata server says it is one) unless ``DDPM_JAX_ALLOW_CPU_ON_TPU=1``: it is set
here unless the caller set it (``=0`` rehearses the refusal).
"""

import os

if os.environ.get("DDPM_JAX_REHEARSE_GCE_TPU") == "1":
  import jax  # noqa: F401  (runs cloud_tpu_init, which sets the variable)

  os.environ.pop("TPU_SKIP_MDS_QUERY", None)
  os.environ.setdefault("DDPM_JAX_ALLOW_CPU_ON_TPU", "1")
