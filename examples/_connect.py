"""Shared by the examples: connect with a client config written by ``silogate up``."""

from __future__ import annotations

import argparse
from pathlib import Path

from gateway.client import SilogateClient
from gateway.settings import ClientConfig, load_config


def connect_from_args(default_consumer: str) -> SilogateClient:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--client",
        type=Path,
        default=Path("work/up/clients") / f"{default_consumer}.yaml",
        help="client config written by `silogate up work/up`",
    )
    config = load_config(parser.parse_args().client, ClientConfig)
    return SilogateClient.connect(
        config.address, ca=config.tls.ca, cert=config.tls.cert, key=config.tls.key
    )
