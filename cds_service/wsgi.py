"""WSGI entry point for production servers: `gunicorn 'cds_service.wsgi:app'`.

Configuration comes from `KETAMINE_CDS_*` environment variables (the same names as the `serve` flags),
so the process manager owns the settings and no file is edited per deployment.
"""

from __future__ import annotations

import gc
import logging
import sys

from cds_service.app import create_app
from cds_service.config import config_from
from cds_service.reload import install_sighup
from fhir_mappings.validation import MappingsInvalid

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
try:
    app = create_app(config_from())
except MappingsInvalid as exc:  # the same file:line:column lines as `ketamine-cds mappings validate`
    print(str(exc), file=sys.stderr)
    raise SystemExit(2) from None
install_sighup(app)  # kill -HUP reloads the mappings (with `-c python:cds_service.reload`, gunicorn's HUP too)
gc.freeze()  # start-up objects leave the collector's scans: cheaper GC per request (as `ketamine-cds serve`)
