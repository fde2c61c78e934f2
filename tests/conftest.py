"""Fixtures shared by the test modules."""
import http.server
import os
import struct
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope='session', autouse=True)
def tuning_decisions(tmp_path_factory):
    """Depthwise-conv tuning decisions of this test session (each worker's) go to a folder of its
    own, not to the user's kernel cache: decisions timed by tests under load would otherwise be the
    ones the user's runs adopt. The runs a test starts inherit it."""
    os.environ['FAT_DWCONV_TUNE_DIR'] = str(tmp_path_factory.mktemp('tuning'))
    yield
    del os.environ['FAT_DWCONV_TUNE_DIR']


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """Forget the process-wide kernel builds, self-check results and tuners, and the tuning decisions
    of earlier tests (a remembered case is not self-checked again), for the duration of a test."""
    from kernels import dwconv
    from kernels.dwconv import autotune, build
    monkeypatch.setenv(autotune.FOLDER_VARIABLE, str(tmp_path / 'decisions'))
    monkeypatch.setattr(build, '_loaded', {})
    monkeypatch.setattr(dwconv, '_usable', {})
    monkeypatch.setattr(autotune, '_tuners', {})


@pytest.fixture
def saved_bytes():
    """``saved_bytes(fn, *args)``: the bytes autograd keeps for backward while ``fn(*args)`` runs."""
    def measure(fn, *args) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            fn(*args)
        return sum(sizes)
    return measure


class FileServer:
    """An HTTP server on 127.0.0.1 that serves the files of ``folder`` by name. ``requests`` counts
    the requests per name; ``faults[name]`` lists what the next requests of ``name`` get: an HTTP
    status, 'stall' (headers, then nothing for 8 s), 'trickle' (a byte every 0.3 s), 'cut' (half the
    file chunked, then the connection closes) or 'ok'."""

    def __init__(self, folder: Path):
        self.folder, self.requests, self.faults = folder, {}, {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                name = self.path.rsplit('/', 1)[-1]
                server.requests[name] = server.requests.get(name, 0) + 1
                fault = server.faults[name].pop(0) if server.faults.get(name) else 'ok'
                path = server.folder / name
                if isinstance(fault, int) or not path.is_file():
                    self.send_error(fault if isinstance(fault, int) else 404)
                    return
                body = path.read_bytes()
                self.send_response(200)
                if fault == 'cut':  # chunked, the last chunk never sent: the client's read fails mid-way
                    self.send_header('Transfer-Encoding', 'chunked')
                    self.end_headers()
                    half = body[:len(body) // 2]
                    self.wfile.write(f'{len(half):x}\r\n'.encode() + half + b'\r\n')
                    self.close_connection = True
                    return
                self.send_header('Content-Length', str(len(body)))
                self.end_headers()
                if fault == 'stall':
                    time.sleep(8)
                elif fault == 'trickle':
                    for byte in body[:40]:
                        self.wfile.write(bytes([byte]))
                        self.wfile.flush()
                        time.sleep(0.3)

                else:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}/'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    """``serve(folder)``: a :class:`FileServer` of ``folder``, closed after the test."""
    servers = []

    def start(folder: Path) -> FileServer:
        servers.append(FileServer(folder))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


@pytest.fixture
def tmpfs(tmp_path):
    """``tmpfs(size)``: a new folder under ``tmp_path`` holding a tmpfs of ``size`` ('64k', '4m'), for
    full-disk tests; unmounted after the test. Mounting needs root: elsewhere the test skips, and
    under CI (CI=true) it fails, so CI cannot silently stop testing a full disk."""
    mounts = []

    def mount(size: str) -> Path:
        folder = tmp_path / f'tmpfs{len(mounts)}'
        folder.mkdir()
        if subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(folder)],
                          capture_output=True).returncode:
            if os.environ.get('CI') == 'true':
                pytest.fail('cannot mount a tmpfs: the full-disk tests need root')
            pytest.skip('cannot mount a tmpfs (needs root)')
        mounts.append(folder)
        return folder
    yield mount
    for folder in mounts:
        subprocess.run(['umount', str(folder)], check=True)


@pytest.fixture
def bomb_png() -> bytes:
    """A PNG whose header claims 40000 x 40000 pixels (and holds none): PIL refuses it as a likely
    decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', 40000, 40000, 8, 2, 0, 0, 0))
            + chunk(b'IEND', b''))
