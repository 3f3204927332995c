"""No training on the host CPU of a Cloud TPU VM (``ddpm_jax.tpu_vm``), rehearsed on CPU.

A TPU VM says what it is through its GCE metadata server (``accelerator-type``); the
rehearsal's metadata server (``ddpm_jax.launch``) says ``v4-8`` for one host. Off a TPU VM
nothing is asked and nothing changes.
"""

import socket

import pytest

from ddpm_jax import launch, tpu_vm
from tests import cli


@pytest.fixture
def tpu_vm_metadata():
  """A metadata server saying it is worker 0 of a one-host v4-8 slice; its GCE_METADATA_IP."""
  server = launch.metadata_server(0, 1)
  host, port = server.server_address[:2]
  yield f"{host}:{port}"
  server.shutdown()


def test_a_tpu_vm_whose_backend_is_cpu_is_refused_in_one_line(tpu_vm_metadata):
  env = {"GCE_METADATA_IP": tpu_vm_metadata, "JAX_PLATFORMS": "cpu"}
  for mode in ("train", "distill"):
    with pytest.raises(tpu_vm.CpuOnTpuVm) as e:
      tpu_vm.check_backend(mode, env, platform="cpu")
    line = str(e.value)
    assert "\n" not in line
    assert "Cloud TPU VM (v4-8)" in line  # what the machine is,
    assert "JAX_PLATFORMS=cpu leaves the TPU out" in line  # the cause found,
    assert f"{tpu_vm.ALLOW_ENV}=1" in line  # and the setting that allows it


def test_the_cause_names_the_evidence_jax_left(monkeypatch):
  """libtpu missing; JAX's own TPU error saying the TPU is in use; otherwise the TPU software
  version the runner would pick for this accelerator type (docs/tpu_pod.md)."""
  monkeypatch.setattr(tpu_vm, "_libtpu_installed", lambda: False)
  assert "libtpu is not installed" in tpu_vm.likely_cause("v4-8", {})
  monkeypatch.setattr(tpu_vm, "_libtpu_installed", lambda: True)
  monkeypatch.setattr(tpu_vm, "_tpu_backend_error",
                      lambda: "TPU initialization failed: The TPU is already in use by pid 7")
  assert tpu_vm.likely_cause("v6e-8", {}).startswith(
      "another process holds the TPU (JAX: TPU initialization failed: The TPU is already in use "
      "by pid 7")
  monkeypatch.setattr(tpu_vm, "_tpu_backend_error", lambda: None)
  cause = tpu_vm.likely_cause("v5litepod-16", {})
  assert "does not fit v5litepod-16 (Google lists v2-alpha-tpuv5-lite)" in cause


def test_the_check_lets_through_what_is_not_cpu_training_on_a_tpu_vm(tpu_vm_metadata):
  """The TPU backend, an explicit allow, a mode that does not train: nothing refused."""
  env = {"GCE_METADATA_IP": tpu_vm_metadata}
  tpu_vm.check_backend("train", env, platform="tpu")
  tpu_vm.check_backend("train", {**env, tpu_vm.ALLOW_ENV: "1"}, platform="cpu")
  tpu_vm.check_backend("sample", env, platform="cpu")
  with pytest.raises(tpu_vm.CpuOnTpuVm):  # "0" is not an allow
    tpu_vm.check_backend("train", {**env, tpu_vm.ALLOW_ENV: "0"}, platform="cpu")


def test_off_gce_the_metadata_server_is_not_asked(tmp_path, monkeypatch):
  """A laptop or a GPU box (no GCE_METADATA_IP, DMI not Google) waits on no network; a GCE VM
  (DMI says Google) is asked, and one without an accelerator type is not a TPU VM."""
  asked = []
  monkeypatch.setattr(tpu_vm, "metadata", lambda key, env, timeout_s: asked.append(key))
  dmi = tmp_path / "product_name"
  monkeypatch.setattr(tpu_vm, "DMI_FILES", (str(dmi), str(tmp_path / "absent")))
  dmi.write_text("Standard PC (Q35 + ICH9, 2009)\n")
  assert tpu_vm.accelerator_type({}) is None and asked == []
  tpu_vm.check_backend("train", {}, platform="cpu")
  assert asked == []
  dmi.write_text("Google Compute Engine\n")
  assert tpu_vm.accelerator_type({}) is None and asked == ["accelerator-type"]
  tpu_vm.check_backend("train", {}, platform="cpu")  # answered nothing: not a TPU VM


def test_a_metadata_server_that_fails_or_never_answers_is_not_a_tpu_vm():
  """Refused, 404 (a GKE node's server has no accelerator-type), silent: None, within the
  timeout, never an exception."""
  gke = launch.metadata_server(0, 1, gke=True)
  silent = socket.socket()
  silent.bind(("127.0.0.1", 0))
  silent.listen(1)  # accepts the connection, never replies
  closed = socket.socket()
  closed.bind(("127.0.0.1", 0))  # bound, not listening: connection refused
  try:
    for host, port in (gke.server_address[:2], silent.getsockname(), closed.getsockname()):
      assert tpu_vm.metadata("accelerator-type", {"GCE_METADATA_IP": f"{host}:{port}"},
                             timeout_s=0.5) is None
  finally:
    gke.shutdown()
    silent.close()
    closed.close()


def test_a_rehearsed_tpu_vm_on_cpu_stops_with_one_line(tmp_path, data_dir):
  """``main.py`` on a rehearsed one-host slice (``launch --cluster gce-tpu``: the metadata
  server says v4-8, JAX runs on the CPU) with ``DDPM_JAX_ALLOW_CPU_ON_TPU=0``: refused in one
  line before anything is written. (The rehearsal's own default, =1, trains: every gce-tpu
  run of test_multihost and test_gcs.)"""
  w = tmp_path / "w"
  args = [*cli.tiny_flags(data_dir, "--config.training.num_train_steps=2"), "--workdir", str(w)]
  job = cli.launch(1, 4, *args, cwd=tmp_path, cluster="gce-tpu",
                   extra_env={tpu_vm.ALLOW_ENV: "0"})
  assert job.finish(timeout=300) != 0
  errors = [line for line in job.output.splitlines() if line.startswith("[p0] error:")]
  assert len(errors) == 1, job.output[-3000:]
  assert "Cloud TPU VM (v4-8)" in errors[0] and f"{tpu_vm.ALLOW_ENV}=1" in errors[0]
  assert "Traceback" not in job.output
  assert not (w / "checkpoints").exists()
