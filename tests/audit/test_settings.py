"""The audit settings of the gateway and silo config files."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.errors import ConfigurationError
from gateway.settings import GatewayConfig, SiloConfig, load_config

GATEWAY = """
tls: {ca: ca.pem, cert: gw.pem, key: gw.key}
policy: policies
ledger: state/ledger.sqlite
audit: state/audit
silos: {}
"""


def test_defaults_and_relative_key_paths(tmp_path: Path) -> None:
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(GATEWAY)
    defaults = load_config(config_file, GatewayConfig).audit_log
    assert defaults.signing_key is None and defaults.max_record_bytes == 1 << 20
    assert defaults.checkpoint_every_records == 1000 and defaults.checkpoint_every_seconds == 60
    config_file.write_text(
        GATEWAY + "audit_log: {signing_key: keys/audit.pem, checkpoint_every_seconds: 5}\n"
    )
    settings = load_config(config_file, GatewayConfig).audit_log
    assert settings.signing_key == tmp_path.resolve() / "keys" / "audit.pem"
    assert settings.checkpoint_every_seconds == 5


@pytest.mark.parametrize(
    "setting",
    [
        "max_record_bytes: 1073741824",  # a 1 GB record limit is not a limit
        "checkpoint_every_records: 0",
        "segment_max_bytes: 100",
        "origin: 'has spaces'",
        "unknown_setting: 1",
    ],
)
def test_bad_settings_are_refused(tmp_path: Path, setting: str) -> None:
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(GATEWAY + f"audit_log: {{{setting}}}\n")
    with pytest.raises(ConfigurationError, match="audit_log"):
        load_config(config_file, GatewayConfig)


def test_silos_have_the_same_settings(tmp_path: Path) -> None:
    config_file = tmp_path / "silo.yaml"
    config_file.write_text(
        "silo: civil\ntls: {ca: a, cert: b, key: c}\npolicy: p\ndatabase: d\n"
        "release_log: log\ngateway_identity: spiffe://x\nreceipt_key: r.key\n"
        "audit_log: {signing_key: silo.pem, segment_max_seconds: 3600}\n"
    )
    settings = load_config(config_file, SiloConfig).audit_log
    assert settings.signing_key == tmp_path.resolve() / "silo.pem"
    assert settings.segment_max_seconds == 3600
