"""Configuration: flags, KETAMINE_CDS_* variables, booleans, defaults and refusals."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cds_service.config import ConfigError, ServiceConfig, add_arguments, config_from, parse_bool


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "yes", "on", " On "])
def test_true_spellings(raw: str) -> None:
    assert parse_bool("--lenient", raw) is True


@pytest.mark.parametrize("raw", ["0", "false", "no", "off", "OFF"])
def test_false_spellings(raw: str) -> None:
    assert parse_bool("--lenient", raw) is False


def test_other_boolean_spellings_are_refused() -> None:
    with pytest.raises(ConfigError, match="--lenient"):
        parse_bool("--lenient", "maybe")


def test_environment_fills_what_flags_leave_and_flags_win() -> None:
    env = {"KETAMINE_CDS_PORT": "9000", "KETAMINE_CDS_LENIENT": "yes", "KETAMINE_CDS_DATABASE": "sqlite:////tmp/a.db"}
    config = config_from({"port": "9100"}, env)
    assert config.port == 9100 and config.lenient is True and config.database == "sqlite:////tmp/a.db"


def test_every_field_has_a_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = vars(parser.parse_args(["--insecure-no-auth", "--public-base-url", "https://cds.example.org/"]))
    config = config_from(args, {})
    assert config.insecure_no_auth is True
    assert config.base_url == "https://cds.example.org"  # trailing slash dropped: aud is computed from it


def test_defaults_are_safe() -> None:
    config = ServiceConfig()
    assert config.insecure_no_auth is False and config.database == "sqlite:///ketamine-cds.db"
    with pytest.raises(ConfigError, match="trusted-issuers"):
        config.validate()  # authentication is on: without issuers the service refuses to start


def test_refusals_say_which_option(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--port"):
        config_from({"port": "http"}, {})
    with pytest.raises(ConfigError, match="--database"):
        ServiceConfig(insecure_no_auth=True, database="mysql://x").validate()
    with pytest.raises(ConfigError, match="file not found"):
        ServiceConfig(trusted_issuers=str(tmp_path / "missing.json")).validate()


def test_default_body_limit_holds_large_records_and_reaches_the_parser(tmp_path: Path) -> None:
    """Real charts exceed 8 MiB of prefetch: the default is 30 MiB, and the JSON limits use the configured value."""
    from cds_service.app import create_app

    assert ServiceConfig().max_body_bytes == 30 * 1024 * 1024
    config = ServiceConfig(insecure_no_auth=True, database=f"sqlite:///{tmp_path}/a.db", max_body_bytes=12_345_678)
    app = create_app(config)
    state = app.extensions["ketamine_cds"]
    assert state.json_limits.max_bytes == 12_345_678 and app.config["MAX_CONTENT_LENGTH"] == 12_345_678
    state.audit.close()
