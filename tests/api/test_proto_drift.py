"""The committed generated code must be exactly what `make proto` produces from the .proto files."""

from __future__ import annotations

from pathlib import Path

from gateway.api.regenerate import PROTO_PACKAGE, regenerate

REPO = Path(__file__).resolve().parents[2]


def test_committed_generated_code_matches_proto(tmp_path: Path) -> None:
    generated = regenerate(REPO, tmp_path)
    committed = sorted(p.relative_to(REPO) for p in (REPO / PROTO_PACKAGE).glob("*_pb2*"))
    assert generated == committed, "generated file set differs; run `make proto`"
    drifted = [
        str(rel) for rel in generated if (tmp_path / rel).read_bytes() != (REPO / rel).read_bytes()
    ]
    assert not drifted, f"generated code drifted from proto/ (run `make proto`): {drifted}"


def test_every_proto_message_and_field_is_documented() -> None:
    """The .proto comments are the API reference: every message, field, enum value and RPC has one."""
    undocumented = []
    for proto in sorted((REPO / "proto" / PROTO_PACKAGE).glob("*.proto")):
        lines = proto.read_text().splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            is_declaration = stripped.startswith(("message ", "rpc ", "enum ", "service ")) or (
                stripped.endswith(";")
                and "=" in stripped
                and not stripped.startswith(("syntax", "package", "import", "option"))
            )
            if is_declaration and not lines[number - 1].strip().startswith("//"):
                undocumented.append(f"{proto.name}:{number + 1}: {stripped}")
    assert not undocumented, "\n".join(undocumented)
