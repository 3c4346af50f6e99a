"""cds_service."""
