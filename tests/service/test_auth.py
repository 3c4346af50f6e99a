"""JWT verification of CDS clients, the trusted-issuers file, FHIR server allow-listing and the sandbox signer."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import stat
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import requests
import responses
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from cds_service.auth import (
    JWKS_MIN_REFETCH_INTERVAL,
    AuthError,
    Caller,
    JwtVerifier,
    ReplayCache,
    TrustedIssuers,
    TrustedIssuersError,
    fhir_server_allowed,
)
from sandbox.signing import (
    SandboxKey,
    _jwk_thumbprint,
    generate_key,
    jwks,
    load_key,
    save_key,
    sign_cds_jwt,
    trusted_issuers_document,
    write_trusted_issuers,
)

ISS = "https://ehr.example"
AUD = "https://cds.example/cds-services/ketamine-pa"
FHIR = "https://ehr.example/fhir"
JWKS_URL = "https://ehr.example/.well-known/jwks.json"
JKU_URL = "https://keys.ehr.example/jwks.json"
T0 = 1_700_000_000.0
PRIVATE_JWK_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


class FakeClock:
    """An injectable clock: tests move time instead of sleeping."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(scope="module")
def es_key() -> SandboxKey:
    return generate_key("ES384", kid="es-1")


@pytest.fixture(scope="module")
def rs_key() -> SandboxKey:
    return generate_key("RS384", kid="rs-1")


@pytest.fixture(scope="module")
def other_es_key() -> SandboxKey:
    return generate_key("ES384", kid="es-2")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def mocked_http() -> Iterator[responses.RequestsMock]:
    with responses.RequestsMock(assert_all_requests_are_fired=False) as rsps:
        yield rsps


def issuers_with(*entries: dict[str, Any]) -> TrustedIssuers:
    return TrustedIssuers.from_document({"issuers": list(entries)})


def inline_issuer(keys: list[SandboxKey], iss: str = ISS, **extra: Any) -> dict[str, Any]:
    return {"iss": iss, "jwks": jwks(keys), "fhir_servers": [FHIR], **extra}


def verifier_for(issuers: TrustedIssuers, clock: FakeClock, **options: Any) -> JwtVerifier:
    return JwtVerifier(issuers, clock=clock, **options)


def token(key: SandboxKey, clock: FakeClock, **options: Any) -> str:
    options.setdefault("iss", ISS)
    options.setdefault("aud", AUD)
    return sign_cds_jwt(key, now=clock(), **options)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def hand_built_token(
    header: dict[str, Any], payload: dict[str, Any], sign: Callable[[bytes], bytes] | None = None
) -> str:
    """A compact JWS assembled without PyJWT, to forge what PyJWT would refuse to produce."""
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(payload).encode())}"
    signature = sign(signing_input.encode("ascii")) if sign else b""
    return f"{signing_input}.{b64url(signature)}"


def standard_claims(clock: FakeClock, jti: str = "a" * 64) -> dict[str, Any]:
    now = int(clock())
    return {"iss": ISS, "aud": AUD, "iat": now, "exp": now + 300, "jti": jti}


def ecdsa_raw_signature(private_key: ec.EllipticCurvePrivateKey, data: bytes, size: int) -> bytes:
    r, s = decode_dss_signature(private_key.sign(data, ec.ECDSA(hashes.SHA384())))
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


# --------------------------------------------------------------------------------------------------------------
# Accepted tokens
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_name", ["es_key", "rs_key"])
def test_valid_token_with_inline_jwks_is_accepted(
    key_name: str, request: pytest.FixtureRequest, clock: FakeClock
) -> None:
    key: SandboxKey = request.getfixturevalue(key_name)
    verifier = verifier_for(issuers_with(inline_issuer([key])), clock)

    caller = verifier.verify(f"Bearer {token(key, clock, jti='j-1', extra_claims={'tenant': 't-9'})}", AUD)

    assert caller == Caller(iss=ISS, fhir_servers=(FHIR,), kid=key.kid, jti="j-1", tenant="t-9")


def test_bearer_scheme_is_case_insensitive(es_key: SandboxKey, clock: FakeClock) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    assert verifier.verify(f"bearer {token(es_key, clock)}", AUD).iss == ISS
    assert verifier.verify(f"BEARER   {token(es_key, clock)}  ", AUD).iss == ISS


def test_typ_is_compared_case_insensitively(es_key: SandboxKey, clock: FakeClock) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    caller = verifier.verify(f"Bearer {token(es_key, clock, extra_headers={'typ': 'jwt'})}", AUD)
    assert caller.kid == es_key.kid


def test_key_is_found_among_several_inline_keys(es_key: SandboxKey, rs_key: SandboxKey, clock: FakeClock) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key, rs_key])), clock)
    assert verifier.verify(f"Bearer {token(rs_key, clock)}", AUD).kid == rs_key.kid
    assert verifier.verify(f"Bearer {token(es_key, clock)}", AUD).kid == es_key.kid


@pytest.mark.parametrize("key_name", ["es_key", "rs_key"])
def test_valid_token_with_jwks_url_is_accepted_and_jwks_cached(
    key_name: str, request: pytest.FixtureRequest, clock: FakeClock, mocked_http: responses.RequestsMock
) -> None:
    key: SandboxKey = request.getfixturevalue(key_name)
    served = mocked_http.get(JWKS_URL, json=jwks([key]))
    verifier = verifier_for(issuers_with({"iss": ISS, "jwks_url": JWKS_URL, "fhir_servers": [FHIR]}), clock)

    assert verifier.verify(f"Bearer {token(key, clock)}", AUD).kid == key.kid
    clock.advance(60)
    assert verifier.verify(f"Bearer {token(key, clock)}", AUD).kid == key.kid

    assert served.call_count == 1


def test_jwks_is_refetched_after_its_ttl(
    es_key: SandboxKey, clock: FakeClock, mocked_http: responses.RequestsMock
) -> None:
    served = mocked_http.get(JWKS_URL, json=jwks([es_key]))
    verifier = verifier_for(issuers_with({"iss": ISS, "jwks_url": JWKS_URL}), clock, jwks_ttl=600)

    verifier.verify(f"Bearer {token(es_key, clock)}", AUD)
    clock.advance(599)
    verifier.verify(f"Bearer {token(es_key, clock)}", AUD)
    assert served.call_count == 1
    clock.advance(2)
    verifier.verify(f"Bearer {token(es_key, clock)}", AUD)
    assert served.call_count == 2


@pytest.mark.parametrize("token_jku", [JKU_URL, JKU_URL + "/"])
def test_allow_listed_jku_is_fetched_and_accepted(
    token_jku: str, es_key: SandboxKey, other_es_key: SandboxKey, clock: FakeClock, mocked_http: responses.RequestsMock
) -> None:
    served = mocked_http.get(JKU_URL, json=jwks([es_key]))
    issuers = issuers_with(inline_issuer([other_es_key], jku=[JKU_URL]))
    verifier = verifier_for(issuers, clock)

    caller = verifier.verify(f"Bearer {token(es_key, clock, jku=token_jku)}", AUD)

    assert caller.kid == es_key.kid
    assert served.call_count == 1
    assert [call.request.url for call in mocked_http.calls] == [JKU_URL]  # the configured URL, never the token's


def test_sandbox_style_issuer_with_jku_equal_to_jwks_url_fetches_once(
    es_key: SandboxKey, clock: FakeClock, mocked_http: responses.RequestsMock
) -> None:
    served = mocked_http.get(JWKS_URL, json=jwks([es_key]))
    verifier = verifier_for(issuers_with({"iss": ISS, "jwks_url": JWKS_URL, "jku": [JWKS_URL]}), clock)

    verifier.verify(f"Bearer {token(es_key, clock, jku=JWKS_URL)}", AUD)

    assert served.call_count == 1
    assert len(mocked_http.calls) == 1


# --------------------------------------------------------------------------------------------------------------
# Authorization header and JOSE header
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [
        (None, "missing Authorization"),
        ("", "missing Authorization"),
        ("   ", "missing Authorization"),
        ("Basic dXNlcjpwYXNz", "not Bearer"),
        ("Token abc.def.ghi", "not Bearer"),
        ("Bearer", "malformed"),
        ("Bearer not-a-jwt", "malformed"),
        ("Bearer a.b", "malformed"),
        ("Bearer a.b.c.d", "malformed"),
        ("Bearer abc.def.ghi", "malformed"),
        ("Bearer " + "a" * 20_000, "too long"),
    ],
)
def test_bad_authorization_headers_are_rejected(
    authorization: str | None, reason: str, es_key: SandboxKey, clock: FakeClock
) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    with pytest.raises(AuthError, match=reason):
        verifier.verify(authorization, AUD)


def test_alg_none_is_rejected(es_key: SandboxKey, clock: FakeClock) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    header = {"alg": "none", "kid": es_key.kid, "typ": "JWT"}
    unsigned = hand_built_token(header, standard_claims(clock))
    with_junk_signature = hand_built_token(header, standard_claims(clock), sign=lambda _data: b"junk")

    with pytest.raises(AuthError, match="malformed"):
        verifier.verify(f"Bearer {unsigned}", AUD)
    with pytest.raises(AuthError, match="alg 'none' not allowed"):
        verifier.verify(f"Bearer {with_junk_signature}", AUD)


@pytest.mark.parametrize("secret_form", ["pem", "jwk_json"])
def test_hs256_signed_with_the_public_key_is_rejected(secret_form: str, rs_key: SandboxKey, clock: FakeClock) -> None:
    """Classic alg confusion: the attacker HMACs with the (public) verification key as the secret."""
    verifier = verifier_for(issuers_with(inline_issuer([rs_key])), clock)
    if secret_form == "pem":
        secret = rs_key.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        secret = json.dumps(rs_key.public_jwk()).encode()
    forged = hand_built_token(
        {"alg": "HS256", "kid": rs_key.kid, "typ": "JWT"},
        standard_claims(clock),
        sign=lambda data: hmac.new(secret, data, hashlib.sha256).digest(),
    )
    with pytest.raises(AuthError, match="alg 'HS256' not allowed"):
        verifier.verify(f"Bearer {forged}", AUD)


def test_hs384_is_rejected(es_key: SandboxKey, clock: FakeClock) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    forged = jwt.encode(standard_claims(clock), "x" * 48, algorithm="HS384", headers={"kid": es_key.kid})
    with pytest.raises(AuthError, match="alg 'HS384' not allowed"):
        verifier.verify(f"Bearer {forged}", AUD)


def test_rs256_is_rejected(rs_key: SandboxKey, clock: FakeClock) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([rs_key])), clock)
    signed = jwt.encode(standard_claims(clock), rs_key.private_key, algorithm="RS256", headers={"kid": rs_key.kid})
    with pytest.raises(AuthError, match="alg 'RS256' not allowed"):
        verifier.verify(f"Bearer {signed}", AUD)


def test_missing_alg_is_rejected(es_key: SandboxKey, clock: FakeClock) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    forged = hand_built_token({"kid": es_key.kid, "typ": "JWT"}, standard_claims(clock), sign=lambda _d: b"x")
    with pytest.raises(AuthError, match="alg missing"):
        verifier.verify(f"Bearer {forged}", AUD)


def test_missing_kid_is_rejected(es_key: SandboxKey, clock: FakeClock) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    with pytest.raises(AuthError, match="kid header missing"):
        verifier.verify(f"Bearer {token(es_key, clock, extra_headers={'kid': None})}", AUD)


@pytest.mark.parametrize("typ", [None, "at+jwt", "JWS"])
def test_typ_missing_or_not_jwt_is_rejected(typ: str | None, es_key: SandboxKey, clock: FakeClock) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    signed = token(es_key, clock, extra_headers={"typ": typ})
    assert jwt.get_unverified_header(signed).get("typ") == typ
    with pytest.raises(AuthError, match="typ header"):
        verifier.verify(f"Bearer {signed}", AUD)


def test_crit_header_is_rejected(es_key: SandboxKey, clock: FakeClock) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    header = {"alg": "ES384", "kid": es_key.kid, "typ": "JWT", "crit": ["exp-ext"], "exp-ext": 1}
    forged = hand_built_token(header, standard_claims(clock), sign=lambda _d: b"x")
    with pytest.raises(AuthError, match=r"crit|malformed token header"):  # PyJWT itself refuses unknown crit
        verifier.verify(f"Bearer {forged}", AUD)


def test_jku_not_allow_listed_is_rejected_without_any_request(
    es_key: SandboxKey, clock: FakeClock, mocked_http: responses.RequestsMock
) -> None:
    evil = "https://evil.example/jwks.json"
    mocked_http.get(evil, json=jwks([es_key]))  # would verify if we were foolish enough to fetch it
    verifier = verifier_for(issuers_with(inline_issuer([generate_key("ES384", kid="other")], jku=[JKU_URL])), clock)

    with pytest.raises(AuthError, match="jku not allow-listed"):
        verifier.verify(f"Bearer {token(es_key, clock, jku=evil)}", AUD)
    assert len(mocked_http.calls) == 0


def test_jku_on_issuer_without_jku_allow_list_is_rejected(
    es_key: SandboxKey, clock: FakeClock, mocked_http: responses.RequestsMock
) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    with pytest.raises(AuthError, match="jku not allow-listed"):
        verifier.verify(f"Bearer {token(es_key, clock, jku=JKU_URL)}", AUD)
    assert len(mocked_http.calls) == 0


# --------------------------------------------------------------------------------------------------------------
# Issuer, keys and signature
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("iss", ["https://evil.example", ISS + "/"])
def test_unknown_iss_is_rejected(iss: str, es_key: SandboxKey, clock: FakeClock) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    with pytest.raises(AuthError, match="unknown issuer"):
        verifier.verify(f"Bearer {token(es_key, clock, iss=iss)}", AUD)


def test_unknown_kid_in_inline_jwks_is_rejected(es_key: SandboxKey, other_es_key: SandboxKey, clock: FakeClock) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    with pytest.raises(AuthError, match="unknown kid"):
        verifier.verify(f"Bearer {token(other_es_key, clock)}", AUD)


def test_signature_by_a_different_key_with_the_same_kid_is_rejected(es_key: SandboxKey, clock: FakeClock) -> None:
    impostor = generate_key("ES384", kid=es_key.kid)
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    with pytest.raises(AuthError, match="bad signature"):
        verifier.verify(f"Bearer {token(impostor, clock)}", AUD)


def test_tampered_payload_is_rejected(es_key: SandboxKey, clock: FakeClock) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    header, _payload, signature = token(es_key, clock, aud="https://other.example/cds-services/x").split(".")
    tampered = f"{header}.{b64url(json.dumps(standard_claims(clock)).encode())}.{signature}"
    with pytest.raises(AuthError, match="bad signature"):
        verifier.verify(f"Bearer {tampered}", AUD)


def test_tampered_header_is_rejected(es_key: SandboxKey, clock: FakeClock) -> None:
    """The signature covers the header segment too: one changed header member (still valid) fails it."""
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    _header, payload, signature = token(es_key, clock).split(".")
    header = {"alg": "ES384", "kid": es_key.kid, "typ": "jwt"}  # typ spelled otherwise: accepted, but not signed
    tampered = f"{b64url(json.dumps(header).encode())}.{payload}.{signature}"
    with pytest.raises(AuthError, match="bad signature"):
        verifier.verify(f"Bearer {tampered}", AUD)


@pytest.mark.parametrize("cut", [1, 8, 40])
def test_truncated_signature_is_rejected(cut: int, es_key: SandboxKey, clock: FakeClock) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    signed = token(es_key, clock)
    with pytest.raises(AuthError, match=r"bad signature|malformed token|signature check"):
        verifier.verify(f"Bearer {signed[:-cut]}", AUD)


@pytest.mark.parametrize("b64", [False, "false", 0])
def test_unencoded_payload_header_is_rejected(b64: object, es_key: SandboxKey, clock: FakeClock) -> None:
    """RFC 7797 `b64: false` changes what the signature covers: never a CDS Hooks token, refused before the key."""
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    header = {"alg": "ES384", "kid": es_key.kid, "typ": "JWT", "b64": b64}
    forged = hand_built_token(header, standard_claims(clock), sign=lambda _d: b"x")
    with pytest.raises(AuthError, match="b64 header not supported"):
        verifier.verify(f"Bearer {forged}", AUD)


def test_rsa_key_cannot_verify_an_es384_token(rs_key: SandboxKey, clock: FakeClock) -> None:
    """The kid points at an RSA key, the header says ES384: the key type must follow the header alg."""
    impostor = generate_key("ES384", kid=rs_key.kid)
    verifier = verifier_for(issuers_with(inline_issuer([rs_key])), clock)
    with pytest.raises(AuthError, match="does not match token alg ES384"):
        verifier.verify(f"Bearer {token(impostor, clock)}", AUD)


def test_ec_key_cannot_verify_an_rs384_token(es_key: SandboxKey, clock: FakeClock) -> None:
    impostor = generate_key("RS384", kid=es_key.kid)
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    with pytest.raises(AuthError, match="does not match token alg RS384"):
        verifier.verify(f"Bearer {token(impostor, clock)}", AUD)


def test_jwk_alg_must_equal_header_alg(es_key: SandboxKey, clock: FakeClock) -> None:
    jwk = {**es_key.public_jwk(), "alg": "ES256"}
    verifier = verifier_for(issuers_with({"iss": ISS, "jwks": {"keys": [jwk]}}), clock)
    with pytest.raises(AuthError, match="key alg does not match"):
        verifier.verify(f"Bearer {token(es_key, clock)}", AUD)


def test_jwk_for_encryption_is_not_used_for_signatures(es_key: SandboxKey, clock: FakeClock) -> None:
    jwk = {**es_key.public_jwk(), "use": "enc"}
    verifier = verifier_for(issuers_with({"iss": ISS, "jwks": {"keys": [jwk]}}), clock)
    with pytest.raises(AuthError, match="not a signature key"):
        verifier.verify(f"Bearer {token(es_key, clock)}", AUD)


def test_p256_key_cannot_verify_es384(clock: FakeClock) -> None:
    p256 = ec.generate_private_key(ec.SECP256R1())
    public_jwk = {**jwt.algorithms.ECAlgorithm.to_jwk(p256.public_key(), as_dict=True), "kid": "p256"}
    forged = hand_built_token(
        {"alg": "ES384", "kid": "p256", "typ": "JWT"},
        standard_claims(clock),
        sign=lambda data: ecdsa_raw_signature(p256, data, 32),
    )
    verifier = verifier_for(issuers_with({"iss": ISS, "jwks": {"keys": [public_jwk]}}), clock)
    with pytest.raises(AuthError, match="P-384"):
        verifier.verify(f"Bearer {forged}", AUD)


def test_short_rsa_key_is_rejected(clock: FakeClock) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    public_jwk = {**jwt.algorithms.RSAAlgorithm.to_jwk(weak.public_key(), as_dict=True), "kid": "weak"}
    forged = hand_built_token(
        {"alg": "RS384", "kid": "weak", "typ": "JWT"},
        standard_claims(clock),
        sign=lambda data: weak.sign(data, padding.PKCS1v15(), hashes.SHA384()),
    )
    verifier = verifier_for(issuers_with({"iss": ISS, "jwks": {"keys": [public_jwk]}}), clock)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(AuthError, match="at least 2048 bits"):
            verifier.verify(f"Bearer {forged}", AUD)


def test_private_members_of_a_fetched_jwk_are_ignored(
    es_key: SandboxKey, clock: FakeClock, mocked_http: responses.RequestsMock
) -> None:
    """A client that mistakenly publishes its private JWK still verifies, with the public half only."""
    private_jwk = {**jwt.algorithms.ECAlgorithm.to_jwk(es_key.private_key, as_dict=True), "kid": es_key.kid}
    assert "d" in private_jwk
    mocked_http.get(JWKS_URL, json={"keys": [private_jwk]})
    verifier = verifier_for(issuers_with({"iss": ISS, "jwks_url": JWKS_URL}), clock)
    assert verifier.verify(f"Bearer {token(es_key, clock)}", AUD).kid == es_key.kid


def test_duplicate_kid_in_fetched_jwks_is_rejected(
    es_key: SandboxKey, clock: FakeClock, mocked_http: responses.RequestsMock
) -> None:
    twin = generate_key("ES384", kid=es_key.kid)
    mocked_http.get(JWKS_URL, json=jwks([es_key, twin]))
    verifier = verifier_for(issuers_with({"iss": ISS, "jwks_url": JWKS_URL}), clock)
    with pytest.raises(AuthError, match="not unique"):
        verifier.verify(f"Bearer {token(es_key, clock)}", AUD)


def test_unknown_kid_refetch_is_rate_limited(
    es_key: SandboxKey, other_es_key: SandboxKey, clock: FakeClock, mocked_http: responses.RequestsMock
) -> None:
    served = mocked_http.get(JWKS_URL, json=jwks([es_key]))
    verifier = verifier_for(issuers_with({"iss": ISS, "jwks_url": JWKS_URL}), clock)
    verifier.verify(f"Bearer {token(es_key, clock)}", AUD)
    assert served.call_count == 1

    clock.advance(5)
    for _ in range(3):
        with pytest.raises(AuthError, match="unknown kid"):
            verifier.verify(f"Bearer {token(other_es_key, clock)}", AUD)
    assert served.call_count == 1  # fetched 5 s ago: no refetch within the 30 s window

    mocked_http.replace(responses.GET, JWKS_URL, json=jwks([es_key, other_es_key]))  # the client rotates keys
    clock.advance(JWKS_MIN_REFETCH_INTERVAL)
    assert verifier.verify(f"Bearer {token(other_es_key, clock)}", AUD).kid == other_es_key.kid
    assert len(mocked_http.calls) == 2

    clock.advance(10)
    with pytest.raises(AuthError, match="unknown kid"):
        verifier.verify(f"Bearer {token(generate_key('ES384', kid='es-3'), clock)}", AUD)
    assert len(mocked_http.calls) == 2


def test_first_unknown_kid_fetches_once_then_waits(
    other_es_key: SandboxKey, es_key: SandboxKey, clock: FakeClock, mocked_http: responses.RequestsMock
) -> None:
    served = mocked_http.get(JWKS_URL, json=jwks([es_key]))
    verifier = verifier_for(issuers_with({"iss": ISS, "jwks_url": JWKS_URL}), clock)
    for _ in range(3):
        with pytest.raises(AuthError, match="unknown kid"):
            verifier.verify(f"Bearer {token(other_es_key, clock)}", AUD)
        clock.advance(1)
    assert served.call_count == 1


@pytest.mark.parametrize(
    "failure",
    [
        {"status": 500, "body": "oops"},
        {"status": 404, "body": "not found"},
        {"body": requests.exceptions.ConnectTimeout("timed out")},
        {"body": requests.exceptions.ReadTimeout("timed out")},
        {"body": requests.exceptions.ConnectionError("refused")},
        {"status": 200, "body": "<html>not json</html>"},
        {"status": 200, "json": {"not": "a jwks"}},
        {"status": 200, "json": ["keys"]},
    ],
    ids=["500", "404", "connect-timeout", "read-timeout", "connection-error", "not-json", "no-keys", "not-object"],
)
def test_jwks_fetch_failure_is_an_auth_error(
    failure: dict[str, Any], es_key: SandboxKey, clock: FakeClock, mocked_http: responses.RequestsMock
) -> None:
    mocked_http.get(JWKS_URL, **failure)
    verifier = verifier_for(issuers_with({"iss": ISS, "jwks_url": JWKS_URL}), clock)
    with pytest.raises(AuthError, match="JWKS"):
        verifier.verify(f"Bearer {token(es_key, clock)}", AUD)


def test_failed_jwks_fetch_is_retried_only_after_the_rate_limit(
    es_key: SandboxKey, clock: FakeClock, mocked_http: responses.RequestsMock
) -> None:
    mocked_http.get(JWKS_URL, status=503)
    verifier = verifier_for(issuers_with({"iss": ISS, "jwks_url": JWKS_URL}), clock)
    with pytest.raises(AuthError, match="HTTP 503"):
        verifier.verify(f"Bearer {token(es_key, clock)}", AUD)

    mocked_http.replace(responses.GET, JWKS_URL, json=jwks([es_key]))
    clock.advance(10)
    with pytest.raises(AuthError, match="unavailable"):
        verifier.verify(f"Bearer {token(es_key, clock)}", AUD)
    assert len(mocked_http.calls) == 1

    clock.advance(JWKS_MIN_REFETCH_INTERVAL)
    assert verifier.verify(f"Bearer {token(es_key, clock)}", AUD).kid == es_key.kid
    assert len(mocked_http.calls) == 2


def test_jwks_redirect_is_not_followed(
    es_key: SandboxKey, clock: FakeClock, mocked_http: responses.RequestsMock
) -> None:
    internal = "http://169.254.169.254/latest/meta-data"
    mocked_http.get(JWKS_URL, status=302, headers={"Location": internal})
    mocked_http.get(internal, json=jwks([es_key]))
    verifier = verifier_for(issuers_with({"iss": ISS, "jwks_url": JWKS_URL}), clock)
    with pytest.raises(AuthError, match="HTTP 302"):
        verifier.verify(f"Bearer {token(es_key, clock)}", AUD)
    assert [call.request.url for call in mocked_http.calls] == [JWKS_URL]


def test_oversized_jwks_is_rejected(es_key: SandboxKey, clock: FakeClock, mocked_http: responses.RequestsMock) -> None:
    mocked_http.get(JWKS_URL, json={"keys": [es_key.public_jwk()], "padding": "x" * 300_000})
    verifier = verifier_for(issuers_with({"iss": ISS, "jwks_url": JWKS_URL}), clock)
    with pytest.raises(AuthError, match="larger than"):
        verifier.verify(f"Bearer {token(es_key, clock)}", AUD)


def test_expired_token_makes_no_jwks_request(
    es_key: SandboxKey, clock: FakeClock, mocked_http: responses.RequestsMock
) -> None:
    """Cheap claim checks come before any key fetch, so stale tokens cannot drive traffic to the issuer."""
    mocked_http.get(JWKS_URL, json=jwks([es_key]))
    verifier = verifier_for(issuers_with({"iss": ISS, "jwks_url": JWKS_URL}), clock)
    stale = token(es_key, clock)
    clock.advance(3600)
    with pytest.raises(AuthError, match="expired"):
        verifier.verify(f"Bearer {stale}", AUD)
    assert len(mocked_http.calls) == 0


# --------------------------------------------------------------------------------------------------------------
# Claims
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def es_verifier(es_key: SandboxKey, clock: FakeClock) -> JwtVerifier:
    return verifier_for(issuers_with(inline_issuer([es_key])), clock)


def test_wrong_aud_is_rejected(es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier) -> None:
    with pytest.raises(AuthError, match="aud does not match"):
        es_verifier.verify(f"Bearer {token(es_key, clock, aud='https://cds.example/cds-services/other')}", AUD)


def test_aud_array_containing_the_endpoint_is_accepted(
    es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier
) -> None:
    signed = token(es_key, clock, extra_claims={"aud": ["https://other.example", AUD]})
    assert es_verifier.verify(f"Bearer {signed}", AUD).iss == ISS


def test_aud_array_without_the_endpoint_is_rejected(
    es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier
) -> None:
    signed = token(es_key, clock, extra_claims={"aud": ["https://other.example", AUD + "x"]})
    with pytest.raises(AuthError, match="aud does not match"):
        es_verifier.verify(f"Bearer {signed}", AUD)


@pytest.mark.parametrize("bad_aud", [[], 42, [AUD, 42], {"aud": AUD}])
def test_malformed_aud_is_rejected(
    bad_aud: Any, es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier
) -> None:
    with pytest.raises(AuthError, match="aud"):
        es_verifier.verify(f"Bearer {token(es_key, clock, extra_claims={'aud': bad_aud})}", AUD)


@pytest.mark.parametrize(("token_aud", "expected"), [(AUD + "/", AUD), (AUD, AUD + "/"), (AUD + "//", AUD)])
def test_trailing_slashes_in_aud_do_not_matter(
    token_aud: str, expected: str, es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier
) -> None:
    assert es_verifier.verify(f"Bearer {token(es_key, clock, aud=token_aud)}", expected).iss == ISS


def test_expected_audience_may_be_several_urls(es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier) -> None:
    feedback = AUD + "/feedback"
    assert es_verifier.verify(f"Bearer {token(es_key, clock, aud=feedback)}", [AUD, feedback]).iss == ISS


def test_empty_expected_audience_is_a_programming_error(
    es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier
) -> None:
    with pytest.raises(ValueError, match="audience"):
        es_verifier.verify(f"Bearer {token(es_key, clock)}", [])


def test_expired_token_is_rejected(es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier) -> None:
    signed = token(es_key, clock, lifetime=300)
    clock.advance(300 + 60)  # exactly at exp + leeway
    with pytest.raises(AuthError, match="expired"):
        es_verifier.verify(f"Bearer {signed}", AUD)


def test_token_expired_within_leeway_is_accepted(
    es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier
) -> None:
    signed = token(es_key, clock, lifetime=300)
    clock.advance(300 + 59)
    assert es_verifier.verify(f"Bearer {signed}", AUD).iss == ISS


def test_iat_in_the_future_is_rejected(es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier) -> None:
    signed = sign_cds_jwt(es_key, iss=ISS, aud=AUD, now=clock() + 61)
    with pytest.raises(AuthError, match="iat in the future"):
        es_verifier.verify(f"Bearer {signed}", AUD)


def test_iat_slightly_ahead_within_leeway_is_accepted(
    es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier
) -> None:
    signed = sign_cds_jwt(es_key, iss=ISS, aud=AUD, now=clock() + 30)
    assert es_verifier.verify(f"Bearer {signed}", AUD).iss == ISS


def test_nbf_in_the_future_is_rejected(es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier) -> None:
    signed = token(es_key, clock, extra_claims={"nbf": clock() + 120})
    with pytest.raises(AuthError, match="nbf"):
        es_verifier.verify(f"Bearer {signed}", AUD)


def test_lifetime_longer_than_max_is_rejected(es_key: SandboxKey, clock: FakeClock) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock, max_lifetime=3600)
    assert verifier.verify(f"Bearer {token(es_key, clock, lifetime=3600)}", AUD).iss == ISS
    with pytest.raises(AuthError, match="lifetime longer than 3600"):
        verifier.verify(f"Bearer {token(es_key, clock, lifetime=3601)}", AUD)


def test_exp_before_iat_is_rejected(es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier) -> None:
    signed = token(es_key, clock, extra_claims={"iat": int(clock()) + 30, "exp": int(clock()) + 10})
    with pytest.raises(AuthError, match="exp not after iat"):
        es_verifier.verify(f"Bearer {signed}", AUD)


@pytest.mark.parametrize("claim", ["iss", "aud", "exp", "iat", "jti"])
def test_missing_required_claim_is_rejected(
    claim: str, es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier
) -> None:
    signed = token(es_key, clock, extra_claims={claim: None})
    assert claim not in jwt.decode(signed, options={"verify_signature": False})
    with pytest.raises(AuthError, match=f"missing {claim} claim"):
        es_verifier.verify(f"Bearer {signed}", AUD)


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": "tomorrow"}, "not a number"),
        ({"iat": True}, "not a number"),
        ({"jti": 12345}, "jti"),
        ({"jti": ""}, "jti"),
        ({"jti": "x" * 256}, "jti"),
        ({"tenant": 7}, "tenant"),
    ],
)
def test_malformed_claims_are_rejected(
    claims: dict[str, Any], reason: str, es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier
) -> None:
    with pytest.raises(AuthError, match=reason):
        es_verifier.verify(f"Bearer {token(es_key, clock, extra_claims=claims)}", AUD)


def test_non_string_iss_is_rejected(es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier) -> None:
    claims = {**standard_claims(clock), "iss": 7}
    forged = hand_built_token(
        {"alg": "ES384", "kid": es_key.kid, "typ": "JWT"},
        claims,
        sign=lambda data: ecdsa_raw_signature(es_key.private_key, data, 48),
    )
    with pytest.raises(AuthError, match="missing iss claim"):
        es_verifier.verify(f"Bearer {forged}", AUD)


def test_replayed_jti_is_rejected_and_a_new_jti_passes(
    es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier
) -> None:
    first = token(es_key, clock, jti="once")
    assert es_verifier.verify(f"Bearer {first}", AUD).jti == "once"
    with pytest.raises(AuthError, match="replayed jti"):
        es_verifier.verify(f"Bearer {first}", AUD)
    with pytest.raises(AuthError, match="replayed jti"):  # same jti in a freshly signed token is a replay too
        es_verifier.verify(f"Bearer {token(es_key, clock, jti='once')}", AUD)
    assert es_verifier.verify(f"Bearer {token(es_key, clock, jti='twice')}", AUD).jti == "twice"


def test_jti_is_scoped_per_issuer(es_key: SandboxKey, other_es_key: SandboxKey, clock: FakeClock) -> None:
    other_iss = "https://other-ehr.example"
    verifier = verifier_for(issuers_with(inline_issuer([es_key]), inline_issuer([other_es_key], iss=other_iss)), clock)
    assert verifier.verify(f"Bearer {token(es_key, clock, jti='shared')}", AUD).iss == ISS
    assert verifier.verify(f"Bearer {token(other_es_key, clock, iss=other_iss, jti='shared')}", AUD).iss == other_iss


def test_forged_token_does_not_burn_a_jti(es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier) -> None:
    """jti is remembered only after the signature verified, so an attacker cannot pre-empt a real token."""
    forged = token(generate_key("ES384", kid=es_key.kid), clock, jti="victim")
    with pytest.raises(AuthError, match="bad signature"):
        es_verifier.verify(f"Bearer {forged}", AUD)
    assert es_verifier.verify(f"Bearer {token(es_key, clock, jti='victim')}", AUD).jti == "victim"


def test_reasons_never_contain_the_token(es_key: SandboxKey, clock: FakeClock, es_verifier: JwtVerifier) -> None:
    bad_tokens = [
        token(es_key, clock, aud="https://secret-aud.example"),
        token(generate_key("ES384", kid=es_key.kid), clock),
        token(es_key, clock, extra_headers={"typ": "nope"}),
        token(es_key, clock, extra_claims={"jti": None, "patient": "Patient/123"}),
    ]
    for bad in bad_tokens:
        with pytest.raises(AuthError) as caught:
            es_verifier.verify(f"Bearer {bad}", AUD)
        reason = str(caught.value)
        assert bad not in reason
        assert all(part not in reason for part in bad.split("."))
        assert "secret-aud" not in reason and "Patient/123" not in reason


# --------------------------------------------------------------------------------------------------------------
# ReplayCache
# --------------------------------------------------------------------------------------------------------------


def test_replay_cache_remembers_until_exp_plus_leeway(clock: FakeClock) -> None:
    cache = ReplayCache(leeway=60, clock=clock)
    exp = clock() + 300
    assert cache.seen_or_add(ISS, "j", exp) is False
    assert cache.seen_or_add(ISS, "j", exp) is True
    clock.advance(300 + 59)
    assert cache.seen_or_add(ISS, "j", exp) is True
    clock.advance(1)
    assert cache.seen_or_add(ISS, "other", clock() + 300) is False
    assert len(cache) == 1  # "j" was evicted
    assert cache.seen_or_add(ISS, "j", clock() + 300) is False


def test_replay_cache_is_bounded(clock: FakeClock) -> None:
    cache = ReplayCache(leeway=0, clock=clock, max_entries=3)
    for index, lifetime in enumerate([400, 100, 300]):
        assert cache.seen_or_add(ISS, f"j{index}", clock() + lifetime) is False
    assert cache.seen_or_add(ISS, "j3", clock() + 500) is False
    assert len(cache) == 3
    assert cache.seen_or_add(ISS, "j1", clock() + 100) is False  # the soonest-expiring entry was dropped
    assert cache.seen_or_add(ISS, "j3", clock() + 500) is True


def test_replay_cache_admits_a_jti_exactly_once_across_threads(clock: FakeClock) -> None:
    cache = ReplayCache(clock=clock)
    results: list[bool] = []
    barrier = threading.Barrier(16)

    def worker() -> None:
        barrier.wait()
        results.append(cache.seen_or_add(ISS, "race", clock() + 300))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results.count(False) == 1
    assert results.count(True) == 15


def test_verifier_uses_the_injected_replay_cache(es_key: SandboxKey, clock: FakeClock) -> None:
    cache = ReplayCache(clock=clock)
    cache.seen_or_add(ISS, "pre-seen", clock() + 300)
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock, replay_cache=cache)
    with pytest.raises(AuthError, match="replayed"):
        verifier.verify(f"Bearer {token(es_key, clock, jti='pre-seen')}", AUD)


# --------------------------------------------------------------------------------------------------------------
# TrustedIssuers
# --------------------------------------------------------------------------------------------------------------


def test_trusted_issuers_load_valid_file(tmp_path: Path, es_key: SandboxKey, rs_key: SandboxKey) -> None:
    path = tmp_path / "trusted-issuers.json"
    doc = trusted_issuers_document(ISS, [es_key], [FHIR, "https://ehr.example/fhir2/"], jku=[JKU_URL])
    doc["issuers"].append(
        {"iss": "https://other.example", "jwks_url": JWKS_URL, "fhir_servers": [FHIR], "_comment": "test EHR"}
    )
    doc["issuers"].append({"iss": "https://bare.example", "jwks": jwks([rs_key])})
    write_trusted_issuers(path, doc)

    issuers = TrustedIssuers.load(path)

    assert len(issuers) == 3
    first = issuers.get(ISS)
    assert first is not None
    assert first.jwks == jwks([es_key]) and first.jwks_url is None
    assert first.jku == (JKU_URL,)
    assert first.fhir_servers == (FHIR, "https://ehr.example/fhir2/")
    other = issuers.get("https://other.example")
    assert other is not None and other.jwks is None and other.jwks_url == JWKS_URL and other.jku == ()
    bare = issuers.get("https://bare.example")
    assert bare is not None and bare.fhir_servers == () and bare.jku == ()
    assert issuers.get("https://unknown.example") is None
    assert issuers.all_fhir_servers() == (FHIR, "https://ehr.example/fhir2/")
    assert {issuer.iss for issuer in issuers} == {ISS, "https://other.example", "https://bare.example"}


def _valid_entry() -> dict[str, Any]:
    return {
        "iss": ISS,
        "jwks": {"keys": [{"kty": "EC", "crv": "P-384", "x": "AA", "y": "AA", "kid": "k1"}]},
        "fhir_servers": [FHIR],
    }


def _entry_with(**changes: Any) -> dict[str, Any]:
    entry = _valid_entry()
    for name, value in changes.items():
        if value is _REMOVE:
            entry.pop(name, None)
        else:
            entry[name] = value
    return {"issuers": [entry]}


_REMOVE = object()
_ISS_LABEL = f"issuers[0] (iss '{ISS}')"


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ([], "top level"),
        ({"issuers": [_valid_entry()], "isuers": []}, "isuers"),
        ({}, "issuers: must be a non-empty list"),
        ({"issuers": []}, "issuers: must be a non-empty list"),
        ({"issuers": {"iss": ISS}}, "issuers: must be a non-empty list"),
        ({"issuers": ["https://ehr.example"]}, "issuers[0]: must be a JSON object"),
        (_entry_with(iss=_REMOVE), "issuers[0]: iss is required"),
        (_entry_with(iss=""), "issuers[0]: iss is required"),
        (_entry_with(iss=42), "issuers[0]: iss is required"),
        ({"issuers": [_valid_entry(), _valid_entry()]}, f"issuers[1] (iss '{ISS}'): iss: duplicate"),
        (_entry_with(jwks_url=JWKS_URL), f"{_ISS_LABEL}: jwks/jwks_url: give exactly one"),
        (_entry_with(jwks=_REMOVE), f"{_ISS_LABEL}: jwks/jwks_url: give exactly one"),
        (_entry_with(jwks={"keys": []}), f"{_ISS_LABEL}: jwks: must be a JWK Set"),
        (_entry_with(jwks={"key": []}), f"{_ISS_LABEL}: jwks: must be a JWK Set"),
        (_entry_with(jwks=[{"kid": "k"}]), f"{_ISS_LABEL}: jwks: must be a JWK Set"),
        (_entry_with(jwks={"keys": ["k1"]}), f"{_ISS_LABEL}: jwks.keys[0]: must be a JSON object"),
        (_entry_with(jwks={"keys": [{"kty": "EC"}]}), f"{_ISS_LABEL}: jwks.keys[0]: kid is required"),
        (
            _entry_with(jwks={"keys": [{"kty": "EC", "kid": "a"}, {"kty": "EC", "kid": "a"}]}),
            f"{_ISS_LABEL}: jwks.keys[1]: duplicate kid 'a'",
        ),
        (_entry_with(jwks={"keys": [{"kty": "oct", "kid": "a", "k": "c2VjcmV0"}]}), "jwks.keys[0]: kty must be"),
        (_entry_with(jwks={"keys": [{"kty": "EC", "kid": "a", "d": "AA"}]}), "jwks.keys[0]: contains private key"),
        (_entry_with(jwks=_REMOVE, jwks_url="/jwks.json"), f"{_ISS_LABEL}: jwks_url: must be an absolute http(s)"),
        (_entry_with(jwks=_REMOVE, jwks_url="ftp://x.example/j"), f"{_ISS_LABEL}: jwks_url: must be an absolute"),
        (_entry_with(jwks=_REMOVE, jwks_url=42), f"{_ISS_LABEL}: jwks_url: must be an absolute"),
        (_entry_with(jku=JKU_URL), f"{_ISS_LABEL}: jku: must be a list"),
        (_entry_with(jku=[JKU_URL, "keys.example/jwks"]), f"{_ISS_LABEL}: jku[1]: must be an absolute"),
        (_entry_with(fhir_servers=FHIR), f"{_ISS_LABEL}: fhir_servers: must be a list"),
        (_entry_with(fhir_servers=["https://user@ehr.example/fhir"]), f"{_ISS_LABEL}: fhir_servers[0]: must be"),
        (_entry_with(fhir_servers=["https://ehr.example/fhir/../x"]), f"{_ISS_LABEL}: fhir_servers[0]: must be"),
        (_entry_with(fhir_servers=["gopher://ehr.example/fhir"]), f"{_ISS_LABEL}: fhir_servers[0]: must be"),
        (_entry_with(jwks_uri=JWKS_URL), f"{_ISS_LABEL}: unknown field(s) jwks_uri"),
        (_entry_with(fhirServers=[FHIR]), f"{_ISS_LABEL}: unknown field(s) fhirServers"),
    ],
)
def test_invalid_trusted_issuers_documents_are_explained(doc: Any, expected: str) -> None:
    with pytest.raises(TrustedIssuersError) as caught:
        TrustedIssuers.from_document(doc)
    assert expected in str(caught.value)


def test_trusted_issuers_load_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "issuers.json"
    path.write_text(json.dumps(_entry_with(jwks=_REMOVE)))
    with pytest.raises(TrustedIssuersError, match="jwks/jwks_url") as caught:
        TrustedIssuers.load(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_trusted_issuers_load_reports_invalid_json(tmp_path: Path) -> None:
    path = tmp_path / "issuers.json"
    path.write_text('{"issuers": [}')
    with pytest.raises(TrustedIssuersError, match=r"not valid JSON: .*line 1 column 14"):
        TrustedIssuers.load(path)


def test_trusted_issuers_load_reports_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TrustedIssuersError, match="cannot read"):
        TrustedIssuers.load(tmp_path / "absent.json")


def test_trusted_issuers_error_is_a_value_error() -> None:
    assert issubclass(TrustedIssuersError, ValueError)


# --------------------------------------------------------------------------------------------------------------
# fhir_server_allowed
# --------------------------------------------------------------------------------------------------------------

_PREFIX = ("https://ehr.example/fhir",)


@pytest.mark.parametrize(
    ("url", "prefixes", "allowed"),
    [
        ("https://ehr.example/fhir", _PREFIX, True),
        ("https://ehr.example/fhir/", _PREFIX, True),
        ("https://ehr.example/fhir/Patient/1", _PREFIX, True),
        ("https://ehr.example/fhir/Observation?patient=1&_count=50", _PREFIX, True),
        ("HTTPS://EHR.Example/fhir/Patient/1", _PREFIX, True),
        ("https://ehr.example:443/fhir/Patient/1", _PREFIX, True),
        ("https://ehr.example/fhir", ("https://ehr.example/fhir/",), True),
        ("http://ehr.example/fhir/Patient/1", ("http://EHR.example:80/fhir",), True),
        ("https://ehr.example/fhir/Patient/1", ("https://ehr.example/fhir?tenant=1#frag",), True),
        ("https://ehr.example/anything", ("https://ehr.example/",), True),
        ("https://ehr.example/fhir/Patient/1", ("https://other.example/fhir", *_PREFIX), True),
        ("https://ehr.example/fhirx", _PREFIX, False),
        ("https://ehr.example/fhirx/Patient", _PREFIX, False),
        ("https://ehr.example/FHIR/Patient", _PREFIX, False),
        ("https://ehr.example/", _PREFIX, False),
        ("https://ehr.example/fhir/../admin", _PREFIX, False),
        ("https://ehr.example/fhir/./Patient", _PREFIX, False),
        ("https://ehr.example/fhir/..", _PREFIX, False),
        ("https://ehr.example/fhir/%2e%2e/admin", _PREFIX, False),
        ("https://ehr.example/fhir/%2E%2E/admin", _PREFIX, False),
        ("https://ehr.example/fhir/.%2e/admin", _PREFIX, False),
        ("https://ehr.example/fhir/%252e%252e/admin", _PREFIX, False),
        ("https://ehr.example/fhir/..;/admin", _PREFIX, False),
        ("https://ehr.example/fhir/x%2f..%2f..%2fadmin", _PREFIX, False),
        ("https://ehr.example/fhir/a\\..\\admin", _PREFIX, False),
        ("https://user@ehr.example/fhir/Patient/1", _PREFIX, False),
        ("https://user:pw@ehr.example/fhir/Patient/1", _PREFIX, False),
        ("https://ehr.example@evil.example/fhir", _PREFIX, False),
        ("https://ehr.example\\@evil.example/fhir", _PREFIX, False),
        ("http://ehr.example/fhir/Patient/1", _PREFIX, False),
        ("https://ehr.example:8443/fhir/Patient/1", _PREFIX, False),
        ("https://evil.example/fhir", _PREFIX, False),
        ("https://ehr.example.evil.example/fhir", _PREFIX, False),
        ("ftp://ehr.example/fhir", _PREFIX, False),
        ("file:///etc/passwd", ("file:///etc",), False),
        ("//ehr.example/fhir", _PREFIX, False),
        ("/fhir/Patient/1", _PREFIX, False),
        ("https://ehr.example/fhir/Patient/1 ", _PREFIX, False),
        ("https://ehr.example:99999/fhir", _PREFIX, False),
        ("", _PREFIX, False),
        ("https://ehr.example/fhir/Patient/1", (), False),
        ("https://ehr.example/fhir/Patient/1", ("ehr.example/fhir",), False),
        ("https://ehr.example/fhir/Patient/1", ("https://ehr.example/fhir/../",), False),
    ],
)
def test_fhir_server_allowed(url: str, prefixes: tuple[str, ...], allowed: bool) -> None:
    assert fhir_server_allowed(url, prefixes) is allowed


def test_fhir_server_allowed_accepts_any_iterable() -> None:
    assert fhir_server_allowed("https://ehr.example/fhir/Patient", iter(_PREFIX)) is True
    assert fhir_server_allowed("https://ehr.example/fhir/Patient", (p for p in ())) is False


# --------------------------------------------------------------------------------------------------------------
# sandbox.signing
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_name", "kty", "public_members"), [("es_key", "EC", {"crv", "x", "y"}), ("rs_key", "RSA", {"n", "e"})]
)
def test_public_jwk_has_public_parameters_only(
    key_name: str, kty: str, public_members: set[str], request: pytest.FixtureRequest
) -> None:
    key: SandboxKey = request.getfixturevalue(key_name)
    jwk = key.public_jwk()
    assert set(jwk) == {"kty", "kid", "alg", "use", "key_ops"} | public_members
    assert (jwk["kty"], jwk["kid"], jwk["alg"], jwk["use"], jwk["key_ops"]) == (
        kty,
        key.kid,
        key.alg,
        "sig",
        ["verify"],
    )
    assert not set(PRIVATE_JWK_MEMBERS) & set(jwk)
    if kty == "EC":
        assert jwk["crv"] == "P-384"


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
def test_save_and_load_round_trip(alg: str, tmp_path: Path) -> None:
    key = generate_key(alg, kid=f"{alg}-kid")
    path = tmp_path / "keys" / "client.json"

    save_key(key, path)
    loaded = load_key(path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(json.loads(path.read_text())) == {"kid", "alg", "private_key_pem"}
    assert (loaded.kid, loaded.alg) == (key.kid, alg)
    assert loaded.public_jwk() == key.public_jwk()
    signed = sign_cds_jwt(loaded, iss=ISS, aud=AUD)
    assert jwt.decode(signed, jwt.PyJWK(key.public_jwk()), algorithms=[alg], audience=AUD)["iss"] == ISS


def test_save_key_tightens_mode_of_an_existing_file(es_key: SandboxKey, tmp_path: Path) -> None:
    path = tmp_path / "client.json"
    path.write_text("{}")
    path.chmod(0o644)
    save_key(es_key, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(path).kid == es_key.kid


def test_load_key_rejects_a_key_that_does_not_fit_its_alg(rs_key: SandboxKey, tmp_path: Path) -> None:
    path = tmp_path / "client.json"
    save_key(rs_key, path)
    doc = json.loads(path.read_text())
    path.write_text(json.dumps({**doc, "alg": "ES384"}))
    with pytest.raises(ValueError, match="ES384 needs an EC P-384"):
        load_key(path)
    path.write_text(json.dumps({"kid": "x"}))
    with pytest.raises(ValueError, match="private_key_pem"):
        load_key(path)


def test_generate_key_rejects_other_algorithms() -> None:
    for alg in ("HS256", "RS256", "ES256", "none"):
        with pytest.raises(ValueError, match="unsupported alg"):
            generate_key(alg)


def test_default_kid_is_the_rfc7638_thumbprint() -> None:
    rfc_example = {
        "kty": "RSA",
        "e": "AQAB",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjB"
            "ZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8"
            "KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_"
            "xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
        ),
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert _jwk_thumbprint(rfc_example) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    key = generate_key("ES384")
    assert key.kid == _jwk_thumbprint(key.public_jwk())
    assert generate_key("ES384").kid != key.kid


def test_sign_cds_jwt_header_and_claims(es_key: SandboxKey) -> None:
    signed = sign_cds_jwt(es_key, iss=ISS, aud=AUD, lifetime=120, jku=JKU_URL, now=T0 + 0.9)
    header = jwt.get_unverified_header(signed)
    claims = jwt.decode(signed, options={"verify_signature": False})

    assert header == {"alg": "ES384", "kid": es_key.kid, "typ": "JWT", "jku": JKU_URL}
    assert set(claims) == {"iss", "aud", "exp", "iat", "jti"}
    assert (claims["iss"], claims["aud"], claims["iat"], claims["exp"]) == (ISS, AUD, int(T0), int(T0) + 120)
    assert len(claims["jti"]) == 64 and int(claims["jti"], 16) >= 0
    assert sign_cds_jwt(es_key, iss=ISS, aud=AUD) != sign_cds_jwt(es_key, iss=ISS, aud=AUD)  # fresh jti each time


def test_sign_cds_jwt_extra_claims_and_headers(es_key: SandboxKey) -> None:
    signed = sign_cds_jwt(
        es_key,
        iss=ISS,
        aud=AUD,
        jti="fixed",
        extra_claims={"tenant": "t1", "iat": None},
        extra_headers={"typ": None, "x-test": "1"},
    )
    header = jwt.get_unverified_header(signed)
    claims = jwt.decode(signed, options={"verify_signature": False})
    assert "typ" not in header and header["x-test"] == "1" and header["kid"] == es_key.kid
    assert claims["tenant"] == "t1" and claims["jti"] == "fixed" and "iat" not in claims
    with pytest.raises(ValueError, match="alg"):
        sign_cds_jwt(es_key, iss=ISS, aud=AUD, extra_headers={"alg": "HS256"})


def test_trusted_issuers_document_round_trips_through_the_loader(
    es_key: SandboxKey, rs_key: SandboxKey, tmp_path: Path, clock: FakeClock
) -> None:
    doc = trusted_issuers_document(ISS, [es_key, rs_key], [FHIR], jku=[JKU_URL])
    assert doc == {"issuers": [{"iss": ISS, "jwks": jwks([es_key, rs_key]), "jku": [JKU_URL], "fhir_servers": [FHIR]}]}
    path = tmp_path / "trusted.json"
    write_trusted_issuers(path, doc)
    verifier = verifier_for(TrustedIssuers.load(path), clock)
    assert verifier.verify(f"Bearer {token(rs_key, clock)}", AUD).fhir_servers == (FHIR,)


def test_write_trusted_issuers_refuses_an_invalid_document(tmp_path: Path) -> None:
    path = tmp_path / "trusted.json"
    with pytest.raises(TrustedIssuersError, match="issuers"):
        write_trusted_issuers(path, {"issuers": []})
    assert not path.exists()


# --------------------------------------------------------------------------------------------------------------
# Replay protection shared across processes


def test_shared_replay_cache_consults_the_shared_store_and_fails_closed() -> None:
    from cds_service.auth import SharedReplayCache

    claimed: set[tuple[str, str]] = set()

    def claim(iss: str, jti: str, forget_after: float) -> bool:
        if (iss, jti) in claimed:
            return False
        claimed.add((iss, jti))
        return True

    worker_a, worker_b = SharedReplayCache(claim), SharedReplayCache(claim)
    exp = time.time() + 300
    assert worker_a.seen_or_add("iss", "j1", exp) is False
    assert worker_b.seen_or_add("iss", "j1", exp) is True  # used by the other worker
    assert worker_a.seen_or_add("iss", "j1", exp) is True  # this worker remembers it itself

    def broken(iss: str, jti: str, forget_after: float) -> bool:
        raise ConnectionError("database down")

    assert SharedReplayCache(broken).seen_or_add("iss", "j2", exp) is True  # cannot check: refuse


# -- header and payload fields are type-checked before use ------------------------------------------------


@pytest.mark.parametrize(
    "alg", [["ES384"], {"ES384": True}, 384, None, True, "es384", "ES384\x00", "x" * 300], ids=lambda a: repr(a)[:12]
)
def test_alg_of_any_other_type_is_refused_not_a_crash(alg: Any, es_key: SandboxKey, clock: FakeClock) -> None:
    """An `alg` sent as a list must be refused (it used to be hashed and raise TypeError: a 500)."""
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    forged = hand_built_token({"alg": alg, "kid": es_key.kid, "typ": "JWT"}, standard_claims(clock), lambda _d: b"s")

    with pytest.raises(AuthError, match="alg"):
        verifier.verify(f"Bearer {forged}", AUD)


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "ES384", "kid": ["k"], "typ": "JWT"},
        {"alg": "ES384", "kid": "k", "typ": {"JWT": 1}},
        {"alg": "ES384", "kid": "k", "typ": "JWT", "jku": ["https://x"]},
    ],
)
def test_other_header_fields_of_the_wrong_type_are_refused(
    header: dict[str, Any], es_key: SandboxKey, clock: FakeClock
) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    forged = hand_built_token(header, standard_claims(clock), lambda _d: b"s")
    with pytest.raises(AuthError):
        verifier.verify(f"Bearer {forged}", AUD)


@pytest.mark.parametrize(
    "segment",
    [
        b"[" * 3000 + b"]" * 3000,  # deeper than the JSON decoder's recursion limit
        b'{"alg": "ES384", "alg": "RS384", "kid": "k", "typ": "JWT"}',  # which alg would win?
        b'{"alg": "ES384", "kid": "k", "typ": "JWT", "x": 1e999}',
        b'"just a string"',
        b"\xff\xfe not utf-8",
    ],
    ids=["deep", "duplicate-alg", "infinite", "not-an-object", "not-utf8"],
)
def test_malformed_header_segments_are_an_auth_error(segment: bytes, es_key: SandboxKey, clock: FakeClock) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    payload = b64url(json.dumps(standard_claims(clock)).encode())
    forged = f"{b64url(segment)}.{payload}.{b64url(b'sig')}"
    with pytest.raises(AuthError, match="malformed token header"):
        verifier.verify(f"Bearer {forged}", AUD)


def test_duplicate_claims_are_a_malformed_payload(es_key: SandboxKey, clock: FakeClock) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    header = b64url(json.dumps({"alg": "ES384", "kid": es_key.kid, "typ": "JWT"}).encode())
    payload = json.dumps(standard_claims(clock))[:-1] + f', "iss": "{ISS}-other"}}'
    forged = f"{header}.{b64url(payload.encode())}.{b64url(b'sig')}"
    with pytest.raises(AuthError, match="malformed token payload"):
        verifier.verify(f"Bearer {forged}", AUD)


def test_jti_with_a_control_character_is_refused(es_key: SandboxKey, clock: FakeClock) -> None:
    verifier = verifier_for(issuers_with(inline_issuer([es_key])), clock)
    signed = token(es_key, clock, jti="abc\x00def")
    with pytest.raises(AuthError, match="jti"):
        verifier.verify(f"Bearer {signed}", AUD)
