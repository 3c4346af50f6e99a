"""Who may call us: JWT verification of CDS clients and the trusted-issuers file.

CDS Hooks 2.0 §Trusting CDS Clients: every call carries `Authorization: Bearer <JWT>` signed by the EHR. We accept
only issuers listed in a trusted-issuers file, only asymmetric ES384/RS384 signatures, keys only from URLs that
file names (no SSRF through `jku`), the audience of *this* endpoint, short-lived tokens, and each `jti` once.

Every failure raises `AuthError` whose message is an internal reason that is safe to log (it never contains the
token or claim values other than `iss`); the HTTP layer answers a bare 401 whatever the reason.

The same file ties each issuer to the FHIR servers its calls may make us fetch from (`fhir_server_allowed`), so a
caller cannot point `fhirServer` at an internal host.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import jwt
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from cds_service.fhir_client import WATCHDOG, guarded_session
from cds_service.hook_request import JsonLimits, load_json

log = logging.getLogger(__name__)

ALLOWED_ALGORITHMS: frozenset[str] = frozenset({"ES384", "RS384"})
"""CDS Hooks 2.0 recommends these two and forbids `none` and every symmetric algorithm."""

JWKS_MIN_REFETCH_INTERVAL: float = 30.0
"""Seconds between two network fetches of one JWKS URL, whatever the reason (unknown kid, failed fetch)."""

MAX_AUTHORIZATION_LENGTH = 16_384
MAX_JTI_LENGTH = 255
MAX_JWKS_BYTES = 256 * 1024
MIN_RSA_KEY_BITS = 2048

_BEARER_TOKEN = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
_PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_UNSAFE_URL_CHARS = re.compile(r"[\s\\\x00-\x1f\x7f]")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
_ISSUER_FIELDS = frozenset({"iss", "jwks", "jwks_url", "jku", "fhir_servers"})
_REQUIRED_CLAIMS = ("iss", "aud", "exp", "iat", "jti")


class AuthError(Exception):
    """Internal reason (safe to log: no token, no claims except iss); the HTTP answer is always a generic 401."""


class TrustedIssuersError(ValueError):
    """The trusted-issuers file is invalid; the message says which issuer/field and why."""


# --------------------------------------------------------------------------------------------------------------
# URLs: one parser for FHIR server prefixes, JWKS URLs and the URLs we are asked to fetch
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HttpLocation:
    """An http(s) URL reduced to what decides where a request goes; path has no trailing slash."""

    scheme: str
    host: str
    port: int
    path: str

    def contains(self, other: _HttpLocation) -> bool:
        """True if `other` is this location or below it, on path-segment boundaries."""
        if (self.scheme, self.host, self.port) != (other.scheme, other.host, other.port):
            return False
        return other.path == self.path or other.path.startswith(self.path + "/")


def _fully_unquote(segment: str) -> str:
    """Percent-decode until stable, so `%252e%252e` cannot hide `..` from a server that decodes twice."""
    for _ in range(5):
        decoded = unquote(segment)
        if decoded == segment:
            return decoded
        segment = decoded
    return segment


def _path_is_safe(path: str) -> bool:
    """No `.`/`..` segments (also encoded, also Tomcat-style `..;x`), no encoded slashes or control characters."""
    for segment in path.split("/"):
        decoded = _fully_unquote(segment)
        if decoded.split(";", 1)[0] in (".", ".."):
            return False
        if "/" in decoded or "\\" in decoded or _CONTROL_CHARS.search(decoded):
            return False
    return True


def _parse_http_location(url: Any) -> _HttpLocation | None:
    """Parse an absolute http(s) URL, or None if it is anything we refuse to reason about."""
    if not isinstance(url, str) or not url or _UNSAFE_URL_CHARS.search(url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or "@" in parts.netloc or not parts.hostname:
        return None
    if not _path_is_safe(parts.path):
        return None
    return _HttpLocation(scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme], parts.path.rstrip("/"))


def fhir_server_allowed(url: str, prefixes: Iterable[str]) -> bool:
    """True iff `url` lies under one of `prefixes` (segment boundaries, case-insensitive scheme/host, default ports).

    URLs with userinfo, non-http(s) schemes or dot segments (also percent-encoded) are never allowed, because
    servers and proxies disagree on how to resolve them. Invalid prefixes allow nothing.
    """
    return matching_fhir_prefix(url, prefixes) is not None


def matching_fhir_prefix(url: str, prefixes: Iterable[str]) -> str | None:
    """The configured prefix `url` lies under (the first, in file order), or None; rules of `fhir_server_allowed`.

    The FHIR client keys its connection pool and concurrency cap by this entry, so the sub-paths a caller
    may vary under one allowed base all share one bounded pool."""
    target = _parse_http_location(url)
    if target is None:
        return None
    for prefix in prefixes:
        base = _parse_http_location(prefix)
        if base is not None and base.contains(target):
            return prefix
    return None


# --------------------------------------------------------------------------------------------------------------
# Trusted issuers
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrustedIssuer:
    """One CDS client we trust: where its keys are and which FHIR servers it may send us to."""

    iss: str
    jwks: dict[str, Any] | None  # inline JWK Set {"keys": [...]}
    jwks_url: str | None  # or a URL to fetch it from (exactly one of jwks / jwks_url)
    jku: tuple[str, ...] = ()  # allow-listed `jku` header values for this issuer (may be empty)
    fhir_servers: tuple[str, ...] = ()  # FHIR base URL prefixes this issuer's calls may make us fetch from


def _is_extension_field(name: str) -> bool:
    """Fields starting with `_` are free-form notes (`_comment`), since JSON has no comments."""
    return name.startswith("_")


def _check_url_list(value: Any, where: str, *, fhir_base: bool) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise TrustedIssuersError(f"{where}: must be a list of URLs")
    urls: list[str] = []
    for index, url in enumerate(value):
        _check_url(url, f"{where}[{index}]", fhir_base=fhir_base)
        urls.append(url)
    return tuple(urls)


def _check_url(url: Any, where: str, *, fhir_base: bool) -> str:
    if _parse_http_location(url) is None:
        detail = " without user@, '.' or '..' segments" if fhir_base else " without user@"
        raise TrustedIssuersError(f"{where}: must be an absolute http(s) URL{detail}, got {url!r}")
    return url


def _check_inline_jwks(jwks: Any, where: str) -> dict[str, Any]:
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list) or not jwks["keys"]:
        raise TrustedIssuersError(f'{where}: must be a JWK Set {{"keys": [...]}} with at least one key')
    kids: set[str] = set()
    for index, key in enumerate(jwks["keys"]):
        key_where = f"{where}.keys[{index}]"
        if not isinstance(key, dict):
            raise TrustedIssuersError(f"{key_where}: must be a JSON object (a JWK)")
        kid = key.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TrustedIssuersError(f"{key_where}: kid is required (a non-empty string)")
        if kid in kids:
            raise TrustedIssuersError(f"{key_where}: duplicate kid {kid!r}")
        kids.add(kid)
        if key.get("kty") not in ("EC", "RSA"):
            raise TrustedIssuersError(f"{key_where}: kty must be 'EC' or 'RSA', got {key.get('kty')!r}")
        private = sorted(_PRIVATE_JWK_MEMBERS & key.keys())
        if private:
            raise TrustedIssuersError(
                f"{key_where}: contains private key material ({', '.join(private)}); publish public keys only"
            )
    return jwks


def _issuer_from_json(entry: Any, index: int, seen: set[str]) -> TrustedIssuer:
    where = f"issuers[{index}]"
    if not isinstance(entry, dict):
        raise TrustedIssuersError(f"{where}: must be a JSON object")
    iss = entry.get("iss")
    if not isinstance(iss, str) or not iss.strip():
        raise TrustedIssuersError(f"{where}: iss is required (a non-empty string)")
    if iss in seen:
        raise TrustedIssuersError(f"{where} (iss {iss!r}): iss: duplicate issuer")
    where = f"{where} (iss {iss!r})"
    unknown = sorted(name for name in entry if name not in _ISSUER_FIELDS and not _is_extension_field(name))
    if unknown:
        raise TrustedIssuersError(
            f"{where}: unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(_ISSUER_FIELDS))}"
        )
    jwks, jwks_url = entry.get("jwks"), entry.get("jwks_url")
    if (jwks is None) == (jwks_url is None):
        raise TrustedIssuersError(f"{where}: jwks/jwks_url: give exactly one of them")
    return TrustedIssuer(
        iss=iss,
        jwks=None if jwks is None else _check_inline_jwks(jwks, f"{where}: jwks"),
        jwks_url=None if jwks_url is None else _check_url(jwks_url, f"{where}: jwks_url", fhir_base=False),
        jku=_check_url_list(entry.get("jku"), f"{where}: jku", fhir_base=False),
        fhir_servers=_check_url_list(entry.get("fhir_servers"), f"{where}: fhir_servers", fhir_base=True),
    )


class TrustedIssuers:
    """The allow-list of CDS clients, indexed by `iss` (exact match, as the JWT spec compares it)."""

    def __init__(self, issuers: Iterable[TrustedIssuer]) -> None:
        self._by_iss: dict[str, TrustedIssuer] = {}
        for issuer in issuers:
            if issuer.iss in self._by_iss:
                raise TrustedIssuersError(f"iss {issuer.iss!r}: duplicate issuer")
            self._by_iss[issuer.iss] = issuer

    @classmethod
    def load(cls, path: str | Path) -> TrustedIssuers:
        """Read and validate the JSON file; every problem becomes a TrustedIssuersError that names the file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TrustedIssuersError(f"{path}: cannot read trusted-issuers file: {exc}") from exc
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TrustedIssuersError(f"{path}: not valid JSON: {exc}") from exc
        try:
            return cls.from_document(doc)
        except TrustedIssuersError as exc:
            raise TrustedIssuersError(f"{path}: {exc}") from exc

    @classmethod
    def from_document(cls, doc: dict[str, Any]) -> TrustedIssuers:
        """Validate a parsed document `{"issuers": [...]}`; messages name the issuer index/iss and the field."""
        if not isinstance(doc, dict):
            raise TrustedIssuersError('top level: must be a JSON object {"issuers": [...]}')
        unknown = sorted(name for name in doc if name != "issuers" and not _is_extension_field(name))
        if unknown:
            raise TrustedIssuersError(f"top level: unknown field(s) {', '.join(unknown)}; expected issuers")
        entries = doc.get("issuers")
        if not isinstance(entries, list) or not entries:
            raise TrustedIssuersError("issuers: must be a non-empty list")
        seen: set[str] = set()
        issuers: list[TrustedIssuer] = []
        for index, entry in enumerate(entries):
            issuer = _issuer_from_json(entry, index, seen)
            seen.add(issuer.iss)
            issuers.append(issuer)
        return cls(issuers)

    def get(self, iss: str) -> TrustedIssuer | None:
        return self._by_iss.get(iss)

    def all_fhir_servers(self) -> tuple[str, ...]:
        """Every allowed FHIR prefix, deduplicated in file order (e.g. for CORS or startup logging)."""
        return tuple(dict.fromkeys(url for issuer in self._by_iss.values() for url in issuer.fhir_servers))

    def __len__(self) -> int:
        return len(self._by_iss)

    def __iter__(self) -> Iterator[TrustedIssuer]:
        return iter(self._by_iss.values())


# --------------------------------------------------------------------------------------------------------------
# Replay protection
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Caller:
    """A verified CDS client, as the rest of the request path needs it."""

    iss: str
    fhir_servers: tuple[str, ...]
    kid: str
    jti: str
    tenant: str | None = None


class ReplayCache:
    """jti replay protection: remembers (iss, jti) until the token's exp (+leeway); thread-safe; bounded memory.

    Expired entries are evicted on every call. Memory is further capped at `max_entries`: when full, the entries
    closest to expiry are dropped (with a warning) rather than refusing every new caller. The cache is
    per process; several workers each keep their own.
    """

    def __init__(
        self, *, leeway: float = 60, clock: Callable[[], float] = time.time, max_entries: int = 100_000
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._leeway = leeway
        self._clock = clock
        self._max_entries = max_entries
        self._forget_at: dict[tuple[str, str], float] = {}
        self._expiry_heap: list[tuple[float, str, str]] = []
        self._lock = threading.Lock()
        self._warned_full_at = -math.inf

    def seen_or_add(self, iss: str, jti: str, exp: float) -> bool:
        """True if (iss, jti) is still remembered (=> replay); otherwise remember it and return False."""
        now = self._clock()
        key = (iss, jti)
        with self._lock:
            self._evict(lambda forget_at: forget_at <= now)
            if key in self._forget_at:
                return True
            if len(self._forget_at) >= self._max_entries:
                if now - self._warned_full_at >= 60:
                    self._warned_full_at = now
                    log.warning("jti replay cache full (%d entries): forgetting those closest to expiry", len(self))
                self._evict(lambda _forget_at: len(self._forget_at) >= self._max_entries)
            forget_at = exp + self._leeway
            self._forget_at[key] = forget_at
            heapq.heappush(self._expiry_heap, (forget_at, iss, jti))
            return False

    def _evict(self, should_evict: Callable[[float], bool]) -> None:
        """Pop heap entries (soonest first) while `should_evict` says so. Caller holds the lock."""
        while self._expiry_heap and should_evict(self._expiry_heap[0][0]):
            forget_at, iss, jti = heapq.heappop(self._expiry_heap)
            if self._forget_at.get((iss, jti)) == forget_at:
                del self._forget_at[(iss, jti)]

    def __len__(self) -> int:
        return len(self._forget_at)


class SharedReplayCache(ReplayCache):
    """Replay protection across processes and instances: this process's memory first (cheap, catches most
    replays), then `claim(iss, jti, forget_after)` — an insert into a database every worker shares, which
    answers False when the jti was already used anywhere. A database that cannot answer refuses the token."""

    def __init__(self, claim: Callable[[str, str, float], bool], *, leeway: float = 60, **kwargs: Any) -> None:
        super().__init__(leeway=leeway, **kwargs)
        self._claim = claim
        self._shared_leeway = leeway

    def seen_or_add(self, iss: str, jti: str, exp: float) -> bool:
        if super().seen_or_add(iss, jti, exp):
            return True
        try:
            return not self._claim(iss, jti, exp + self._shared_leeway)
        except Exception as exc:  # the shared store is down: fail closed, the EHR retries
            log.warning("jti replay store unavailable (%s): token refused", type(exc).__name__)
            return True


# --------------------------------------------------------------------------------------------------------------
# JWKS fetching (only URLs from the trusted-issuers file)
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _JwksEntry:
    keys: list[dict[str, Any]] | None = None
    fetched_at: float = -math.inf
    attempted_at: float = -math.inf
    lock: threading.Lock = field(default_factory=threading.Lock)


class _JwksCache:
    """Per-URL JWKS cache: TTL, refetch on an unknown kid, at most one network fetch per URL per 30 s.

    The rate limit covers failed fetches too: anyone can send a token naming a trusted `iss` and a random kid, and
    must not be able to make us hammer the issuer's JWKS endpoint or tie up our threads in timeouts.
    """

    def __init__(self, session: requests.Session, ttl: float, timeout: float, clock: Callable[[], float]) -> None:
        self._session = session
        self._ttl = ttl
        self._timeout = timeout
        self._clock = clock
        self._entries: dict[str, _JwksEntry] = {}
        self._entries_lock = threading.Lock()

    def keys_with_kid(self, url: str, kid: str) -> list[dict[str, Any]]:
        """JWKs with this kid from the JWKS at `url` (maybe empty); AuthError if no usable JWKS is available."""
        with self._entries_lock:
            entry = self._entries.setdefault(url, _JwksEntry())
        cached = self._fresh_keys(entry)
        if cached is not None and (matches := _jwks_with_kid(cached, kid)):
            return matches
        with entry.lock:  # one fetch at a time per URL; the others wait and reuse its result
            cached = self._fresh_keys(entry)
            if cached is not None and (matches := _jwks_with_kid(cached, kid)):
                return matches
            now = self._clock()
            if now - entry.attempted_at < JWKS_MIN_REFETCH_INTERVAL:
                if cached is None:
                    raise AuthError(f"JWKS {url} unavailable (last fetch failed; retry rate-limited)")
                return []
            entry.attempted_at = now
            keys = self._fetch(url)
            entry.keys, entry.fetched_at = keys, now
            return _jwks_with_kid(keys, kid)

    def _fresh_keys(self, entry: _JwksEntry) -> list[dict[str, Any]] | None:
        keys, fetched_at = entry.keys, entry.fetched_at
        if keys is None or self._clock() - fetched_at >= self._ttl:
            return None
        return keys

    def _fetch(self, url: str) -> list[dict[str, Any]]:
        """GET the JWKS: no redirects (they could lead anywhere), bounded size, timeout; errors become AuthError."""
        stop_at = time.monotonic() + self._timeout
        try:
            # One deadline for connect, headers and body: a JWKS endpoint that trickles cannot hold the
            # request threads of every caller of this issuer (they wait on this fetch) past it.
            with (
                WATCHDOG.guard(stop_at),
                self._session.get(
                    url,
                    timeout=self._timeout,
                    allow_redirects=False,
                    stream=True,
                    headers={"Accept": "application/json"},
                ) as response,
            ):
                if response.status_code != 200:
                    raise AuthError(f"JWKS fetch from {url} failed: HTTP {response.status_code}")
                body = bytearray()
                for chunk in response.iter_content(chunk_size=16_384):
                    body += chunk
                    if len(body) > MAX_JWKS_BYTES:
                        raise AuthError(f"JWKS fetch from {url} failed: larger than {MAX_JWKS_BYTES} bytes")
                    if time.monotonic() > stop_at:
                        raise AuthError(f"JWKS fetch from {url} failed: timeout")
            doc = load_json(bytes(body), JsonLimits(max_bytes=MAX_JWKS_BYTES, max_depth=16))
        except AuthError as exc:
            log.warning("%s", exc)
            raise
        except (requests.RequestException, ValueError, OSError) as exc:
            log.warning("JWKS fetch from %s failed: %s", url, type(exc).__name__)
            raise AuthError(f"JWKS fetch from {url} failed: {type(exc).__name__}") from exc
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            log.warning("JWKS fetch from %s: not a JWK Set", url)
            raise AuthError(f"JWKS from {url} is not a JWK Set")
        return [key for key in doc["keys"] if isinstance(key, dict)]


def _jwks_with_kid(keys: list[dict[str, Any]], kid: str) -> list[dict[str, Any]]:
    return [key for key in keys if key.get("kid") == kid]


def _same_url(a: str, b: str) -> bool:
    """jku and JWKS URLs compare exactly, except that a trailing slash makes no difference."""
    return a.rstrip("/") == b.rstrip("/")


# --------------------------------------------------------------------------------------------------------------
# The verifier
# --------------------------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _bearer_token(authorization: str | None) -> str:
    if not authorization or not authorization.strip():
        raise AuthError("missing Authorization header")
    if len(authorization) > MAX_AUTHORIZATION_LENGTH:
        raise AuthError("Authorization header too long")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError("Authorization scheme is not Bearer")
    token = token.strip()
    if not _BEARER_TOKEN.fullmatch(token):
        raise AuthError("malformed token (not a compact JWS)")
    return token


_JWT_SEGMENT_LIMITS = JsonLimits(max_bytes=MAX_AUTHORIZATION_LENGTH, max_depth=8, max_string_length=4096)


def _segment_json(segment: str, what: str) -> dict[str, Any]:
    """A JWS header or payload segment decoded and parsed within tight limits, before PyJWT sees it: a
    deeply nested, duplicate-keyed or non-object segment is a malformed token, never an exception."""
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        value = load_json(raw, _JWT_SEGMENT_LIMITS)
    except (ValueError, binascii.Error):  # JsonInputError is a ValueError
        raise AuthError(f"malformed token {what}") from None
    if not isinstance(value, dict):
        raise AuthError(f"malformed token {what} (not a JSON object)")
    return value


def _checked_header(token: str) -> dict[str, Any]:
    """The JOSE header, once it passes the rules of CDS Hooks 2.0: asymmetric alg, kid, typ JWT.

    Every field is type-checked before it is used (an `alg` sent as a list is refused, not hashed)."""
    header = _segment_json(token.split(".", 1)[0], "header")
    alg = header.get("alg")
    if not isinstance(alg, str):
        raise AuthError("alg missing or not a string")
    if alg not in ALLOWED_ALGORITHMS:
        raise AuthError(f"alg {alg[:20]!r} not allowed (ES384 or RS384 only)")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise AuthError("kid header missing")
    typ = header.get("typ")
    if not isinstance(typ, str) or typ.lower() != "jwt":
        raise AuthError("typ header missing or not JWT")
    if "crit" in header:
        raise AuthError("crit header not supported")
    if header.get("b64", True) is not True:  # RFC 7797 unencoded payloads: never a CDS Hooks token
        raise AuthError("b64 header not supported")
    return header


def _unverified_claims(token: str) -> dict[str, Any]:
    return _segment_json(token.split(".")[1], "payload")


def _public_key_for(jwk: dict[str, Any], alg: str) -> jwt.PyJWK:
    """Build a verification key bound to `alg`; refuses keys whose kty/crv/size/alg/use do not fit that alg."""
    if jwk.get("alg") not in (None, alg):
        raise AuthError(f"key alg does not match token alg {alg}")
    if jwk.get("use") not in (None, "sig"):
        raise AuthError("key is not a signature key (use)")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        raise AuthError("key is not a verification key (key_ops)")
    public_only = {name: value for name, value in jwk.items() if name not in _PRIVATE_JWK_MEMBERS}
    try:
        key = jwt.PyJWK(public_only, algorithm=alg)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise AuthError(f"key type does not match token alg {alg}") from exc
    if alg == "ES384" and not (
        isinstance(key.key, ec.EllipticCurvePublicKey) and isinstance(key.key.curve, ec.SECP384R1)
    ):
        raise AuthError("ES384 needs an EC P-384 key")
    if alg == "RS384" and not (isinstance(key.key, rsa.RSAPublicKey) and key.key.key_size >= MIN_RSA_KEY_BITS):
        raise AuthError(f"RS384 needs an RSA key of at least {MIN_RSA_KEY_BITS} bits")
    return key


class JwtVerifier:
    """Verifies the `Authorization` header of a CDS Hooks call and says who the caller is."""

    def __init__(
        self,
        issuers: TrustedIssuers,
        *,
        leeway: int = 60,
        max_lifetime: int = 3600,
        replay_cache: ReplayCache | None = None,
        clock: Callable[[], float] = time.time,
        session: requests.Session | None = None,
        jwks_ttl: int = 600,
        jwks_timeout: float = 3.0,
    ) -> None:
        self._issuers = issuers
        self._leeway = leeway
        self._max_lifetime = max_lifetime
        self._clock = clock
        self._replay_cache = replay_cache if replay_cache is not None else ReplayCache(leeway=leeway, clock=clock)
        self._jwks_cache = _JwksCache(session or guarded_session(4), jwks_ttl, jwks_timeout, clock)
        self._keys: dict[tuple[int, str], tuple[dict[str, Any], jwt.PyJWK]] = {}

    def verify(self, authorization: str | None, audience: str | Iterable[str]) -> Caller:
        """Return the verified caller or raise AuthError.

        Order follows CDS Hooks best practice: cheap checks (header, iss, aud, exp, ...) before any key fetch, the
        signature next, and the jti last so that only genuine tokens can occupy the replay cache.
        `audience` is the URL that was called (or several spellings of it); trailing slashes are ignored.
        """
        expected_audiences = self._normalised_audiences(audience)
        token = _bearer_token(authorization)
        header = _checked_header(token)
        alg, kid = header["alg"], header["kid"]
        unverified = _unverified_claims(token)
        iss = unverified.get("iss")
        if not isinstance(iss, str) or not iss:
            raise AuthError("missing iss claim")
        issuer = self._issuers.get(iss)
        if issuer is None:
            raise AuthError(f"unknown issuer {iss[:200]!r}")
        self._check_claims(unverified, expected_audiences)
        jku_url = self._allow_listed_jku(issuer, header.get("jku"))
        key = self._signing_key(issuer, jku_url, kid, alg)
        claims = self._verified_claims(token, unverified, key, alg)  # the same payload bytes, now authenticated
        if self._replay_cache.seen_or_add(iss, claims["jti"], float(claims["exp"])):
            raise AuthError(f"replayed jti from issuer {iss!r}")
        return Caller(
            iss=iss, fhir_servers=issuer.fhir_servers, kid=kid, jti=claims["jti"], tenant=claims.get("tenant")
        )

    @staticmethod
    def _normalised_audiences(audience: str | Iterable[str]) -> frozenset[str]:
        audiences = [audience] if isinstance(audience, str) else list(audience)
        normalised = frozenset(a.rstrip("/") for a in audiences if isinstance(a, str) and a.strip())
        if not normalised:
            raise ValueError("JwtVerifier.verify needs the expected audience (the URL that was called)")
        return normalised

    def _check_claims(self, claims: dict[str, Any], expected_audiences: frozenset[str]) -> None:
        for name in _REQUIRED_CLAIMS:
            if name not in claims:
                raise AuthError(f"missing {name} claim")
        aud = claims["aud"]
        token_audiences = [aud] if isinstance(aud, str) else aud
        if not isinstance(token_audiences, list) or not all(isinstance(a, str) for a in token_audiences):
            raise AuthError("aud claim is not a string or array of strings")
        if not any(a.rstrip("/") in expected_audiences for a in token_audiences):
            raise AuthError("aud does not match this endpoint")
        exp, iat = claims["exp"], claims["iat"]
        if not _is_number(exp) or not _is_number(iat):
            raise AuthError("exp/iat claim is not a number")
        now = self._clock()
        if now >= exp + self._leeway:
            raise AuthError("token expired")
        if iat > now + self._leeway:
            raise AuthError("iat in the future")
        nbf = claims.get("nbf")
        if nbf is not None and (not _is_number(nbf) or nbf > now + self._leeway):
            raise AuthError("token not yet valid (nbf)")
        if exp <= iat:
            raise AuthError("exp not after iat")
        if exp - iat > self._max_lifetime:
            raise AuthError(f"token lifetime longer than {self._max_lifetime} s")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti or len(jti) > MAX_JTI_LENGTH or _CONTROL_CHARS.search(jti):
            raise AuthError(
                f"jti claim must be a non-empty string of at most {MAX_JTI_LENGTH} characters, without controls"
            )
        if claims.get("tenant") is not None and not isinstance(claims["tenant"], str):
            raise AuthError("tenant claim is not a string")

    @staticmethod
    def _allow_listed_jku(issuer: TrustedIssuer, jku: Any) -> str | None:
        """The configured entry the token's `jku` matches, or None without jku; we never fetch the token's string."""
        if jku is None:
            return None
        if not isinstance(jku, str):
            raise AuthError("jku header is not a string")
        for allowed in issuer.jku:
            if _same_url(jku, allowed):
                return allowed
        raise AuthError(f"jku not allow-listed for issuer {issuer.iss!r}")

    def _signing_key(self, issuer: TrustedIssuer, jku_url: str | None, kid: str, alg: str) -> jwt.PyJWK:
        """Find `kid` in the issuer's inline JWKS or jwks_url, then in the token's allow-listed jku."""
        errors: list[str] = []
        for source in self._key_sources(issuer, jku_url):
            try:
                if isinstance(source, str):
                    candidates = self._jwks_cache.keys_with_kid(source, kid)
                else:
                    candidates = _jwks_with_kid(source, kid)
            except AuthError as exc:
                errors.append(str(exc))
                continue
            if len(candidates) > 1:
                raise AuthError("kid is not unique in the issuer's JWKS")
            if candidates:
                return self._key_for(candidates[0], alg)
        raise AuthError(errors[0] if errors else f"unknown kid for issuer {issuer.iss!r}")

    def _key_for(self, jwk: dict[str, Any], alg: str) -> jwt.PyJWK:
        """`_public_key_for`, built once per JWK object and alg (an issuer's keys are the same dicts call after call
        until their JWKS is fetched again). The cache holds the dict, so its id cannot be reused meanwhile."""
        cached = self._keys.get((id(jwk), alg))
        if cached is not None and cached[0] is jwk:
            return cached[1]
        key = _public_key_for(jwk, alg)
        if len(self._keys) >= 256:  # JWKS refreshes replace the dicts: never let old ones accumulate
            self._keys.clear()
        self._keys[(id(jwk), alg)] = (jwk, key)
        return key

    @staticmethod
    def _key_sources(issuer: TrustedIssuer, jku_url: str | None) -> list[list[dict[str, Any]] | str]:
        """Where keys may come from, in order: inline keys (a list) or jwks_url, then jku; URLs are fetched lazily."""
        sources: list[list[dict[str, Any]] | str] = []
        if issuer.jwks is not None:
            sources.append(issuer.jwks["keys"])
        if issuer.jwks_url is not None:
            sources.append(issuer.jwks_url)
        if jku_url is not None and not (issuer.jwks_url and _same_url(jku_url, issuer.jwks_url)):
            sources.append(jku_url)
        return sources

    @staticmethod
    def _verified_claims(token: str, unverified: dict[str, Any], key: jwt.PyJWK, alg: str) -> dict[str, Any]:
        """The claims, once the signature over the token's own header and payload segments checks out.

        The signature is checked by PyJWT's algorithm for `alg` (the key was bound to it by `_public_key_for`),
        over exactly the bytes `unverified` was parsed from: parsing them a second time, as `jwt.decode` would,
        costs a sixth of the call's verification and could only disagree with the first parse. Time claims are
        ours (PyJWT reads the wall clock; ours is injectable).
        """
        signing_input, _, signature_segment = token.rpartition(".")
        try:
            signature = base64.urlsafe_b64decode(signature_segment + "=" * (-len(signature_segment) % 4))
        except (binascii.Error, ValueError):
            raise AuthError("malformed token signature") from None
        algorithm = key.Algorithm
        if key.algorithm_name != alg or algorithm is None:
            raise AuthError(f"key type does not match token alg {alg}")
        try:
            valid = algorithm.verify(signing_input.encode("ascii"), key.key, signature)
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise AuthError(f"token rejected by signature check ({type(exc).__name__})") from exc
        if not valid:
            raise AuthError("bad signature")
        return unverified
