"""Reading Ed25519 keys (PEM) for checkpoints, receipts and the like, with one-line errors."""

from __future__ import annotations

from pathlib import Path

from Crypto.PublicKey import ECC

from gateway.errors import ConfigurationError


def read_ed25519_key(path: Path, what: str) -> ECC.EccKey:
    """The Ed25519 key (private or public) in the PEM file ``path``; ``what`` names it in errors
    ("the receipt public key", ...). Unreadable, not PEM or not Ed25519: ConfigurationError
    with reason ``KEY_UNREADABLE``."""
    try:
        key = ECC.import_key(Path(path).read_text(encoding="ascii"))
    except OSError as err:
        raise ConfigurationError(
            f"cannot read {what} {path}: {err.strerror}",
            reason="KEY_UNREADABLE",
            metadata={"path": path},
        ) from err
    except (ValueError, IndexError, TypeError, UnicodeDecodeError):
        raise ConfigurationError(
            f"{what} {path} is not a PEM key", reason="KEY_UNREADABLE", metadata={"path": path}
        ) from None
    if key.curve != "Ed25519":
        raise ConfigurationError(
            f"{what} {path} is not an Ed25519 key",
            reason="KEY_UNREADABLE",
            metadata={"path": path},
        )
    return key
