"""auth.py with real PyJWT tokens: algorithms, required claims, time, cache, channel globs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import subprocess
import sys
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from aether_fast.auth import (
    CACHE_SIZE,
    Authenticator,
    AuthError,
    Claims,
    channel_allowed,
    mint_token,
)
from aether_fast.config import Config, load_config
from tests.unit import support

SECRET = "k" * 32
NOW = 1_700_000_000.0


def hs_config(**env: str) -> Config:
    return load_config({"JWT_SECRET": SECRET, **{k.upper(): v for k, v in env.items()}})


def hs_token(payload: dict[str, Any], secret: str = SECRET, alg: str = "HS256") -> str:
    return jwt.encode(payload, secret, algorithm=alg)


def good(**extra: Any) -> dict[str, Any]:
    return {"sub": "alice", "exp": int(NOW) + 600, "iat": int(NOW), **extra}


def refused(auth: Authenticator, token: str, now: float = NOW) -> AuthError:
    with pytest.raises(AuthError) as info:
        auth.verify(token, now=now)
    if token:
        assert token not in info.value.reason and token not in str(info.value)
    return info.value


@pytest.fixture(scope="module")
def rsa_pems() -> tuple[str, str]:
    return support.rsa_pems()


def test_hs256_roundtrip() -> None:
    auth = Authenticator(hs_config())
    claims = auth.verify(hs_token(good()), now=NOW)
    assert claims == Claims(user_id="alice", expires_at=NOW + 600, admin=False, channels=None)


def test_admin_claims() -> None:
    auth = Authenticator(hs_config())
    assert auth.verify(hs_token(good(admin=True)), now=NOW).admin is True
    assert auth.verify(hs_token(good(role="admin")), now=NOW).admin is True
    assert auth.verify(hs_token(good(admin="true")), now=NOW).admin is False
    assert auth.verify(hs_token(good(role="user")), now=NOW).admin is False


def test_wrong_secret() -> None:
    auth = Authenticator(hs_config())
    e = refused(auth, hs_token(good(), secret="x" * 32))
    assert (e.code, e.reason) == ("AUTH_INVALID", "signature verification failed")


def test_garbage_and_empty() -> None:
    auth = Authenticator(hs_config())
    assert refused(auth, "not.a.jwt").code == "AUTH_INVALID"
    assert refused(auth, "abc").reason == "malformed token"
    assert refused(auth, "").code == "AUTH_REQUIRED"
    assert refused(auth, "e" * 9000).reason == "token too long"


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_alg_none_refused() -> None:
    auth = Authenticator(hs_config())
    token = f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(good())}."
    e = refused(auth, token)
    assert e.code == "AUTH_INVALID"
    token = jwt.encode(good(), "", algorithm="none")
    assert refused(auth, token).reason == "algorithm not allowed"


def test_other_hmac_algorithm_refused() -> None:
    auth = Authenticator(hs_config())
    token = hs_token(good(), secret="k" * 64, alg="HS512")
    assert refused(auth, token).reason == "algorithm not allowed"


def test_rs256(rsa_pems: tuple[str, str]) -> None:
    private, public = rsa_pems
    config = load_config({"JWT_ALGORITHM": "RS256", "JWT_PUBLIC_KEY": public})
    auth = Authenticator(config)
    token = jwt.encode(good(), private, algorithm="RS256")
    assert auth.verify(token, now=NOW).user_id == "alice"

    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(good(), other, algorithm="RS256")
    assert refused(auth, forged).reason == "signature verification failed"


def test_algorithm_confusion_refused(rsa_pems: tuple[str, str]) -> None:
    """An HS256 token signed with the public key as HMAC secret must not pass an RS256 server."""
    _, public = rsa_pems
    auth = Authenticator(load_config({"JWT_ALGORITHM": "RS256", "JWT_PUBLIC_KEY": public}))
    header = _b64({"alg": "HS256", "typ": "JWT"})
    body = _b64(good())
    sig = hmac.new(public.encode(), f"{header}.{body}".encode(), hashlib.sha256).digest()
    token = f"{header}.{body}.{base64.urlsafe_b64encode(sig).rstrip(b'=').decode()}"
    e = refused(auth, token)
    assert (e.code, e.reason) == ("AUTH_INVALID", "algorithm not allowed")
    # and a plain HS256 token with any secret
    assert refused(auth, hs_token(good())).code == "AUTH_INVALID"


def test_es256() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    auth = Authenticator(load_config({"JWT_ALGORITHM": "ES256", "JWT_PUBLIC_KEY": public}))
    assert auth.verify(jwt.encode(good(), key, algorithm="ES256"), now=NOW).user_id == "alice"


@pytest.mark.parametrize("claim", ["exp", "sub"])
def test_missing_required_claim(claim: str) -> None:
    auth = Authenticator(hs_config())
    payload = good()
    del payload[claim]
    e = refused(auth, hs_token(payload))
    assert (e.code, e.reason) == ("AUTH_INVALID", f"missing claim: {claim}")


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ({"sub": ""}, "claim sub must be a non-empty string"),
        ({"sub": 42}, "claim sub must be a string"),
        ({"exp": "soon"}, "claim exp must be a number"),
        ({"exp": True}, "claim exp must be a number"),
        ({"nbf": int(NOW) + 60}, "token not yet valid (nbf)"),
        ({"iat": int(NOW) + 60}, "token issued in the future (iat)"),
        ({"channels": "chat.*"}, "claim channels must be a list of strings"),
        ({"channels": ["chat.*", 3]}, "claim channels must be a list of strings"),
    ],
)
def test_bad_claims(extra: dict[str, Any], reason: str) -> None:
    auth = Authenticator(hs_config())
    e = refused(auth, hs_token(good(**extra)))
    assert (e.code, e.reason) == ("AUTH_INVALID", reason)


def test_expired() -> None:
    auth = Authenticator(hs_config())
    token = hs_token(good(exp=int(NOW) - 1))
    e = refused(auth, token)
    assert (e.code, e.reason) == ("TOKEN_EXPIRED", "token expired")
    # exactly at exp is expired too
    assert refused(auth, hs_token(good(exp=int(NOW)))).code == "TOKEN_EXPIRED"


def test_leeway() -> None:
    token = hs_token(good(exp=int(NOW) - 5, nbf=int(NOW) + 5))
    assert refused(Authenticator(hs_config()), token).code == "TOKEN_EXPIRED"
    lenient = Authenticator(hs_config(jwt_leeway_s="10"))
    assert lenient.verify(token, now=NOW).expires_at == NOW - 5
    assert refused(lenient, token, now=NOW + 6).code == "TOKEN_EXPIRED"


def test_audience_and_issuer() -> None:
    auth = Authenticator(hs_config(jwt_audience="aether", jwt_issuer="https://id.example"))
    ok = good(aud="aether", iss="https://id.example")
    assert auth.verify(hs_token(ok), now=NOW).user_id == "alice"
    assert auth.verify(hs_token({**ok, "aud": ["x", "aether"]}), now=NOW).user_id == "alice"
    assert refused(auth, hs_token({**ok, "aud": "other"})).reason == "invalid audience"
    assert refused(auth, hs_token({**ok, "iss": "evil"})).reason == "invalid issuer"
    no_aud = dict(ok)
    del no_aud["aud"]
    assert refused(auth, hs_token(no_aud)).reason == "missing claim: aud"
    no_iss = dict(ok)
    del no_iss["iss"]
    assert refused(auth, hs_token(no_iss)).reason == "missing claim: iss"
    # a server without an audience refuses tokens that name one (PyJWT's rule)
    plain = Authenticator(hs_config())
    assert refused(plain, hs_token(good(aud="aether"))).reason == "invalid audience"


def test_cache_still_checks_expiry() -> None:
    auth = Authenticator(hs_config())
    token = hs_token(good(exp=int(NOW) + 10))
    first = auth.verify(token, now=NOW)
    assert auth.verify(token, now=NOW + 9) is first  # served from the cache
    e = refused(auth, token, now=NOW + 10)
    assert e.code == "TOKEN_EXPIRED"
    assert refused(auth, token, now=NOW + 11).code == "TOKEN_EXPIRED"


def test_cache_skips_signature_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """HS256 is checked by the hmac fast path, not jwt.decode: count the HMACs computed."""
    auth = Authenticator(hs_config())
    token = hs_token(good())
    real_digest = hmac.digest
    calls: list[str] = []

    def counting(key: bytes, msg: bytes, digest: str) -> bytes:
        calls.append(digest)
        return real_digest(key, msg, digest)

    monkeypatch.setattr(hmac, "digest", counting)
    assert auth.verify(token, now=NOW).user_id == "alice"
    assert calls == ["sha256"]  # the first sight is verified ...
    assert auth.verify(token, now=NOW + 1).user_id == "alice"
    assert calls == ["sha256"]  # ... the second is served from the cache


def test_cache_skips_pyjwt_decode(
    rsa_pems: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """RS256 has no fast path: the first verify goes through jwt.decode, the second must not."""
    private, public = rsa_pems
    auth = Authenticator(load_config({"JWT_ALGORITHM": "RS256", "JWT_PUBLIC_KEY": public}))
    token = jwt.encode(good(), private, algorithm="RS256")
    real_decode = jwt.decode
    calls: list[str] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append("decode")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    assert auth.verify(token, now=NOW).user_id == "alice"
    assert calls == ["decode"]
    assert auth.verify(token, now=NOW + 1).user_id == "alice"
    assert calls == ["decode"]


def test_cache_is_bounded() -> None:
    auth = Authenticator(hs_config())
    first = hs_token(good(n=-1))
    auth.verify(first, now=NOW)
    for i in range(CACHE_SIZE):
        auth.verify(hs_token(good(n=i)), now=NOW)
    assert len(auth._cache) == CACHE_SIZE
    assert first not in auth._cache


def test_verify_uses_wall_clock_by_default() -> None:
    auth = Authenticator(hs_config())
    now = time.time()
    assert auth.verify(hs_token({"sub": "a", "exp": int(now) + 60})).user_id == "a"
    with pytest.raises(AuthError) as info:
        auth.verify(hs_token({"sub": "a", "exp": int(now) - 60}))
    assert info.value.code == "TOKEN_EXPIRED"


def test_channel_globs() -> None:
    auth = Authenticator(hs_config())
    claims = auth.verify(hs_token(good(channels=["chat.*", "news"])), now=NOW)
    assert claims.channels == ("chat.*", "news")
    assert channel_allowed(claims, "chat.lobby")
    assert channel_allowed(claims, "news")
    assert not channel_allowed(claims, "news.sport")
    assert not channel_allowed(claims, "CHAT.lobby")  # case-sensitive
    assert not channel_allowed(claims, "private")
    assert channel_allowed(None, "anything")
    assert channel_allowed(auth.verify(hs_token(good()), now=NOW), "anything")
    nothing = auth.verify(hs_token(good(channels=[])), now=NOW)
    assert not channel_allowed(nothing, "chat.lobby")


def test_channel_glob_semantics() -> None:
    """`*` stays within one dot-separated segment and never crosses `:`; `**` matches any
    run of characters; nothing else is special (docs/protocol.md §5)."""
    auth = Authenticator(hs_config())

    def allowed(patterns: list[str], channel: str) -> bool:
        return channel_allowed(auth.verify(hs_token(good(channels=patterns)), now=NOW), channel)

    assert allowed(["chat.*"], "chat.room1")
    assert allowed(["chat.*"], "chat.")  # the segment may be empty
    assert not allowed(["chat.*"], "chat.a.b")
    assert not allowed(["chat.*"], "chat.a:admin")
    assert not allowed(["chat.*"], "chat.a.b:admin")
    assert not allowed(["chat.*"], "chat")
    assert allowed(["chat.*.x"], "chat.b.x") and not allowed(["chat.*.x"], "chat.b.c.x")
    assert allowed(["chat.*:admin"], "chat.a:admin")
    assert allowed(["*"], "lobby") and not allowed(["*"], "a.b") and not allowed(["*"], "a:b")
    assert allowed(["chat.**"], "chat.a.b:admin") and allowed(["chat.**"], "chat.x")
    assert not allowed(["chat.**"], "chatx.a")
    assert allowed(["**"], "any.thing:at-all")
    assert allowed(["pre*"], "prefix") and not allowed(["pre*"], "pre.fix")
    # fnmatch's other wildcards are plain characters (no channel name contains them)
    assert not allowed(["chat.?"], "chat.a")
    assert not allowed(["chat.[ab]"], "chat.a")
    assert allowed(["a-b_c.d"], "a-b_c.d") and not allowed(["a-b_c.d"], "a-b_cxd")


def _reference_glob(pattern: str) -> re.Pattern[str]:
    """The claim's semantics as a regex (the matcher before issue 12's review; it
    backtracks, so it is only run here on small cases)."""
    parts = []
    for piece in re.split(r"(\*\*|\*)", pattern):
        if piece == "**":
            parts.append(".*")
        elif piece == "*":
            parts.append("[^.:]*")
        else:
            parts.append(re.escape(piece))
    return re.compile("".join(parts), re.DOTALL)


@settings(max_examples=3000, deadline=None)
@given(
    patterns=st.lists(st.text(alphabet="ab.:*?-", max_size=8), min_size=0, max_size=3),
    channel=st.text(alphabet="ab.:-", max_size=10),
)
def test_channel_globs_agree_with_the_regex(patterns: list[str], channel: str) -> None:
    claims = Claims(user_id="u", expires_at=NOW, admin=False, channels=tuple(patterns))
    expected = any(_reference_glob(p).fullmatch(channel) for p in patterns)
    assert channel_allowed(claims, channel) is expected


_PATHOLOGICAL = ["*a*a*a*a*a*b", "**a**a**a**a**a**b", "*a" * 60 + "*b", "**a" * 60 + "**b"]


def test_channel_globs_do_not_backtrack() -> None:
    """A backtracking matcher takes seconds to refuse one of these (`*a*a*a*a*a*b` on 128 `a`:
    17 s) and hours for all; the automaton reads each name once. Run in a child process so
    a regression fails at the (generous) timeout instead of hanging the suite."""
    code = f"""
from aether_fast.auth import Claims, channel_allowed
for pattern in {_PATHOLOGICAL!r}:
    claims = Claims(user_id="u", expires_at=0.0, admin=False, channels=(pattern,) * 8)
    for _ in range(10):
        assert not channel_allowed(claims, "a" * 128)
        assert not channel_allowed(claims, "a." * 64)
        assert channel_allowed(claims, "a" * 127 + "b")
print("done")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert done.stdout.strip() == "done"


def test_mint_token_hs_roundtrip() -> None:
    config = hs_config(jwt_audience="aud", jwt_issuer="iss", jwt_expires_s="120")
    token = mint_token(config, "bob", admin=True, channels=["chat.*"], now=NOW)
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload == {
        "sub": "bob",
        "iat": int(NOW),
        "exp": int(NOW) + 120,
        "admin": True,
        "channels": ["chat.*"],
        "aud": "aud",
        "iss": "iss",
    }
    claims = Authenticator(config).verify(token, now=NOW + 1)
    assert claims == Claims("bob", NOW + 120, True, ("chat.*",))
    plain = jwt.decode(
        mint_token(config, "c", ttl_s=5, now=NOW), options={"verify_signature": False}
    )
    assert "admin" not in plain and "channels" not in plain and plain["exp"] == int(NOW) + 5


def test_mint_token_generated_secret() -> None:
    config = load_config({})
    assert Authenticator(config).verify(mint_token(config, "x")).user_id == "x"


def test_mint_token_rs256(rsa_pems: tuple[str, str]) -> None:
    private, public = rsa_pems
    verify_only = load_config({"JWT_ALGORITHM": "RS256", "JWT_PUBLIC_KEY": public})
    with pytest.raises(ValueError, match="JWT_PRIVATE_KEY"):
        mint_token(verify_only, "alice")
    config = load_config(
        {"JWT_ALGORITHM": "RS256", "JWT_PUBLIC_KEY": public, "JWT_PRIVATE_KEY": private}
    )
    token = mint_token(config, "alice", now=NOW)
    assert jwt.get_unverified_header(token)["alg"] == "RS256"
    assert Authenticator(config).verify(token, now=NOW).user_id == "alice"


def test_mint_token_bad_arguments() -> None:
    config = hs_config()
    with pytest.raises(ValueError):
        mint_token(config, "")
    with pytest.raises(ValueError):
        mint_token(config, "a", ttl_s=0)
    with pytest.raises(ValueError):
        mint_token(config, "a", channels="chat.*")


def _forge(header: dict[str, Any], payload: Any, secret: str = SECRET) -> str:
    """An HS256 token with exactly this header and payload JSON, signed with `secret`."""

    def seg(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = seg(json.dumps(header).encode())
    body = seg(json.dumps(payload).encode())
    sig = hmac.new(secret.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{seg(sig)}"


@pytest.mark.parametrize(
    ("env", "header", "payload", "fast"),
    [
        ({}, {"alg": "HS256", "typ": "JWT"}, good(), True),
        ({}, {"alg": "HS256", "kid": "k1"}, good(channels=["a.*"]), True),
        ({"jwt_audience": "api"}, {"alg": "HS256"}, good(aud="api"), True),
        ({"jwt_audience": "api"}, {"alg": "HS256"}, good(aud=["x", "api"]), True),
        ({"jwt_issuer": "me"}, {"alg": "HS256"}, good(iss="me"), True),
        # everything below is left to PyJWT, which gives the exact reason
        ({}, {"alg": "HS256", "crit": ["x"], "x": 1}, good(), False),
        ({}, {"alg": "HS256", "kid": 7}, good(), False),
        ({}, {"alg": "HS512"}, good(), False),
        ({}, {"alg": "none"}, good(), False),
        ({}, ["HS256"], good(), False),
        ({}, {"alg": "HS256"}, ["not", "a", "dict"], False),
        ({}, {"alg": "HS256"}, {"sub": "alice"}, False),
        ({}, {"alg": "HS256"}, {"exp": NOW + 600}, False),
        ({}, {"alg": "HS256"}, good(sub=5), False),
        ({}, {"alg": "HS256"}, good(jti=5), False),
        ({}, {"alg": "HS256"}, good(aud="api"), False),
        ({"jwt_audience": "api"}, {"alg": "HS256"}, good(), False),
        ({"jwt_audience": "api"}, {"alg": "HS256"}, good(aud="other"), False),
        ({"jwt_audience": "api"}, {"alg": "HS256"}, good(aud=["api", 5]), False),
        ({"jwt_issuer": "me"}, {"alg": "HS256"}, good(), False),
        ({"jwt_issuer": "me"}, {"alg": "HS256"}, good(iss="you"), False),
    ],
)
def test_fast_hmac_path_agrees_with_pyjwt(
    env: dict[str, str], header: Any, payload: Any, fast: bool
) -> None:
    """The HS* fast path takes a token only when PyJWT would accept it with the same
    payload; the rest go through PyJWT, so both paths give one answer and one reason."""
    auth = Authenticator(hs_config(**env))
    token = _forge(header, payload)
    got = auth._fast_hmac(token)
    assert (got is not None) is fast
    if got is not None:
        assert got == jwt.decode(
            token,
            SECRET,
            algorithms=["HS256"],
            audience=env.get("jwt_audience"),
            issuer=env.get("jwt_issuer"),
            options={"verify_exp": False},
        )
        assert auth.verify(token, now=NOW).user_id == payload["sub"]


def test_fast_hmac_path_refuses_bad_signatures_and_shapes() -> None:
    auth = Authenticator(hs_config())
    token = _forge({"alg": "HS256"}, good())
    head, body, sig = token.split(".")
    wrong = _forge({"alg": "HS256"}, good(), secret="x" * 32)
    for bad in (wrong, f"{head}.{body}", f"{head}.{body}.{sig}.x", f"{head}.{body}.", "é.a.b"):
        assert auth._fast_hmac(bad) is None
        with pytest.raises(AuthError) as e:
            auth.verify(bad, now=NOW)
        assert e.value.code == "AUTH_INVALID"
    with pytest.raises(AuthError, match="signature verification failed"):
        auth.verify(wrong, now=NOW)


# -- one spelling per signed token -------------------------------------------------------

_MANGLE_CHARS = "!=@ \t\n+/.~%\x00éAQgw0_-"
_mangles = st.one_of(
    st.tuples(st.just("append"), st.text(_MANGLE_CHARS, min_size=1, max_size=12), st.just(0)),
    st.tuples(
        st.just("insert"), st.text(_MANGLE_CHARS, min_size=1, max_size=4), st.integers(0, 400)
    ),
    st.tuples(st.just("replace"), st.sampled_from(list(_MANGLE_CHARS)), st.integers(0, 400)),
    st.tuples(st.just("pad"), st.sampled_from(["=", "==", "==="]), st.integers(0, 2)),
    st.tuples(st.just("strip"), st.just(""), st.integers(0, 2)),
    st.tuples(st.just("bits"), st.just(""), st.integers(0, 2)),
    st.tuples(st.just("wrap"), st.sampled_from([" ", "\t", "\n", "\r\n", "\x0b"]), st.just(0)),
)
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _mangle(token: str, how: str, text: str, at: int) -> str:
    if how == "append":
        return token + text
    if how == "insert":
        i = at % (len(token) + 1)
        return token[:i] + text + token[i:]
    if how == "replace":
        i = at % len(token)
        return token[:i] + text + token[i + 1 :]
    if how == "wrap":
        return text + token + text
    parts = token.split(".")
    at %= len(parts)
    seg = parts[at]
    if how == "pad":
        parts[at] = seg + text
    elif how == "strip":
        parts[at] = seg[:-1]
    elif seg and seg[-1] in _ALPHABET:
        # bits: the last character's spare low bits set (a second spelling of one value)
        spare = {2: 15, 3: 3}.get(len(seg) % 4, 0)
        parts[at] = seg[:-1] + _ALPHABET[_ALPHABET.index(seg[-1]) | spare]
    return ".".join(parts)


def _pyjwt_accepts(token: str) -> bool:
    try:
        jwt.decode(token, SECRET, algorithms=["HS256"], options={"verify_exp": False})
    except (jwt.exceptions.PyJWTError, ValueError, TypeError):
        return False
    return True


@settings(max_examples=400, deadline=None, database=None)
@given(
    payload=st.fixed_dictionaries(
        {"sub": st.text(min_size=1, max_size=12), "exp": st.just(int(NOW) + 600)},
        optional={"n": st.integers(0, 1 << 20), "kid": st.text(max_size=5)},
    ),
    mangles=st.lists(_mangles, min_size=1, max_size=3),
)
def test_mangled_tokens_are_refused(payload: dict[str, Any], mangles: list[Any]) -> None:
    """Neither verifier accepts what PyJWT refuses, and a signed token has exactly one
    spelling: any change to it is refused, so a user cannot mint cache keys from it."""
    token = hs_token(payload)
    mangled = token
    for how, text, at in mangles:
        mangled = _mangle(mangled, how, text, at)
    auth = Authenticator(hs_config())
    try:
        auth.verify(mangled, now=NOW)
        accepted = True
    except AuthError as err:
        assert err.code == "AUTH_INVALID"
        accepted = False
    if not _pyjwt_accepts(mangled):
        assert not accepted
        assert auth._fast_hmac(mangled) is None or mangled == token
    assert accepted == (mangled == token)
    assert len(auth._cache) == (1 if accepted else 0)


def test_reported_variants_are_refused() -> None:
    """The variants of issue 12 (each was accepted by the fast path, refused by PyJWT)."""
    auth = Authenticator(hs_config())
    token = hs_token(good())
    for bad in (token + "!!!!", token + "====", token + "@" * 8192, token + "@" * 100):
        assert refused(auth, bad).code == "AUTH_INVALID"
    assert auth.verify(token, now=NOW).user_id == "alice"
    assert len(auth._cache) == 1
