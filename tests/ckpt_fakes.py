"""Test doubles for test_checkpoints.py: stand-ins for Lightning/sacred classes, pickles that
try to run code, and a local HTTP server that can misbehave on purpose.

Nothing here contacts the network beyond 127.0.0.1.
"""
import os
import re
import sys
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


# --- classes that real checkpoints name, recreated under their original module paths --------

def install_fake_module(monkeypatch, module_name, **classes):
    """Register `module_name` (and its parents) in sys.modules holding `classes`, so that
    pickle writes the original global names (`module_name.ClassName`) into test files."""
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        if name not in sys.modules:
            monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    module = sys.modules[module_name]
    for class_name, cls in classes.items():
        cls.__module__, cls.__qualname__, cls.__name__ = module_name, class_name, class_name
        setattr(module, class_name, cls)


def lightning_classes(monkeypatch):
    """Lightning 1.3 / sacred 0.8 look-alikes, pickled the way the originals pickle."""

    class AttributeDict(dict):  # dict subclass, default pickling (NEWOBJ + SETITEMS)
        def __getattr__(self, key):
            try:
                return self[key]
            except KeyError as err:
                raise AttributeError(key) from err

    class ReadOnlyDict(dict):  # sacred pickles read-only containers as cls(plain copy)
        def __reduce__(self):
            return (type(self), (dict(self),))

    class ReadOnlyList(list):
        def __reduce__(self):
            return (type(self), (list(self),))

    class ModelCheckpoint:  # only its class object is pickled (as a dictionary key)
        pass

    install_fake_module(monkeypatch, "pytorch_lightning.utilities.parsing",
                        AttributeDict=AttributeDict)
    install_fake_module(monkeypatch, "sacred.config.custom_containers",
                        ReadOnlyDict=ReadOnlyDict, ReadOnlyList=ReadOnlyList)
    install_fake_module(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint",
                        ModelCheckpoint=ModelCheckpoint)
    return types.SimpleNamespace(AttributeDict=AttributeDict, ReadOnlyDict=ReadOnlyDict,
                                 ReadOnlyList=ReadOnlyList, ModelCheckpoint=ModelCheckpoint)


def harmless_but_unlisted_class(monkeypatch):
    """A plain config object from some package: harmless, but not on the allow-list."""

    class Config:
        def __init__(self, lr):
            self.lr = lr

    install_fake_module(monkeypatch, "some_trainer.config", Config=Config)
    return Config


# --- pickles whose loading would run code ----------------------------------------------------

class ShellPayload:
    """Unpickling calls os.system(touch marker) (pickled as the global posix.system)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class ExecPayload:
    """Unpickling calls builtins.exec on source that creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({self.marker!r}).write_text('ran')",))


# --- a local HTTP file server with switchable faults -----------------------------------------

class FakeServer:
    """Serves `files` (url path -> bytes) on 127.0.0.1 at an ephemeral port.

    Faults: `cuts` responses in a row stop after `cut_after` body bytes and drop the
    connection; `ignore_range` answers Range requests with the whole file (200);
    `corrupt_at` flips one byte of every body; `status` answers every request with that code;
    `delay` seconds pass before each answer. `requests` records (path, Range header or None).
    """

    def __init__(self):
        self.files = {}
        self.requests = []
        self.cut_after, self.cuts = 0, 0
        self.ignore_range = False
        self.corrupt_at = None
        self.status = None
        self.delay = 0.0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def url(self):
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)

    def body_for(self, path):
        data = self.files.get(path)
        if data is not None and self.corrupt_at is not None:
            data = bytearray(data)
            data[self.corrupt_at] ^= 0xFF
            data = bytes(data)
        return data


def _handler_for(server):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            range_header = self.headers.get("Range")
            server.requests.append((self.path, range_header))
            time.sleep(server.delay)
            data = server.body_for(self.path)
            if server.status is not None or data is None:
                self.send_error(server.status or 404)
                return
            start = _range_start(range_header) if not server.ignore_range else None
            if start is not None and start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._send_body(data, start)

        def _send_body(self, data, start):
            if start is None:
                self.send_response(200)
                body = data
            else:
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if server.cuts > 0:  # announce the full length, send part, hang up
                server.cuts -= 1
                body = body[:server.cut_after]
                self.close_connection = True
            self.wfile.write(body)
            self.wfile.flush()

        def log_message(self, *args):  # keep test output quiet
            pass

    return Handler


def _range_start(header):
    match = re.fullmatch(r"bytes=(\d+)-", header or "")
    return int(match.group(1)) if match else None
