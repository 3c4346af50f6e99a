"""Act as a CDS client: keys, JWKS and signed CDS Hooks JWTs for the EHR simulator, the demo and the tests.

Keys are generated with `cryptography` and tokens signed with PyJWT, so the service's verifier is tested against
the same library calls a real client stack would make. Nothing here is for production key management: private
keys are stored unencrypted (file mode 0600).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from cds_service.auth import TrustedIssuers

SUPPORTED_ALGORITHMS = ("ES384", "RS384")
RSA_KEY_BITS = 2048
_THUMBPRINT_MEMBERS = {"EC": ("crv", "kty", "x", "y"), "RSA": ("e", "kty", "n")}


@dataclass
class SandboxKey:
    """A CDS client signing key: ES384 (EC P-384) or RS384 (RSA 2048+)."""

    kid: str
    alg: str
    private_key: Any  # cryptography private key object

    def public_jwk(self) -> dict[str, Any]:
        """The public half as a JWK (kty, kid, alg, use, key_ops and public parameters only)."""
        public_key = self.private_key.public_key()
        if self.alg == "ES384":
            jwk = ECAlgorithm.to_jwk(public_key, as_dict=True)
        else:
            jwk = RSAAlgorithm.to_jwk(public_key, as_dict=True)
        jwk.update({"kid": self.kid, "alg": self.alg, "use": "sig", "key_ops": ["verify"]})
        return jwk


def _check_key_matches_alg(alg: str, private_key: Any) -> None:
    """Refuse a key the verifier would refuse, so mistakes show up where the key is made, not as a 401."""
    if alg == "ES384":
        if not (isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(private_key.curve, ec.SECP384R1)):
            raise ValueError("ES384 needs an EC P-384 private key")
    elif alg == "RS384":
        if not (isinstance(private_key, rsa.RSAPrivateKey) and private_key.key_size >= RSA_KEY_BITS):
            raise ValueError(f"RS384 needs an RSA private key of at least {RSA_KEY_BITS} bits")
    else:
        raise ValueError(f"unsupported alg {alg!r}; use one of {', '.join(SUPPORTED_ALGORITHMS)}")


def _jwk_thumbprint(public_jwk: dict[str, Any]) -> str:
    """RFC 7638 SHA-256 thumbprint: a kid that is stable for the key and unique without coordination."""
    members = _THUMBPRINT_MEMBERS[public_jwk["kty"]]
    canonical = json.dumps({name: public_jwk[name] for name in members}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def generate_key(alg: str = "ES384", kid: str | None = None) -> SandboxKey:
    """A fresh key; without `kid`, its RFC 7638 thumbprint is used."""
    if alg == "ES384":
        private_key: Any = ec.generate_private_key(ec.SECP384R1())
    elif alg == "RS384":
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
    else:
        raise ValueError(f"unsupported alg {alg!r}; use one of {', '.join(SUPPORTED_ALGORITHMS)}")
    key = SandboxKey(kid=kid or "", alg=alg, private_key=private_key)
    if not kid:
        key.kid = _jwk_thumbprint(key.public_jwk())
    return key


def _write_atomically(path: Path, text: str, mode: int) -> None:
    """Write via a temp file in the same directory, so readers never see half a file and the mode is set first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def save_key(key: SandboxKey, path: str | Path) -> None:
    """Store the private key as JSON {"kid", "alg", "private_key_pem"} (PKCS#8, unencrypted), readable by owner only."""
    _check_key_matches_alg(key.alg, key.private_key)
    pem = key.private_key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    ).decode("ascii")
    doc = {"kid": key.kid, "alg": key.alg, "private_key_pem": pem}
    _write_atomically(Path(path), json.dumps(doc, indent=2) + "\n", 0o600)


def load_key(path: str | Path) -> SandboxKey:
    """Read a key written by `save_key`; ValueError if the file is not one."""
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or not all(
        isinstance(doc.get(name), str) for name in ("kid", "alg", "private_key_pem")
    ):
        raise ValueError(f"{path}: expected JSON with string fields kid, alg, private_key_pem")
    private_key = serialization.load_pem_private_key(doc["private_key_pem"].encode("ascii"), password=None)
    _check_key_matches_alg(doc["alg"], private_key)
    return SandboxKey(kid=doc["kid"], alg=doc["alg"], private_key=private_key)


def jwks(keys: Iterable[SandboxKey]) -> dict[str, Any]:
    """The public JWK Set a client publishes (at its `jku`) or a service lists inline."""
    return {"keys": [key.public_jwk() for key in keys]}


def sign_cds_jwt(
    key: SandboxKey,
    *,
    iss: str,
    aud: str,
    lifetime: int = 300,
    jku: str | None = None,
    jti: str | None = None,
    now: float | None = None,
    extra_claims: dict[str, Any] | None = None,
    extra_headers: dict[str, Any] | None = None,
) -> str:
    """A CDS Hooks 2.0 client JWT: header alg/kid/typ "JWT" (+jku), payload iss/aud/exp/iat/jti.

    `jti` defaults to 64 random hex characters (as Inferno sends). In `extra_claims`/`extra_headers` a value of
    None *removes* that claim/header, so tests can forge tokens without `kid`, `typ`, `exp`, ... The header `alg`
    cannot be overridden here (PyJWT would sign with it); build alg-confusion tokens by hand.
    """
    if extra_headers and "alg" in extra_headers:
        raise ValueError("extra_headers cannot change alg; build such a token by hand")
    issued_at = int(time.time() if now is None else now)
    payload: dict[str, Any] = {
        "iss": iss,
        "aud": aud,
        "exp": issued_at + lifetime,
        "iat": issued_at,
        "jti": jti or secrets.token_hex(32),
    }
    headers: dict[str, Any] = {"kid": key.kid, "typ": "JWT"}
    if jku is not None:
        headers["jku"] = jku
    _merge_removing_none(payload, extra_claims)
    _merge_removing_none(headers, extra_headers)
    if "typ" not in headers:
        headers["typ"] = None  # PyJWT adds typ "JWT" unless told otherwise with a falsy value
    return jwt.encode(payload, key.private_key, algorithm=key.alg, headers=headers)


def _merge_removing_none(target: dict[str, Any], changes: dict[str, Any] | None) -> None:
    for name, value in (changes or {}).items():
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value


def trusted_issuers_document(
    iss: str, keys: Iterable[SandboxKey], fhir_servers: Iterable[str], jku: Iterable[str] = ()
) -> dict[str, Any]:
    """A trusted-issuers document with one issuer whose public keys are listed inline."""
    return {"issuers": [{"iss": iss, "jwks": jwks(keys), "jku": list(jku), "fhir_servers": list(fhir_servers)}]}


def write_trusted_issuers(path: str | Path, doc: dict[str, Any]) -> None:
    """Validate `doc` with the service's own loader (TrustedIssuersError if invalid), then write it as JSON."""
    TrustedIssuers.from_document(doc)
    _write_atomically(Path(path), json.dumps(doc, indent=2) + "\n", 0o644)
