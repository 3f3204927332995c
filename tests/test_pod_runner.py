"""The pod runner's control flow against a fake ``gcloud`` that simulates a Spot slice.

The fake (written into tmp_path, first on PATH) records every call, moves the queued resource
through WAITING_FOR_RESOURCES -> ACTIVE, and preempts the slice while the first trainers run
(SIGTERM to every process of the "VM", then its disk is gone). Commands sent over ``ssh`` run
for real in bash with HOME set to a per-worker folder, so the detached wrapper, the status
probe and ``stop`` are the shell code a TPU VM would run; only the install is simulated (it
writes a fake ``.venv/bin/python`` that plays the trainer: it records its arguments, exits 0
on SIGTERM like the real one after its checkpoint, and otherwise finishes or fails on cue).
"""

import json
import os
import signal
import stat
import sys
import time

import pytest

from ddpm_jax import pod

FAKE_GCLOUD = r'''#!PYTHON
import json, os, shutil, signal, subprocess, sys, time

D = os.environ["FAKE_GCLOUD_DIR"]
STATE = os.path.join(D, "state.json")
WORKERS = 2
argv = sys.argv[1:]
words = [a for a in argv if not a.startswith("--")]
flags = dict(a[2:].split("=", 1) if "=" in a else (a[2:], True) for a in argv
             if a.startswith("--"))
st = json.load(open(STATE))

def save():
  json.dump(st, open(STATE, "w"))

def event(name, **kw):
  with open(os.path.join(D, "calls.log"), "a") as f:
    f.write(json.dumps({"event": name, "argv": argv, **kw}) + "\n")

def home(i):
  return os.path.join(D, f"w{i}")

def pids(i):
  try:
    return int(open(os.path.join(home(i), "ddpm_pod", "pid")).read())
  except (OSError, ValueError):
    return None

def vm_dies(wipe=True):
  """Preemption or deletion: SIGTERM to every process of each worker, then its disk is gone."""
  for i in range(WORKERS):
    p = pids(i)
    if p is not None:
      try:
        os.killpg(os.getpgid(p), signal.SIGTERM)
      except ProcessLookupError:
        pass
      rc = os.path.join(home(i), "ddpm_pod", "rc")
      for _ in range(250):
        if os.path.exists(rc):
          break
        time.sleep(0.02)
    if wipe:
      shutil.rmtree(home(i), ignore_errors=True)

def not_found(what):
  sys.stderr.write(f"ERROR: (gcloud) NOT_FOUND: {what} 'x' was not found\n")
  sys.exit(1)

def trainer_alive():
  p = pids(0)
  if p is None:
    return False
  try:
    os.kill(p, 0)
    return not os.path.exists(os.path.join(home(0), "ddpm_pod", "rc"))
  except ProcessLookupError:
    return False

FAKE_TRAINER = """#!PYTHON
import json, os, signal, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
with open(%(log)r, "a") as f:
  f.write(json.dumps({"gen": %(gen)d, "home": os.environ["HOME"], "argv": sys.argv[1:],
                      "platforms": os.environ.get("JAX_PLATFORMS")}) + "\\n")
deadline = time.time() + %(seconds)r
while not stop and time.time() < deadline:
  time.sleep(0.02)
rc = %(rc)r  # one status, or one per start of this worker's trainer (the last repeats)
if isinstance(rc, list):
  starts = sum(json.loads(x)["home"] == os.environ["HOME"] for x in open(%(log)r))
  rc = rc[min(starts, len(rc)) - 1]
sys.exit(0 if stop else rc)
"""

def finished():
  rcs = [os.path.join(home(i), "ddpm_pod", "rc") for i in range(WORKERS)]
  return all(os.path.exists(f) and open(f).read().strip() == "0" for f in rcs)

group, verb = " ".join(words[:3]), words[3]
if group == "compute tpus queued-resources":
  if verb == "create":
    st["creates"] = st.get("creates", 0) + 1
    fails = st.get("create_fails", {}).get(str(st["creates"]))  # "gone" / "exists"
    if fails != "gone":
      st["gen"] += 1
      st["qr"], st["node"], st["polls"], st["active_polls"] = "WAITING_FOR_RESOURCES", None, 0, 0
      for i in range(WORKERS):
        shutil.rmtree(home(i), ignore_errors=True)
    event("create", spot="spot" in flags, fails=fails)
    if fails:
      save()
      sys.stderr.write("ERROR: (gcloud) INTERNAL: the reply was lost\n")
      sys.exit(1)
  elif verb == "describe":
    if st["qr"] is None:
      not_found("queuedResource")
    st["polls"] += 1
    if st["qr"] == "WAITING_FOR_RESOURCES" and st["polls"] >= 2:
      st["qr"], st["node"] = "ACTIVE", "READY"
      for i in range(WORKERS):
        os.makedirs(home(i), exist_ok=True)
    elif st.get("flip_in"):  # "late": the SIGTERM came a poll before the state changed
      st["flip_in"] -= 1
      if not st["flip_in"]:
        vm_dies()
        st["qr"], st["node"] = ("SUSPENDED", None) if st["qr"] == "ACTIVE" else (None, None)
    elif (st["qr"] == "ACTIVE" and st["gen"] in st.get("preempt_gens", [1]) and st["preempt"]
          and trainer_alive()):
      st["active_polls"] += 1
      if st["active_polls"] >= 2:
        vm_dies(wipe=st["preempt"] not in ("late", "deleting"))
        if st["preempt"] == "late":
          st["flip_in"] = 1
        elif st["preempt"] == "qr":
          st["qr"], st["node"] = "SUSPENDED", None
        elif st["preempt"] == "deleted":  # `pod delete` or the console, by hand
          st["qr"], st["node"] = None, None
        elif st["preempt"] == "deleting":  # the same, seen while it is under way
          st["qr"], st["node"], st["flip_in"] = "DELETING", "DELETING", 1
        else:
          st["node"] = "PREEMPTED"
        event("preempted", how=st["preempt"])
    if st["qr"] is None:  # deleted by this very poll
      save()
      not_found("queuedResource")
    print(json.dumps({"name": words[4], "state": {"state": st["qr"]}}))
  elif verb == "delete":
    if st["qr"] is None:
      not_found("queuedResource")
    vm_dies()
    st["qr"], st["node"] = None, None
    event("delete", force="force" in flags)
elif group == "compute tpus tpu-vm":
  if verb == "describe":
    if st["node"] is None:
      not_found("node")
    print(json.dumps({"name": words[4], "state": st["node"],
                      "networkEndpoints": [{"ipAddress": f"10.0.0.{i}"} for i in range(WORKERS)]}))
  elif verb == "delete":
    st["node"] = None
    event("delete-node")
  elif verb == "ssh":
    if st["node"] != "READY":
      sys.stderr.write("ssh: connect to host: Connection refused\n")
      sys.exit(255)
    cmd = flags["command"]
    targets = range(WORKERS) if flags["worker"] == "all" else [int(flags["worker"])]
    kind = ("install" if "uv pip install" in cmd else "train" if "setsid nohup" in cmd
            else "stop" if "stop_requested\"; p=" in cmd else "probe")
    if kind != "probe":
      event(kind, worker=flags["worker"])
    rc, out, err = 0, [], []
    silent = st.get("unreachable", {}).get(str(st["gen"]), [])  # workers a probe cannot reach
    if kind == "probe" and silent and st.get("unreachable_probes", 0) > 0:
      st["unreachable_probes"] -= 1
    else:
      silent = []
    for i in targets:
      if i in silent:
        sys.stderr.write(f"ssh: connect to host 10.0.0.{i} port 22: Connection timed out\n")
        rc = 255
        continue
      if kind == "install":
        venv = os.path.join(home(i), "ddpm_jax", ".venv", "bin")
        os.makedirs(venv, exist_ok=True)
        py = os.path.join(venv, "python")
        with open(py, "w") as f:
          f.write(FAKE_TRAINER % dict(log=os.path.join(D, "trainer.log"), gen=st["gen"],
                                      **st["trainer"].get(str(st["gen"]), st["trainer"].get("*"))))
        os.chmod(py, 0o755)
        print(f"DDPM_POD_WORKER installed jax 0.10.2")
        continue
      env = dict(os.environ, HOME=home(i), FAKE_HOST=f"worker-{i}")
      r = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True,
                         timeout=60)
      out.append(r.stdout)
      err.append(r.stderr)
      rc = max(rc, r.returncode)
    if kind == "probe" and st.get("interrupt") and (
        finished() if st["interrupt"] == "finished" else trainer_alive()):
      st["interrupt"] = None  # Ctrl-C: the runner does not see this probe's answer
      save()
      os.kill(os.getppid(), signal.SIGINT)
      sys.exit(255)
    sys.stdout.write("".join(out))
    sys.stderr.write("".join(err))
    save()
    sys.exit(rc)
save()
'''


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
  """The fake's folder; ``configure(**state)`` sets the scenario before the runner starts.

  ``preempt`` (of the slices numbered in ``preempt_gens``, default [1]): None; "qr" (the
  queued resource goes SUSPENDED and the node disappears); "node" (the node goes PREEMPTED,
  the queued resource stays ACTIVE); "late" (the trainers get the shutdown SIGTERM, save and
  exit 0 while the slice still looks ACTIVE for a poll); "deleted" / "deleting" (deleted by
  hand: gone at once / DELETING for a poll, then gone). ``create_fails``: {"n": "gone" or
  "exists"}, the n-th create fails, having made the resource or not. ``unreachable``:
  {"gen": [workers]} that the next ``unreachable_probes`` status probes cannot reach.
  ``interrupt``: "finished" / "running": a SIGINT to the runner at the probe that would see
  the trainers finished / running. ``trainer``: {"gen" or "*": {"seconds", "rc"}}.
  """
  d = tmp_path / "gcloud"
  d.mkdir()
  script = d / "gcloud"
  script.write_text(FAKE_GCLOUD.replace("#!PYTHON", "#!" + sys.executable))
  hostname = d / "hostname"
  hostname.write_text("#!/bin/sh\necho \"${FAKE_HOST:-fake}\"\n")
  for f in (script, hostname):
    f.chmod(f.stat().st_mode | stat.S_IXUSR)
  monkeypatch.setenv("PATH", f"{d}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("FAKE_GCLOUD_DIR", str(d))

  def configure(**state):
    base = {"qr": None, "node": None, "gen": 0, "polls": 0, "active_polls": 0, "preempt": None,
            "trainer": {}}
    (d / "state.json").write_text(json.dumps({**base, **state}))

  configure()
  yield d, configure
  for pid_file in d.glob("w*/ddpm_pod/pid"):  # no trainer outlives the test
    try:
      os.killpg(os.getpgid(int(pid_file.read_text())), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass


def events(d):
  path = d / "calls.log"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def trainer_starts(d):
  path = d / "trainer.log"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


COMMON = ["--name", "ddpm", "--zone", "us-central2-b", "--poll-seconds", "0",
          "--backoff-seconds", "0"]
TRAIN = ["--workdir", "gs://b/runs/x", "--config", "configs/tiny.py", "--",
         "--config.training.num_train_steps=10"]
ARGV = ["--workdir=gs://b/runs/x", "--config=configs/tiny.py",
        "--config.training.num_train_steps=10"]


@pytest.mark.parametrize("preempt", ["qr", "node", "late"])
def test_run_recreates_a_preempted_slice_and_reruns_the_same_command(fake_gcloud, capsys,
                                                                     preempt):
  d, configure = fake_gcloud
  configure(preempt=preempt, trainer={"1": {"seconds": 60.0, "rc": 0},   # runs until preempted
                                      "2": {"seconds": 0.3, "rc": 0}})   # then finishes
  t0 = time.time()
  rc = pod.main(["run", *COMMON, "--accelerator-type", "v4-16", "--spot",
                 "--repo", "https://example.com/ddpm_jax.git", *TRAIN])
  out = capsys.readouterr().out
  assert rc == 0, out
  assert time.time() - t0 < 60
  assert [e["event"] for e in events(d)] == [
      "create", "install", "train", "preempted", "delete", "create", "install", "train"]
  assert all(e["spot"] for e in events(d) if e["event"] == "create")
  assert all(e["force"] for e in events(d) if e["event"] == "delete")
  create = next(e["argv"] for e in events(d) if e["event"] == "create")
  assert create[:5] == ["compute", "tpus", "queued-resources", "create", "ddpm"]
  for flag in ("--node-id=ddpm", "--accelerator-type=v4-16",
               "--runtime-version=tpu-ubuntu2204-base", "--spot", "--zone=us-central2-b"):
    assert flag in create
  assert "WAITING_FOR_RESOURCES" in out and "preempted" in out
  assert out.index("slice lost") < out.index("training finished on every worker")
  if preempt == "late":  # the trainers saved and exited 0 on the shutdown's SIGTERM: not finished
    assert "exited 0 after a SIGTERM" in out
  # The same training command on every worker, before and after the preemption: each worker
  # started once per slice, the new slice's after the old one's (the workers of one slice start
  # concurrently, in no promised order).
  starts = trainer_starts(d)
  assert sorted((s["gen"], os.path.basename(s["home"])) for s in starts) == [
      (1, "w0"), (1, "w1"), (2, "w0"), (2, "w1")]
  assert [s["gen"] for s in starts] == sorted(s["gen"] for s in starts)
  assert all(s["argv"] == ["main.py", *ARGV] for s in starts)
  # Each worker of the new slice recorded the trainer's exit: 0, no outside signal.
  for w in ("w0", "w1"):
    assert (d / w / "ddpm_pod" / "rc").read_text().strip() == "0"
    assert not (d / w / "ddpm_pod" / "signalled").exists()

  assert pod.main(["stop", *COMMON]) == 0
  assert pod.main(["delete", *COMMON]) == 0
  assert [e["event"] for e in events(d)][-2:] == ["stop", "delete"]
  assert "no trainer running" in capsys.readouterr().out


def test_stop_ends_the_trainers_and_watch_reports_it(fake_gcloud, capsys):
  d, configure = fake_gcloud
  configure(trainer={"1": {"seconds": 60.0, "rc": 0}})
  assert pod.main(["up", *COMMON, "--repo", "https://example.com/ddpm_jax.git"]) == 0
  assert pod.main(["train", *COMMON, *TRAIN]) == 0
  assert pod.main(["train", *COMMON, *TRAIN]) == 0  # idempotent: no second trainer
  assert "already running on worker-0, worker-1" in capsys.readouterr().out
  assert pod.main(["status", *COMMON]) == 0
  assert "worker-0: running" in capsys.readouterr().out
  assert pod.main(["stop", *COMMON]) == 0
  assert "SIGTERM to" in capsys.readouterr().out
  assert pod.main(["watch", *COMMON, *TRAIN]) == 0
  assert "stopped by `stop`" in capsys.readouterr().out
  for w in ("w0", "w1"):  # the trainer itself got the SIGTERM and exited 0
    assert (d / w / "ddpm_pod" / "rc").read_text().strip() == "0"
    assert (d / w / "ddpm_pod" / "stop_requested").exists()
  assert pod.main(["delete", *COMMON]) == 0
  assert [e["event"] for e in events(d)] == [
      "create", "install", "train", "train", "stop", "delete"]
  assert len(trainer_starts(d)) == 2  # watch did not restart a stopped run


def test_trainers_that_keep_failing_are_rerun_then_given_up(fake_gcloud, capsys):
  d, configure = fake_gcloud
  configure(trainer={"1": {"seconds": 0.0, "rc": 3}})
  rc = pod.main(["run", *COMMON, "--max-restarts", "1", "--repo", "https://example.com/r.git",
                 *TRAIN])
  out = capsys.readouterr().out
  assert rc == 1
  assert "rerunning the training command (1/1)" in out and "giving up" in out
  assert [e["event"] for e in events(d)] == ["create", "install", "train", "train"]
  assert not any(e["event"] == "create" for e in events(d)[1:])  # not taken for a preemption


def test_trainers_refused_by_a_held_lock_are_rerun_without_counting_as_restarts(fake_gcloud,
                                                                              capsys):
  """A slice whose trainers find the workdir lock held (exit 75, as after a lost VM, until its
  lock is 5 minutes old) three times, then train: `run` reruns them each poll without using
  up --max-restarts (1 here), and finishes."""
  from ddpm_jax import errors
  assert pod.LOCKED_EXIT_STATUS == errors.LOCKED_EXIT_STATUS
  d, configure = fake_gcloud
  configure(trainer={"1": {"seconds": 0.0, "rc": [75, 75, 75, 0]}})
  rc = pod.main(["run", *COMMON, "--max-restarts", "1", "--repo", "https://example.com/r.git",
                 *TRAIN])
  out = capsys.readouterr().out
  assert rc == 0, out
  assert out.count("the workdir lock is held") == 3 and "training finished" in out
  assert "giving up" not in out and "(1/1)" not in out
  assert [e["event"] for e in events(d)] == ["create", "install"] + ["train"] * 4


def test_a_lock_that_stays_held_ends_watch_after_the_wait(fake_gcloud, capsys):
  d, configure = fake_gcloud
  configure(trainer={"1": {"seconds": 0.0, "rc": 75}})
  rc = pod.main(["run", *COMMON, "--max-lock-wait-minutes", "0", "--repo",
                 "https://example.com/r.git", *TRAIN])
  out = capsys.readouterr().out
  assert rc == 1 and "the workdir lock stayed held for 0 minutes" in out, out


def test_a_local_workdir_is_refused_before_anything_runs(fake_gcloud, capsys):
  d, _ = fake_gcloud
  assert pod.main(["run", *COMMON, "--repo", "r", "--workdir", "runs/x"]) == 1
  assert "gs://" in capsys.readouterr().err
  assert events(d) == []


def test_the_wrapper_and_commands_are_plain_bash(tmp_path):
  """The script a worker runs parses in bash (-n), with the training arguments quoted."""
  import subprocess
  a = pod.parse(["train", "--name", "n", "--zone", "z", "--workdir", "gs://b/r x",
                 "--", "--config.data.folder=/a b"])
  script = tmp_path / "run.sh"
  script.write_text(pod.Pod(a).wrapper_script())
  assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
  assert "'--workdir=gs://b/r x'" in script.read_text()


def test_an_uneventful_run_deletes_the_slice_when_asked(fake_gcloud, capsys):
  d, configure = fake_gcloud
  configure(trainer={"1": {"seconds": 0.2, "rc": 0}})
  assert pod.main(["run", *COMMON, "--delete-when-done", "--repo", "r", *TRAIN]) == 0
  assert "training finished" in capsys.readouterr().out
  assert [e["event"] for e in events(d)] == ["create", "install", "train", "delete"]
  # JAX on the workers may use the TPU only: one that misses it fails instead of training on
  # the host CPU while the slice bills.
  assert [s["platforms"] for s in trainer_starts(d)] == ["tpu", "tpu"]


@pytest.mark.parametrize("accelerator, extra, version", [
    ("v4-32", [], "tpu-ubuntu2204-base"),
    ("v5litepod-16", [], "v2-alpha-tpuv5-lite"),
    ("v5p-16", [], "v2-alpha-tpuv5"),
    ("v6e-8", [], "v2-alpha-tpuv6e"),
    ("v5p-16", ["--version", "v2-alpha-tpuv5-custom"], "v2-alpha-tpuv5-custom"),  # overrides
    ("v9z-8", ["--version", "v2-alpha-tpuv9z"], "v2-alpha-tpuv9z"),  # a type unknown here
])
def test_the_runtime_version_follows_the_accelerator_type(fake_gcloud, accelerator, extra,
                                                          version):
  """Google lists one TPU software version per generation (cloud.google.com/tpu/docs/runtimes):
  on v5e/v5p/v6e, tpu-ubuntu2204-base is the wrong image and JAX can miss the TPU."""
  d, configure = fake_gcloud
  configure(trainer={"*": {"seconds": 0.0, "rc": 0}})
  assert pod.main(["up", *COMMON, "--accelerator-type", accelerator, *extra, "--repo", "r"]) == 0
  creates = [e["argv"] for e in events(d) if e["event"] == "create"]
  assert len(creates) == 1
  assert f"--accelerator-type={accelerator}" in creates[0]
  assert [a for a in creates[0] if a.startswith("--runtime-version")] == [
      f"--runtime-version={version}"]


def test_an_unknown_accelerator_type_asks_for_version_before_anything_runs(fake_gcloud, capsys):
  d, _ = fake_gcloud
  assert pod.main(["run", *COMMON, "--accelerator-type", "v9z-8", "--repo", "r", *TRAIN]) == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "--accelerator-type=v9z-8" in err[0] and "pass --version" in err[0]
  assert events(d) == []  # nothing created, nothing bills


def test_up_replaces_a_suspended_queued_resource(fake_gcloud):
  d, configure = fake_gcloud
  configure(qr="SUSPENDED", gen=1, trainer={"2": {"seconds": 0.2, "rc": 0}})
  assert pod.main(["up", *COMMON, "--repo", "r"]) == 0
  assert [e["event"] for e in events(d)] == ["delete", "create", "install"]


def test_the_runner_needs_only_the_standard_library():
  """It runs on a laptop's Python (3.8+) without the project's dependencies."""
  import ast
  import subprocess
  with open(pod.__file__) as f:
    ast.parse(f.read(), feature_version=(3, 8))
  code = ("import sys, ddpm_jax.pod; bad = {'jax', 'numpy'} & set(sys.modules); "
          "sys.exit(str(bad) if bad else 0)")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                     cwd=os.path.dirname(os.path.dirname(pod.__file__)))
  assert r.returncode == 0, r.stderr


BILLS = ("still exists and bills until deleted: python -m ddpm_jax.pod delete --name=ddpm "
         "--zone=us-central2-b")
NASTY = ["--config.sampling.name=$(touch {d}/F)", "--x=`touch {d}/G`", 'a"b', "it's",
         "two  words", "line\nbreak", "x; touch {d}/H", "${{HOME}}", "\\", "*", "--y=a'\"b"]


def test_training_arguments_reach_every_trainer_byte_for_byte(fake_gcloud, tmp_path, capsys):
  """No remote shell reads them: $(...), backticks, quotes, ;, newlines arrive as given."""
  d, configure = fake_gcloud
  configure(trainer={"1": {"seconds": 0.2, "rc": 0}})
  nasty = [a.format(d=tmp_path) for a in NASTY]
  rc = pod.main(["run", *COMMON, "--repo", "r", *TRAIN[:-1], *nasty])
  assert rc == 0, capsys.readouterr().out
  starts = trainer_starts(d)
  assert len(starts) == 2
  assert all(s["argv"] == ["main.py", *ARGV[:2], *nasty] for s in starts)
  assert not any((tmp_path / f).exists() for f in "FGH")  # nothing ran on any worker
  assert [e["event"] for e in events(d)] == ["create", "install", "train"]  # one try was enough


def test_install_quotes_every_value_once(tmp_path):
  """--repo, --ref and --python with shell metacharacters reach git and uv as one argument."""
  import subprocess
  bin_, home = tmp_path / "bin", tmp_path / "home"
  bin_.mkdir()
  home.mkdir()
  stub = (f"#!{sys.executable}\nimport json, os, sys\n"
          f"open({str(tmp_path / 'calls')!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n"
          "if 'clone' in sys.argv: os.makedirs(sys.argv[-1] + '/.git')\n"
          "if 'venv' in sys.argv:\n"
          "  os.makedirs('.venv/bin'); os.symlink(sys.argv[0], '.venv/bin/python')\n")
  for name in ("git", "python3"):
    (bin_ / name).write_text(stub)
    (bin_ / name).chmod(0o755)
  t = tmp_path
  a = pod.parse(["up", "--name", "n", "--zone", "z", "--repo", f"https://x/r.git; touch {t}/F",
                 "--ref", f"$(touch {t}/G)", "--python", f"3.11 `touch {t}/H`"])
  r = subprocess.run(["bash", "-c", pod.Pod(a).install_command()], capture_output=True,
                     text=True, timeout=60, env=dict(os.environ, HOME=str(home),
                                                     PATH=f"{bin_}:/usr/bin:/bin"))
  assert r.returncode == 0, r.stderr
  calls = [json.loads(line)[1:] for line in (tmp_path / "calls").read_text().splitlines()]
  assert ["clone", "-q", f"https://x/r.git; touch {t}/F", f"{home}/ddpm_jax"] in calls
  assert ["-C", f"{home}/ddpm_jax", "checkout", "-q", f"$(touch {t}/G)"] in calls
  assert ["-m", "uv", "venv", "-q", "--python", f"3.11 `touch {t}/H`", ".venv"] in calls
  assert not any((t / f).exists() for f in "FGH")


def test_a_create_that_failed_but_made_the_resource_is_used(fake_gcloud, capsys):
  """A create whose reply is lost: the resource it made is installed and trained on."""
  d, configure = fake_gcloud
  configure(create_fails={"1": "exists"}, trainer={"1": {"seconds": 0.2, "rc": 0}})
  assert pod.main(["run", *COMMON, "--repo", "r", *TRAIN]) == 0
  out = capsys.readouterr().out
  assert "but queued resource ddpm exists" in out and "training finished" in out
  assert [e["event"] for e in events(d)] == ["create", "install", "train"]
  assert out.strip().splitlines()[-1].endswith(BILLS)  # it is left, and bills: one line says so


def test_a_create_that_failed_for_good_leaves_nothing_and_says_nothing_bills(fake_gcloud, capsys):
  d, configure = fake_gcloud
  configure(create_fails={"1": "gone"})
  assert pod.main(["up", *COMMON, "--repo", "r"]) == 1
  captured = capsys.readouterr()
  assert "pod: error:" in captured.err and "bills" not in captured.out
  assert [e["event"] for e in events(d)] == ["create"]


@pytest.mark.parametrize("how", ["deleted", "deleting"])
def test_a_slice_deleted_by_hand_ends_watch_and_is_not_recreated(fake_gcloud, capsys, how):
  """No SUSPENDED / PREEMPTED state seen and not deleted by the runner: someone deleted it."""
  d, configure = fake_gcloud
  configure(preempt=how, trainer={"1": {"seconds": 60.0, "rc": 0},
                                  "*": {"seconds": 0.2, "rc": 0}})  # were it made again
  assert pod.main(["run", *COMMON, "--repo", "r", *TRAIN]) == 1
  out = capsys.readouterr().out
  assert "deleted, not by this runner and not after a preemption" in out
  assert [e["event"] for e in events(d)] == ["create", "install", "train", "preempted"]
  assert "bills" not in out  # nothing is left


@pytest.mark.parametrize("cause", ["preempted", "lost host"])
def test_a_recreation_whose_create_failed_is_tried_again(fake_gcloud, capsys, cause):
  """The slice the runner deleted itself is gone on the next poll: made again, not 'by hand'."""
  d, configure = fake_gcloud
  lost = (dict(preempt="qr") if cause == "preempted"
          else dict(unreachable={"1": [1]}, unreachable_probes=3))
  configure(create_fails={"2": "gone"}, **lost,
            trainer={"1": {"seconds": 60.0, "rc": 0}, "2": {"seconds": 0.2, "rc": 0}})
  rc = pod.main(["run", *COMMON, "--repo", "r", "--max-failed-polls", "3", *TRAIN])
  assert rc == 0, capsys.readouterr().out
  assert [e["event"] for e in events(d)] == [
      "create", "install", "train", *(["preempted"] if cause == "preempted" else []), "delete",
      "create", "create", "install", "train"]


def test_recreations_back_off_exponentially_up_to_a_cap_then_give_up(fake_gcloud, capsys):
  d, configure = fake_gcloud
  configure(preempt="node", preempt_gens=[1, 2, 3, 4],
            trainer={"*": {"seconds": 60.0, "rc": 0}, "5": {"seconds": 0.2, "rc": 0}})
  rc = pod.main(["run", *COMMON, "--repo", "r", "--max-recreations", "3", "--backoff-seconds",
                 "0.01", "--max-backoff-seconds", "0.015", *TRAIN])
  out = capsys.readouterr().out
  assert rc == 1
  assert [e["event"] for e in events(d)].count("create") == 4  # the first, then 3 more
  assert "creating the slice again (1/3)\n" in out  # the first at once,
  assert "creating the slice again (2/3) after waiting 0.01 s" in out  # then doubling
  assert "creating the slice again (3/3) after waiting 0.015 s" in out  # up to the cap
  assert "(--max-recreations 3); giving up" in out
  assert out.strip().splitlines()[-1].endswith(BILLS)  # the preempted one is still there
  assert "delete" not in [e["event"] for e in events(d)][-3:]


def test_a_worker_that_stops_answering_is_taken_for_a_lost_host(fake_gcloud, capsys):
  d, configure = fake_gcloud
  configure(unreachable={"1": [1]}, unreachable_probes=8,
            trainer={"1": {"seconds": 0.3, "rc": 0}, "2": {"seconds": 0.2, "rc": 0}})
  rc = pod.main(["run", *COMMON, "--repo", "r", "--max-failed-polls", "3", *TRAIN])
  out = capsys.readouterr().out
  assert rc == 0, out
  assert "1 of 2 workers did not answer 3 polls in a row: taken for a lost host" in out
  assert [e["event"] for e in events(d)] == [
      "create", "install", "train", "delete", "create", "install", "train"]


def test_no_worker_answering_stops_watch_and_leaves_the_slice(fake_gcloud, capsys):
  """Every worker silent is more likely ssh from here failing: no recreation, one line."""
  d, configure = fake_gcloud
  configure(unreachable={"1": [0, 1]}, unreachable_probes=8,
            trainer={"1": {"seconds": 0.3, "rc": 0}})
  rc = pod.main(["run", *COMMON, "--repo", "r", "--max-failed-polls", "3", *TRAIN])
  out = capsys.readouterr().out
  assert rc == 1
  assert "no worker answered 3 polls in a row" in out
  assert out.strip().splitlines()[-1].endswith(BILLS)
  assert [e["event"] for e in events(d)] == ["create", "install", "train"]


def test_the_trainers_giving_up_says_the_slice_bills(fake_gcloud, capsys):
  d, configure = fake_gcloud
  configure(trainer={"1": {"seconds": 0.0, "rc": 3}})
  assert pod.main(["run", *COMMON, "--max-restarts", "0", "--repo", "r", *TRAIN]) == 1
  out = capsys.readouterr().out
  assert "giving up" in out and out.strip().splitlines()[-1].endswith(BILLS)
  assert "delete" not in [e["event"] for e in events(d)]


@pytest.mark.parametrize("when", ["finished", "running"])
def test_ctrl_c_with_delete_when_done_deletes_only_a_finished_slice(fake_gcloud, when):
  """A runner stopped after the trainers finished (before it saw it) still deletes the slice;
  one stopped while they train leaves them training and says the slice bills."""
  import subprocess
  d, configure = fake_gcloud
  configure(interrupt=when, trainer={"1": {"seconds": 0.3 if when == "finished" else 60.0,
                                           "rc": 0}})
  r = subprocess.run([sys.executable, "-m", "ddpm_jax.pod", "run", *COMMON, "--repo", "r",
                      "--delete-when-done", *TRAIN], capture_output=True, text=True, timeout=120,
                     cwd=os.path.dirname(os.path.dirname(pod.__file__)),
                     # Ctrl-C as at a terminal: a runner started from a background job (a
                     # pytest under `cmd &` without job control) inherits SIGINT ignored,
                     # and Python then installs no KeyboardInterrupt handler.
                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  assert r.returncode == 130, r.stdout + r.stderr
  assert "interrupted" in r.stderr and "Traceback" not in r.stderr
  kinds = [e["event"] for e in events(d)]
  if when == "finished":
    assert kinds == ["create", "install", "train", "delete"]
    assert "deleting the slice (--delete-when-done)" in r.stdout and "bills" not in r.stdout
  else:
    assert kinds == ["create", "install", "train"]
    assert r.stdout.strip().splitlines()[-1].endswith(BILLS)


def test_a_trainer_whose_wrapper_is_still_writing_its_status_is_not_taken_for_vanished(tmp_path):
  """The window between the trainer's exit and its wrapper's rc (the cause of a rerun after an
  uneventful run on CI): a dead trainer pid with its run.sh alive reads "running"; the same
  dead pid with no wrapper reads "vanished"; a written rc reads "exited 0"."""
  import subprocess
  d = tmp_path / "ddpm_pod"
  d.mkdir()
  dead = subprocess.Popen(["true"])
  dead.wait()
  (d / "pid").write_text(str(dead.pid))
  (tmp_path / "run.sh").write_text("sleep 30\n")
  wrapper = subprocess.Popen(["bash", str(tmp_path / "run.sh")])

  def state():
    r = subprocess.run(["bash", "-c", pod.Pod.status_command()], capture_output=True, text=True,
                       env={**os.environ, "HOME": str(tmp_path)}, check=True)
    return r.stdout.split()[2:]

  try:
    (d / "wrapper_pid").write_text(str(wrapper.pid))
    assert state() == ["running"]
  finally:
    wrapper.kill()
    wrapper.wait()
  assert state() == ["vanished"]
  (d / "rc").write_text("0\n")
  assert state() == ["exited", "0"]
