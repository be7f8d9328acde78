"""Bearer tokens: verify a JWT into a ``Principal``, issue one, read the ``Authorization`` header.

Verification (``TokenVerifier``) accepts only the algorithms of ``api_jwt_algorithms`` that have
a key: HS256/384/512 with ``api_jwt_secret``; RS*/PS*/ES* with ``api_jwt_public_key_file`` (a PEM
public key) or ``api_jwks_url`` (keys fetched on first use and cached). ``none`` never is. A
token's header ``alg`` is checked against that list before any key is looked up, and the key is
chosen by the algorithm, so an HS256 token is never checked against a public key. The claims
``exp``, ``iat``, ``sub``, ``role``, ``iss`` and ``aud`` are required, ``nbf`` is checked when
present, both with ``api_jwt_leeway`` seconds of clock skew; a tenant owner's token lists its
tenants in ``tenants``.

Every refusal is an ``AuthError`` (HTTP 401) saying why; no message ever carries the token.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey as _ECPublic
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from workers.api.roles import Principal, Role
from workers.runtime.errors import (
    ConfigError,
    PermanentError,
    TransientError,
    ValidationFailedError,
)
from workers.runtime.settings import Settings

__all__ = [
    "AuthError",
    "REQUIRED_CLAIMS",
    "TokenVerifier",
    "bearer",
    "issue_token",
    "key_id",
]

#: Claims every token must carry.
REQUIRED_CLAIMS: Final = ("exp", "iat", "sub", "role", "iss", "aud")
#: The algorithms cul8er knows, by the key they need.
HMAC_ALGORITHMS: Final = frozenset({"HS256", "HS384", "HS512"})
RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
EC_ALGORITHMS: Final = frozenset({"ES256", "ES384", "ES512"})
#: RFC 7518 §3.2: an HMAC key at least as long as the hash.
MIN_SECRET_BYTES: Final = 32
#: Seconds a JWKS answer is kept, and the longest wait for it.
JWKS_LIFESPAN: Final = 300.0
JWKS_TIMEOUT: Final = 5.0
_EC_CURVES: Final = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


class AuthError(PermanentError):
    """The request carries no valid bearer token (HTTP 401); the message says why."""

    code = "unauthorized"


PublicKey = RSAPublicKey | _ECPublic


class TokenVerifier:
    """Checks bearer tokens against the API settings; build it once, call ``verify`` per request."""

    def __init__(self, settings: Settings) -> None:
        self._issuer = settings.api_jwt_issuer
        self._audience = settings.api_jwt_audience
        self._leeway = settings.api_jwt_leeway
        self._secret = _secret(settings)
        self._public_key = _public_key(settings.api_jwt_public_key_file)
        self._jwks = (
            jwt.PyJWKClient(
                settings.api_jwks_url,
                cache_keys=True,
                lifespan=JWKS_LIFESPAN,
                timeout=JWKS_TIMEOUT,
            )
            if settings.api_jwks_url
            else None
        )
        self.algorithms = self._usable(_configured_algorithms(settings))
        if not self.algorithms:
            raise ConfigError(
                "no bearer token can be verified: set CUL8ER_API_JWT_SECRET (HS256), or "
                "CUL8ER_API_JWT_PUBLIC_KEY_FILE or CUL8ER_API_JWKS_URL (RS256, ES256), with a "
                "matching algorithm in CUL8ER_API_JWT_ALGORITHMS"
            )

    def _usable(self, configured: frozenset[str]) -> frozenset[str]:
        """The configured algorithms that have a key to check them with."""
        usable: set[str] = set()
        if self._secret is not None:
            usable |= configured & HMAC_ALGORITHMS
        if self._jwks is not None:
            usable |= configured & (RSA_ALGORITHMS | EC_ALGORITHMS)
        elif isinstance(self._public_key, RSAPublicKey):
            usable |= configured & RSA_ALGORITHMS
        elif isinstance(self._public_key, _ECPublic):
            usable |= configured & {_EC_CURVES.get(self._public_key.curve.name, "")}
        return frozenset(usable)

    def verify(self, token: str) -> Principal:
        """The principal ``token`` stands for; ``AuthError`` says why it is refused."""
        if not isinstance(token, str) or not token:
            raise AuthError("malformed token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise AuthError("malformed token") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self.algorithms:
            shown = algorithm[:20] if isinstance(algorithm, str) else algorithm
            raise AuthError(f"algorithm {shown!r} is not allowed")
        key = self._key_for(algorithm, token)
        claims = self._decode(token, key, algorithm)
        return _principal(claims)

    def _key_for(self, algorithm: str, token: str) -> jwt.PyJWK | PublicKey | bytes:
        """The key that checks ``algorithm``: chosen by the algorithm, never by the token."""
        if algorithm in HMAC_ALGORITHMS:
            assert self._secret is not None  # _usable allowed no HMAC algorithm without it
            return self._secret
        if self._jwks is None:
            assert self._public_key is not None  # nor an asymmetric one without a key
            return self._public_key
        try:
            return self._jwks.get_signing_key_from_jwt(token)
        except (jwt.PyJWKClientConnectionError, ValueError):
            # Down, or answering something that is not JSON: the server's trouble, not the token's.
            raise TransientError("the JWKS of CUL8ER_API_JWKS_URL cannot be fetched") from None
        except jwt.PyJWTError:
            raise AuthError("no key of the JWKS matches the token's key id") from None

    def _decode(
        self, token: str, key: jwt.PyJWK | PublicKey | bytes, algorithm: str
    ) -> dict[str, Any]:
        """The verified claims; every PyJWT refusal becomes an ``AuthError`` saying why."""
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": list(REQUIRED_CLAIMS), "verify_signature": True},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(_reason(exc)) from None
        return claims


def _reason(exc: Exception) -> str:
    """Why PyJWT refused a token, in words that never quote it."""
    reasons: list[tuple[type[Exception], str]] = [
        (jwt.ExpiredSignatureError, "token expired"),
        (jwt.ImmatureSignatureError, "token not yet valid"),
        (jwt.InvalidSignatureError, "bad signature"),
        (jwt.InvalidAudienceError, "wrong audience"),
        (jwt.InvalidIssuerError, "wrong issuer"),
        (jwt.InvalidAlgorithmError, "algorithm not allowed"),
        (jwt.InvalidKeyError, "algorithm not allowed for the configured key"),
        (jwt.exceptions.InvalidSubjectError, "malformed claim 'sub'"),
        (jwt.InvalidIssuedAtError, "malformed claim 'iat'"),
    ]
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing claim {exc.claim!r}"
    for kind, reason in reasons:
        if isinstance(exc, kind):
            return reason
    return "malformed token"


def _principal(claims: dict[str, Any]) -> Principal:
    """The principal of verified claims: a known role, a subject, a tenant owner's tenants."""
    subject = claims["sub"]
    if not isinstance(subject, str) or not subject:
        raise AuthError("malformed claim 'sub'")
    raw_role = claims["role"]
    try:
        role = Role(raw_role)
    except ValueError:
        shown = raw_role[:40] if isinstance(raw_role, str) else raw_role
        raise AuthError(f"unknown role {shown!r}") from None
    if role is not Role.TENANT_OWNER:
        return Principal(subject=subject, role=role, tenants=frozenset())
    tenants = claims.get("tenants")
    if tenants is None:
        raise AuthError("missing claim 'tenants'")
    if not isinstance(tenants, list) or not all(isinstance(t, str) and t for t in tenants):
        raise AuthError("malformed claim 'tenants': a list of tenant ids")
    return Principal(subject=subject, role=role, tenants=frozenset(tenants))


def _configured_algorithms(settings: Settings) -> frozenset[str]:
    """``api_jwt_algorithms``, refusing ``none`` and names cul8er does not know."""
    configured = frozenset(settings.api_jwt_algorithms)
    known = HMAC_ALGORITHMS | RSA_ALGORITHMS | EC_ALGORITHMS
    unknown = sorted(a for a in configured if a not in known)
    if unknown:
        raise ConfigError(
            f"CUL8ER_API_JWT_ALGORITHMS names {unknown} (never 'none'); known: {sorted(known)}"
        )
    return configured


def _secret(settings: Settings) -> bytes | None:
    """``api_jwt_secret`` as bytes, refusing one too short for HMAC."""
    if settings.api_jwt_secret is None:
        return None
    secret = settings.api_jwt_secret.get_secret_value().encode()
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(
            f"CUL8ER_API_JWT_SECRET must be at least {MIN_SECRET_BYTES} bytes long "
            f"(it is {len(secret)})"
        )
    return secret


def _public_key(path: Path | None) -> PublicKey | None:
    """The PEM public key of ``api_jwt_public_key_file`` (RSA or EC)."""
    if path is None:
        return None
    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"CUL8ER_API_JWT_PUBLIC_KEY_FILE {str(path)!r} is not a readable PEM public key: "
            f"{type(exc).__name__}"
        ) from None
    if not isinstance(key, RSAPublicKey | _ECPublic):
        raise ConfigError(
            f"CUL8ER_API_JWT_PUBLIC_KEY_FILE {str(path)!r} holds a {type(key).__name__}; "
            "an RSA or EC key is needed"
        )
    return key


def _private_key(path: Path) -> tuple[RSAPrivateKey | EllipticCurvePrivateKey, str]:
    """The PEM private key of ``api_jwt_private_key_file`` and the algorithm it signs with."""
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(
            f"CUL8ER_API_JWT_PRIVATE_KEY_FILE {str(path)!r} is not a readable unencrypted PEM "
            f"private key: {type(exc).__name__}"
        ) from None
    if isinstance(key, RSAPrivateKey):
        return key, "RS256"
    if isinstance(key, EllipticCurvePrivateKey) and key.curve.name in _EC_CURVES:
        return key, _EC_CURVES[key.curve.name]
    raise ConfigError(
        f"CUL8ER_API_JWT_PRIVATE_KEY_FILE {str(path)!r} holds a key cul8er cannot sign with; "
        "an RSA key or an EC key on P-256, P-384 or P-521 is needed"
    )


def key_id(public_key: PublicKey) -> str:
    """The RFC 7638 thumbprint of a public key: the ``kid`` of tokens it checks."""
    jwk: dict[str, Any]
    if isinstance(public_key, RSAPublicKey):
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(public_key, as_dict=True)
        members = {name: jwk[name] for name in ("e", "kty", "n")}
    else:
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(public_key, as_dict=True)
        members = {name: jwk[name] for name in ("crv", "kty", "x", "y")}
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(canonical).digest()).rstrip(b"=").decode()


def issue_token(
    settings: Settings,
    *,
    subject: str,
    role: Role,
    tenants: Iterable[str] = (),
    ttl_seconds: int = 3600,
    not_before: int | None = None,
) -> str:
    """A signed bearer token for ``subject`` in ``role``, valid ``ttl_seconds`` from now.

    Signs with ``api_jwt_private_key_file`` (RS256, or ES256/384/512 by the EC key's curve)
    when it is set, else HS256 with ``api_jwt_secret``; ``ConfigError`` when neither is.
    ``tenants`` are a tenant owner's (and only a tenant owner's); ``not_before`` is a Unix time.
    """
    tenant_ids = sorted(set(tenants))
    _check_request(subject, role, tenant_ids, ttl_seconds)
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": settings.api_jwt_issuer,
        "aud": settings.api_jwt_audience,
        "sub": subject,
        "role": role.value,
        "iat": now,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
    }
    if role is Role.TENANT_OWNER:
        claims["tenants"] = tenant_ids
    if not_before is not None:
        claims["nbf"] = not_before
    if settings.api_jwt_private_key_file is not None:
        key, algorithm = _private_key(settings.api_jwt_private_key_file)
        _check_signing_algorithm(settings, algorithm)
        headers = {"kid": key_id(key.public_key())}
        return jwt.encode(claims, key, algorithm=algorithm, headers=headers)
    secret = _secret(settings)
    if secret is None:
        raise ConfigError(
            "cannot sign tokens: set CUL8ER_API_JWT_PRIVATE_KEY_FILE (RS256, ES256) or "
            "CUL8ER_API_JWT_SECRET (HS256)"
        )
    _check_signing_algorithm(settings, "HS256")
    return jwt.encode(claims, secret, algorithm="HS256")


def _check_request(subject: str, role: Role, tenant_ids: list[str], ttl_seconds: int) -> None:
    """Refuse a token request that could not be used as asked."""
    errors: list[dict[str, str]] = []
    if not subject:
        errors.append({"field": "subject", "message": "must not be empty"})
    if ttl_seconds <= 0:
        errors.append({"field": "ttl_seconds", "message": "must be positive"})
    if tenant_ids and role is not Role.TENANT_OWNER:
        errors.append({"field": "tenants", "message": "only a tenant_owner token names tenants"})
    if any(not tenant for tenant in tenant_ids):
        errors.append({"field": "tenants", "message": "a tenant id must not be empty"})
    if errors:
        raise ValidationFailedError("the token cannot be issued as asked", errors=errors)


def _check_signing_algorithm(settings: Settings, algorithm: str) -> None:
    """Refuse to sign tokens this cul8er's own verifier would refuse."""
    if algorithm not in settings.api_jwt_algorithms:
        raise ConfigError(
            f"tokens would be signed with {algorithm}, which CUL8ER_API_JWT_ALGORITHMS "
            f"({settings.api_jwt_algorithms}) does not accept"
        )


def bearer(authorization_header: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; ``AuthError`` otherwise."""
    if not authorization_header:
        raise AuthError("missing bearer token")
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or " " in token:
        raise AuthError("missing bearer token")
    return token
