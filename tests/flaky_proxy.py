"""A TCP proxy on loopback that can go down and come back: a store outage, by hand.

While down it resets every open connection and refuses new ones (connections are
accepted and closed at once), as a client sees a network partition or a restarting
front end."""

from __future__ import annotations

import socket
import threading


class FlakyProxy:
  def __init__(self, target_host: str, target_port: int):
    self.target = (target_host, target_port)
    self.server = socket.create_server(("127.0.0.1", 0))
    self.port = self.server.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self.down = False
    self._open: set[socket.socket] = set()
    self._lock = threading.Lock()
    self._closed = False
    threading.Thread(target=self._accept, daemon=True).start()

  def set_down(self, down: bool) -> None:
    with self._lock:
      self.down = down
      if down:
        for s in list(self._open):
          _close(s)
        self._open.clear()

  def close(self) -> None:
    self._closed = True
    self.set_down(True)
    _close(self.server)

  def _accept(self) -> None:
    while not self._closed:
      try:
        client, _ = self.server.accept()
      except OSError:
        return
      with self._lock:
        if self.down:
          _close(client)
          continue
        try:
          upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
          _close(client)
          continue
        self._open.update((client, upstream))
      for a, b in ((client, upstream), (upstream, client)):
        threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

  def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
    try:
      while data := src.recv(65536):
        dst.sendall(data)
    except OSError:
      pass
    finally:
      _close(src)
      _close(dst)
      with self._lock:
        self._open.discard(src)
        self._open.discard(dst)


def _close(s: socket.socket) -> None:
  try:
    s.shutdown(socket.SHUT_RDWR)
  except OSError:
    pass
  s.close()
