"""Reads from the EHR's FHIR server: bounded in time, size, pages and destination, and never raising.

A hook call has a few seconds in total (CRD: 5 s for 90 % of calls), so every GET gets one deadline —
min(per-request timeout, time left in the call's budget) — that covers connecting, the response headers and
the body: a watchdog shuts the socket down when it passes, wherever the GET is blocked (a server that trickles
its answer one byte at a time cannot hold a thread past it). Each configured FHIR server (the allow-list entry
the request matched, not the URL it sent) gets its own pooled `requests.Session` and its own bounded set of
fetch threads, so a slow server delays only the calls that use it, never the others; idle servers are evicted.
Any failure — timeout, HTTP error, a body that is not the expected FHIR JSON, a `next` link pointing elsewhere —
becomes a `FetchResult` that says how much was read, because the decision must tell "not there" from "not
looked at".

Logs carry resource type, status, page count and timing only: URLs hold patient ids and the
`Authorization` header holds the caller's token, so neither is ever logged (nor exception messages,
which `requests` builds from the URL).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urljoin, urlsplit

import requests
from requests import PreparedRequest
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError, ReadTimeoutError

from cds_service.hook_request import JsonInputError, JsonLimits, load_json
from fhir_mappings.record import Availability

log = logging.getLogger(__name__)

# urllib3 logs every request line ("GET /fhir/Patient/<id>") at DEBUG: patient ids in URLs are PHI, so its
# records stop at INFO whatever the root level is, unless a deployment configured that logger on purpose.
_urllib3_log = logging.getLogger("urllib3")
if _urllib3_log.level == logging.NOTSET:
    _urllib3_log.setLevel(logging.INFO)

_READ_PATH = re.compile(r"^/?([A-Z][A-Za-z]+)/([^/?]+)$")
_SEARCH_PATH = re.compile(r"^/?([A-Z][A-Za-z]+)/?$")
_CHUNK = 64 * 1024
_PATH_SAFE = "/%:@!$&'()*+,;=-._~"  # keep percent-escapes the template already made
_QUERY_SAFE = ":/,"
_ERROR_SEVERITIES = frozenset({"error", "fatal"})
DEFAULT_PAGE_SIZE = 1000  # `_count` asked of every search: a Synthea-sized record in a few pages, not hundreds
MAX_SERVERS = 64  # FHIR servers with a live pool; the least recently used idle one is evicted beyond this
IDLE_EVICT_SECONDS = 300.0  # a server's pool unused this long is closed (threads and connections released)
_GRACE = 0.5  # seconds fetch_many waits past the deadline for fetches the watchdog is cutting


@dataclass(frozen=True)
class FetchResult:
    """What one read or search produced, and how complete it is."""

    resources: list[dict] = field(repr=False)  # entry resources of all pages read, or the single resource
    full_urls: dict[str, dict] = field(repr=False)  # entry.fullUrl -> resource
    availability: Availability
    reason: str  # PHI-free: "", "timeout", "HTTP 403", "page limit", "not found", ...
    pages: int
    status: int | None  # last HTTP status
    malformed_entries: int = 0  # Bundle entries that were not {"resource": {...}}: data we could not read


class _PageError(Exception):
    """One page could not be used; `reason` is PHI-free."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class _HeaderAuthOnly(AuthBase):
    """Leaves the request as built: stops requests from reading ~/.netrc on every call, whose Basic
    credentials would otherwise replace the caller's bearer token."""

    def __call__(self, request: PreparedRequest) -> PreparedRequest:
        return request


def _no_cookies() -> DefaultCookiePolicy:
    """Sessions are shared by all callers of one FHIR server: a cookie must never carry over between them."""
    return DefaultCookiePolicy(allowed_domains=[])


# -- one deadline per GET, enforced on the socket ----------------------------------------------------------


class _Guard:
    """The sockets one GET uses and the instant they must be shut down."""

    __slots__ = ("deadline", "done", "expired", "sockets")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.sockets: list[socket.socket] = []
        self.done = False
        self.expired = False


def _shutdown(sock: socket.socket) -> None:
    """Wake any thread blocked on this socket (connect, headers or body): the read returns at once.

    `socket.socket.shutdown` on purpose, also for TLS sockets: SSLSocket.shutdown would drop its SSL object
    under the reading thread's feet."""
    with contextlib.suppress(OSError, TypeError, ValueError):  # already closed or detached
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class DeadlineWatchdog:
    """One thread that shuts down the sockets of every GET whose deadline passed.

    Per-read socket timeouts cannot bound a GET: a server that sends one byte per second never lets a read
    time out. The GET runs inside `guard(deadline)`; the connection classes below register the socket they
    use with the current thread's guard, and at the deadline this thread shuts it down.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Guard]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._local = threading.local()
        self.cut = 0  # GETs cut at their deadline, for tests and metrics

    @contextmanager
    def guard(self, deadline: float) -> Iterator[_Guard]:
        guard = _Guard(deadline)
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._counter), guard))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="fhir-deadline-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        previous = getattr(self._local, "guard", None)
        self._local.guard = guard
        try:
            yield guard
        finally:
            self._local.guard = previous
            with self._cond:
                guard.done = True
                guard.sockets.clear()

    def register(self, sock: socket.socket | None) -> None:
        """Called by the connection classes: this thread's GET now uses `sock`."""
        guard = getattr(self._local, "guard", None)
        if guard is None or sock is None:
            return
        with self._cond:
            if guard.done:
                return
            guard.sockets.append(sock)
            expired = guard.expired
        if expired:
            _shutdown(sock)

    def _run(self) -> None:
        while True:
            due: list[_Guard] = []
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                now = time.monotonic()
                while self._heap and (self._heap[0][0] <= now or self._heap[0][2].done):
                    guard = heapq.heappop(self._heap)[2]
                    if not guard.done:
                        guard.expired = True
                        due.append(guard)
                sockets = [s for g in due for s in g.sockets]
                if self._heap and not due:
                    self._cond.wait(max(0.0, self._heap[0][0] - now))
            if due:
                self.cut += len(due)
            for sock in sockets:
                _shutdown(sock)


WATCHDOG = DeadlineWatchdog()


class _GuardedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        WATCHDOG.register(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        WATCHDOG.register(self.sock)  # a pooled connection being reused
        super().request(*args, **kwargs)


class _GuardedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        WATCHDOG.register(sock)  # covers the TLS handshake until the socket is wrapped
        return sock

    def connect(self) -> None:
        super().connect()
        WATCHDOG.register(self.sock)

    def request(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        WATCHDOG.register(self.sock)
        super().request(*args, **kwargs)


class _GuardedHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections register their sockets with the deadline watchdog."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _GuardedHTTPConnectionPool,
            "https": _GuardedHTTPSConnectionPool,
        }


def guarded_session(pool_size: int) -> requests.Session:
    """A session for one remote server: deadline-guarded sockets, no retries, no cookies, no netrc."""
    session = requests.Session()
    adapter = GuardedAdapter(pool_connections=4, pool_maxsize=max(pool_size, 4), max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.cookies.set_policy(_no_cookies())
    session.auth = _HeaderAuthOnly()
    return session


def read_body(response: requests.Response, max_bytes: int, stop_at: float) -> bytes:
    """The body of a streamed response, at most `max_bytes`, refused once `stop_at` (monotonic) has passed."""
    declared = response.headers.get("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise _PageError("response too large", response.status_code)
    chunks: list[bytes] = []
    size = 0
    for chunk in response.iter_content(_CHUNK):
        if chunks and time.monotonic() > stop_at:  # a body still dripping in after the budget
            raise _PageError("timeout", response.status_code)
        size += len(chunk)
        if size > max_bytes:
            raise _PageError("response too large", response.status_code)
        chunks.append(chunk)
    return b"".join(chunks)


# -- FHIR JSON -------------------------------------------------------------------------------------------


def is_error_outcome(resource: Any) -> bool:
    """An OperationOutcome with an error or fatal issue (warnings and information do not count)."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "OperationOutcome":
        return False
    issues = resource.get("issue")
    if not isinstance(issues, list):
        return True  # an OperationOutcome that says nothing is still not data
    return any(isinstance(i, dict) and i.get("severity") in _ERROR_SEVERITIES for i in issues)


def next_link(bundle: Mapping[str, Any]) -> str | None:
    """The `link[relation=next]` URL of a Bundle, if any."""
    links = bundle.get("link")
    if not isinstance(links, list):
        return None
    for link in links:
        if isinstance(link, dict) and link.get("relation") == "next":
            url = link.get("url")
            if isinstance(url, str) and url:
                return url
    return None


def bundle_entries(bundle: Mapping[str, Any]) -> tuple[list[dict], dict[str, dict], str, int]:
    """(resources, fullUrl map, problem, malformed) of a searchset Bundle page; `problem` is "" when usable.

    OperationOutcome entries (search.mode "outcome") are messages about the search, not data: an error
    one means the search failed ("OperationOutcome"); warnings and information are dropped. `malformed`
    counts entries that are not `{"resource": {...}}`: data the server sent that cannot be read, so the
    query is not completely read.
    """
    resources: list[dict] = []
    full_urls: dict[str, dict] = {}
    entries = bundle.get("entry")
    if entries is None:
        return resources, full_urls, "", 0
    if not isinstance(entries, list):
        return resources, full_urls, "malformed Bundle entries", 0
    problem = ""
    malformed = 0
    for entry in entries:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            malformed += 1
            continue
        search = entry.get("search")
        mode = search.get("mode") if isinstance(search, dict) else None
        if mode == "outcome" or resource.get("resourceType") == "OperationOutcome":
            if is_error_outcome(resource):
                problem = "OperationOutcome"
            continue
        resources.append(resource)
        full_url = entry.get("fullUrl")
        if isinstance(full_url, str) and full_url:
            full_urls[full_url] = resource
    return resources, full_urls, problem, malformed


def build_url(base_url: str, relative_url: str, page_size: int | None = None) -> str:
    """`base_url` joined with a relative FHIR URL, its query re-encoded; absolute URLs are kept as given.

    Templates carry `|`, `:` and `,` in values (`code=http://loinc.org|44261-6,...`): parsing and
    re-encoding makes them arrive intact and keeps a value from ever splitting into two parameters.
    With `page_size`, a search that does not say its own `_count` asks for pages that large.
    """
    if relative_url.startswith(("http://", "https://")):
        return relative_url
    path, _, query = relative_url.partition("?")
    url = base_url.rstrip("/") + "/" + quote(path.lstrip("/"), safe=_PATH_SAFE)
    pairs = parse_qsl(query, keep_blank_values=True) if query else []
    if page_size is not None and not any(name == "_count" for name, _ in pairs):
        pairs.append(("_count", str(page_size)))
    if pairs:
        url += "?" + urlencode(pairs, quote_via=quote, safe=_QUERY_SAFE)
    return url


def _label(relative_url: str) -> str:
    """A PHI-free name for logs: the resource type, or "page" for a continuation URL."""
    if relative_url.startswith(("http://", "https://")):
        return "page"
    match = re.match(r"^/?([A-Z][A-Za-z]+)", relative_url)
    return match.group(1) if match else "?"


def _default_pool_key(base_url: str) -> str:
    """Without a configured allow-list entry: one pool per origin, so sub-paths cannot multiply pools."""
    try:
        parts = urlsplit(base_url)
        return f"{parts.scheme.lower()}://{parts.netloc.lower()}"
    except ValueError:
        return base_url


class _ServerPool:
    """One FHIR server's session and fetch threads; `in_flight` fetches keep it from being evicted."""

    def __init__(self, key: str, concurrency: int) -> None:
        self.key = key
        self.session = guarded_session(concurrency)
        self.executor = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="fhir-fetch")
        self.in_flight = 0
        self.last_used = time.monotonic()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.session.close()


class FhirClient:
    """Fetches FHIR reads and searches, in parallel, within a deadline; safe to share across threads.

    `max_workers` is the cap on concurrent fetches *per FHIR server* (per pool key); `page_size` the
    `_count` asked of searches; `max_response_bytes` the largest page accepted.
    """

    def __init__(
        self,
        *,
        timeout: float = 2.5,
        max_workers: int = 16,
        max_response_bytes: int = 20_000_000,
        page_size: int | None = DEFAULT_PAGE_SIZE,
        max_servers: int = MAX_SERVERS,
        idle_evict_seconds: float = IDLE_EVICT_SECONDS,
    ) -> None:
        self.timeout = timeout
        self.max_workers = max_workers
        self.max_response_bytes = max_response_bytes
        self.page_size = page_size
        self.max_servers = max_servers
        self.idle_evict_seconds = idle_evict_seconds
        self.json_limits = JsonLimits(max_bytes=max_response_bytes)
        self._pools: OrderedDict[str, _ServerPool] = OrderedDict()
        self._lock = threading.Lock()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------
    def _pool(self, key: str) -> _ServerPool:
        """The pool of one FHIR server (created on first use); evicts idle pools beyond the bounds."""
        key = key.rstrip("/")
        evicted: list[_ServerPool] = []
        with self._lock:
            if self._closed:
                raise RuntimeError("FhirClient is closed")
            pool = self._pools.get(key)
            if pool is None:
                pool = _ServerPool(key, self.max_workers)
                self._pools[key] = pool
            self._pools.move_to_end(key)
            pool.last_used = time.monotonic()
            evicted = self._evict_locked(keep=key)
        for old in evicted:
            old.close()
        return pool

    def _evict_locked(self, keep: str) -> list[_ServerPool]:
        """Idle pools unused for `idle_evict_seconds`, and the least recently used idle ones beyond
        `max_servers` (busy pools are never closed under a running fetch)."""
        now = time.monotonic()
        evicted = []
        for key, pool in list(self._pools.items()):
            if key == keep or pool.in_flight:
                continue
            if now - pool.last_used > self.idle_evict_seconds or len(self._pools) > self.max_servers:
                evicted.append(self._pools.pop(key))
        return evicted

    def _session(self, key: str) -> requests.Session:
        """The pooled session of one FHIR server (tests look at it)."""
        return self._pool(key).session

    def pool_keys(self) -> list[str]:
        with self._lock:
            return list(self._pools)

    def in_flight(self) -> int:
        """Fetches running or queued right now, over all servers."""
        with self._lock:
            return sum(pool.in_flight for pool in self._pools.values())

    def close(self) -> None:
        """Stop the worker threads and close every pooled connection."""
        with self._lock:
            self._closed = True
            pools = list(self._pools.values())
            self._pools.clear()
        for pool in pools:
            pool.close()

    def __enter__(self) -> FhirClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- fetching ----------------------------------------------------------------------------------
    def fetch(
        self,
        base_url: str,
        relative_url: str,
        *,
        token: str | None,
        deadline: float,
        max_pages: int,
        url_allowed: Callable[[str], bool],
        pool_key: str | None = None,
    ) -> FetchResult:
        """Read `Type/id` or search `Type?...` (or continue at an absolute `next` URL), following pages.

        `deadline` is a `time.monotonic()` instant for the whole gathering; `url_allowed` guards every
        URL, the first and each `next` link, against leaving the caller's FHIR server. `pool_key` names
        the configured server whose pool to use (default: the base URL's origin).
        """
        try:
            pool = self._pool(pool_key or _default_pool_key(base_url))
        except RuntimeError:
            return _failure("client closed", None)
        return self._fetch_logged(
            _label(relative_url), pool, base_url, relative_url, token, deadline, max_pages, url_allowed
        )

    def fetch_many(
        self,
        base_url: str,
        requests_: Mapping[str, str],
        *,
        token: str | None,
        deadline: float,
        max_pages: int,
        url_allowed: Callable[[str], bool],
        page_limits: Mapping[str, int] | None = None,
        pool_key: str | None = None,
    ) -> dict[str, FetchResult]:
        """Fetch every `key -> relative URL` at once on the server's pool; one result per key, never raising.

        `page_limits` overrides `max_pages` per key (a prefetch Bundle continued from its `next` link has
        already used one page of its bound). Fetches still queued at the deadline are cancelled; running
        ones are cut by the watchdog, so this returns by the deadline plus a short grace.
        """
        if not requests_:
            return {}
        try:
            pool = self._pool(pool_key or _default_pool_key(base_url))
        except RuntimeError:
            return {key: _failure("client closed", None) for key in requests_}
        futures: dict[str, Future[FetchResult]] = {}
        for key, relative_url in requests_.items():
            label = f"{key} ({_label(relative_url)})"
            try:
                with self._lock:
                    pool.in_flight += 1
                future = pool.executor.submit(
                    self._fetch_logged,
                    label,
                    pool,
                    base_url,
                    relative_url,
                    token,
                    deadline,
                    (page_limits or {}).get(key, max_pages),
                    url_allowed,
                )
            except RuntimeError:  # the client or this pool was closed (service shutting down)
                with self._lock:
                    pool.in_flight -= 1
                break
            future.add_done_callback(lambda _f, p=pool: self._release(p))
            futures[key] = future
        wait_futures(futures.values(), timeout=max(0.0, deadline - time.monotonic()) + _GRACE)
        results: dict[str, FetchResult] = {}
        for key in requests_:
            future = futures.get(key)
            if future is None:
                results[key] = _failure("client closed", None)
            elif not future.done():
                future.cancel()  # still queued behind this server's other fetches: never started
                results[key] = _failure("deadline", None)
            elif future.cancelled():
                results[key] = _failure("deadline", None)
            elif future.exception() is not None:
                log.error("fhir %s: internal error %s", key, type(future.exception()).__name__)
                results[key] = _failure("internal error", None)
            else:
                results[key] = future.result()
        return results

    def _release(self, pool: _ServerPool) -> None:
        with self._lock:
            pool.in_flight -= 1
            pool.last_used = time.monotonic()

    def _fetch_logged(
        self,
        label: str,
        pool: _ServerPool,
        base_url: str,
        relative_url: str,
        token: str | None,
        deadline: float,
        max_pages: int,
        url_allowed: Callable[[str], bool],
    ) -> FetchResult:
        """`_fetch` plus one PHI-free log line: label (query key / resource type), outcome, status, timing."""
        if max_pages < 1:
            raise ValueError("max_pages must be at least 1")
        started = time.monotonic()
        result = self._fetch(pool.session, base_url, relative_url, token, deadline, max_pages, url_allowed)
        elapsed_ms = (time.monotonic() - started) * 1000
        level = logging.DEBUG if result.availability is Availability.READ else logging.WARNING
        log.log(
            level,
            "fhir %s: %s%s, status %s, %d page(s), %d resource(s), %.0f ms",
            label,
            result.availability.value,
            f" ({result.reason})" if result.reason else "",
            result.status,
            result.pages,
            len(result.resources),
            elapsed_ms,
        )
        return result

    def _fetch(
        self,
        session: requests.Session,
        base_url: str,
        relative_url: str,
        token: str | None,
        deadline: float,
        max_pages: int,
        url_allowed: Callable[[str], bool],
    ) -> FetchResult:
        absolute = relative_url.startswith(("http://", "https://"))
        path = relative_url.partition("?")[0]
        read_match = None if absolute or "?" in relative_url else _READ_PATH.match(path)
        if not absolute and read_match is None and not _SEARCH_PATH.match(path):
            return _failure("not a FHIR read or search", None)
        url = build_url(base_url, relative_url, None if read_match is not None or absolute else self.page_size)
        if not url_allowed(url):
            # An absolute URL here is a continuation (a prefetch Bundle's `next` link).
            return _failure("next link outside allowed server" if absolute else "URL outside allowed server", None)
        headers = {"Accept": "application/fhir+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"

        if read_match is not None:
            try:
                status, body = self._get(session, url, headers, deadline)
            except _PageError as exc:
                return _failure(exc.reason, exc.status)
            return _read_result(read_match.group(1), status, body)

        resources: list[dict] = []
        full_urls: dict[str, dict] = {}
        pages = 0
        malformed = 0
        status: int | None = None
        seen: set[str] = set()
        next_url: str | None = url

        def stopped(reason: str, last_status: int | None) -> FetchResult:
            return _result(resources, full_urls, pages, last_status, reason, malformed)

        while next_url is not None:
            if pages >= max_pages:
                return stopped("page limit", status)
            if next_url != url and not url_allowed(next_url):
                return stopped("next link outside allowed server", status)
            if next_url in seen:
                return stopped("next link loop", status)
            seen.add(next_url)
            try:
                status, body = self._get(session, next_url, headers, deadline)
                if status != 200:
                    raise _PageError(f"HTTP {status}", status)
                page_resources, page_urls, following, page_malformed = _search_page(body)
            except _PageError as exc:
                return stopped(exc.reason, exc.status or status)
            pages += 1
            malformed += page_malformed
            resources.extend(page_resources)
            full_urls.update(page_urls)
            next_url = urljoin(next_url, following) if following else None
            if next_url is not None and not next_url.startswith(("http://", "https://")):
                return stopped("next link outside allowed server", status)
        if malformed:
            partial = Availability.PARTIAL
            return FetchResult(resources, full_urls, partial, "malformed entries", pages, status, malformed)
        return FetchResult(resources, full_urls, Availability.READ, "", pages, status)

    def _get(self, session: requests.Session, url: str, headers: dict[str, str], deadline: float) -> tuple[int, Any]:
        """One GET within min(timeout, time left) for connect, headers and body together: (status, parsed JSON
        body, or None for non-200)."""
        started = time.monotonic()
        remaining = deadline - started
        if remaining <= 0:
            raise _PageError("deadline")
        budget = min(self.timeout, remaining)
        stop_at = started + budget
        with WATCHDOG.guard(stop_at) as guard:
            try:
                response = session.get(url, headers=headers, timeout=budget, allow_redirects=False, stream=True)
            except requests.Timeout as exc:
                raise _PageError("timeout") from exc
            except (requests.RequestException, OSError, HTTPError) as exc:
                raise _PageError("timeout" if guard.expired else f"connection error ({type(exc).__name__})") from exc
            with response:
                status = response.status_code
                if 300 <= status < 400:
                    raise _PageError(f"HTTP {status} (redirect not followed)", status)
                if status != 200:
                    return status, None
                try:
                    raw = read_body(response, self.max_response_bytes, stop_at)
                except (requests.RequestException, OSError, HTTPError) as exc:
                    reason = "timeout" if guard.expired else _read_failure(exc)
                    raise _PageError(reason, status) from exc
        try:
            return status, load_json(raw, self.json_limits)
        except JsonInputError as exc:
            raise _PageError("response too large" if exc.status == 413 else "invalid JSON", status) from exc


def _read_failure(exc: Exception) -> str:
    """requests reports a read timeout while streaming as ConnectionError(ReadTimeoutError): still a timeout."""
    if isinstance(exc, requests.Timeout) or any(isinstance(arg, ReadTimeoutError) for arg in exc.args):
        return "timeout"
    return f"read error ({type(exc).__name__})"


def _failure(reason: str, status: int | None) -> FetchResult:
    return FetchResult([], {}, Availability.UNAVAILABLE, reason, 0, status)


def _result(
    resources: list[dict], full_urls: dict[str, dict], pages: int, status: int | None, reason: str, malformed: int = 0
) -> FetchResult:
    """A search that stopped early: PARTIAL once a page was read, UNAVAILABLE before."""
    availability = Availability.PARTIAL if pages else Availability.UNAVAILABLE
    return FetchResult(resources, full_urls, availability, reason, pages, status, malformed)


def _read_result(resource_type: str, status: int, body: Any) -> FetchResult:
    """A read: the resource, "no such resource" (404/410 — no data, not a failure), or a failure."""
    if status in (404, 410):
        return FetchResult([], {}, Availability.READ, "not found", 0, status)
    if status != 200:
        return _failure(f"HTTP {status}", status)
    if not isinstance(body, dict):
        return _failure("not a FHIR resource", status)
    if body.get("resourceType") == "OperationOutcome":
        return _failure("OperationOutcome", status)
    if body.get("resourceType") != resource_type:
        return _failure("unexpected resourceType", status)
    return FetchResult([body], {}, Availability.READ, "", 1, status)


def _search_page(body: Any) -> tuple[list[dict], dict[str, dict], str | None, int]:
    """Entries, fullUrls, `next` link and malformed-entry count of one searchset page; _PageError when it is
    not one."""
    if not isinstance(body, dict):
        raise _PageError("not a FHIR resource", 200)
    resource_type = body.get("resourceType")
    if resource_type == "OperationOutcome":
        raise _PageError("OperationOutcome", 200)
    if resource_type != "Bundle" or body.get("type", "searchset") != "searchset":
        raise _PageError("not a searchset Bundle", 200)
    resources, full_urls, problem, malformed = bundle_entries(body)
    if problem:
        raise _PageError(problem, 200)
    return resources, full_urls, next_link(body), malformed
