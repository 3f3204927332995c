"""The one filesystem layer: every path a run reads or writes goes through here.

Paths are local paths or URLs (``gs://bucket/run``), handled by ``etils.epath``,
the layer orbax and TFDS use too. The CLI (``run_utils.set_process_defaults``) sets
``EPATH_USE_TF=false`` unless the user set it, so ``gs://`` goes through gcsfs (which
honours ``STORAGE_EMULATOR_HOST``) rather than TensorFlow's own GCS client.

Object stores have no append and no atomic rename of folders; the helpers here
write whole objects. Local writes go to a temporary file renamed into place, so a
reader never sees half a file.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid

import numpy as np
from etils import epath


def is_remote(p) -> bool:
  """True for URLs (gs://, s3://, ...), False for local paths."""
  return "://" in str(p)


def normalize(p) -> str:
  """A local path made absolute (``~`` expanded); a URL unchanged but for a trailing /."""
  p = os.fspath(p)
  if is_remote(p):
    return p.rstrip("/")
  return os.path.abspath(os.path.expanduser(p))


def join(base, *parts: str) -> str:
  if is_remote(base):
    return posixpath.join(str(base), *parts)
  return os.path.join(os.fspath(base), *parts)


def path(p) -> epath.Path:
  return epath.Path(normalize(p))


def exists(p) -> bool:
  return path(p).exists()


def makedirs(p) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def listdir(p) -> list[str]:
  """Names in a folder ([] if it does not exist)."""
  d = path(p)
  if not d.exists():
    return []
  return sorted(c.name for c in d.iterdir())


def read_bytes(p) -> bytes:
  return path(p).read_bytes()


def read_text(p) -> str:
  return path(p).read_text()


def write_bytes(p, data: bytes) -> None:
  """Writes a whole file, creating its folder; atomic on local disk."""
  p = normalize(p)
  if is_remote(p):
    path(p).write_bytes(data)  # an object appears whole or not at all
    return
  os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
  tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, p)


def write_text(p, text: str) -> None:
  write_bytes(p, text.encode())


def write_json(p, obj, **kw) -> None:
  write_text(p, json.dumps(obj, indent=2, default=str, **kw) + "\n")


def save_npz(p, **arrays) -> None:
  buf = io.BytesIO()
  np.savez_compressed(buf, **arrays)
  write_bytes(p, buf.getvalue())


def load_npz(p) -> dict:
  with np.load(io.BytesIO(read_bytes(p))) as f:
    return {k: f[k] for k in f.files}


def check_writable(folder, what: str) -> None:
  """Raises UserError (one line, with the fix) unless a small object can be written to and
  removed from ``folder``; for remote folders only (local ones fail clearly by themselves)."""
  folder = normalize(folder)
  if not is_remote(folder):
    return
  from ddpm_jax.errors import UserError
  probe = join(folder, f".ddpm_jax_write_check-{uuid.uuid4().hex[:8]}")
  try:
    write_bytes(probe, b"ok")
    remove(probe)
  except Exception as e:  # noqa: BLE001  (missing bucket, no permission, no credentials)
    bucket = folder.split("://", 1)[1].split("/", 1)[0]
    scheme = folder.split("://", 1)[0]
    cause = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    raise UserError(
        f"{what} {folder} cannot be written ({type(e).__name__}: {cause}). If the bucket does "
        f"not exist, create it in the region of your VMs: `gcloud storage buckets create "
        f"{scheme}://{bucket} --location=REGION`; if it does, give this VM's service account "
        f"access: `gcloud storage buckets add-iam-policy-binding {scheme}://{bucket} "
        f"--member=serviceAccount:SERVICE_ACCOUNT --role=roles/storage.objectAdmin`") from None


def remove(p) -> None:
  """Removes a file if it is there."""
  q = path(p)
  if q.exists():
    q.unlink()


def _no_scheme(p: str) -> str:
  return str(p).split("://", 1)[-1].rstrip("/")


def is_dir(p) -> bool:
  return path(p).is_dir()


def walk_files(folder) -> list[str]:
  """Paths of every file under ``folder`` (recursive; local or remote), sorted."""
  folder = normalize(folder)
  base, out = _no_scheme(folder), []
  for root, _, files in path(folder).walk():
    rel = _no_scheme(root)[len(base):].lstrip("/")
    out += [join(folder, rel, f) if rel else join(folder, f) for f in files]
  return sorted(out)


def copytree(src, dst) -> None:
  """Copies a folder tree file by file (local <-> remote, either way)."""
  src, dst = normalize(src), normalize(dst)
  base = _no_scheme(src)
  for root, _, files in path(src).walk():
    # A bucket's walk may give its folders without the gs:// scheme: name files from src.
    rel = _no_scheme(root)[len(base):].lstrip("/")
    for f in files:
      src_file = join(src, rel, f) if rel else join(src, f)
      write_bytes(join(dst, rel, f) if rel else join(dst, f), read_bytes(src_file))


def move(src, dst) -> None:
  """Moves a folder: a rename on local disk, copy then delete on an object store."""
  src, dst = normalize(src), normalize(dst)
  if not is_remote(src) and not is_remote(dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.rename(src, dst)
    return
  copytree(src, dst)
  path(src).rmtree()


_TRANSIENT_NAMES = {"ServerDisconnectedError", "ClientConnectorError", "ClientOSError",
                    "ServerTimeoutError", "ClientPayloadError", "ServiceUnavailable",
                    "GatewayTimeout", "InternalServerError", "TooManyRequests", "RetryError",
                    "TransportError", "ConnectionError", "ReadTimeout", "ConnectTimeout"}


def is_transient(e: BaseException) -> bool:
  """True if ``e`` (or an exception it was raised from) says the store did not answer (a
  dropped connection, a time-out, a 5xx or 429), which a later try may not meet; False for
  answers that will not change (missing objects, permissions, bad data)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, (FileNotFoundError, PermissionError)):
      return False
    if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__name__ in _TRANSIENT_NAMES:
      return True
    if str(e).lstrip().startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED")):
      return True
    e = e.__cause__ or e.__context__
  return False


class GrowingFile:
  """A log file that only grows (``metrics.jsonl``, TensorBoard events).

  Local files are appended to. Remote objects cannot be appended to, so the whole
  content is kept and rewritten on ``flush`` (an object of a few MB at most for
  these logs); an existing object's content is kept at the front.
  """

  def __init__(self, p, keep_existing: bool = True):
    self.path = normalize(p)
    self._remote = is_remote(self.path)
    self._pending = bytearray()
    if self._remote:
      self._content = bytearray(read_bytes(self.path) if keep_existing and exists(self.path)
                                else b"")
    else:
      os.makedirs(os.path.dirname(self.path), exist_ok=True)
      if not keep_existing:
        open(self.path, "wb").close()

  def write(self, data: bytes) -> None:
    self._pending += data

  def flush(self) -> None:
    if not self._pending:
      return
    if self._remote:  # the content grows only once the upload went through
      content = self._content + self._pending
      path(self.path).write_bytes(bytes(content))
      self._content = content
    else:
      with open(self.path, "ab") as f:
        f.write(self._pending)
    self._pending = bytearray()

  def keep_lines(self, keep) -> None:
    """Keeps only the complete lines for which ``keep(line)`` is true (a torn last line
    goes too); rewrites the file if anything is dropped."""
    self.flush()
    if self._remote:
      data = bytes(self._content)
    elif os.path.exists(self.path):
      with open(self.path, "rb") as f:
        data = f.read()
    else:
      return
    lines = data.splitlines(keepends=True)
    kept = []
    for line in lines:
      try:
        if line.endswith(b"\n") and keep(line):
          kept.append(line)
      except ValueError:  # a torn or foreign line
        pass
    if len(kept) == len(lines):
      return
    out = b"".join(kept)
    if self._remote:
      self._content = bytearray(out)
    write_bytes(self.path, out)

  def size(self) -> int:
    done = len(self._content) if self._remote else (
        os.path.getsize(self.path) if os.path.exists(self.path) else 0)
    return done + len(self._pending)
