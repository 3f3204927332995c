"""A store that does not answer (a bucket outage): which errors are worth waiting for, the
trainer's bounded retry around saves and its one line after it, and logs that are neither lost
nor written twice by a failed upload. The outage itself, end to end through a proxy in front of
the GCS emulator, is in test_gcs.py (DDPM_JAX_SLOW_TESTS=1: it takes minutes)."""

import pytest

from ddpm_jax import fs, train
from ddpm_jax.errors import StoreUnavailable


def _disconnected():
  import aiohttp
  return aiohttp.ServerDisconnectedError("Server disconnected")


def test_what_is_worth_waiting_for():
  from google.api_core import exceptions
  wrapped = RuntimeError("save failed")
  wrapped.__cause__ = ConnectionResetError(104, "Connection reset by peer")
  for e in (_disconnected(), ValueError("UNAVAILABLE: HTTP response code 503"),
            exceptions.ServiceUnavailable("503"), TimeoutError(), wrapped):
    assert fs.is_transient(e), e
  for e in (FileNotFoundError("gone"), PermissionError("403"),
            ValueError("OUT_OF_RANGE: Requested byte range"), exceptions.Forbidden("403"),
            KeyError("x")):
    assert not fs.is_transient(e), e


def test_a_save_is_tried_again_while_the_store_does_not_answer(monkeypatch):
  slept = []
  monkeypatch.setattr(train.time, "sleep", slept.append)
  calls = []

  def save():
    calls.append(1)
    if len(calls) < 4:
      raise _disconnected()
    return "saved"
  assert train.with_store_retries("save checkpoint 6", save, "gs://b/w", lambda: 4,
                                  retry_s=300) == "saved"
  assert slept == [5.0, 10.0, 20.0]  # backoff


def test_an_outage_longer_than_the_wait_is_one_line_that_says_where_to_resume(monkeypatch):
  monkeypatch.setattr(train.time, "sleep", lambda s: None)
  calls = []

  def save():
    calls.append(1)
    raise _disconnected()
  with pytest.raises(StoreUnavailable) as e:
    train.with_store_retries("save checkpoint 6", save, "gs://b/w", lambda: 4, retry_s=0)
  msg = str(e.value)
  assert "\n" not in msg and len(calls) == 1
  assert msg.startswith("could not save checkpoint 6 in gs://b/w (ServerDisconnectedError")
  assert "the newest checkpoint is step 4; rerun the same command" in msg


def test_an_answer_that_will_not_change_is_not_waited_for(monkeypatch):
  monkeypatch.setattr(train.time, "sleep", lambda s: pytest.fail("slept"))
  with pytest.raises(PermissionError):
    train.with_store_retries("save", lambda: (_ for _ in ()).throw(PermissionError("403")),
                             "gs://b/w", lambda: None, retry_s=300)


class _FlakyUploads:
  """Stands for an object path whose upload fails ``failures`` times, then works."""

  def __init__(self, store, failures):
    self.store, self.failures = store, failures

  def write_bytes(self, data):
    if self.failures:
      self.failures -= 1
      raise _disconnected()
    self.store["data"] = data


def test_a_failed_upload_of_the_logs_keeps_every_line_once(monkeypatch):
  """A remote log is rewritten whole at each flush; an upload that fails must leave the
  lines pending (not lost, and not appended twice when the next flush goes through)."""
  store = {}
  uploads = _FlakyUploads(store, failures=1)
  monkeypatch.setattr(fs, "path", lambda p: uploads)
  monkeypatch.setattr(fs, "exists", lambda p: False)
  f = fs.GrowingFile("gs://b/w/metrics.jsonl")
  f.write(b'{"step": 1}\n')
  with pytest.raises(Exception, match="disconnected"):
    f.flush()
  f.write(b'{"step": 2}\n')
  f.flush()
  assert store["data"] == b'{"step": 1}\n{"step": 2}\n'
  f.write(b'{"step": 3}\n')
  f.flush()
  assert store["data"] == b'{"step": 1}\n{"step": 2}\n{"step": 3}\n'
