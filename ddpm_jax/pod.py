"""Train on a Cloud TPU VM slice from your own machine, through preemptions: ``gcloud`` driven.

  python -m ddpm_jax.pod run --name ddpm --zone us-central2-b --accelerator-type v4-32 --spot \\
      --repo https://github.com/YOU/ddpm_jax --workdir gs://BUCKET/runs/anime \\
      --config configs/anime.py -- --config.data.data_dir=gs://BUCKET/tfds

Commands (every one takes --name, --zone and optionally --project):

  up      create the slice through a queued resource (``--spot`` or on-demand), wait until it
          is ACTIVE, install on every worker (clone --repo, a Python 3.11 venv made by uv)
  train   start ``main.py`` on every worker, detached from the ssh session (``setsid nohup``)
  watch   poll the slice and the trainers until training finished; after a preemption (queued
          resource SUSPENDING/SUSPENDED/FAILED, node PREEMPTED/TERMINATED, or either gone)
          delete the slice, create it again, reinstall and rerun the same training command,
          which resumes from the gs:// workdir's newest checkpoint
  run     up + train + watch
  stop    SIGTERM to the trainer on every worker: all save the same step and exit 0
  delete  delete the queued resource and its node (a slice bills while it exists)
  status  the queued resource's and the node's state, each worker's trainer, the log's tail

Finished means every worker's trainer exited 0 with neither a ``stop`` nor a signal from
outside: each worker runs the trainer under a small wrapper (``~/ddpm_pod/run.sh``) that
records the trainer's exit status (``rc``) and whether it was signalled (a preempted VM's
shutdown SIGTERMs every process; the trainer then saves and exits 0 too, so an exit status
alone cannot tell a finished run from a preempted one). ``stop`` leaves ``stop_requested``.

Standard library only (no JAX): it runs on a laptop with the Google Cloud CLI.
"""

from __future__ import annotations

import argparse
import base64
import json
import shlex
import subprocess
import sys
import time

POD_DIR = "$HOME/ddpm_pod"  # on each worker: run.sh, pid, rc, signalled, stop_requested, log
REPO_DIR = "$HOME/ddpm_jax"
STATUS_TAG = "DDPM_POD_WORKER"
QR_WAITING = {"CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING"}
QR_LOST = {"SUSPENDING", "SUSPENDED", "FAILED", "DELETING"}
NODE_LOST = {"PREEMPTED", "TERMINATED", "STOPPED", "STOPPING", "DELETING", "HIDDEN", "HIDING"}


class PodError(RuntimeError):
  """A gcloud step that failed for good; the message says which and why."""


def log(msg: str) -> None:
  print(f"pod: {time.strftime('%H:%M:%S')} {msg}", flush=True)


class Pod:
  """One slice: a queued resource NAME whose node is also called NAME."""

  def __init__(self, args):
    self.a = args

  # -- gcloud ------------------------------------------------------------------------------

  def gcloud(self, *words: str, check: bool = True, capture: bool = True):
    cmd = ["gcloud", *words, f"--zone={self.a.zone}", "--quiet"]
    if self.a.project:
      cmd.append(f"--project={self.a.project}")
    r = subprocess.run(cmd, capture_output=capture, text=True, stdin=subprocess.DEVNULL)
    if check and r.returncode != 0:
      detail = (r.stderr or "").strip().splitlines()[-3:] if capture else []
      raise PodError(f"{shlex.join(cmd[:6])} ... failed ({r.returncode}): {' | '.join(detail)}")
    return r

  def describe(self, kind: str) -> dict | None:
    """The queued resource (kind "qr") or the node ("node") as a dict; None if it is gone."""
    group = (["compute", "tpus", "queued-resources"] if kind == "qr"
             else ["compute", "tpus", "tpu-vm"])
    r = self.gcloud(*group, "describe", self.a.name, "--format=json", check=False)
    if r.returncode != 0:
      if "NOT_FOUND" in r.stderr or "not found" in r.stderr.lower():
        return None
      raise PodError(f"describe {kind} {self.a.name}: {r.stderr.strip()[-300:]}")
    return json.loads(r.stdout or "{}")

  def states(self) -> tuple[str, str]:
    """(queued resource state, node state); "GONE" for one that does not exist."""
    qr = self.describe("qr")
    node = self.describe("node")
    qr_state = "GONE" if qr is None else (qr.get("state") or {}).get("state", "UNKNOWN")
    node_state = "GONE" if node is None else node.get("state", "UNKNOWN")
    return qr_state, node_state

  def ssh(self, command: str, worker: str = "all", check: bool = True, tries: int = 1):
    """``command`` on the workers (bash on the TPU VM), retried ``tries`` times."""
    for attempt in range(1, tries + 1):
      r = self.gcloud("compute", "tpus", "tpu-vm", "ssh", self.a.name, f"--worker={worker}",
                      f"--command={command}", check=False)
      if r.returncode == 0 or attempt == tries:
        break
      log(f"ssh to worker {worker} failed ({r.returncode}); retrying")
      time.sleep(self.a.poll_seconds)
    if check and r.returncode != 0:
      raise PodError(f"ssh --worker={worker} failed ({r.returncode}): {r.stderr.strip()[-300:]}")
    return r

  # -- the slice ---------------------------------------------------------------------------

  def create(self) -> None:
    words = ["compute", "tpus", "queued-resources", "create", self.a.name,
             f"--node-id={self.a.name}", f"--accelerator-type={self.a.accelerator_type}",
             f"--runtime-version={self.a.version}"]
    if self.a.spot:
      words.append("--spot")
    log(f"creating queued resource {self.a.name} ({self.a.accelerator_type}, "
        f"{'spot' if self.a.spot else 'on-demand'}, {self.a.version})")
    self.gcloud(*words)

  def wait_active(self) -> None:
    last, gone = None, 0
    while True:
      qr_state, node_state = self.states()
      if (qr_state, node_state) != last:
        log(f"queued resource {qr_state}, node {node_state}")
        last = (qr_state, node_state)
      if qr_state == "ACTIVE" and node_state == "READY":
        return
      gone = gone + 1 if qr_state == "GONE" else 0  # just created: may not be listed yet
      if qr_state in ("FAILED", "SUSPENDED") or gone >= 3:
        raise PodError(f"queued resource {self.a.name} is {qr_state} while waiting for it; "
                       f"see `gcloud compute tpus queued-resources describe {self.a.name}`")
      time.sleep(self.a.poll_seconds)

  def delete(self) -> None:
    log(f"deleting queued resource {self.a.name} and its node")
    if self.describe("qr") is not None:
      self.gcloud("compute", "tpus", "queued-resources", "delete", self.a.name, "--force")
    if self.describe("node") is not None:  # a node made without a queued resource
      self.gcloud("compute", "tpus", "tpu-vm", "delete", self.a.name)
    while self.states() != ("GONE", "GONE"):
      time.sleep(self.a.poll_seconds)

  def install(self) -> None:
    if not self.a.repo:
      raise PodError("--repo (a git URL every worker can clone) is needed to install")
    ref = f" && git -C {REPO_DIR} checkout -q {shlex.quote(self.a.ref)}" if self.a.ref else ""
    cmd = (
        f"set -e; test -d {REPO_DIR}/.git || git clone -q {shlex.quote(self.a.repo)} {REPO_DIR}"
        f"{ref}; cd {REPO_DIR}; python3 -m pip install -q --user uv; "
        f"test -x .venv/bin/python || python3 -m uv venv -q --python {self.a.python} .venv; "
        f"python3 -m uv pip install -q --python .venv/bin/python -r requirements-tpu.txt; "
        f".venv/bin/python -c 'import jax; print(\"{STATUS_TAG} installed jax\", jax.__version__)'")
    log(f"installing on every worker: {self.a.repo} into ~/ddpm_jax, Python {self.a.python}")
    self.ssh(cmd, tries=3)

  def up(self) -> None:
    qr_state, _ = self.states()
    if qr_state in QR_LOST:
      log(f"queued resource {self.a.name} is {qr_state}: deleting it to create it again")
      self.delete()
      qr_state = "GONE"
    if qr_state == "GONE":
      self.create()
    else:
      log(f"queued resource {self.a.name} exists ({qr_state}); not creating it")
    self.wait_active()
    self.install()

  # -- the trainers ------------------------------------------------------------------------

  def train_args(self) -> list[str]:
    if not (self.a.workdir or "").startswith("gs://"):
      raise PodError("--workdir must be gs://BUCKET/...: a preempted VM's disk is gone, the "
                     "run resumes from the bucket")
    args = [f"--workdir={self.a.workdir}"]
    if self.a.config:
      args.append(f"--config={self.a.config}")
    return args + list(self.a.main_args)

  def wrapper_script(self) -> str:
    """run.sh: the trainer in the background, its pid, its exit status, outside signals."""
    main = shlex.join([".venv/bin/python", "main.py", *self.train_args()])
    return f"""#!/bin/bash
D="{POD_DIR}"
pid=
trap 'touch "$D/signalled"; [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' TERM INT
cd "{REPO_DIR}" || {{ echo 127 > "$D/rc"; exit 1; }}
{main} >> "$D/train.log" 2>&1 < /dev/null &
pid=$!
echo "$pid" > "$D/pid"
while :; do wait "$pid"; rc=$?; kill -0 "$pid" 2>/dev/null || break; done
wait "$pid"; r=$?; [ "$r" -ne 127 ] && rc=$r
echo "$rc" > "$D/rc"
"""

  def start_training(self) -> None:
    """The training command on every worker, detached; returns once each has its pid."""
    script = base64.b64encode(self.wrapper_script().encode()).decode()
    cmd = (f'D="{POD_DIR}"; mkdir -p "$D"; p=$(cat "$D/pid" 2>/dev/null); '
           f'if [ -n "$p" ] && [ ! -f "$D/rc" ] && kill -0 "$p" 2>/dev/null; then '
           f'echo "{STATUS_TAG} $(hostname) already running pid $p"; else '
           f'rm -f "$D/pid" "$D/rc" "$D/signalled" "$D/stop_requested"; '
           f'echo {script} | base64 -d > "$D/run.sh"; '
           f'echo "== $(date -u) {shlex.join(self.train_args())}" >> "$D/train.log"; '
           f'setsid nohup bash "$D/run.sh" > "$D/wrapper.log" 2>&1 < /dev/null & '
           f'for i in $(seq 600); do [ -s "$D/pid" ] && break; sleep 0.1; done; '
           f'echo "{STATUS_TAG} $(hostname) started pid $(cat "$D/pid")"; fi')
    log("starting training on every worker: main.py " + shlex.join(self.train_args()))
    r = self.ssh(cmd, tries=3)
    running = [line.split()[1] for line in r.stdout.splitlines()
               if line.startswith(STATUS_TAG) and "already running" in line]
    if running:
      log(f"a trainer was already running on {', '.join(running)}: not started again there")

  def worker_states(self) -> list[dict] | None:
    """Each worker's trainer: running / exited (rc) / vanished / none; None if ssh failed."""
    cmd = (f'D="{POD_DIR}"; p=$(cat "$D/pid" 2>/dev/null); '
           f'if [ -f "$D/rc" ]; then s="exited $(cat "$D/rc")"; '
           f'elif [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then s=running; '
           f'elif [ -n "$p" ]; then s=vanished; else s=none; fi; '
           f'[ -f "$D/signalled" ] && s="$s signalled"; '
           f'[ -f "$D/stop_requested" ] && s="$s stop_requested"; '
           f'echo "{STATUS_TAG} $(hostname) $s"')
    r = self.ssh(cmd, check=False)
    if r.returncode != 0:
      return None
    out = []
    for line in r.stdout.splitlines():
      words = line.split()
      if len(words) >= 3 and words[0] == STATUS_TAG:
        rc = (int(words[3]) if words[2] == "exited" and len(words) > 3
              and words[3].lstrip("-").isdigit() else None)
        out.append({"host": words[1], "state": words[2], "rc": rc,
                    "signalled": "signalled" in words, "stop": "stop_requested" in words})
    try:
      node = self.describe("node") or {}
    except PodError:
      return None
    expected = len(node.get("networkEndpoints") or []) or 1
    return out if len(out) >= expected else None

  def stop(self) -> None:
    cmd = (f'D="{POD_DIR}"; mkdir -p "$D"; touch "$D/stop_requested"; '
           f'p=$(cat "$D/pid" 2>/dev/null); '
           f'if [ -n "$p" ] && kill -TERM "$p" 2>/dev/null; then s="SIGTERM to $p";'
           f' else s="no trainer running"; fi; echo "{STATUS_TAG} $(hostname) $s"')
    log("stop: SIGTERM to the trainer on every worker (each saves the same step, exits 0)")
    r = self.ssh(cmd)
    for line in r.stdout.splitlines():
      if line.startswith(STATUS_TAG):
        log(line[len(STATUS_TAG) + 1:])

  # -- the loop ----------------------------------------------------------------------------

  def recreate(self) -> None:
    self.delete()
    self.create()
    self.wait_active()
    self.install()
    self.start_training()

  def watch(self) -> int:
    """Until training finished (0), was stopped (0), or failed max_restarts times (1)."""
    restarts, unknown, failed_recreations, last = 0, 0, 0, None
    while True:
      try:
        qr_state, node_state = self.states()
      except PodError as e:  # gcloud or the network failing for a while: not the slice
        log(f"{e}; polling again")
        time.sleep(self.a.poll_seconds)
        continue
      if qr_state in QR_LOST or qr_state == "GONE" or (
          qr_state == "ACTIVE" and (node_state in NODE_LOST or node_state == "GONE")):
        log(f"slice lost (queued resource {qr_state}, node {node_state}): preempted; "
            "deleting and creating it again, then the same training command resumes")
        try:
          self.recreate()
        except PodError as e:
          failed_recreations += 1
          if failed_recreations > self.a.max_restarts:
            log(f"could not create the slice again {failed_recreations} times: {e}")
            return 1
          log(f"creating the slice again failed ({e}); trying again")
          time.sleep(self.a.poll_seconds)
          continue
        restarts, failed_recreations, last = 0, 0, None
        continue
      if qr_state != "ACTIVE" or node_state != "READY":
        log(f"queued resource {qr_state}, node {node_state}: waiting")
        time.sleep(self.a.poll_seconds)
        continue
      workers = self.worker_states()
      if workers is None:
        unknown += 1
        if unknown % 5 == 1:
          log("could not read every worker's trainer state (ssh failed); polling again")
        time.sleep(self.a.poll_seconds)
        continue
      unknown = 0
      summary = ", ".join(sorted({w["state"] + (f" {w['rc']}" if w["rc"] is not None else "")
                                  + (" after a SIGTERM" if w["signalled"] else "")
                                  for w in workers}))
      if summary != last:
        log(f"trainers: {summary} ({len(workers)} workers)")
        last = summary
      if any(w["state"] == "running" for w in workers):
        time.sleep(self.a.poll_seconds)
        continue
      if any(w["stop"] for w in workers):
        log("stopped by `stop` (checkpoint saved); `train` or `run` resumes it")
        return 0
      if all(w["state"] == "exited" and w["rc"] == 0 and not w["signalled"] for w in workers):
        log("training finished on every worker")
        if self.a.delete_when_done:
          self.delete()
        else:
          log(f"the slice still exists and bills: python -m ddpm_jax.pod delete "
              f"--name {self.a.name} --zone {self.a.zone}")
        return 0
      # Not running, not finished: a crash, a lost host, or an outside SIGTERM (maybe a
      # preemption whose state is not visible yet): look at the slice once more, then rerun.
      time.sleep(self.a.poll_seconds)
      try:
        if self.states() != ("ACTIVE", "READY"):
          continue
      except PodError:
        continue
      if restarts >= self.a.max_restarts:
        log(f"the trainers ended without finishing {restarts + 1} times on this slice ({summary});"
            f" giving up. Their log: `python -m ddpm_jax.pod status --name {self.a.name} "
            f"--zone {self.a.zone}`")
        return 1
      restarts += 1
      log(f"trainers ended without finishing ({summary}); rerunning the training command "
          f"({restarts}/{self.a.max_restarts})")
      try:
        self.start_training()
      except PodError as e:  # the slice going away under us: the next poll sees it
        log(f"{e}; polling again")
      last = None

  def status(self) -> int:
    qr_state, node_state = self.states()
    print(f"queued resource {self.a.name}: {qr_state}\nnode {self.a.name}: {node_state}")
    if node_state == "READY":
      workers = self.worker_states()
      for w in workers or []:
        flags = " ".join(k for k in ("signalled", "stop") if w[k])
        rc = "" if w["rc"] is None else f" {w['rc']}"
        print(f"  {w['host']}: {w['state']}{rc} {flags}".rstrip())
      r = self.ssh(f'tail -n {self.a.lines} "{POD_DIR}/train.log" 2>/dev/null', worker="0",
                   check=False)
      if r.stdout.strip():
        print(f"worker 0, ~/ddpm_pod/train.log:\n{r.stdout.rstrip()}")
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
  main_args = []
  if "--" in argv:
    i = argv.index("--")
    argv, main_args = argv[:i], argv[i + 1:]
  p = argparse.ArgumentParser(prog="python -m ddpm_jax.pod", description=__doc__.split("\n")[0],
                              usage="%(prog)s COMMAND --name N --zone Z [options] "
                                    "[-- MAIN_PY_ARGS...]")
  p.add_argument("command", choices=["up", "train", "watch", "run", "stop", "delete", "status"])
  p.add_argument("--name", required=True, help="queued resource and TPU VM name")
  p.add_argument("--zone", required=True, help="e.g. us-central2-b")
  p.add_argument("--project", default=None, help="Google Cloud project (default: gcloud's)")
  p.add_argument("--accelerator-type", default="v4-8", help="e.g. v4-32 (4 hosts)")
  p.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU software version")
  p.add_argument("--spot", action="store_true", help="Spot TPU VMs (preemptible, cheaper)")
  p.add_argument("--repo", default=None, help="git URL of ddpm_jax every worker clones")
  p.add_argument("--ref", default=None, help="git commit/branch/tag to check out (same on "
                 "every (re)creation; default: the clone's default branch)")
  p.add_argument("--python", default="3.11", help="Python uv installs into the venv")
  p.add_argument("--workdir", default=None, help="gs://BUCKET/runs/NAME (required to train)")
  p.add_argument("--config", default=None, help="config file in the repo, e.g. configs/anime.py")
  p.add_argument("--poll-seconds", type=float, default=60.0, help="between state polls")
  p.add_argument("--max-restarts", type=int, default=3,
                 help="reruns on one slice after the trainers end without finishing")
  p.add_argument("--delete-when-done", action="store_true", help="delete the slice at the end")
  p.add_argument("--lines", type=int, default=20, help="status: lines of worker 0's log")
  a = p.parse_args(argv)
  a.main_args = main_args
  return a


def main(argv: list[str] | None = None) -> int:
  a = parse(sys.argv[1:] if argv is None else argv)
  pod = Pod(a)
  try:
    if a.command == "up":
      pod.up()
    elif a.command == "train":
      pod.train_args()  # checks --workdir before anything runs
      pod.start_training()
    elif a.command == "watch":
      pod.train_args()
      return pod.watch()
    elif a.command == "run":
      pod.train_args()
      pod.up()
      pod.start_training()
      return pod.watch()
    elif a.command == "stop":
      pod.stop()
    elif a.command == "delete":
      pod.delete()
    elif a.command == "status":
      return pod.status()
  except KeyboardInterrupt:
    print("pod: interrupted; the slice and its trainers keep running (`watch` watches again)",
          file=sys.stderr)
    return 130
  except PodError as e:
    print(f"pod: error: {e}", file=sys.stderr)
    return 1
  except FileNotFoundError:
    print("pod: error: gcloud not found: install the Google Cloud CLI "
          "(https://cloud.google.com/sdk/docs/install)", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
