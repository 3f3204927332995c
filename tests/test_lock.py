"""The workdir lock under the faults a review found: a lock file deleted under a live trainer,
a store reply lost after a conditional write succeeded, a taker whose clock is fast, and two
takers interleaved at the worst moment (a fake object store that runs one taker's whole turn
inside the other's, so each race happens by construction, not by luck)."""

import datetime
import json
import os
import subprocess
import sys

import pytest
from google.api_core import exceptions

from ddpm_jax import lock as lock_lib
from ddpm_jax.errors import WorkdirLocked

# --- local disk --------------------------------------------------------------------------

def test_a_deleted_lock_file_is_taken_again_by_its_holder(tmp_path):
  """A /tmp cleaner or `rsync --delete` removes the file: the holder notices at its next
  check (before any write) and locks a new file, so a later trainer is still refused."""
  a = lock_lib.WorkdirLock(str(tmp_path))
  a.acquire()
  os.remove(tmp_path / "trainer.lock")
  a.check()  # no error: nobody else holds it
  assert not a.lost
  assert json.load(open(tmp_path / "trainer.lock"))["id"] == a.me["id"]
  with pytest.raises(WorkdirLocked, match="in use by a running trainer"):
    lock_lib.WorkdirLock(str(tmp_path)).acquire()
  a.release()
  assert not os.path.exists(tmp_path / "trainer.lock")


def test_a_trainer_whose_deleted_lock_another_took_stops_and_leaves_its_file(tmp_path):
  """The file is deleted and a second trainer starts before the first looks again: the
  second holds the lock; the first stops writing and its release removes nothing of the
  second's."""
  a = lock_lib.WorkdirLock(str(tmp_path))
  a.acquire()
  os.remove(tmp_path / "trainer.lock")
  b = lock_lib.WorkdirLock(str(tmp_path))
  b.acquire()  # in: the file it found was nobody's
  assert a.is_lost()
  with pytest.raises(WorkdirLocked, match="took over the workdir"):
    a.check()
  a.release()
  assert json.load(open(tmp_path / "trainer.lock"))["id"] == b.me["id"]
  with pytest.raises(WorkdirLocked, match="in use by a running trainer"):
    lock_lib.WorkdirLock(str(tmp_path)).acquire()  # b's flock is intact
  b.release()
  assert not os.path.exists(tmp_path / "trainer.lock")


def test_a_lock_file_put_back_by_hand_is_not_a_lost_lock(tmp_path):
  """A copy of an old lock file restored over the holder's (rsync from a backup): nobody
  holds the new file, so the holder takes it rather than stop a healthy run."""
  a = lock_lib.WorkdirLock(str(tmp_path))
  a.acquire()
  os.remove(tmp_path / "trainer.lock")
  (tmp_path / "trainer.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
  a.check()
  assert not a.lost and json.load(open(tmp_path / "trainer.lock"))["id"] == a.me["id"]
  a.release()


def test_the_cli_trainer_stops_without_writing_when_its_deleted_lock_was_taken(tmp_path,
                                                                                data_dir):
  """The fault review's case end to end: the lock of a running trainer is deleted and another
  process takes it; the trainer ends with one line and exit 75 (``LOCKED_EXIT_STATUS``: the
  pod runner's "try again later") and writes nothing more: no
  checkpoint (none was due; a trainer that stops saves one, unless it lost its lock), and
  the other's lock file is still there."""
  from tests import cli
  w = tmp_path / "w"
  job = cli.main_py(*cli.tiny_flags(data_dir, "--config.training.num_train_steps=100000",
                                    "--config.training.checkpoint_every_steps=100000",
                                    "--config.training.checkpoint_every_minutes=0"),
                    "--workdir", str(w), cwd=tmp_path)
  job.wait_for(r"train: step \d+/")
  other = subprocess.Popen(  # deletes the lock file and takes the lock, until it has it
      [sys.executable, "-c", "import os, time; from ddpm_jax import lock as lock_lib\n"
       "while True:\n"
       f"  os.remove({str(w / 'trainer.lock')!r})\n"
       "  try:\n"
       f"    lock_lib.WorkdirLock({str(w)!r}).acquire(); break\n"
       "  except lock_lib.WorkdirLocked: pass  # the trainer took it again in between\n"
       "print('held', flush=True); time.sleep(600)"],
      stdout=subprocess.PIPE, text=True, env=cli.env())
  try:
    assert other.stdout.readline().strip() == "held"
    from ddpm_jax.errors import LOCKED_EXIT_STATUS
    assert job.finish(timeout=120) == LOCKED_EXIT_STATUS == 75, job.output[-3000:]
    errors = [x for x in job.lines if x.startswith("error:")]
    assert len(errors) == 1 and "another trainer took over the workdir" in errors[0], (
        job.output[-3000:])
    assert "Traceback" not in job.output
    assert not [s for s in os.listdir(w / "checkpoints") if s[0].isdigit()], job.output[-3000:]
    assert json.load(open(w / "trainer.lock"))["pid"] == other.pid
  finally:
    other.kill()
    other.wait()


# --- an object store, faked so that races happen by construction --------------------------

class FakeStore:
  """Objects with generations and the store's own clock (``now``, apart from any host's);
  ``hooks[op]`` runs before an operation (an interleaved rival's turn); ``lose_reply``
  names operations whose next call is applied and then answered with the 412 a client's
  retry of it would get."""

  def __init__(self):
    self.objects = {}  # name -> (generation, bytes, updated seconds)
    self.now = 1_000_000.0
    self.next_generation = 1
    self.hooks = {}
    self.lose_reply = set()

  def bucket(self, name):
    return FakeBucket(self)


class FakeBucket:
  def __init__(self, store):
    self.store = store

  def blob(self, name):
    return FakeBlob(self.store, name)


class FakeBlob:
  def __init__(self, store, name):
    self.store, self.name = store, name
    self.generation, self.updated = None, None

  def _hook(self, op):
    hook = self.store.hooks.pop(op, None)
    if hook is not None:
      hook()

  def _check(self, if_generation_match):
    have = self.store.objects.get(self.name)
    if if_generation_match is None:
      return
    if (have[0] if have else 0) != if_generation_match:
      raise exceptions.PreconditionFailed("412 conditionNotMet")

  def _load(self, entry):
    self.generation = entry[0]
    self.updated = datetime.datetime.fromtimestamp(entry[2], datetime.UTC)

  def upload_from_string(self, data, if_generation_match=None):
    self._hook("upload")
    self._check(if_generation_match)
    entry = (self.store.next_generation, bytes(data), self.store.now)
    self.store.next_generation += 1
    self.store.objects[self.name] = entry
    self._load(entry)
    if "upload" in self.store.lose_reply:
      self.store.lose_reply.discard("upload")
      raise exceptions.PreconditionFailed("412 (the retry of a write whose reply was lost)")

  def reload(self):
    self._hook("reload")
    if self.name not in self.store.objects:
      raise exceptions.NotFound("404")
    self._load(self.store.objects[self.name])

  def download_as_bytes(self, if_generation_match=None):
    self._hook("download")
    if self.name not in self.store.objects:
      raise exceptions.NotFound("404")
    self._check(if_generation_match)
    return self.store.objects[self.name][1]

  def delete(self, if_generation_match=None):
    self._hook("delete")
    if self.name not in self.store.objects:
      raise exceptions.NotFound("404")
    self._check(if_generation_match)
    del self.store.objects[self.name]


class FakeStoreLock(lock_lib.WorkdirLock):
  REFRESH_S = 3600.0  # refreshed by hand in these tests

  def __init__(self, store, workdir="gs://bkt/run"):
    super().__init__(workdir)
    self.store = store

  def _bucket(self):
    return self.store.bucket("bkt")


def _holder_id(store):
  return json.loads(store.objects["run/trainer.lock"][1])["id"]


def _stale_lock(store):
  store.objects["run/trainer.lock"] = (99, json.dumps({"host": "gone-vm", "pid": 7}).encode(),
                                       store.now)
  store.now += lock_lib.WorkdirLock.STALE_S + 1


def test_two_takers_of_a_stale_lock_one_inside_the_others_turn_one_wins():
  """Both read the stale lock; b takes it over between a's read and a's write. a's takeover
  is conditional on the generation it read, so it fails and a is refused."""
  store = FakeStore()
  _stale_lock(store)
  a, b = FakeStoreLock(store), FakeStoreLock(store)
  store.hooks["upload"] = None  # a's first (create-if-absent) write runs plainly

  def a_reads_then_b_takes_over():
    store.hooks["upload"] = b.acquire  # just before a's takeover write: b's whole turn
  store.hooks["download"] = a_reads_then_b_takes_over
  with pytest.raises(WorkdirLocked, match="in use by a running trainer"):
    a.acquire()
  assert b.held and _holder_id(store) == b.me["id"]
  b.release()


def _taken_over():
  """a holds the lock; its machine stalls past STALE_S and b takes the lock over."""
  store = FakeStore()
  a = FakeStoreLock(store)
  a.acquire()
  store.now += lock_lib.WorkdirLock.STALE_S + 1
  b = FakeStoreLock(store)
  b.acquire()
  return store, a, b


def test_the_release_of_a_holder_that_lost_its_lock_leaves_the_new_holders():
  """a's machine stalled past STALE_S, b took over; a, not yet aware, releases: the delete
  is conditional on a's generation, so b's lock stays."""
  store, a, b = _taken_over()
  a.release()
  assert _holder_id(store) == b.me["id"]
  b.release()
  assert "run/trainer.lock" not in store.objects


def test_a_refresh_whose_reply_was_lost_keeps_the_lock():
  """The conditional rewrite succeeded but its reply was lost; the client's retry got 412.
  The object still carries our id: the trainer carries on (and keeps refreshing)."""
  store = FakeStore()
  a = FakeStoreLock(store)
  a.acquire()
  store.lose_reply.add("upload")
  a.refresh()
  assert not a.lost
  a.check()
  store.now += 60
  a.refresh()  # the next refresh is conditional on the generation now stored
  assert not a.lost and store.objects["run/trainer.lock"][2] == store.now
  a.release()
  assert "run/trainer.lock" not in store.objects


def test_a_create_whose_reply_was_lost_holds_the_lock():
  store = FakeStore()
  store.lose_reply.add("upload")
  a = FakeStoreLock(store)
  a.acquire()
  assert a.held and _holder_id(store) == a.me["id"]
  with pytest.raises(WorkdirLocked):
    FakeStoreLock(store).acquire()
  a.release()


def test_a_refresh_that_finds_another_holder_loses_the_lock():
  store, a, b = _taken_over()
  a.refresh()
  assert a.lost
  with pytest.raises(WorkdirLocked, match="took over"):
    a.check()
  b.release()


def test_a_lock_deleted_by_hand_on_the_bucket_is_taken_again():
  store = FakeStore()
  a = FakeStoreLock(store)
  a.acquire()
  del store.objects["run/trainer.lock"]
  a.refresh()
  assert not a.lost and _holder_id(store) == a.me["id"]
  a.release()


def test_a_taker_whose_clock_is_fast_does_not_take_a_live_lock(monkeypatch):
  """Staleness is measured on the store's clock only: a host 10 minutes ahead sees the live
  lock as just written, and is told how old the lock is."""
  store = FakeStore()
  a = FakeStoreLock(store)
  a.acquire()
  store.now += 30
  real = lock_lib.time.time
  monkeypatch.setattr(lock_lib.time, "time", lambda: real() + 600)
  with pytest.raises(WorkdirLocked, match=r"refreshed 30 s ago"):
    FakeStoreLock(store).acquire()
  assert _holder_id(store) == a.me["id"]
  a.release()


def test_a_stale_lock_is_taken_over():
  store = FakeStore()
  _stale_lock(store)
  a = FakeStoreLock(store)
  a.acquire()
  assert _holder_id(store) == a.me["id"]
  a.release()


