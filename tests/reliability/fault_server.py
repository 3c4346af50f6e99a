"""A FHIR server on loopback that misbehaves on purpose, one fault per base path: `http://127.0.0.1:P/{mode}/fhir`.

Modes: `healthy` (a searchable record, honours `_count`/`_offset`), `trickle` (headers, then one body byte
every 50 ms, forever), `trickle-headers` (the status line, then one header byte every 50 ms), `hang` (reads
the request, never answers), `401`, `403`, `500`, `nonjson`, `truncated` (Content-Length larger than what is
sent, then close), `loop` (a `next` link back to the same URL), `endless` (a new `next` page forever),
`huge` (a 50 MB chunked searchset), `elsewhere` (one entry and a `next` link to `next_target`).

Raw sockets, so every byte is under the test's control. The server counts the connections it holds open
(`live`), which tells whether the client closed what it gave up on: a socket cut at the deadline is seen
here as a closed connection. `requests_seen` records (mode, path, Authorization header) of every request.
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qs, urlsplit

MAX_PAGE = 1000  # like sekmet-fhir and HAPI: `_count` above this is capped
DEFAULT_PAGE = 20


def closed_port() -> int:
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FaultServer:
    def __init__(self, resources: Iterable[dict[str, Any]] = (), *, next_target: str | None = None) -> None:
        self.resources = list(resources)
        self.next_target = next_target
        self.live = 0
        self.accepted = 0
        self.requests_seen: list[tuple[str, str, str | None]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        fault = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                fault._handle(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-fhir", daemon=True)

    def base(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mode}/fhir"

    def start(self) -> FaultServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def wait_live(self, predicate: Any, timeout: float = 10.0) -> bool:
        """Wait until `predicate(live connections)` holds (readiness, not sleeps)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if predicate(self.live):
                    return True
            time.sleep(0.02)
        return False

    # -- one connection ---------------------------------------------------------------------------------
    def _handle(self, sock: socket.socket) -> None:
        with self._lock:
            self.live += 1
            self.accepted += 1
        try:
            sock.settimeout(10)
            request = _read_request(sock)
            if request is None:
                return
            path, headers = request
            parts = path.split("/", 3)  # "", mode, "fhir", rest
            mode = parts[1] if len(parts) > 1 else ""
            rest = parts[3] if len(parts) > 3 else ""
            with self._lock:
                self.requests_seen.append((mode, path, headers.get("authorization")))
            self._answer(sock, mode, rest, path)
        except OSError:
            pass  # the client went away: expected for the slow modes
        finally:
            with self._lock:
                self.live -= 1
            with contextlib.suppress(OSError):
                sock.close()

    def _answer(self, sock: socket.socket, mode: str, rest: str, path: str) -> None:
        if mode == "healthy":
            status, body = self._healthy(rest)
            return _send(sock, status, json.dumps(body).encode())
        if mode in ("401", "403", "500"):
            outcome = {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "security"}]}
            return _send(sock, int(mode), json.dumps(outcome).encode())
        if mode == "nonjson":
            return _send(sock, 200, b"<html><body>Service temporarily unavailable</body></html>", "text/html")
        if mode == "truncated":
            head = _head(200, {"Content-Type": "application/fhir+json", "Content-Length": "5000"})
            sock.sendall(head + b'{"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {"resou')
            return None
        if mode == "loop":
            url = f"http://127.0.0.1:{self.port}{path}"
            return _send(sock, 200, json.dumps(_bundle([], next_url=url)).encode())
        if mode == "endless":
            page = int(parse_qs(urlsplit(path).query).get("page", ["0"])[0]) + 1
            url = f"http://127.0.0.1:{self.port}/endless/fhir/{rest.split('?')[0]}?page={page}"
            return _send(sock, 200, json.dumps(_bundle([], next_url=url)).encode())
        if mode == "elsewhere":
            return _send(sock, 200, json.dumps(_bundle([], next_url=self.next_target)).encode())
        if mode == "trickle":
            sock.sendall(_head(200, {"Content-Type": "application/fhir+json", "Content-Length": "1000000"}) + b"{")
            return self._drip(sock, b" ")
        if mode == "trickle-headers":
            sock.sendall(b"HTTP/1.1 200 OK\r\n")
            return self._drip(sock, b"X")
        if mode == "hang":
            return self._hold(sock)
        if mode == "huge":
            return self._huge(sock)
        return _send(sock, 404, b'{"resourceType": "OperationOutcome", "issue": []}')

    def _drip(self, sock: socket.socket, byte: bytes) -> None:
        while not self._stop.wait(0.05):
            sock.sendall(byte)  # raises once the client has closed its end

    def _hold(self, sock: socket.socket) -> None:
        sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                if sock.recv(1) == b"":
                    return  # the client closed
            except TimeoutError:
                continue

    def _huge(self, sock: socket.socket) -> None:
        head = _head(200, {"Content-Type": "application/fhir+json", "Transfer-Encoding": "chunked"})
        entry = json.dumps({"resource": {"resourceType": "Observation", "id": "x", "status": "final"}}).encode()
        chunk = b",".join([entry] * 500) + b","
        sock.sendall(head + _chunk(b'{"resourceType": "Bundle", "type": "searchset", "entry": ['))
        sent = 0
        while sent < 50 * 1024 * 1024 and not self._stop.is_set():
            sock.sendall(_chunk(chunk))
            sent += len(chunk)
        sock.sendall(_chunk(entry + b"]}") + b"0\r\n\r\n")

    # -- the healthy record -------------------------------------------------------------------------------
    def _healthy(self, rest: str) -> tuple[int, dict[str, Any]]:
        path, _, query = rest.partition("?")
        params = {k: v[-1] for k, v in parse_qs(query).items()}
        segments = [s for s in path.split("/") if s]
        if len(segments) == 2:
            found = [r for r in self.resources if r["resourceType"] == segments[0] and r.get("id") == segments[1]]
            if found:
                return 200, found[0]
            return 404, {"resourceType": "OperationOutcome", "issue": [{"severity": "error", "code": "not-found"}]}
        rtype = segments[0] if segments else ""
        matches = [r for r in self.resources if r["resourceType"] == rtype and _matches(r, params)]
        included: list[dict[str, Any]] = []
        if params.get("_include") == "Coverage:payor":
            payors = {p.get("reference") for c in matches for p in c.get("payor", [])}
            included = [r for r in self.resources if f"{r['resourceType']}/{r.get('id')}" in payors]
        size = min(int(params.get("_count", DEFAULT_PAGE)), MAX_PAGE)
        offset = int(params.get("_offset", 0))
        next_url = None
        if offset + size < len(matches):
            following = dict(params, _offset=str(offset + size), _count=str(size))
            next_url = f"http://127.0.0.1:{self.port}/healthy/fhir/{rtype}?" + "&".join(
                f"{k}={v}" for k, v in following.items()
            )
        return 200, _bundle(matches[offset : offset + size] + included, next_url=next_url)


def _matches(resource: dict[str, Any], params: dict[str, str]) -> bool:
    """Patient and _id filters only: enough for the service's queries (other parameters are ignored)."""
    if "_id" in params and resource.get("id") not in params["_id"].split(","):
        return False
    if "patient" in params:
        refs = [resource.get(k, {}).get("reference", "") for k in ("subject", "patient", "beneficiary")]
        if not any(ref.split("/")[-1] == params["patient"] for ref in refs if isinstance(ref, str)):
            return False
    if "practitioner" in params:
        ref = (resource.get("practitioner") or {}).get("reference", "")
        if ref.split("/")[-1] not in params["practitioner"].split(","):
            return False
    return True


def _bundle(resources: list[dict[str, Any]], *, next_url: str | None = None) -> dict[str, Any]:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [{"resource": r} for r in resources],
    }
    if next_url:
        bundle["link"] = [{"relation": "next", "url": next_url}]
    return bundle


def _read_request(sock: socket.socket) -> tuple[str, dict[str, str]] | None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return None
        data += chunk
        if len(data) > 65536:
            return None
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = head.split("\r\n")
    _method, path, _version = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return path, headers


def _head(status: int, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} X", *(f"{k}: {v}" for k, v in headers.items()), "Connection: close", "", ""]
    return "\r\n".join(lines).encode()


def _send(sock: socket.socket, status: int, body: bytes, content_type: str = "application/fhir+json") -> None:
    sock.sendall(_head(status, {"Content-Type": content_type, "Content-Length": str(len(body))}) + body)


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"
