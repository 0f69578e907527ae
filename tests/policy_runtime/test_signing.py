"""Bundle signing: keys, manifest and signature files, verification and verified loading."""

from __future__ import annotations

import base64
import stat
from pathlib import Path

import pytest
from support import edit_rule

from gateway.errors import ConfigurationError, PolicyInvalid
from gateway.policy.loader import bundle_version, manifest_text
from gateway.policy.model import Bundle
from gateway.policy.signing import (
    MANIFEST_FILE,
    SIGNATURE_FILE,
    SIGNATURE_SCHEME,
    generate_signing_key,
    load_policy,
    sign_bundle,
    verify_bundle,
)

RULE = "civil-elderly-care"


def refusal(bundle: Path, public: Path) -> PolicyInvalid:
    with pytest.raises(PolicyInvalid) as caught:
        verify_bundle(bundle, public)
    assert caught.value.reason == "POLICY_SIGNATURE_INVALID"
    assert len(caught.value.problems) == 1
    return caught.value


# -- keys -------------------------------------------------------------------------------------


def test_keygen_writes_a_private_key_only_its_owner_can_read(tmp_path: Path) -> None:
    private, public = tmp_path / "k" / "signing.pem", tmp_path / "k" / "verify.pem"
    key_id = generate_signing_key(private, public)
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert len(key_id) == 16 and int(key_id, 16) >= 0


def test_keygen_never_overwrites_unless_asked(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    before = private.read_bytes()
    with pytest.raises(ConfigurationError) as caught:
        generate_signing_key(private, tmp_path / "other.pem")
    assert caught.value.reason == "KEY_EXISTS"
    assert private.read_bytes() == before
    assert not (tmp_path / "other.pem").exists()  # nothing half-written either
    private.chmod(0o644)
    generate_signing_key(private, public, overwrite=True)
    assert private.read_bytes() != before
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


# -- signing and verification -----------------------------------------------------------------


def test_sign_and_verify_round_trip(bundle_dir: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    version = bundle_version(bundle_dir)
    assert sign_bundle(bundle_dir, private) == bundle_dir / SIGNATURE_FILE
    assert (bundle_dir / MANIFEST_FILE).read_text() == manifest_text(bundle_dir)
    header, signature = (bundle_dir / SIGNATURE_FILE).read_text().splitlines()
    assert header.startswith(SIGNATURE_SCHEME)
    assert len(base64.b64decode(signature)) == 64
    # The signature files are not part of the version: signing does not change it.
    assert bundle_version(bundle_dir) == version
    assert verify_bundle(bundle_dir, public) == version
    assert load_policy(bundle_dir, public).version == version


def test_a_file_changed_after_signing_is_named(bundle_dir: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    sign_bundle(bundle_dir, private)
    edit_rule(bundle_dir, RULE, description="edited after signing")
    err = refusal(bundle_dir, public)
    assert "rules.yaml changed after signing" in err.message


def test_added_and_removed_files_are_named(bundle_dir: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    sign_bundle(bundle_dir, private)
    (bundle_dir / "extra.yaml").write_text("rules: {}\n")
    assert "extra.yaml is not in the signed manifest" in refusal(bundle_dir, public).message
    (bundle_dir / "extra.yaml").unlink()
    (bundle_dir / "keysets" / "sexes.csv").unlink()
    err = refusal(bundle_dir, public)
    assert "keysets/sexes.csv is listed in the signed manifest but missing" in err.message


def test_an_unsigned_bundle_is_refused(bundle_dir: Path, keys: tuple[Path, Path]) -> None:
    assert "the bundle is not signed" in refusal(bundle_dir, keys[1]).message


def test_a_missing_manifest_is_refused(bundle_dir: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    sign_bundle(bundle_dir, private)
    (bundle_dir / MANIFEST_FILE).unlink()
    assert "manifest.txt is missing" in refusal(bundle_dir, public).message


def test_an_edited_manifest_does_not_verify(bundle_dir: Path, keys: tuple[Path, Path]) -> None:
    """Editing the manifest to match edited files is what the signature exists to catch."""
    private, public = keys
    sign_bundle(bundle_dir, private)
    edit_rule(bundle_dir, RULE, description="edited after signing")
    (bundle_dir / MANIFEST_FILE).write_text(manifest_text(bundle_dir))
    err = refusal(bundle_dir, public)
    assert "does not verify over manifest.txt" in err.message


def test_a_signature_by_another_key_is_refused(
    tmp_path: Path, bundle_dir: Path, keys: tuple[Path, Path]
) -> None:
    other_private, other_public = tmp_path / "other.pem", tmp_path / "other.pub"
    generate_signing_key(other_private, other_public)
    sign_bundle(bundle_dir, other_private)
    err = refusal(bundle_dir, keys[1])
    assert "was not made with the configured key" in err.message
    assert verify_bundle(bundle_dir, other_public) == bundle_version(bundle_dir)


def test_a_malformed_signature_file_is_refused(bundle_dir: Path, keys: tuple[Path, Path]) -> None:
    private, public = keys
    sign_bundle(bundle_dir, private)
    (bundle_dir / SIGNATURE_FILE).write_text(f"{SIGNATURE_SCHEME}\nnot base64!\n")
    assert "the signature is not base64" in refusal(bundle_dir, public).message
    (bundle_dir / SIGNATURE_FILE).write_text("rsa-sha1\nAAAA\n")
    assert "bundle.sig is malformed" in refusal(bundle_dir, public).message


def test_an_unreadable_or_wrong_kind_of_key_is_refused(
    tmp_path: Path, bundle_dir: Path, keys: tuple[Path, Path]
) -> None:
    private, _ = keys
    sign_bundle(bundle_dir, private)
    assert "cannot read the verification key" in refusal(bundle_dir, tmp_path / "absent").message
    (tmp_path / "garbage.pem").write_text("not a key\n")
    assert "is not a PEM key" in refusal(bundle_dir, tmp_path / "garbage.pem").message
    # Servers get the public key; a private one there could sign any bundle.
    assert "is a private key" in refusal(bundle_dir, private).message


def test_an_invalid_bundle_is_not_signed(bundle_dir: Path, keys: tuple[Path, Path]) -> None:
    (bundle_dir / "rules.yaml").write_text("rules:\n  broken: [\n")
    with pytest.raises(PolicyInvalid) as caught:
        sign_bundle(bundle_dir, keys[0])
    assert caught.value.reason == "POLICY_INVALID"
    assert str(caught.value.problems[0]).startswith("rules.yaml:")
    assert not (bundle_dir / SIGNATURE_FILE).exists()
    assert not (bundle_dir / MANIFEST_FILE).exists()


def test_signing_with_a_public_key_is_a_clear_error(
    bundle_dir: Path, keys: tuple[Path, Path]
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        sign_bundle(bundle_dir, keys[1])
    assert caught.value.reason == "KEY_UNREADABLE"
    assert "sign with the private key" in caught.value.message


# -- verified loading -------------------------------------------------------------------------


def test_configuration_not_the_bundle_decides_whether_to_verify(
    bundle_dir: Path, keys: tuple[Path, Path]
) -> None:
    """Without a key an unsigned bundle loads; with one the same bundle is refused, although
    nothing in the bundle asks for verification."""
    assert load_policy(bundle_dir, None).version == bundle_version(bundle_dir)
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(bundle_dir, keys[1])
    assert caught.value.reason == "POLICY_SIGNATURE_INVALID"
    # A refusal says which files it refused.
    assert caught.value.metadata["policy_version"] == bundle_version(bundle_dir)


def test_a_signed_but_invalid_bundle_is_still_refused(
    bundle_dir: Path, keys: tuple[Path, Path]
) -> None:
    """A signature approves files; it does not make them valid."""
    private, public = keys
    sign_bundle(bundle_dir, private)
    rules = bundle_dir / "rules.yaml"
    rules.write_text(rules.read_text().replace("effect: permit", "effect: allow", 1))
    sign_bundle_bypassing_validation(bundle_dir, private)
    assert verify_bundle(bundle_dir, public) == bundle_version(bundle_dir)
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(bundle_dir, public)
    assert caught.value.reason == "POLICY_INVALID"


def sign_bundle_bypassing_validation(bundle: Path, private: Path) -> None:
    from Crypto.PublicKey import ECC
    from Crypto.Signature import eddsa

    manifest = manifest_text(bundle).encode()
    key = ECC.import_key(private.read_text())
    signature = eddsa.new(key, "rfc8032").sign(manifest)
    (bundle / MANIFEST_FILE).write_bytes(manifest)
    (bundle / SIGNATURE_FILE).write_text(
        f"{SIGNATURE_SCHEME}\n{base64.b64encode(signature).decode()}\n"
    )


def test_only_files_of_the_version_are_ever_loaded(bundle_dir: Path) -> None:
    """A key set read from outside the hashed files (``tests/``) would change behaviour without
    changing the version; the verified loader only sees the hashed files."""
    (bundle_dir / "tests").mkdir()
    (bundle_dir / "tests" / "sexes.csv").write_text("key\nF\nM\n")
    key_sets = bundle_dir / "key_sets.yaml"
    text = key_sets.read_text()
    assert "keysets/sexes.csv" in text
    key_sets.write_text(text.replace("keysets/sexes.csv", "tests/sexes.csv"))
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(bundle_dir, None)
    assert any("tests/sexes.csv" in str(p) for p in caught.value.problems)


def test_an_edit_between_verification_and_loading_is_refused(
    bundle_dir: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files verified must be the files loaded, even when an editor writes in between."""
    from gateway.policy import signing

    private, public = keys
    sign_bundle(bundle_dir, private)
    real_load = signing.load_bundle

    def load_after_an_edit(root: Path) -> Bundle:
        edit_rule(root, RULE, description="written between verification and loading")
        return real_load(root)

    monkeypatch.setattr(signing, "load_bundle", load_after_an_edit)
    with pytest.raises(PolicyInvalid) as caught:
        load_policy(bundle_dir, public)
    assert caught.value.reason == "POLICY_SIGNATURE_INVALID"
    assert "changed while the bundle was being verified" in caught.value.message


def test_oversized_signature_files_are_refused_without_reading_them(
    bundle_dir: Path, keys: tuple[Path, Path]
) -> None:
    private, public = keys
    sign_bundle(bundle_dir, private)
    with (bundle_dir / SIGNATURE_FILE).open("a") as handle:
        handle.write("A" * 10_000)
    assert "bundle.sig is over the limit" in refusal(bundle_dir, public).message
