"""Refuse to train on the host CPU of a Cloud TPU VM: the slice bills as a TPU either way.

On a TPU VM whose JAX misses the TPU (a TPU software version that does not fit the
accelerator type, libtpu not installed, the TPU held by another process), JAX falls back to
the host CPU with a warning few read, and training runs for hours at a fraction of the speed
(reported in dstack#2148, pytorch/xla#8295). ``check_backend`` stops such a run before it
starts with one line naming the likely cause; ``DDPM_JAX_ALLOW_CPU_ON_TPU=1`` lets it train
(the CPU rehearsals of a slice, ``ddpm_jax.launch --cluster gce-tpu``, set it).

A TPU VM is recognised by its GCE metadata server's ``accelerator-type`` instance attribute
(e.g. ``v4-32``), or by TPU chips on the PCI bus. The metadata server is asked only where it
can exist (``GCE_METADATA_IP`` set, as JAX and google-auth read it, or the machine's DMI
saying Google Compute Engine) and only when the backend is already the CPU, with a short
timeout: a laptop, a GPU box or an offline machine waits on no network.
"""

from __future__ import annotations

import http.client
import importlib.util
import os
import urllib.request

from ddpm_jax.errors import UserError

ALLOW_ENV = "DDPM_JAX_ALLOW_CPU_ON_TPU"
TRAINING_MODES = ("train", "distill", "consistency")
METADATA_IP = "169.254.169.254"  # metadata.google.internal, without a DNS lookup
METADATA_TIMEOUT_S = 2.0
DMI_FILES = ("/sys/class/dmi/id/product_name", "/sys/class/dmi/id/bios_vendor")

# The TPU software version ("runtime version") Google lists for JAX per TPU generation
# (cloud.google.com/tpu/docs/runtimes): on a wrong one JAX can miss the TPU and train on the
# host CPU while the slice bills. Keyed on the --accelerator-type prefix ("v5litepod-16").
RUNTIME_VERSIONS = (
    (("v2-", "v3-", "v4-"), "tpu-ubuntu2204-base"),
    (("v5litepod-", "v5e-"), "v2-alpha-tpuv5-lite"),
    (("v5p-",), "v2-alpha-tpuv5"),
    (("v6e-",), "v2-alpha-tpuv6e"),
)


def runtime_version(accelerator_type: str) -> str | None:
  """The TPU software version for ``accelerator_type`` (e.g. v4-32), None if not known here."""
  kind = (accelerator_type or "").strip().lower()
  return next((version for prefixes, version in RUNTIME_VERSIONS
               if kind.startswith(prefixes)), None)


class CpuOnTpuVm(UserError, RuntimeError):
  """JAX runs on the CPU of a machine that has (or should have) TPUs."""


def allowed(env=None) -> bool:
  env = os.environ if env is None else env
  return env.get(ALLOW_ENV, "").strip().lower() in ("1", "true", "yes")


def metadata(key: str, env=None, timeout_s: float = METADATA_TIMEOUT_S) -> str | None:
  """The instance attribute ``key`` from the GCE metadata server; None if nothing answers it."""
  env = os.environ if env is None else env
  host = env.get("GCE_METADATA_IP") or env.get("GCE_METADATA_HOST") or METADATA_IP
  request = urllib.request.Request(
      f"http://{host}/computeMetadata/v1/instance/attributes/{key}",
      headers={"Metadata-Flavor": "Google"})
  opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
  try:
    with opener.open(request, timeout=timeout_s) as r:
      return r.read().decode(errors="replace").strip() or None
  except (OSError, ValueError, http.client.HTTPException):  # refused, 404, timed out, garbled
    return None


def _on_gce(env) -> bool:
  """A metadata server may answer here: named in the environment, or a GCE VM by its DMI."""
  if env.get("GCE_METADATA_IP") or env.get("GCE_METADATA_HOST"):
    return True
  for path in DMI_FILES:
    try:
      with open(path) as f:
        if f.read().strip().startswith("Google"):
          return True
    except OSError:
      pass
  return False


def accelerator_type(env=None, timeout_s: float = METADATA_TIMEOUT_S) -> str | None:
  """This TPU VM's accelerator type (``v5litepod-16``); None off a TPU VM (no network then)."""
  env = os.environ if env is None else env
  return metadata("accelerator-type", env, timeout_s) if _on_gce(env) else None


def tpu_chips() -> int:
  """TPU chips on this machine's PCI bus, as JAX counts them (0 where it cannot tell)."""
  try:
    from jax._src import hardware_utils
    return int(hardware_utils.num_available_tpu_chips_and_device_id()[0])
  except Exception:  # noqa: BLE001  a private helper: absent or changed in another JAX
    return 0


def _libtpu_installed() -> bool:
  try:
    from jax._src import cloud_tpu_init
    return cloud_tpu_init.get_tpu_library_path() is not None
  except Exception:  # noqa: BLE001
    return importlib.util.find_spec("libtpu") is not None


def _tpu_backend_error() -> str | None:
  """Why JAX's TPU backend failed to start, if it tried (JAX keeps the message)."""
  try:
    from jax._src import xla_bridge
    err = getattr(xla_bridge, "_backend_errors", {}).get("tpu")
  except Exception:  # noqa: BLE001
    return None
  return " ".join(str(err).split())[:240] if err else None


def likely_cause(accelerator: str | None, env) -> str:
  """The one-line reason, most specific evidence first."""
  platforms = env.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms.lower().split(","):
    return f"JAX_PLATFORMS={platforms} leaves the TPU out"
  if not _libtpu_installed():
    return ("libtpu is not installed in this Python (install requirements-tpu.txt, "
            "jax[tpu], into the venv)")
  expected = runtime_version(accelerator or "")
  version = (f"the TPU software version does not fit {accelerator} (Google lists {expected})"
             if expected else "the TPU software version does not fit the accelerator type")
  err = _tpu_backend_error()
  if err and any(w in err.lower() for w in ("in use", "busy", "lock", "already")):
    return (f"another process holds the TPU (JAX: {err}; see `sudo lsof -w /dev/accel* "
            f"/dev/vfio/*`)")
  seen = f" (JAX: {err})" if err else ""
  return f"likely {version}, or another process holds the TPU{seen}"


def check_backend(mode: str, env=None, platform: str | None = None) -> None:
  """Raises ``CpuOnTpuVm`` if ``mode`` trains on the CPU backend of a TPU VM (not allowed)."""
  env = os.environ if env is None else env
  if mode not in TRAINING_MODES or allowed(env):
    return
  if platform is None:
    import jax
    platform = jax.default_backend()
  if platform != "cpu":
    return
  chips = tpu_chips()
  accelerator = accelerator_type(env)
  if accelerator is None and not chips:
    return  # not a TPU VM: a CPU run is what was asked for
  where = (f"a Cloud TPU VM ({accelerator})" if accelerator
           else f"a machine with {chips} TPU chip(s)")
  what = "train" if mode == "train" else f"train (--mode={mode})"
  raise CpuOnTpuVm(f"this is {where} but JAX has no TPU and would {what} on the host CPU while "
                   f"the TPU bills: {likely_cause(accelerator, env)}; set {ALLOW_ENV}=1 to "
                   f"train on the CPU anyway")
