"""WSGI entry point for production servers: `gunicorn 'cds_service.wsgi:app'`.

Configuration comes from `KETAMINE_CDS_*` environment variables (the same names as the `serve` flags),
so the process manager owns the settings and no file is edited per deployment.
"""

from __future__ import annotations

import logging

from cds_service.app import create_app
from cds_service.config import config_from

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
app = create_app(config_from())
