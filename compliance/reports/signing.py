"""A report's signature: its manifest signed with the audit signing key, and the keys Bridge
trusts to verify one (the same as for checkpoints: the current key and every key a rotation
record signed by both links to it)."""

from __future__ import annotations

from typing import Any

from compliance import proof
from compliance.reports import verify


def signing_key_id() -> str:
    from security.keys import audit_signing_key

    return audit_signing_key().key_id


def sign(manifest: dict[str, Any]) -> dict[str, Any]:
    """The detached signature record of `manifest` (which names the signing key already).

    The rotation records the sinks vouch for travel with it, so an auditor holding an older
    public key can follow a rotation to the key that signed."""
    from compliance.checkpoints import rotations_to_publish
    from compliance.sinks import configured_sinks
    from security.keys import audit_signing_key

    key = audit_signing_key()
    if manifest.get("signing_key_id") != key.key_id:
        raise ValueError("the manifest names another signing key than the current one")
    return verify.signature_record(
        manifest, key.private, key.key_id, rotations_to_publish(configured_sinks())
    )


def trusted_ring(rotations: list[dict[str, Any]]) -> proof.KeyRing:
    """The keys Bridge trusts, extended by `rotations` where both of a record's keys signed."""
    from compliance.checkpoints import sink_rotations
    from compliance.sinks import configured_sinks
    from security.keys import trusted_keys

    return trusted_keys([*sink_rotations(configured_sinks()), *rotations])
