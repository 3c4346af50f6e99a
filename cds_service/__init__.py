"""ketamine-cds: a CDS Hooks 2.0 order-sign service advising on prior authorization of ketamine orders."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask

    from cds_service.config import ServiceConfig

__all__ = ["create_app"]


def create_app(config: ServiceConfig | None = None, **kwargs: Any) -> Flask:
    """The Flask application factory (imported lazily so `import cds_service` stays cheap for the CLI)."""
    from cds_service.app import create_app as factory

    return factory(config, **kwargs)
