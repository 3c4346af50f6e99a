"""Service configuration: one dataclass, filled from CLI flags or `KETAMINE_CDS_<NAME>` environment variables.

Every option has exactly one definition here (name, type, default, help), which the `serve` command,
the gunicorn entry point (`cds_service.wsgi`) and the tests all use, so they cannot drift apart.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "KETAMINE_CDS_"
#: `KETAMINE_CDS_*` families read by the tests, benchmarks and sandbox tools, never by the service itself.
TOOL_ENV_PREFIXES = (
    "KETAMINE_CDS_REQUIRE_", "KETAMINE_CDS_TEST_", "KETAMINE_CDS_SAFETY_", "KETAMINE_CDS_SANDBOX_",
    "KETAMINE_CDS_BENCH_",
)  # fmt: skip
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and why."""


def parse_bool(name: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigError(f"{name}: expected one of 1/true/yes/on or 0/false/no/off, got {raw!r}")


@dataclass(frozen=True)
class ServiceConfig:
    """Everything the Flask app needs to run. Defaults are safe: authentication is on."""

    host: str = field(default="127.0.0.1", metadata={"help": "interface to listen on"})
    port: int = field(default=8765, metadata={"help": "TCP port"})
    public_base_url: str | None = field(
        default=None,
        metadata={
            "help": "URL clients use to reach the service (JWT `aud` is computed from it); default http://HOST:PORT"
        },
    )
    trusted_issuers: str | None = field(
        default=None, metadata={"help": "JSON file of trusted JWT issuers, their keys and FHIR servers"}
    )
    insecure_no_auth: bool = field(
        default=False, metadata={"help": "LOCAL DEVELOPMENT ONLY: accept calls without a JWT"}
    )
    database: str = field(
        default="sqlite:///ketamine-cds.db",
        metadata={"help": "audit/feedback store: sqlite:///file.db, sqlite:////abs/path.db or postgresql://..."},
    )
    lenient: bool = field(
        default=False,
        metadata={"help": "accept what real clients send: the tolerances of cds_service/tolerances.py (see README)"},
    )
    site_config: str | None = field(
        default=None, metadata={"help": "YAML/JSON site configuration (local codes, credentialed clinics)"}
    )
    fhir_timeout: float = field(
        default=2.5, metadata={"help": "seconds allowed for each FHIR request to the EHR's server"}
    )
    fetch_budget: float = field(
        default=4.0, metadata={"help": "seconds allowed for gathering the whole patient record"}
    )
    fhir_concurrency: int = field(
        default=16,
        metadata={"help": "concurrent requests to one FHIR server (per allow-list entry, per worker process)"},
    )
    fhir_page_size: int = field(
        default=1000, metadata={"help": "`_count` asked of every FHIR search (servers may answer with fewer)"}
    )
    max_body_bytes: int = field(
        default=30 * 1024 * 1024, metadata={"help": "largest hook/feedback request body accepted (413 above)"}
    )
    max_json_depth: int = field(default=64, metadata={"help": "deepest JSON nesting accepted (413 above)"})
    workers: int = field(default=2, metadata={"help": "gunicorn worker processes"})
    threads: int = field(default=8, metadata={"help": "threads per gunicorn worker"})
    log_level: str = field(default="INFO", metadata={"help": "logging level (DEBUG, INFO, WARNING, ERROR)"})
    proxies: int = field(
        default=0,
        metadata={"help": "reverse proxies in front of the service whose X-Forwarded-* headers are trusted"},
    )

    @property
    def base_url(self) -> str:
        """The public base URL without trailing slash; discovery lives at {base_url}/cds-services."""
        return (self.public_base_url or f"http://{self.host}:{self.port}").rstrip("/")

    def replace(self, **changes: Any) -> ServiceConfig:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return ServiceConfig(**values)

    def validate(self) -> ServiceConfig:
        if not self.insecure_no_auth and not self.trusted_issuers:
            raise ConfigError(
                "no --trusted-issuers file given: the service verifies every caller's JWT. "
                "For local development only, pass --insecure-no-auth."
            )
        if self.trusted_issuers and not Path(self.trusted_issuers).is_file():
            raise ConfigError(f"--trusted-issuers: file not found: {self.trusted_issuers}")
        if self.site_config and not Path(self.site_config).is_file():
            raise ConfigError(f"--site-config: file not found: {self.site_config}")
        if not (
            self.database.startswith("sqlite:///")
            or self.database.startswith("postgresql://")
            or self.database.startswith("postgresql+psycopg://")
        ):
            raise ConfigError("--database: expected sqlite:///path or postgresql://user@host:port/db")
        if self.log_level.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ConfigError(f"--log-level: expected DEBUG, INFO, WARNING or ERROR, got {self.log_level!r}")
        if self.proxies < 0:
            raise ConfigError("--proxies must be 0 or more")
        if self.insecure_no_auth and not is_loopback(self.host):
            raise ConfigError(
                f"--insecure-no-auth refuses to listen on {self.host}: without authentication the service may only "
                "listen on loopback (127.0.0.1, ::1, localhost)"
            )
        if self.fhir_timeout <= 0 or self.fetch_budget <= 0:
            raise ConfigError("--fhir-timeout and --fetch-budget must be positive")
        if min(self.fhir_concurrency, self.fhir_page_size, self.max_body_bytes, self.max_json_depth) < 1:
            raise ConfigError(
                "--fhir-concurrency, --fhir-page-size, --max-body-bytes and --max-json-depth must be at least 1"
            )
        return self


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (a unix socket path counts as local)."""
    host = host.strip("[]")
    if host == "localhost" or host.startswith(("unix:", "/")):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """Refuse `KETAMINE_CDS_*` variables no option reads: a typo (`KETAMINE_CDS_DATABSE`) would otherwise
    silently fall back to the default (an audit trail written to ./ketamine-cds.db)."""
    environ = os.environ if environ is None else environ
    known = [env_name(f.name) for f in fields(ServiceConfig)]
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known and not name.startswith(TOOL_ENV_PREFIXES):
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]}?" if close else f"; known: {', '.join(known)}"
            raise ConfigError(f"unknown environment variable {name}{hint}")


def _option_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one CLI flag per config field; defaults are resolved later so env vars can fill gaps."""
    for f in fields(ServiceConfig):
        help_text = f"{f.metadata.get('help', '')} (env {env_name(f.name)})"
        if f.type in ("bool", bool):
            parser.add_argument(_option_name(f.name), action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(_option_name(f.name), default=None, help=help_text, metavar=f.name.upper())


def _coerce(f: Any, raw: Any) -> Any:
    name = _option_name(f.name)
    if f.type in ("bool", bool):
        return raw if isinstance(raw, bool) else parse_bool(name, str(raw))
    if f.type in ("int", int):
        try:
            return int(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}: expected an integer, got {raw!r}") from exc
    if f.type in ("float", float):
        try:
            return float(raw)
        except ValueError as exc:
            raise ConfigError(f"{name}: expected a number, got {raw!r}") from exc
    return str(raw)


def config_from(args: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> ServiceConfig:
    """Build a config: CLI value if given, else environment variable, else the default."""
    args = args or {}
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in fields(ServiceConfig):
        raw = args.get(f.name)
        if raw is None and env_name(f.name) in environ:
            raw = environ[env_name(f.name)]
        if raw is not None:
            values[f.name] = _coerce(f, raw)
    return ServiceConfig(**values)
