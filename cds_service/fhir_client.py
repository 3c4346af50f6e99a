"""Reads from the EHR's FHIR server: bounded in time, size, pages and destination, and never raising.

A hook call has a few seconds in total (CRD: 5 s for 90 % of calls), so every request gets
min(per-request timeout, time left in the call's budget), all missing queries run at once on one
shared thread pool, and each FHIR server gets one pooled `requests.Session`. Any failure — timeout,
HTTP error, a body that is not the expected FHIR JSON, a `next` link pointing elsewhere — becomes a
`FetchResult` that says how much was read, because the decision must tell "not there" from "not looked at".

Logs carry resource type, status, page count and timing only: URLs hold patient ids and the
`Authorization` header holds the caller's token, so neither is ever logged (nor exception messages,
which `requests` builds from the URL).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from http.cookiejar import DefaultCookiePolicy
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urljoin

import requests
from requests import PreparedRequest
from requests.adapters import HTTPAdapter
from requests.auth import AuthBase
from urllib3.exceptions import ReadTimeoutError

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


@dataclass(frozen=True)
class FetchResult:
    """What one read or search produced, and how complete it is."""

    resources: list[dict] = field(repr=False)  # entry resources of all pages read, or the single resource
    full_urls: dict[str, dict] = field(repr=False)  # entry.fullUrl -> resource
    availability: Availability
    reason: str  # PHI-free: "", "timeout", "HTTP 403", "page limit", "not found", ...
    pages: int
    status: int | None  # last HTTP status


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


def bundle_entries(bundle: Mapping[str, Any]) -> tuple[list[dict], dict[str, dict], str]:
    """(resources, fullUrl map, problem) of a searchset Bundle page; `problem` is "" when the page is usable.

    OperationOutcome entries (search.mode "outcome") are messages about the search, not data: an error
    one means the search failed ("OperationOutcome"); warnings and information are dropped.
    """
    resources: list[dict] = []
    full_urls: dict[str, dict] = {}
    entries = bundle.get("entry")
    if entries is None:
        return resources, full_urls, ""
    if not isinstance(entries, list):
        return resources, full_urls, "malformed Bundle entries"
    problem = ""
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        resource = entry.get("resource")
        if not isinstance(resource, dict):
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
    return resources, full_urls, problem


def build_url(base_url: str, relative_url: str) -> str:
    """`base_url` joined with a relative FHIR URL, its query re-encoded; absolute URLs are kept as given.

    Templates carry `|`, `:` and `,` in values (`code=http://loinc.org|44261-6,...`): parsing and
    re-encoding makes them arrive intact and keeps a value from ever splitting into two parameters.
    """
    if relative_url.startswith(("http://", "https://")):
        return relative_url
    path, _, query = relative_url.partition("?")
    url = base_url.rstrip("/") + "/" + quote(path.lstrip("/"), safe=_PATH_SAFE)
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        url += "?" + urlencode(pairs, quote_via=quote, safe=_QUERY_SAFE)
    return url


def _label(relative_url: str) -> str:
    """A PHI-free name for logs: the resource type, or "page" for a continuation URL."""
    if relative_url.startswith(("http://", "https://")):
        return "page"
    match = re.match(r"^/?([A-Z][A-Za-z]+)", relative_url)
    return match.group(1) if match else "?"


class FhirClient:
    """Fetches FHIR reads and searches, in parallel, within a deadline; safe to share across threads."""

    def __init__(self, *, timeout: float = 2.5, max_workers: int = 16, max_response_bytes: int = 20_000_000) -> None:
        self.timeout = timeout
        self.max_workers = max_workers
        self.max_response_bytes = max_response_bytes
        self._sessions: dict[str, requests.Session] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="fhir-fetch")

    # -- lifecycle ---------------------------------------------------------------------------------
    def _session(self, base_url: str) -> requests.Session:
        """The pooled session of one FHIR server, created on first use."""
        key = base_url.rstrip("/")
        session = self._sessions.get(key)
        if session is not None:
            return session
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = requests.Session()
                adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(self.max_workers, 10), max_retries=0)
                session.mount("https://", adapter)
                session.mount("http://", adapter)
                session.cookies.set_policy(_no_cookies())
                session.auth = _HeaderAuthOnly()
                self._sessions[key] = session
        return session

    def close(self) -> None:
        """Stop the worker threads and close every pooled connection."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for session in sessions:
            session.close()

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
    ) -> FetchResult:
        """Read `Type/id` or search `Type?...` (or continue at an absolute `next` URL), following pages.

        `deadline` is a `time.monotonic()` instant for the whole gathering; `url_allowed` guards every
        URL, the first and each `next` link, against leaving the caller's FHIR server.
        """
        return self._fetch_logged(_label(relative_url), base_url, relative_url, token, deadline, max_pages, url_allowed)

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
    ) -> dict[str, FetchResult]:
        """Fetch every `key -> relative URL` at once on the shared pool; one result per key, never raising.

        `page_limits` overrides `max_pages` per key (a prefetch Bundle continued from its `next` link has
        already used one page of its bound).
        """
        if not requests_:
            return {}
        futures: dict[str, Future[FetchResult]] = {}
        for key, relative_url in requests_.items():
            label = f"{key} ({_label(relative_url)})"
            try:
                futures[key] = self._executor.submit(
                    self._fetch_logged,
                    label,
                    base_url,
                    relative_url,
                    token,
                    deadline,
                    (page_limits or {}).get(key, max_pages),
                    url_allowed,
                )
            except RuntimeError:  # the client was closed (service shutting down)
                break
        # Each fetch stops itself at the deadline; the grace covers one request already under way.
        wait_futures(futures.values(), timeout=max(0.0, deadline - time.monotonic()) + self.timeout + 1.0)
        results: dict[str, FetchResult] = {}
        for key in requests_:
            future = futures.get(key)
            if future is None:
                results[key] = _failure("client closed", None)
            elif not future.done():
                future.cancel()
                results[key] = _failure("deadline", None)
            elif future.exception() is not None:
                log.error("fhir %s: internal error %s", key, type(future.exception()).__name__)
                results[key] = _failure("internal error", None)
            else:
                results[key] = future.result()
        return results

    def _fetch_logged(
        self,
        label: str,
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
        result = self._fetch(base_url, relative_url, token, deadline, max_pages, url_allowed)
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
        url = build_url(base_url, relative_url)
        if not url_allowed(url):
            # An absolute URL here is a continuation (a prefetch Bundle's `next` link).
            return _failure("next link outside allowed server" if absolute else "URL outside allowed server", None)
        headers = {"Accept": "application/fhir+json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        session = self._session(base_url)

        if read_match is not None:
            try:
                status, body = self._get(session, url, headers, deadline)
            except _PageError as exc:
                return _failure(exc.reason, exc.status)
            return _read_result(read_match.group(1), status, body)

        resources: list[dict] = []
        full_urls: dict[str, dict] = {}
        pages = 0
        status: int | None = None
        seen: set[str] = set()
        next_url: str | None = url
        while next_url is not None:
            if pages >= max_pages:
                return _result(resources, full_urls, pages, status, "page limit")
            if next_url != url and not url_allowed(next_url):
                return _result(resources, full_urls, pages, status, "next link outside allowed server")
            if next_url in seen:
                return _result(resources, full_urls, pages, status, "next link loop")
            seen.add(next_url)
            try:
                status, body = self._get(session, next_url, headers, deadline)
                if status != 200:
                    raise _PageError(f"HTTP {status}", status)
                page_resources, page_urls, following = _search_page(body)
            except _PageError as exc:
                return _result(resources, full_urls, pages, exc.status or status, exc.reason)
            pages += 1
            resources.extend(page_resources)
            full_urls.update(page_urls)
            next_url = urljoin(next_url, following) if following else None
            if next_url is not None and not next_url.startswith(("http://", "https://")):
                return _result(resources, full_urls, pages, status, "next link outside allowed server")
        return FetchResult(resources, full_urls, Availability.READ, "", pages, status)

    def _get(self, session: requests.Session, url: str, headers: dict[str, str], deadline: float) -> tuple[int, Any]:
        """One GET within min(timeout, time left): (status, parsed JSON body or None for non-200)."""
        started = time.monotonic()
        remaining = deadline - started
        if remaining <= 0:
            raise _PageError("deadline")
        budget = min(self.timeout, remaining)
        stop_at = started + budget
        try:
            response = session.get(url, headers=headers, timeout=budget, allow_redirects=False, stream=True)
        except requests.Timeout as exc:
            raise _PageError("timeout") from exc
        except requests.RequestException as exc:
            raise _PageError(f"connection error ({type(exc).__name__})") from exc
        with response:
            status = response.status_code
            if 300 <= status < 400:
                raise _PageError(f"HTTP {status} (redirect not followed)", status)
            if status != 200:
                return status, None
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit() and int(declared) > self.max_response_bytes:
                raise _PageError("response too large", status)
            chunks: list[bytes] = []
            size = 0
            try:
                for chunk in response.iter_content(_CHUNK):
                    if chunks and time.monotonic() > stop_at:  # a body still dripping in after the budget
                        raise _PageError("timeout", status)
                    size += len(chunk)
                    if size > self.max_response_bytes:
                        raise _PageError("response too large", status)
                    chunks.append(chunk)
            except requests.RequestException as exc:
                raise _PageError(_read_failure(exc), status) from exc
        try:
            return status, json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as exc:
            raise _PageError("invalid JSON", status) from exc


def _read_failure(exc: requests.RequestException) -> str:
    """requests reports a read timeout while streaming as ConnectionError(ReadTimeoutError): still a timeout."""
    if isinstance(exc, requests.Timeout) or any(isinstance(arg, ReadTimeoutError) for arg in exc.args):
        return "timeout"
    return f"read error ({type(exc).__name__})"


def _failure(reason: str, status: int | None) -> FetchResult:
    return FetchResult([], {}, Availability.UNAVAILABLE, reason, 0, status)


def _result(
    resources: list[dict], full_urls: dict[str, dict], pages: int, status: int | None, reason: str
) -> FetchResult:
    """A search that stopped early: PARTIAL once a page was read, UNAVAILABLE before."""
    availability = Availability.PARTIAL if pages else Availability.UNAVAILABLE
    return FetchResult(resources, full_urls, availability, reason, pages, status)


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


def _search_page(body: Any) -> tuple[list[dict], dict[str, dict], str | None]:
    """Entries, fullUrls and `next` link of one searchset page; _PageError when it is not one."""
    if not isinstance(body, dict):
        raise _PageError("not a FHIR resource", 200)
    resource_type = body.get("resourceType")
    if resource_type == "OperationOutcome":
        raise _PageError("OperationOutcome", 200)
    if resource_type != "Bundle" or body.get("type", "searchset") != "searchset":
        raise _PageError("not a searchset Bundle", 200)
    resources, full_urls, problem = bundle_entries(body)
    if problem:
        raise _PageError(problem, 200)
    return resources, full_urls, next_link(body)
