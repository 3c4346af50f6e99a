"""WSGI entry point for production servers: `gunicorn -c python:cds_service.gunicorn_conf 'cds_service.wsgi:app'`.

Configuration comes from `KETAMINE_CDS_*` environment variables (the same names as the `serve` flags),
so the process manager owns the settings and no file is edited per deployment. With the configuration file
(`cds_service.gunicorn_conf`) everything is checked once in gunicorn's master before the port is bound; without
it, each worker checks here and exits with one line.
"""

from __future__ import annotations

import logging
import sys

from cds_service import serving
from cds_service.audit import AuditStoreError
from cds_service.config import ConfigError, check_environment, config_from
from cds_service.observability import configure_logging
from cds_service.reload import _one_line, install_sighup
from fhir_mappings.validation import MappingsInvalid

try:
    check_environment()
    _config = config_from().validate()
except ConfigError as exc:
    serving.fail(str(exc))
if not logging.getLogger().handlers:  # gunicorn with our configuration has set up JSON logging already
    configure_logging(_config.log_level)
if "gunicorn" in sys.modules and not serving.CONFIGURED:
    logging.getLogger("ketamine_cds").warning(
        "gunicorn was started without `-c python:cds_service.gunicorn_conf`: no start-up checks before the port "
        "is bound, gunicorn's own defaults, and /metrics covers only the worker that answers"
    )

from cds_service.app import create_app

try:
    app = create_app(_config)
except (MappingsInvalid, AuditStoreError) as exc:
    serving.fail(str(exc) if isinstance(exc, AuditStoreError) else f"the mapping set is invalid: {_one_line(exc)}")
install_sighup(app)  # kill -HUP reloads the mappings (with the configuration file, gunicorn's HUP too)
