"""Rehearse a multi-host job on one machine: N processes of the command line as a pod runs them.

  python -m ddpm_jax.launch --processes 2 --devices-per-process 2 -- \\
      --config configs/tiny.py --workdir runs/pod

Each process gets ``--devices-per-process`` CPU devices and gloo CPU collectives, and
learns about the job the way ``--cluster`` says:
  * ``explicit`` (default): ``JAX_COORDINATOR_ADDRESS`` (127.0.0.1, a free port),
    ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``;
  * ``gce-tpu``: as on a slice made by ``gcloud compute tpus tpu-vm create``: nothing in
    the environment but ``GCE_METADATA_IP``, one small metadata server per simulated
    host answering ``agent-worker-number``, ``worker-network-endpoints`` and ``tpu-env``
    (what JAX's ``GceTpuCluster`` reads) and ``accelerator-type`` (a v4 slice, what
    ``ddpm_jax.tpu_vm`` reads), and ``JAX_FORCE_TPU_INIT=1``; the rehearsal trains on the
    CPU of a "TPU VM" on purpose, so its processes default ``DDPM_JAX_ALLOW_CPU_ON_TPU=1``
    (``ddpm_jax/rehearsal/sitecustomize.py``; set it to 0 to see the refusal);
  * ``gke-tpu``: as on GKE: ``TPU_WORKER_HOSTNAMES`` and ``TPU_WORKER_ID``.
In each case ``main.py`` calls ``jax.distributed.initialize()`` and JAX itself detects
the job, as on the real thing.
Output lines are prefixed with ``[pN]``; each process's pid is printed at the start
(``launch: process N pid P``) so one process can be signalled alone. SIGINT/SIGTERM
to the launcher go to every process. The launcher exits non-zero if any process
does; processes still running ``--grace`` seconds after another failed are killed
(they should have stopped on their own: see ``ddpm_jax.parallel``).
"""

from __future__ import annotations

import argparse
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time

# Each process runs the package's command line (``python -m ddpm_jax``, what ``main.py`` runs),
# found through PYTHONPATH from any working directory, installed or in a clone.
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


CLUSTERS = ("explicit", "gce-tpu", "gke-tpu")
_REHEARSAL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "rehearsal")


def process_env(i: int, n: int, port: int, devices: int | None, base=None,
                cluster: str = "explicit", metadata: str | None = None) -> dict:
  """The environment of process ``i`` of ``n`` (``metadata``: its metadata server, gce-tpu)."""
  env = dict(os.environ if base is None else base)
  for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
            "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID", "GCE_METADATA_IP"):
    env.pop(k, None)
  env["PYTHONUNBUFFERED"] = "1"
  env["PYTHONPATH"] = os.pathsep.join(
      [_PACKAGE_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  if cluster == "explicit":
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n),
               JAX_PROCESS_ID=str(i))
  else:  # a rehearsed TPU VM: JAX's own cluster detection finds the job
    env.update(JAX_FORCE_TPU_INIT="1", JAX_COORDINATOR_PORT=str(port),
               GCE_METADATA_IP=metadata or "")
    if cluster == "gce-tpu":
      env["DDPM_JAX_REHEARSE_GCE_TPU"] = "1"
      env["PYTHONPATH"] = os.pathsep.join(
          p for p in (_REHEARSAL, env.get("PYTHONPATH", "")) if p)
    else:
      env.update(TPU_WORKER_HOSTNAMES=",".join(["localhost"] * n), TPU_WORKER_ID=str(i))
  if devices:
    flags = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                     if "xla_force_host_platform_device_count" not in f)
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"
  return env


class _Metadata(http.server.BaseHTTPRequestHandler):
  """A GCE metadata server for one simulated TPU VM worker (instance attributes only)."""
  attributes: dict = {}

  def do_GET(self):  # noqa: N802  (http.server's name)
    prefix = "/computeMetadata/v1/instance/attributes/"
    name = self.path[len(prefix):] if self.path.startswith(prefix) else None
    ok = name in self.attributes and self.headers.get("Metadata-Flavor") == "Google"
    body = (self.attributes[name] if ok else "not found").encode()
    self.send_response(200 if ok else 404)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, *args):
    pass


def metadata_server(worker: int, workers: int, gke: bool = False):
  """Starts a metadata server (daemon thread) for ``worker``; returns it (``.server_address``)."""
  attributes = {"tpu-env": ""}
  if not gke:  # a GKE node's metadata server says nothing about TPU workers
    attributes.update({"agent-worker-number": str(worker),
                       "worker-network-endpoints": ",".join(["localhost"] * workers),
                       "accelerator-type": f"v4-{8 * workers}"})  # 4 chips, 8 cores a host
  handler = type("Metadata", (_Metadata,), {"attributes": attributes})
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  return server


def _die_with_parent() -> None:
  """Linux: a process of the job is killed if the launcher dies (no orphans holding ports)."""
  try:
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):
    pass


def _pump(stream, prefix: str, out) -> None:
  for line in iter(stream.readline, ""):
    out.write(f"{prefix}{line}")
    out.flush()
  stream.close()


def launch(args: list[str], processes: int, devices_per_process: int | None = None,
           port: int | None = None, grace_s: float = 150.0, script: str | None = None,
           cluster: str = "explicit") -> int:
  """Runs ``python -m ddpm_jax args`` (or ``python script args``) as ``processes`` processes;
  returns the job's exit status."""
  command = [sys.executable] + (["-m", "ddpm_jax"] if script is None else [script])
  port = port or free_port()
  procs, pumps = [], []
  servers = [metadata_server(i, processes, gke=cluster == "gke-tpu")
             for i in range(processes)] if cluster != "explicit" else []
  for i in range(processes):
    metadata = (f"{servers[i].server_address[0]}:{servers[i].server_address[1]}" if servers
                else None)
    p = subprocess.Popen([*command, *args],
                         env=process_env(i, processes, port, devices_per_process, None,
                                         cluster, metadata),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, preexec_fn=_die_with_parent)
    print(f"launch: process {i} pid {p.pid}", flush=True)
    procs.append(p)
    for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
      th = threading.Thread(target=_pump, args=(stream, f"[p{i}] ", out), daemon=True)
      th.start()
      pumps.append(th)

  def forward(signum, frame):
    for p in procs:
      if p.poll() is None:
        p.send_signal(signum)
  old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    failed_at = None
    while any(p.poll() is None for p in procs):
      if failed_at is None and any(p.poll() not in (None, 0) for p in procs):
        failed_at = time.time()
      if failed_at is not None and time.time() - failed_at > grace_s:
        for i, p in enumerate(procs):
          if p.poll() is None:
            print(f"launch: process {i} still running {grace_s:.0f} s after another failed: "
                  f"killing it", file=sys.stderr, flush=True)
            p.kill()
      time.sleep(0.1)
  finally:
    for s, h in old.items():
      signal.signal(s, h)
    for server in servers:
      server.shutdown()
  for th in pumps:
    th.join(timeout=5)
  codes = [p.returncode for p in procs]
  for i, c in enumerate(codes):
    what = f"signal {signal.Signals(-c).name}" if c < 0 else f"status {c}"
    print(f"launch: process {i} exited with {what}", file=sys.stderr if c else sys.stdout,
          flush=True)
  return next((1 if c < 0 else c for c in codes if c), 0)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m ddpm_jax.launch", description=__doc__.split("\n\n")[0],
      usage="%(prog)s [-h] --processes N [--devices-per-process D] [--cluster C] "
            "-- MAIN_PY_ARGS...")
  parser.add_argument("--processes", "-n", type=int, required=True, help="processes to start")
  parser.add_argument("--devices-per-process", type=int, default=None,
                      help="CPU devices per process (rehearsal on CPU); unset: the platform's")
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
  parser.add_argument("--cluster", choices=CLUSTERS, default="explicit",
                      help="how processes find the job: explicit variables, a rehearsed "
                           "Cloud TPU VM slice (GCE metadata servers) or GKE TPU variables")
  parser.add_argument("--grace", type=float, default=150.0,
                      help="seconds survivors get to stop after a process failed")
  argv = sys.argv[1:] if argv is None else argv
  if "--" in argv:
    split = argv.index("--")
    ours, rest = argv[:split], argv[split + 1:]
  else:
    ours, rest = argv, []
  a = parser.parse_args(ours)
  if a.processes < 1:
    parser.error("--processes must be >= 1")
  return launch(rest, a.processes, a.devices_per_process, a.port, a.grace,
                cluster=a.cluster)


if __name__ == "__main__":
  sys.exit(main())
