"""Train on a Cloud TPU VM slice from your own machine, through preemptions: ``gcloud`` driven.

  python -m ddpm_jax.pod run --name ddpm --zone us-central2-b --accelerator-type v4-32 --spot \\
      --repo https://github.com/YOU/ddpm_jax --workdir gs://BUCKET/runs/anime \\
      --config configs/anime.py -- --config.data.data_dir=gs://BUCKET/tfds

Commands (every one takes --name, --zone and optionally --project):

  up      create the slice through a queued resource (``--spot`` or on-demand), wait until it
          is ACTIVE, install on every worker (clone --repo, a Python 3.11 venv made by uv)
  train   start ``main.py`` on every worker, detached from the ssh session (``setsid nohup``)
  watch   poll the slice and the trainers until training finished; after a preemption (queued
          resource SUSPENDING/SUSPENDED/FAILED, node PREEMPTED/TERMINATED/STOPPED/HIDDEN)
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

What ``watch`` takes for what (the rules, because each wrong guess costs money or a run):

* Deleted, not preempted: a queued resource DELETING or gone, or a node DELETING or gone under
  an ACTIVE queued resource, is a deletion. A preemption shows as SUSPENDING/SUSPENDED/FAILED
  (or a PREEMPTED/TERMINATED node) first, and the runner records the deletions it does itself;
  so a slice gone after neither (``pod delete`` or the console, by hand) ends ``watch`` with a
  line and exit status 1 instead of being created again.
* Recreations: at most ``--max-recreations`` (default 10) per ``watch``, failed attempts
  included; the k-th waits ``--backoff-seconds`` * 2^(k-2) (none for the first), at most
  ``--max-backoff-seconds``.
* An unanswered worker: ``--max-failed-polls`` (default 10) polls in a row in which some
  workers answer and others do not is a lost host: the slice is recreated. The same number in
  which no worker answers is taken for a problem on this side (ssh keys, network): ``watch``
  stops with a line and leaves the slice as it is.
* A held workdir lock: trainers that exit with status 75 (``LOCKED_EXIT_STATUS``: refused
  because the workdir lock is held, as after a lost VM whose trainer's lock on the bucket
  goes stale 5 minutes after its last refresh) are rerun every ``--poll-seconds`` without
  counting against ``--max-restarts``, for at most ``--max-lock-wait-minutes`` (default 15);
  then ``watch`` gives up with a line (another trainer really holds the workdir).
* Leaving: every exit of up/train/watch/run/stop (errors, Ctrl-C included) that leaves the
  queued resource or its node behind prints one line saying it bills and the command that
  deletes it. With ``--delete-when-done``, an exit for any reason (an exception, Ctrl-C) looks
  once more and deletes a slice whose trainers all finished; one still training is left running.
* Arguments: nothing given to the runner is read by a remote shell. ``main.py``'s arguments
  travel inside the base64-encoded ``run.sh``, quoted once there (``shlex.join``); ``--repo``,
  ``--ref`` and ``--python`` are each quoted once (``shlex.quote``) in the install line.

* The slice's TPU software version: ``--version``, else the one Google lists for JAX on the
  accelerator type (``tpu_vm.RUNTIME_VERSIONS``); an unknown type is one line asking for
  ``--version``. ``run.sh`` sets ``JAX_PLATFORMS=tpu``: a trainer whose JAX misses the TPU
  fails at start rather than training on the host CPU of a billing slice.

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

from ddpm_jax.tpu_vm import runtime_version  # standard library only, as this module

POD_DIR = "$HOME/ddpm_pod"  # on each worker: run.sh, pid, rc, signalled, stop_requested, log
REPO_DIR = "$HOME/ddpm_jax"
STATUS_TAG = "DDPM_POD_WORKER"
LOCKED_EXIT_STATUS = 75  # a trainer refused by a held workdir lock (ddpm_jax.errors, same value)
QR_WAITING = {"CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING"}
QR_PREEMPTED = {"SUSPENDING", "SUSPENDED", "FAILED"}  # a preemption, or a failed provisioning
NODE_PREEMPTED = {"PREEMPTED", "TERMINATED", "STOPPED", "STOPPING", "HIDDEN", "HIDING"}
DELETED = {"DELETING", "GONE"}
QR_LOST = QR_PREEMPTED | {"DELETING"}  # what `up` deletes before creating


class PodError(RuntimeError):
  """A gcloud step that failed for good; the message says which and why."""


def log(msg: str) -> None:
  print(f"pod: {time.strftime('%H:%M:%S')} {msg}", flush=True)


class Pod:
  """One slice: a queued resource NAME whose node is also called NAME."""

  def __init__(self, args):
    self.a = args
    self.deleted_by_us = False  # this runner deleted the slice (and has not made it again yet)
    self.seen_preempted = False  # a preemption state was seen since the slice was last made
    self.finished = False  # every trainer finished (watch saw it)
    self.answered = 0  # workers that answered the last worker_states poll, of self.expected
    self.expected = 1

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

  def version(self) -> str:
    """--version, else the TPU software version of --accelerator-type; unknown: PodError."""
    version = self.a.version or runtime_version(self.a.accelerator_type)
    if not version:
      raise PodError(f"no TPU software version known for --accelerator-type="
                     f"{self.a.accelerator_type} (known: v2/v3/v4, v5litepod (v5e), v5p, v6e): "
                     f"pass --version=... (see cloud.google.com/tpu/docs/runtimes)")
    return version

  def create(self) -> None:
    words = ["compute", "tpus", "queued-resources", "create", self.a.name,
             f"--node-id={self.a.name}", f"--accelerator-type={self.a.accelerator_type}",
             f"--runtime-version={self.version()}"]
    if self.a.spot:
      words.append("--spot")
    log(f"creating queued resource {self.a.name} ({self.a.accelerator_type}, "
        f"{'spot' if self.a.spot else 'on-demand'}, {self.version()})")
    try:
      self.gcloud(*words)
    except PodError as e:  # a reply lost or an error after the resource was made: look
      qr = self.describe("qr")
      if qr is None:
        raise
      state = (qr.get("state") or {}).get("state", "UNKNOWN")
      log(f"{e}; but queued resource {self.a.name} exists ({state}): using it")
    self.deleted_by_us = self.seen_preempted = False

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
    self.deleted_by_us = True  # before the call: a delete that fails half-way is still ours
    if self.describe("qr") is not None:
      self.gcloud("compute", "tpus", "queued-resources", "delete", self.a.name, "--force")
    if self.describe("node") is not None:  # a node made without a queued resource
      self.gcloud("compute", "tpus", "tpu-vm", "delete", self.a.name)
    while self.states() != ("GONE", "GONE"):
      time.sleep(self.a.poll_seconds)

  def install_command(self) -> str:
    """The install line (bash on every worker); each value given to the runner quoted once."""
    q, repo = shlex.quote, f'"{REPO_DIR}"'
    ref = f" && git -C {repo} checkout -q {q(self.a.ref)}" if self.a.ref else ""
    return (
        f"set -e; test -d {repo}/.git || git clone -q {q(self.a.repo)} {repo}"
        f"{ref}; cd {repo}; python3 -m pip install -q --user uv; "
        f"test -x .venv/bin/python || python3 -m uv venv -q --python {q(self.a.python)} .venv; "
        f"python3 -m uv pip install -q --python .venv/bin/python -r requirements-tpu.txt; "
        f".venv/bin/python -c 'import jax; print(\"{STATUS_TAG} installed jax\", jax.__version__)'")

  def install(self) -> None:
    if not self.a.repo:
      raise PodError("--repo (a git URL every worker can clone) is needed to install")
    log(f"installing on every worker: {self.a.repo} into ~/ddpm_jax, Python {self.a.python}")
    self.ssh(self.install_command(), tries=3)

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
    """run.sh: the trainer in the background, its pid, its exit status, outside signals.

    The training arguments appear here only, quoted once by ``shlex``; the script travels
    base64-encoded, so no shell on the way reads them. ``JAX_PLATFORMS=tpu``: a trainer whose
    JAX cannot use the TPU (a wrong TPU software version, libtpu missing, the TPU held by
    another process) fails at start instead of training on the host CPU while the slice bills.
    """
    args = self.train_args()
    main = shlex.join([".venv/bin/python", "main.py", *args])
    return f"""#!/bin/bash
D="{POD_DIR}"
pid=
printf '== %s %s\\n' "$(date -u)" {shlex.quote(shlex.join(args))} >> "$D/train.log"
trap 'touch "$D/signalled"; [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null' TERM INT
echo $$ > "$D/wrapper_pid"
cd "{REPO_DIR}" || {{ echo 127 > "$D/rc"; exit 1; }}
export JAX_PLATFORMS=tpu
{main} >> "$D/train.log" 2>&1 < /dev/null &
pid=$!
echo "$pid" > "$D/pid"
while :; do wait "$pid"; rc=$?; kill -0 "$pid" 2>/dev/null || break; done
wait "$pid"; r=$?; [ "$r" -ne 127 ] && rc=$r
echo "$rc" > "$D/rc.tmp" && mv "$D/rc.tmp" "$D/rc"
"""

  def start_training(self) -> None:
    """The training command on every worker, detached; returns once each has its pid."""
    script = base64.b64encode(self.wrapper_script().encode()).decode()
    cmd = (f'D="{POD_DIR}"; mkdir -p "$D"; p=$(cat "$D/pid" 2>/dev/null); '
           f'if [ -n "$p" ] && [ ! -f "$D/rc" ] && kill -0 "$p" 2>/dev/null; then '
           f'echo "{STATUS_TAG} $(hostname) already running pid $p"; else '
           f'rm -f "$D/pid" "$D/wrapper_pid" "$D/rc" "$D/signalled" "$D/stop_requested"; '
           f'echo {script} | base64 -d > "$D/run.sh"; '
           f'setsid nohup bash "$D/run.sh" > "$D/wrapper.log" 2>&1 < /dev/null & '
           f'for i in $(seq 600); do [ -s "$D/pid" ] && break; sleep 0.1; done; '
           f'echo "{STATUS_TAG} $(hostname) started pid $(cat "$D/pid")"; fi')
    log("starting training on every worker: main.py " + shlex.join(self.train_args()))
    r = self.ssh(cmd, tries=3)
    running = [line.split()[1] for line in r.stdout.splitlines()
               if line.startswith(STATUS_TAG) and "already running" in line]
    if running:
      log(f"a trainer was already running on {', '.join(running)}: not started again there")

  @staticmethod
  def status_command() -> str:
    """The shell line that prints one worker's trainer state (``worker_states`` reads it).

    The wrapper outlives its trainer by the moment it takes to write rc (atomically): a
    trainer gone with its wrapper still there is finishing, not vanished.
    """
    return (f'D="{POD_DIR}"; p=$(cat "$D/pid" 2>/dev/null); '
            f'w=$(cat "$D/wrapper_pid" 2>/dev/null); '
            f'if [ -f "$D/rc" ]; then s="exited $(cat "$D/rc")"; '
            f'elif [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then s=running; '
            f'elif [ -n "$w" ] && grep -qs run.sh "/proc/$w/cmdline"; then s=running; '
            f'elif [ -n "$p" ]; then s=vanished; else s=none; fi; '
            f'[ -f "$D/signalled" ] && s="$s signalled"; '
            f'[ -f "$D/stop_requested" ] && s="$s stop_requested"; '
            f'echo "{STATUS_TAG} $(hostname) $s"')

  def worker_states(self) -> list[dict] | None:
    """Each worker's trainer: running / exited (rc) / vanished / none; None if not every
    worker answered. ``self.answered``: how many did (None when gcloud itself failed)."""
    cmd = self.status_command()
    self.answered = None
    r = self.ssh(cmd, check=False)
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
    self.answered = len(out)
    self.expected = len(node.get("networkEndpoints") or []) or 1
    return out if r.returncode == 0 and len(out) >= self.expected else None

  def trainers_finished(self) -> bool:
    """Every worker's trainer exited 0, none signalled from outside, no ``stop``."""
    workers = self.worker_states()
    return bool(workers) and all(w["state"] == "exited" and w["rc"] == 0 and not w["signalled"]
                                 and not w["stop"] for w in workers)

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

  def lost(self, qr_state: str, node_state: str) -> str | None:
    """"preempted", "deleted" or None (the slice is there); the module docstring's rule."""
    if qr_state in QR_PREEMPTED or (qr_state == "ACTIVE" and node_state in NODE_PREEMPTED):
      return "preempted"
    if qr_state in DELETED or (qr_state == "ACTIVE" and node_state in DELETED):
      return "deleted"
    return None

  def backoff(self, attempt: int) -> float:
    """Seconds to wait before the attempt-th recreation of one watch: 0, b, 2b, 4b, ... <= max."""
    if attempt <= 1:
      return 0.0
    return min(self.a.backoff_seconds * 2 ** (attempt - 2), self.a.max_backoff_seconds)

  def recreate_once(self, attempt: int) -> bool:
    """One recreation (after its backoff); False if it failed (the next poll decides again)."""
    wait = self.backoff(attempt)
    log(f"creating the slice again ({attempt}/{self.a.max_recreations})"
        + (f" after waiting {wait:g} s" if wait else ""))
    time.sleep(wait)
    try:
      self.recreate()
      return True
    except PodError as e:
      log(f"creating the slice again failed: {e}")
      time.sleep(self.a.poll_seconds)
      return False

  def watch(self) -> int:
    """Until training finished (0), was stopped (0), or a give-up (1); see the module's rules."""
    restarts, unknown, attempts, last, lost_host = 0, 0, 0, None, False
    locked_since = None
    while True:
      try:
        qr_state, node_state = self.states()
      except PodError as e:  # gcloud or the network failing for a while: not the slice
        log(f"{e}; polling again")
        time.sleep(self.a.poll_seconds)
        continue
      lost = self.lost(qr_state, node_state)
      if lost == "preempted":
        self.seen_preempted = True
      elif lost == "deleted" and not (self.deleted_by_us or self.seen_preempted):
        log(f"queued resource {self.a.name} {qr_state}, node {node_state}: deleted, not by this "
            "runner and not after a preemption; not creating it again (`run` with the same "
            "arguments creates it and resumes)")
        return 1
      if lost or lost_host:
        if lost:
          log(f"slice lost (queued resource {qr_state}, node {node_state}): "
              f"{'preempted' if self.seen_preempted else 'deleted by this runner'}; deleting and "
              "creating it again, then the same training command resumes")
        if attempts >= self.a.max_recreations:
          log(f"the slice was created again {attempts} times in this watch "
              f"(--max-recreations {self.a.max_recreations}); giving up")
          return 1
        attempts += 1
        if self.recreate_once(attempts):
          restarts, unknown, last, lost_host = 0, 0, None, False
        continue
      if qr_state != "ACTIVE" or node_state != "READY":
        log(f"queued resource {qr_state}, node {node_state}: waiting")
        time.sleep(self.a.poll_seconds)
        continue
      workers = self.worker_states()
      if workers is None:
        unknown += self.answered is not None  # gcloud failing is not a worker failing
        if unknown % 5 == 1:
          log("could not read every worker's trainer state (ssh failed); polling again")
        if unknown >= self.a.max_failed_polls and self.answered == 0:
          log(f"no worker answered {unknown} polls in a row (ssh from here failing?); stopping "
              "the watch, the trainers are left as they are (`watch` watches again)")
          return 1
        if unknown >= self.a.max_failed_polls:
          log(f"{self.expected - self.answered} of {self.expected} workers did not answer "
              f"{unknown} polls in a row: taken for a lost host")
          lost_host = True
          continue
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
        self.finished = True
        if self.a.delete_when_done:
          self.delete()
        return 0
      locked = any(w["state"] == "exited" and w["rc"] == LOCKED_EXIT_STATUS for w in workers)
      if locked:
        locked_since = time.time() if locked_since is None else locked_since
        if time.time() - locked_since > 60 * self.a.max_lock_wait_minutes:
          log(f"the workdir lock stayed held for {self.a.max_lock_wait_minutes:g} minutes "
              "(another trainer holds it?); giving up. Worker 0's log: `python -m "
              f"ddpm_jax.pod status --name {self.a.name} --zone {self.a.zone}`")
          return 1
        log("the trainers were refused: the workdir lock is held (a lost VM's trainer's lock "
            "goes stale 5 minutes after its last refresh); rerunning the training command "
            "after a poll (not counted as a restart)")
        time.sleep(self.a.poll_seconds)
        try:
          self.start_training()
        except PodError as e:
          log(f"{e}; polling again")
        last = None
        continue
      locked_since = None
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

  # -- leaving -----------------------------------------------------------------------------

  def delete_hint(self, command: str) -> str:
    """The exact command that deletes this slice (gcloud's own after our `delete` failed)."""
    where = [f"--zone={self.a.zone}"] + ([f"--project={self.a.project}"] if self.a.project else [])
    if command == "delete":
      return shlex.join(["gcloud", "compute", "tpus", "queued-resources", "delete", self.a.name,
                         "--force", *where])
    return shlex.join(["python", "-m", "ddpm_jax.pod", "delete", f"--name={self.a.name}", *where])

  def at_exit(self, command: str) -> None:
    """Every way out (errors and Ctrl-C too): with --delete-when-done a finished slice is
    deleted; any slice left behind gets one line saying it bills and how to delete it."""
    hint = self.delete_hint(command)
    try:
      states = self.states()
      if (self.a.delete_when_done and command in ("watch", "run") and states != ("GONE", "GONE")
          and (self.finished or (states == ("ACTIVE", "READY") and self.trainers_finished()))):
        log("every trainer finished: deleting the slice (--delete-when-done)")
        self.delete()
        states = self.states()
    except (PodError, OSError, ValueError, KeyboardInterrupt) as e:
      log(f"could not see whether slice {self.a.name} still exists ({type(e).__name__}: "
          f"{e}); while it does, it bills. Delete it: {hint}")
      return
    if "DELETING" in states:
      log(f"slice {self.a.name} is being deleted (queued resource {states[0]}, node "
          f"{states[1]}); if it stays, delete it: {hint}")
    elif states != ("GONE", "GONE"):
      log(f"slice {self.a.name} (queued resource {states[0]}, node {states[1]}) still exists "
          f"and bills until deleted: {hint}")

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
  p.add_argument("--version", default=None,
                 help="TPU software version (default: the one Google lists for the "
                      "accelerator type: v2/v3/v4 tpu-ubuntu2204-base, v5litepod-* "
                      "v2-alpha-tpuv5-lite, v5p-* v2-alpha-tpuv5, v6e-* v2-alpha-tpuv6e)")
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
  p.add_argument("--max-lock-wait-minutes", type=float, default=15.0,
                 help="watch: how long trainers refused by a held workdir lock are rerun")
  p.add_argument("--max-recreations", type=int, default=10,
                 help="watch: slice recreations (failed ones too) before giving up")
  p.add_argument("--backoff-seconds", type=float, default=60.0,
                 help="watch: wait before the 2nd recreation, doubled for each one after")
  p.add_argument("--max-backoff-seconds", type=float, default=1800.0,
                 help="watch: the longest wait between recreations")
  p.add_argument("--max-failed-polls", type=int, default=10,
                 help="watch: polls in a row a worker may not answer (then: a lost host)")
  p.add_argument("--delete-when-done", action="store_true",
                 help="delete the slice once training finished, also if the runner is stopped "
                      "(Ctrl-C, an error) after that")
  p.add_argument("--lines", type=int, default=20, help="status: lines of worker 0's log")
  a = p.parse_args(argv)
  a.main_args = main_args
  return a


def main(argv: list[str] | None = None) -> int:
  a = parse(sys.argv[1:] if argv is None else argv)
  pod = Pod(a)
  rc, leaving = 1, a.command in ("up", "train", "watch", "run", "stop", "delete")
  try:
    rc = run_command(pod, a.command)
  except KeyboardInterrupt:
    print("pod: interrupted; trainers still running keep running (`watch` watches again)",
          file=sys.stderr)
    rc = 130
  except PodError as e:
    print(f"pod: error: {e}", file=sys.stderr)
  except FileNotFoundError:
    leaving = False  # no gcloud: nothing to look at
    print("pod: error: gcloud not found: install the Google Cloud CLI "
          "(https://cloud.google.com/sdk/docs/install)", file=sys.stderr)
  finally:  # also on an exception none of the above catches
    if leaving:
      pod.at_exit(a.command)
  return rc


def run_command(pod: Pod, command: str) -> int:
  if command in ("up", "watch", "run"):  # each may create the slice: know its version first
    pod.version()
  if command == "up":
    pod.up()
  elif command == "train":
    pod.train_args()  # checks --workdir before anything runs
    pod.start_training()
  elif command == "watch":
    pod.train_args()
    return pod.watch()
  elif command == "run":
    pod.train_args()
    pod.up()
    pod.start_training()
    return pod.watch()
  elif command == "stop":
    pod.stop()
  elif command == "delete":
    pod.delete()
  elif command == "status":
    return pod.status()
  return 0


if __name__ == "__main__":
  sys.exit(main())
