"""WSGI entry point for production servers: `gunicorn 'cds_service.wsgi:app'`.

Configuration comes from `KETAMINE_CDS_*` environment variables (the same names as the `serve` flags),
so the process manager owns the settings and no file is edited per deployment.
"""

from __future__ import annotations

import logging
import sys

from cds_service.app import create_app
from cds_service.config import config_from
from cds_service.reload import install_sighup
from cds_service.runtime import tune_gc_after_startup
from fhir_mappings.validation import MappingsInvalid

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
try:
    app = create_app(config_from())
except MappingsInvalid as exc:  # the same file:line:column lines as `ketamine-cds mappings validate`
    print(str(exc), file=sys.stderr)
    raise SystemExit(2) from None
install_sighup(app)  # kill -HUP reloads the mappings (with `-c python:cds_service.reload`, gunicorn's HUP too)
tune_gc_after_startup()  # as `ketamine-cds serve`: start-up frozen out of GC scans, collections scale with a call
