"""JWT verification, channel permissions and development tokens (no I/O).

Rule: the algorithm comes from the Config, never from the token's header, and `none` is never
accepted. Every verification either returns `Claims` or raises `AuthError` with one of the
protocol's codes and a short reason that never contains the token. A verified token is cached
so repeated use skips the signature check, but its expiry is checked again on every call.
A token is refused before either verifier sees it unless each of its three segments is
canonical base64url (alphabet, no padding, zero trailing bits): one signed token then has
one spelling, so nobody without the key can make new cache keys out of a valid token.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import jwt
import jwt.algorithms
import jwt.exceptions
import orjson

from aether_fast.config import HMAC_ALGORITHMS, Config
from aether_fast.protocol import ErrorCode

#: Longest token accepted; longer ones are refused before any parsing.
MAX_TOKEN_CHARS: Final = 8192
#: header.payload.signature in base64url without padding (an empty signature is left to
#: PyJWT, which refuses `none` with its own reason).
_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_SEGMENT: Final = re.compile(r"[A-Za-z0-9_-]*")
#: Last characters allowed by segment length mod 4: those whose unused low bits are zero
#: (2 chars carry 1 byte and 4 spare bits, 3 chars carry 2 bytes and 2 spare bits).
_LAST: Final = {2: frozenset("AQgw"), 3: frozenset("AEIMQUYcgkosw048")}
#: Verified tokens remembered; the oldest is dropped first.
CACHE_SIZE: Final = 10000
#: hashlib names of the HMAC algorithms the fast path verifies itself.
_DIGESTS: Final = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}
#: Header fields the fast path accepts; any other (e.g. `crit`) goes through PyJWT.
_PLAIN_HEADER: Final = frozenset({"alg", "typ", "kid"})


class AuthError(Exception):
    """A token was refused. `code` is AUTH_INVALID, TOKEN_EXPIRED or AUTH_REQUIRED."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Claims:
    """What the server uses from a verified token."""

    user_id: str
    expires_at: float
    admin: bool
    channels: tuple[str, ...] | None


# PyJWT exception -> our reason. Fixed texts: PyJWT messages are not promised to be token-free.
_REASONS: Final[tuple[tuple[type[Exception], str], ...]] = (
    (jwt.exceptions.InvalidSignatureError, "signature verification failed"),
    (jwt.exceptions.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.exceptions.InvalidAudienceError, "invalid audience"),
    (jwt.exceptions.InvalidIssuerError, "invalid issuer"),
    (jwt.exceptions.InvalidSubjectError, "claim sub must be a string"),
    (jwt.exceptions.InvalidJTIError, "claim jti must be a string"),
    (jwt.exceptions.InvalidKeyError, "key refused"),
    (jwt.exceptions.DecodeError, "malformed token"),
)


def _reason(error: Exception) -> str:
    if isinstance(error, jwt.exceptions.MissingRequiredClaimError):
        return f"missing claim: {error.claim}"
    for kind, reason in _REASONS:
        if isinstance(error, kind):
            return reason
    return "invalid token"


def _number(payload: dict[str, Any], claim: str) -> float | None:
    value = payload.get(claim)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AuthError(ErrorCode.AUTH_INVALID, f"claim {claim} must be a number")
    return float(value)


class Authenticator:
    """Verifies tokens against one Config's key, algorithm, audience, issuer and leeway."""

    def __init__(self, config: Config) -> None:
        self._algorithm = config.jwt_algorithm
        raw_key = (
            config.jwt_secret
            if config.jwt_algorithm in HMAC_ALGORITHMS
            else (config.jwt_public_key or "")
        )
        # Parse the key once; PyJWT would otherwise load the PEM on every verification.
        algorithm = jwt.algorithms.get_default_algorithms()[config.jwt_algorithm]
        if not raw_key:
            raise ValueError(f"no verification key configured for {config.jwt_algorithm}")
        try:
            self._key: Any = algorithm.prepare_key(raw_key)
        except (jwt.exceptions.PyJWTError, TypeError) as e:
            raise ValueError(f"unusable verification key for {config.jwt_algorithm}: {e}") from None
        self._audience = config.jwt_audience
        self._issuer = config.jwt_issuer
        self._leeway = config.jwt_leeway_s
        self._cache: dict[str, Claims] = {}
        self._digest = _DIGESTS.get(self._algorithm)
        self._secret = config.jwt_secret.encode() if self._digest else b""
        #: header segments already seen to be plain and of our algorithm
        self._plain_headers: set[str] = set()

    def verify(self, token: str, now: float | None = None) -> Claims:
        """Return the token's Claims, or raise AuthError.

        `now` defaults to time.time(). A cached token is still refused once expired.
        """
        if now is None:
            now = time.time()
        if not token:
            raise AuthError(ErrorCode.AUTH_REQUIRED, "no token")
        cached = self._cache.get(token)
        if cached is not None:
            if cached.expires_at <= now - self._leeway:
                del self._cache[token]
                raise AuthError(ErrorCode.TOKEN_EXPIRED, "token expired")
            return cached
        if len(token) > MAX_TOKEN_CHARS:
            raise AuthError(ErrorCode.AUTH_INVALID, "token too long")
        if not _canonical(token):
            raise AuthError(ErrorCode.AUTH_INVALID, "malformed token")
        claims = self._decode(token, now)
        if len(self._cache) >= CACHE_SIZE:
            del self._cache[next(iter(self._cache))]
        self._cache[token] = claims
        return claims

    def _fast_hmac(self, token: str) -> dict[str, Any] | None:
        """The payload of a well-formed HS* token whose signature, header and registered
        claims (exp and sub present, aud, iss, jti) are all as PyJWT would accept them;
        None for anything else, which then goes through PyJWT for its exact reason.

        hmac.digest and orjson make this ~10x cheaper than PyJWT's general path, which
        was a quarter of a connection's set-up."""
        digest = self._digest
        if digest is None:
            return None
        head, _, rest = token.partition(".")
        body, dot2, signature = rest.partition(".")
        if not dot2 or "." in signature:
            return None
        try:
            if head not in self._plain_headers:
                header = orjson.loads(_b64(head))
                if not (
                    type(header) is dict
                    and header.get("alg") == self._algorithm
                    and header.keys() <= _PLAIN_HEADER
                    and all(type(header[k]) is str for k in header)
                ):
                    return None
            signed = token[: len(head) + 1 + len(body)].encode("ascii")
            expected = hmac.digest(self._secret, signed, digest)
            if not hmac.compare_digest(expected, _b64(signature)):
                return None
            # remembered only once signed with our key: nobody else can fill the set
            if len(self._plain_headers) < 64:
                self._plain_headers.add(head)
            payload = orjson.loads(_b64(body))
        except (ValueError, binascii.Error):  # orjson.JSONDecodeError is a ValueError
            return None
        if type(payload) is not dict or "exp" not in payload or "sub" not in payload:
            return None
        if type(payload["sub"]) is not str or type(payload.get("jti", "")) is not str:
            return None
        aud = payload.get("aud")
        if self._audience is None:
            if "aud" in payload:
                return None
        elif aud != self._audience and not (
            type(aud) is list and self._audience in aud and all(type(a) is str for a in aud)
        ):
            return None
        if self._issuer is not None and payload.get("iss") != self._issuer:
            return None
        return payload

    def _decode(self, token: str, now: float) -> Claims:
        fast = self._fast_hmac(token)
        if fast is not None:
            return self._claims(fast, now)
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                self._key,
                algorithms=[self._algorithm],
                audience=self._audience,
                issuer=self._issuer,
                options={
                    "require": ["exp", "sub"],
                    # Time claims are checked below against `now`, so tests and the cache
                    # path share one clock.
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.exceptions.PyJWTError as e:
            raise AuthError(ErrorCode.AUTH_INVALID, _reason(e)) from None
        except (ValueError, TypeError):
            raise AuthError(ErrorCode.AUTH_INVALID, "malformed token") from None
        return self._claims(payload, now)

    def _claims(self, payload: dict[str, Any], now: float) -> Claims:
        exp = _number(payload, "exp")
        if exp is None:  # "require" already refused this; kept for the type checker
            raise AuthError(ErrorCode.AUTH_INVALID, "missing claim: exp")
        nbf = _number(payload, "nbf")
        iat = _number(payload, "iat")
        if exp <= now - self._leeway:
            raise AuthError(ErrorCode.TOKEN_EXPIRED, "token expired")
        if nbf is not None and nbf > now + self._leeway:
            raise AuthError(ErrorCode.AUTH_INVALID, "token not yet valid (nbf)")
        if iat is not None and iat > now + self._leeway:
            raise AuthError(ErrorCode.AUTH_INVALID, "token issued in the future (iat)")

        sub = payload.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError(ErrorCode.AUTH_INVALID, "claim sub must be a non-empty string")

        channels: tuple[str, ...] | None = None
        raw_channels = payload.get("channels")
        if raw_channels is not None:
            if not isinstance(raw_channels, list) or not all(
                isinstance(p, str) and p for p in raw_channels
            ):
                raise AuthError(ErrorCode.AUTH_INVALID, "claim channels must be a list of strings")
            channels = tuple(raw_channels)

        admin = payload.get("admin") is True or payload.get("role") == "admin"
        return Claims(user_id=sub, expires_at=exp, admin=admin, channels=channels)


def _canonical(token: str) -> bool:
    """Is `token` three segments of canonical base64url (see the module docstring)?"""
    if _SHAPE.fullmatch(token) is None:
        return False
    head, body, signature = token.split(".")
    return _canonical_tail(head) and _canonical_tail(body) and _canonical_tail(signature)


def _canonical_tail(segment: str) -> bool:
    """Is the length of this base64url segment possible, and are its spare bits zero?"""
    tail = len(segment) % 4
    return tail == 0 or (tail != 1 and segment[-1] in _LAST[tail])


def _b64(segment: str) -> bytes:
    """Canonical base64url without padding, as in a JWT; ValueError for anything else
    (Python's decoder alone would skip stray characters and accept padding)."""
    if _SEGMENT.fullmatch(segment) is None or not _canonical_tail(segment):
        raise ValueError("not canonical base64url")
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


#: Characters a single `*` does not match: it stays within one segment of a dotted name.
_SEGMENT_ENDS: Final = frozenset(".:")


@dataclass(frozen=True, slots=True)
class _Globs:
    """The patterns of one `channels` claim as one bit-parallel automaton (Shift-And).

    Bit i of a state set means "the first i tokens of some pattern match what was read".
    Each pattern takes its own run of bits (its tokens, plus one bit for "all of it"), so
    all patterns advance together: reading a name costs a few integer operations per
    character, O(len(name) x total pattern length / 64), whatever the patterns; no
    backtracking (a regex of `*a*a*a*...b` took seconds on a 128-character name)."""

    #: bits to start from: each pattern's first bit, with the stars after it taken as empty
    start: int
    #: bits that mean a whole pattern matched
    accept: int
    #: per literal character: the bits whose next token is that character
    literal: dict[str, int]
    #: bits whose next token is a star (either kind): a star may match nothing
    before_star: int
    #: bits just after a `**` (they stay set on any character)
    any_run: int
    #: bits just after a `*` (they stay set on any character but `.` and `:`)
    segment_run: int

    def matches(self, name: str) -> bool:
        state = self.start
        literal, any_run, segment_run = self.literal, self.any_run, self.segment_run
        stay_any = any_run | segment_run
        before_star = self.before_star
        for c in name:
            if not state:
                return False
            state = ((state & literal.get(c, 0)) << 1) | (
                state & (any_run if c in _SEGMENT_ENDS else stay_any)
            )
            state |= (state & before_star) << 1
        return state & self.accept != 0


def _tokens(pattern: str) -> list[str]:
    """`pattern` as tokens: "*", "**" or one literal character. `**` is read first, so `***`
    is `**` then `*`; a run of stars is then one star, `**` if any of it is (what the run
    matches as a whole: `**` and `*` together match any run, two `*` one segment)."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern[i] != "*":
            out.append(pattern[i])
            i += 1
            continue
        star = "**" if pattern.startswith("**", i) else "*"
        i += len(star)
        if out and out[-1] in ("*", "**"):
            if star == "**":
                out[-1] = "**"
        else:
            out.append(star)
    return out


@functools.lru_cache(maxsize=4096)
def _compile(patterns: tuple[str, ...]) -> _Globs:
    """The automaton of a `channels` claim: `*` is any run (possibly empty) of characters
    other than `.` and `:` (within one segment), `**` any run of characters at all, and
    every other character stands for itself (docs/protocol.md §5)."""
    start = accept = before_star = any_run = segment_run = 0
    literal: dict[str, int] = {}
    base = 0
    for pattern in patterns:
        tokens = _tokens(pattern)
        start |= 1 << base
        for i, token in enumerate(tokens):
            bit = 1 << (base + i)
            if token == "**":
                before_star |= bit
                any_run |= bit << 1
            elif token == "*":
                before_star |= bit
                segment_run |= bit << 1
            else:
                literal[token] = literal.get(token, 0) | bit
        accept |= 1 << (base + len(tokens))
        base += len(tokens) + 1
    # stars are never adjacent, so one step of "a star may be empty" is enough
    start |= (start & before_star) << 1
    return _Globs(start, accept, literal, before_star, any_run, segment_run)


def channel_allowed(claims: Claims | None, channel: str) -> bool:
    """May these claims join/publish to `channel`? Anonymous (None) is decided elsewhere.
    Matching is case-sensitive and covers the whole name (see `_compile`)."""
    if claims is None or claims.channels is None:
        return True
    return _compile(claims.channels).matches(channel)


def mint_token(
    config: Config,
    sub: str,
    *,
    admin: bool = False,
    channels: Sequence[str] | None = None,
    ttl_s: float | None = None,
    now: float | None = None,
) -> str:
    """Sign a token with the configured key (for `aether-fast token`, tests and benchmarks).

    Raises ValueError when the configuration cannot sign (no private key for RS*/ES*/EdDSA)
    or the arguments are unusable.
    """
    if not sub:
        raise ValueError("sub must be a non-empty string")
    if config.jwt_algorithm in HMAC_ALGORITHMS:
        if not config.jwt_secret:
            raise ValueError(f"JWT_SECRET is required to sign {config.jwt_algorithm} tokens")
        key: str = config.jwt_secret
    else:
        if not config.jwt_private_key:
            raise ValueError(
                "JWT_PRIVATE_KEY or JWT_PRIVATE_KEY_FILE is required to sign "
                f"{config.jwt_algorithm} tokens"
            )
        key = config.jwt_private_key
    ttl = config.jwt_expires_s if ttl_s is None else ttl_s
    if not math.isfinite(ttl) or ttl <= 0:
        raise ValueError("ttl must be a positive number of seconds")
    issued = time.time() if now is None else now
    # Round exp up so the token lives at least ttl seconds.
    payload: dict[str, Any] = {"sub": sub, "iat": int(issued), "exp": math.ceil(issued + ttl)}
    if admin:
        payload["admin"] = True
    if channels is not None:
        if isinstance(channels, str):
            raise ValueError("channels must be a sequence of patterns, not one string")
        payload["channels"] = list(channels)
    if config.jwt_audience is not None:
        payload["aud"] = config.jwt_audience
    if config.jwt_issuer is not None:
        payload["iss"] = config.jwt_issuer
    return jwt.encode(payload, key, algorithm=config.jwt_algorithm)
