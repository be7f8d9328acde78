"""Bearer tokens: every refusal says why without quoting the token; every key source verifies."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from workers.api.auth import AuthError, TokenVerifier, bearer, issue_token, key_id
from workers.api.roles import Principal, Role
from workers.runtime.errors import ConfigError, TransientError, ValidationFailedError
from workers.runtime.settings import Settings

SECRET = "s" * 40
OTHER_SECRET = "t" * 40
ISSUER = "cul8er"
AUDIENCE = "cul8er-api"


# -- keys and settings --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _private_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


def _settings(tmp_path: Path, **api: Any) -> Settings:
    """Settings with only the given API keys configured (nothing read from .env)."""
    values: dict[str, Any] = {
        "api_jwt_secret": None,
        "api_jwt_public_key_file": None,
        "api_jwks_url": None,
        "api_jwt_private_key_file": None,
        "api_jwt_issuer": ISSUER,
        "api_jwt_audience": AUDIENCE,
        "api_jwt_leeway": 30.0,
        "api_jwt_algorithms": ["HS256", "RS256", "ES256"],
    }
    values.update(api)
    return Settings(_env_file=None, data_dir=tmp_path, **values)


@pytest.fixture
def hs_settings(tmp_path) -> Settings:
    return _settings(tmp_path, api_jwt_secret=SECRET)


@pytest.fixture
def rs_settings(tmp_path, rsa_key) -> Settings:
    """RS256 only: a public key to verify, the private key to sign."""
    return _settings(
        tmp_path,
        api_jwt_public_key_file=_write(tmp_path, "public.pem", _public_pem(rsa_key)),
        api_jwt_private_key_file=_write(tmp_path, "private.pem", _private_pem(rsa_key)),
    )


def _claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "role": "operator",
        "iat": now,
        "exp": now + 600,
    }
    claims.update(changes)
    return {name: value for name, value in claims.items() if value is not None}


def _hs(**changes: Any) -> str:
    return jwt.encode(_claims(**changes), SECRET, algorithm="HS256")


def _b64(data: dict[str, Any]) -> str:
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _hs256_with_public_pem(key: Any) -> str:
    """Algorithm confusion: the public key's PEM bytes as an HMAC secret.

    PyJWT refuses to sign with such a key, so the token is built by hand as an attacker would.
    """
    signing_input = f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64(_claims())}"
    mac = hmac.new(_public_pem(key), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def refused(verifier: TokenVerifier, token: str) -> str:
    """The reason ``token`` is refused, checked never to quote the token or a part of it."""
    with pytest.raises(AuthError) as error:
        verifier.verify(token)
    message = str(error.value)
    assert error.value.code == "unauthorized"
    assert token not in message
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in message
    return message


# -- success ------------------------------------------------------------------------------------


def test_hs256_round_trip(hs_settings):
    token = issue_token(hs_settings, subject="alice", role=Role.OPERATOR)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    principal = TokenVerifier(hs_settings).verify(token)
    assert principal == Principal(subject="alice", role=Role.OPERATOR, tenants=frozenset())


def test_a_tenant_owner_token_carries_its_tenants(hs_settings):
    token = issue_token(
        hs_settings, subject="bob", role=Role.TENANT_OWNER, tenants=["acme", "globex", "acme"]
    )
    principal = TokenVerifier(hs_settings).verify(token)
    assert principal.role is Role.TENANT_OWNER
    assert principal.tenants == frozenset({"acme", "globex"})


def test_other_roles_get_no_tenants_even_if_the_token_lists_some(hs_settings):
    principal = TokenVerifier(hs_settings).verify(_hs(role="viewer", tenants=["acme"]))
    assert principal.tenants == frozenset()


def test_rs256_with_a_pem_public_key(rs_settings, rsa_key):
    token = issue_token(rs_settings, subject="ci", role=Role.PLUGIN_DEVELOPER)
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256"
    assert header["kid"] == key_id(rsa_key.public_key())
    assert TokenVerifier(rs_settings).verify(token).role is Role.PLUGIN_DEVELOPER


def test_es256_with_a_pem_public_key(tmp_path, ec_key):
    settings = _settings(
        tmp_path,
        api_jwt_public_key_file=_write(tmp_path, "ec-public.pem", _public_pem(ec_key)),
        api_jwt_private_key_file=_write(tmp_path, "ec-private.pem", _private_pem(ec_key)),
    )
    token = issue_token(settings, subject="billing-svc", role=Role.BILLING)
    assert jwt.get_unverified_header(token)["alg"] == "ES256"
    verifier = TokenVerifier(settings)
    assert verifier.algorithms == frozenset({"ES256"})
    assert verifier.verify(token).subject == "billing-svc"


def test_expiry_within_the_leeway_is_accepted(hs_settings):
    now = int(time.time())
    token = _hs(iat=now - 600, exp=now - 10)
    assert TokenVerifier(hs_settings).verify(token).subject == "alice"


# -- a JWKS served over HTTP --------------------------------------------------------------------


class _JWKS:
    """A JWK set on 127.0.0.1, counting its fetches."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.body = json.dumps({"keys": keys}).encode()
        self.fetches = 0
        jwks = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                jwks.fetches += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(jwks.body)))
                self.end_headers()
                self.wfile.write(jwks.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/.well-known/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)


@pytest.fixture
def jwks(rsa_key) -> Iterator[_JWKS]:
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key(), as_dict=True)
    jwk.update(kid=key_id(rsa_key.public_key()), use="sig", alg="RS256")
    served = _JWKS([jwk])
    served.thread.start()
    yield served
    served.server.shutdown()
    served.server.server_close()
    served.thread.join(timeout=5)


def test_rs256_from_a_jwks_fetched_lazily_and_cached(tmp_path, rsa_key, jwks):
    signer = _settings(
        tmp_path, api_jwt_private_key_file=_write(tmp_path, "k.pem", _private_pem(rsa_key))
    )
    verifier = TokenVerifier(_settings(tmp_path, api_jwks_url=jwks.url))
    assert jwks.fetches == 0
    for subject in ("svc-a", "svc-b", "svc-c"):
        token = issue_token(signer, subject=subject, role=Role.VIEWER)
        assert verifier.verify(token).subject == subject
    assert jwks.fetches == 1


def test_a_jwks_token_signed_by_another_key_is_refused(tmp_path, rsa_key, other_rsa_key, jwks):
    verifier = TokenVerifier(_settings(tmp_path, api_jwks_url=jwks.url))
    # The published key id, but the wrong key's signature.
    token = jwt.encode(
        _claims(), other_rsa_key, algorithm="RS256", headers={"kid": key_id(rsa_key.public_key())}
    )
    assert refused(verifier, token) == "bad signature"
    unknown_kid = jwt.encode(_claims(), other_rsa_key, algorithm="RS256", headers={"kid": "nope"})
    assert "no key" in refused(verifier, unknown_kid)


def test_refused_algorithms_never_reach_the_jwks(tmp_path, rsa_key, jwks):
    verifier = TokenVerifier(_settings(tmp_path, api_jwks_url=jwks.url))
    none_token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(_claims())}."
    assert "not allowed" in refused(verifier, none_token)
    confused = _hs256_with_public_pem(rsa_key)
    assert "not allowed" in refused(verifier, confused)
    assert jwks.fetches == 0


def test_a_jwks_that_does_not_answer_is_the_servers_trouble(tmp_path, rsa_key):
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = closed.server_address[1]
    closed.server_close()
    verifier = TokenVerifier(_settings(tmp_path, api_jwks_url=f"http://127.0.0.1:{port}/jwks"))
    token = jwt.encode(_claims(), rsa_key, algorithm="RS256", headers={"kid": "k"})
    with pytest.raises(TransientError) as error:
        verifier.verify(token)
    assert token not in str(error.value)


# -- refusals -----------------------------------------------------------------------------------


def test_expired(hs_settings):
    now = int(time.time())
    token = _hs(iat=now - 3600, exp=now - 120)
    assert refused(TokenVerifier(hs_settings), token) == "token expired"


def test_not_yet_valid_beyond_the_leeway(hs_settings):
    token = issue_token(
        hs_settings, subject="alice", role=Role.VIEWER, not_before=int(time.time()) + 600
    )
    assert refused(TokenVerifier(hs_settings), token) == "token not yet valid"
    soon = issue_token(
        hs_settings, subject="alice", role=Role.VIEWER, not_before=int(time.time()) + 5
    )
    assert TokenVerifier(hs_settings).verify(soon).subject == "alice"


def test_signed_with_another_secret(hs_settings):
    token = jwt.encode(_claims(), OTHER_SECRET, algorithm="HS256")
    assert refused(TokenVerifier(hs_settings), token) == "bad signature"


def test_signed_with_another_rsa_key(rs_settings, other_rsa_key):
    token = jwt.encode(_claims(), other_rsa_key, algorithm="RS256")
    assert refused(TokenVerifier(rs_settings), token) == "bad signature"


def test_wrong_audience(hs_settings):
    assert refused(TokenVerifier(hs_settings), _hs(aud="someone-else")) == "wrong audience"


def test_wrong_issuer(hs_settings):
    assert refused(TokenVerifier(hs_settings), _hs(iss="evil")) == "wrong issuer"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_crafted_by_hand(hs_settings, alg):
    token = f"{_b64({'alg': alg, 'typ': 'JWT'})}.{_b64(_claims())}."
    assert refused(TokenVerifier(hs_settings), token) == f"algorithm {alg!r} is not allowed"


def test_hs256_signed_with_the_public_key_when_only_rs256_is_configured(rs_settings, rsa_key):
    token = _hs256_with_public_pem(rsa_key)
    verifier = TokenVerifier(rs_settings)
    assert verifier.algorithms == frozenset({"RS256"})
    assert refused(verifier, token) == "algorithm 'HS256' is not allowed"


def test_hs256_with_the_public_key_is_checked_against_the_secret_when_both_exist(tmp_path, rsa_key):
    settings = _settings(
        tmp_path,
        api_jwt_secret=SECRET,
        api_jwt_public_key_file=_write(tmp_path, "public.pem", _public_pem(rsa_key)),
    )
    token = _hs256_with_public_pem(rsa_key)
    assert refused(TokenVerifier(settings), token) == "bad signature"


def test_an_algorithm_left_out_of_the_settings_is_refused(tmp_path):
    settings = _settings(tmp_path, api_jwt_secret=SECRET, api_jwt_algorithms=["HS512"])
    assert refused(TokenVerifier(settings), _hs()) == "algorithm 'HS256' is not allowed"


def test_unknown_role(hs_settings):
    assert refused(TokenVerifier(hs_settings), _hs(role="superuser")) == "unknown role 'superuser'"


@pytest.mark.parametrize("claim", ["sub", "role", "exp", "iat", "iss", "aud"])
def test_missing_claim(hs_settings, claim):
    token = jwt.encode(
        {k: v for k, v in _claims().items() if k != claim}, SECRET, algorithm="HS256"
    )
    assert refused(TokenVerifier(hs_settings), token) == f"missing claim {claim!r}"


def test_a_tenant_owner_without_tenants(hs_settings):
    verifier = TokenVerifier(hs_settings)
    assert refused(verifier, _hs(role="tenant_owner")) == "missing claim 'tenants'"
    assert "malformed claim 'tenants'" in refused(verifier, _hs(role="tenant_owner", tenants="a"))
    assert "malformed claim 'tenants'" in refused(verifier, _hs(role="tenant_owner", tenants=[1]))


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "eyJhbGciOiJIUzI1NiJ9", "x" * 300])
def test_malformed(hs_settings, token):
    with pytest.raises(AuthError) as error:
        TokenVerifier(hs_settings).verify(token)
    assert str(error.value) == "malformed token" or "not allowed" in str(error.value)
    if token:
        assert token not in str(error.value)


def test_a_payload_that_is_not_json_is_malformed(hs_settings):
    signing_input = f"{_b64({'alg': 'HS256'})}.{base64.urlsafe_b64encode(b'[1').decode()}"
    token = f"{signing_input}.c2ln"
    assert refused(TokenVerifier(hs_settings), token) in ("malformed token", "bad signature")


# -- the Authorization header -------------------------------------------------------------------


def test_bearer():
    assert bearer("Bearer abc.def.ghi") == "abc.def.ghi"
    assert bearer("bearer  abc.def.ghi ") == "abc.def.ghi"
    for header in (
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "abc.def.ghi",
        "Bearer a b",
    ):
        with pytest.raises(AuthError, match="^missing bearer token$"):
            bearer(header)


# -- configuration ------------------------------------------------------------------------------


def test_nothing_to_verify_with_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="CUL8ER_API_JWT_SECRET.*CUL8ER_API_JWKS_URL"):
        TokenVerifier(_settings(tmp_path))


def test_nothing_to_sign_with_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="CUL8ER_API_JWT_PRIVATE_KEY_FILE.*CUL8ER_API_JWT_SECRET"):
        issue_token(_settings(tmp_path), subject="alice", role=Role.ADMIN)


def test_none_in_the_settings_is_a_config_error(tmp_path):
    settings = _settings(tmp_path, api_jwt_secret=SECRET, api_jwt_algorithms=["HS256", "none"])
    with pytest.raises(ConfigError, match="none"):
        TokenVerifier(settings)


def test_a_short_secret_is_a_config_error(tmp_path):
    settings = _settings(tmp_path, api_jwt_secret="short")
    with pytest.raises(ConfigError, match="at least 32 bytes") as error:
        TokenVerifier(settings)
    assert "short" not in str(error.value)  # the secret itself is never shown
    with pytest.raises(ConfigError):
        issue_token(settings, subject="alice", role=Role.ADMIN)


def test_a_bad_public_key_file_is_a_config_error(tmp_path):
    path = _write(tmp_path, "bad.pem", b"not a key")
    with pytest.raises(ConfigError, match="CUL8ER_API_JWT_PUBLIC_KEY_FILE"):
        TokenVerifier(_settings(tmp_path, api_jwt_public_key_file=path))


def test_signing_with_an_algorithm_the_settings_refuse(tmp_path, rsa_key):
    settings = _settings(
        tmp_path,
        api_jwt_private_key_file=_write(tmp_path, "k.pem", _private_pem(rsa_key)),
        api_jwt_algorithms=["ES256"],
    )
    with pytest.raises(ConfigError, match="RS256"):
        issue_token(settings, subject="alice", role=Role.ADMIN)


def test_a_token_request_that_makes_no_sense(hs_settings):
    with pytest.raises(ValidationFailedError) as error:
        issue_token(hs_settings, subject="", role=Role.VIEWER, tenants=["acme"], ttl_seconds=0)
    fields = {item["field"] for item in error.value.errors}
    assert fields == {"subject", "ttl_seconds", "tenants"}
