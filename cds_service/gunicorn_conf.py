"""gunicorn configuration file for running the service with your own gunicorn:

    gunicorn -c python:cds_service.gunicorn_conf 'cds_service.wsgi:app'

The settings are exactly those of `ketamine-cds serve` (`cds_service.serving.settings`), from `KETAMINE_CDS_*`
environment variables; gunicorn's own command-line flags still override them. Start-up checks run once in the
master before the port is bound.
"""

from cds_service.serving import settings_from_environment

globals().update(settings_from_environment())
