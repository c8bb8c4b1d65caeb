"""config.py: defaults, parsing, validation, cross-field rules, masking, describe()."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from aether_fast.config import (
    SETTINGS,
    Config,
    ConfigError,
    cluster_seed_urls,
    describe,
    load_config,
    masked,
    shard_key,
)
from tests.unit.support import rsa_pems

SECRET = "s" * 32


def _err(env: dict[str, str], overrides: dict[str, object] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(env, overrides)
    return info.value


def test_defaults() -> None:
    c = load_config({})
    assert (c.ws_host, c.ws_port, c.ws_path) == ("0.0.0.0", 8000, "/ws")
    assert c.jwt_algorithm == "HS256" and c.jwt_expires_s == 3600
    assert c.jwt_secret_generated is True and len(c.jwt_secret) >= 32
    assert (c.rate_limit_connections, c.rate_limit_messages, c.rate_limit_window_s) == (100, 50, 60)
    assert c.rate_limit_global_messages == 0
    assert c.enable_metrics is True and c.metrics_port == 9090 and c.metrics_host == "0.0.0.0"
    assert c.max_message_bytes == 65536 and c.max_http_body_bytes == 1048576
    assert c.max_connections == 10000 and c.dedup_ttl_s == 300
    assert c.channel_auto_create and c.channel_default_require_auth
    assert c.channel_default_max_connections == 0 and c.channel_default_message_rate_limit == 0
    assert c.channel_default_presence is False
    assert c.history_size == 100 and c.history_ttl_s == 3600
    assert c.data_dir == "./data" and c.allowed_origins == ()
    assert c.handshake_timeout_s == 5 and c.ping_interval_s == 20
    assert c.http_keepalive_idle_s == 30
    assert c.send_buffer_limit_bytes == 1048576 and c.shutdown_timeout_s == 10
    assert c.workers == 1 and c.broker_url is None and c.log_level == "info"
    assert c.admin_token is None and c.tls_cert_file is None and c.echo_path is None
    assert c.jwt_public_key is None and c.jwt_private_key is None
    assert c.jwt_audience is None and c.jwt_issuer is None and c.jwt_leeway_s == 0
    assert c.token_refresh_notice_s == 60


def test_generated_secret_differs_and_is_long_enough_for_hs512() -> None:
    assert load_config({}).jwt_secret != load_config({}).jwt_secret
    c = load_config({"JWT_ALGORITHM": "HS512"})
    assert c.jwt_secret_generated and len(c.jwt_secret.encode()) >= 64


def test_table_matches_dataclass() -> None:
    names = {s.name for s in SETTINGS}
    field_names = {f.name for f in dataclasses.fields(Config)}
    assert field_names - names == {"jwt_secret_generated"}
    assert names - field_names == {"jwt_public_key_file", "jwt_private_key_file"}
    rows = describe()
    assert [r[0] for r in rows] == [s.name.upper() for s in SETTINGS]
    assert ("WS_PORT", "8000", "the WebSocket/HTTP port") in rows
    assert all(isinstance(x, str) and (i == 1 or x) for r in rows for i, x in enumerate(r))
    assert dict((r[0], r[1]) for r in rows)["ENABLE_METRICS"] == "true"


def test_env_values_parsed() -> None:
    c = load_config(
        {
            "WS_HOST": "127.0.0.1",
            "WS_PORT": "9001",
            "WS_PATH": "/socket",
            "JWT_SECRET": SECRET,
            "RATE_LIMIT_WINDOW_S": "0.5",
            "ENABLE_METRICS": "No",
            "ALLOWED_ORIGINS": " https://A.example.com , http://localhost:3000,,",
            "LOG_LEVEL": "WARNING",
            "HISTORY_SIZE": "0",
            "PING_INTERVAL_S": "0",
        }
    )
    assert c.ws_host == "127.0.0.1" and c.ws_port == 9001 and c.ws_path == "/socket"
    assert c.metrics_host == "127.0.0.1"
    assert c.jwt_secret == SECRET and c.jwt_secret_generated is False
    assert c.rate_limit_window_s == 0.5
    assert c.enable_metrics is False
    assert c.allowed_origins == ("https://a.example.com", "http://localhost:3000")
    assert c.log_level == "warn" and c.history_size == 0 and c.ping_interval_s == 0


@pytest.mark.parametrize(
    ("text", "value"),
    [(t, True) for t in ("true", "TRUE", "1", "yes", "On")]
    + [(t, False) for t in ("false", "False", "0", "no", "OFF")],
)
def test_booleans(text: str, value: bool) -> None:
    assert load_config({"CHANNEL_AUTO_CREATE": text}).channel_auto_create is value


def test_empty_strings_are_unset() -> None:
    c = load_config({"WS_PORT": "", "JWT_SECRET": "", "BROKER_URL": "", "LOG_LEVEL": ""})
    assert c.ws_port == 8000 and c.jwt_secret_generated and c.broker_url is None


def test_star_origin_means_any() -> None:
    assert load_config({"ALLOWED_ORIGINS": "https://a.com,*"}).allowed_origins == ()


@pytest.mark.parametrize(
    ("env", "variable", "fragment"),
    [
        ({"WS_PORT": "abc"}, "WS_PORT", "must be an integer in 1..65535, got 'abc'"),
        ({"WS_PORT": "0"}, "WS_PORT", "1..65535"),
        ({"WS_PORT": "65536"}, "WS_PORT", "1..65535"),
        ({"WS_PORT": "80.5"}, "WS_PORT", "integer"),
        ({"WS_PATH": "ws"}, "WS_PATH", "start"),
        ({"WS_PATH": "/ws?x=1"}, "WS_PATH", "start"),
        ({"JWT_ALGORITHM": "none"}, "JWT_ALGORITHM", "never"),
        ({"JWT_ALGORITHM": "NONE"}, "JWT_ALGORITHM", "never"),
        ({"JWT_ALGORITHM": "HS1"}, "JWT_ALGORITHM", "must be one of"),
        ({"JWT_EXPIRES_S": "0"}, "JWT_EXPIRES_S", ">= 1"),
        ({"JWT_LEEWAY_S": "-1"}, "JWT_LEEWAY_S", ">= 0"),
        ({"JWT_LEEWAY_S": "nan"}, "JWT_LEEWAY_S", "number"),
        ({"RATE_LIMIT_WINDOW_S": "0"}, "RATE_LIMIT_WINDOW_S", "> 0"),
        ({"RATE_LIMIT_WINDOW_S": "inf"}, "RATE_LIMIT_WINDOW_S", "> 0"),
        ({"RATE_LIMIT_MESSAGES": "-3"}, "RATE_LIMIT_MESSAGES", ">= 0"),
        ({"ENABLE_METRICS": "maybe"}, "ENABLE_METRICS", "true/false"),
        ({"METRICS_PORT": "70000"}, "METRICS_PORT", "1..65535"),
        ({"MAX_CONNECTIONS": "0"}, "MAX_CONNECTIONS", ">= 1"),
        ({"HISTORY_SIZE": "100001"}, "HISTORY_SIZE", "0..100000"),
        ({"BUSY_POLL_US": "-1"}, "BUSY_POLL_US", "0..100000"),
        ({"BUSY_POLL_US": "1e3"}, "BUSY_POLL_US", "integer"),
        ({"COMPRESSION": "sometimes"}, "COMPRESSION", "true/false"),
        ({"COMPRESSION_LEVEL": "10"}, "COMPRESSION_LEVEL", "0..9"),
        ({"COMPRESSION_LEVEL": "-1"}, "COMPRESSION_LEVEL", "0..9"),
        ({"COMPRESSION_MIN_BYTES": "-1"}, "COMPRESSION_MIN_BYTES", "0..1073741824"),
        ({"CHANNEL_DEFAULT_MESSAGE_RATE_LIMIT": "x"}, "CHANNEL_DEFAULT_MESSAGE_RATE_LIMIT", ""),
        ({"ALLOWED_ORIGINS": "https://a.com/"}, "ALLOWED_ORIGINS", "origin"),
        ({"ALLOWED_ORIGINS": "a.com"}, "ALLOWED_ORIGINS", "origin"),
        ({"HANDSHAKE_TIMEOUT_S": "0"}, "HANDSHAKE_TIMEOUT_S", "> 0"),
        ({"HTTP_KEEPALIVE_IDLE_S": "0"}, "HTTP_KEEPALIVE_IDLE_S", "> 0 and <= 86400"),
        ({"HTTP_KEEPALIVE_IDLE_S": "86401"}, "HTTP_KEEPALIVE_IDLE_S", "> 0 and <= 86400"),
        ({"WORKERS": "0"}, "WORKERS", "1..1024"),
        ({"LOG_LEVEL": "verbose"}, "LOG_LEVEL", "debug|info|warn|error"),
        ({"BROKER_URL": "http://x"}, "BROKER_URL", "redis://"),
        ({"BROKER_URL": "redis://"}, "BROKER_URL", "redis://"),
        ({"BROKER_URL": "redis://h/0?timeout=1"}, "BROKER_URL", "'timeout' is not supported"),
        ({"BROKER_URL": "rediss://h/x"}, "BROKER_URL", "database number"),
        ({"ECHO_PATH": "echo"}, "ECHO_PATH", "start"),
        ({"ECHO_PATH": "/ws"}, "ECHO_PATH", "differ"),
        ({"JWT_SECRET": "short"}, "JWT_SECRET", "at least 32 bytes"),
        ({"ADMIN_TOKEN": "x" * 31}, "ADMIN_TOKEN", "at least 32 characters (got 31)"),
        ({"MAX_CHANNELS_PER_CONNECTION": "0"}, "MAX_CHANNELS_PER_CONNECTION", ">= 1"),
        ({"MAX_CHANNELS": "0"}, "MAX_CHANNELS", ">= 1"),
        ({"CHANNEL_STATE_TTL_S": "0"}, "CHANNEL_STATE_TTL_S", ">= 1"),
        ({"JWT_SECRET": SECRET, "JWT_ALGORITHM": "HS512"}, "JWT_SECRET", "at least 64 bytes"),
        ({"METRICS_PORT": "8000"}, "METRICS_PORT", "differ"),
        ({"JWT_ALGORITHM": "RS256"}, "JWT_PUBLIC_KEY", "required for RS256"),
        ({"JWT_ALGORITHM": "RS256", "JWT_PUBLIC_KEY": "junk"}, "JWT_PUBLIC_KEY", "usable"),
        ({"TLS_CERT_FILE": "/etc/hostname"}, "TLS_KEY_FILE", "together"),
        ({"TLS_KEY_FILE": "/etc/hostname"}, "TLS_CERT_FILE", "together"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], variable: str, fragment: str) -> None:
    e = _err(env)
    assert e.variable == variable
    assert fragment in e.message
    assert str(e) == f"{variable}: {e.message}"
    assert "\n" not in str(e)


def test_error_line_exact() -> None:
    assert str(_err({"WS_PORT": "abc"})) == "WS_PORT: must be an integer in 1..65535, got 'abc'"


def test_secret_values_never_echoed() -> None:
    e = _err({"JWT_SECRET": "tiny-secret"})
    assert "tiny-secret" not in str(e)
    e = _err({"ADMIN_TOKEN": "tiny-admin"})
    assert "tiny-admin" not in str(e)
    e = _err({"BROKER_URL": "http://user:hunter2@x"})
    assert "hunter2" not in str(e)
    for url in ("redis://u:hunter2@x/0?foo=1", "redis://:hunter2@x:99999/0", "unix://:hunter2@"):
        assert "hunter2" not in str(_err({"BROKER_URL": url})), url


def test_admin_token_minimum_length() -> None:
    assert load_config({"ADMIN_TOKEN": "a" * 32}).admin_token == "a" * 32
    assert _err({"ADMIN_TOKEN": "a" * 31}).variable == "ADMIN_TOKEN"
    assert load_config({"ADMIN_TOKEN": ""}).admin_token is None  # empty = unset


def test_channel_caps_and_state_ttl() -> None:
    c = load_config({})
    assert (c.max_channels_per_connection, c.max_channels, c.channel_state_ttl_s) == (
        128,
        100000,
        86400,
    )
    c = load_config({"MAX_CHANNELS_PER_CONNECTION": "4", "MAX_CHANNELS": "10"})
    assert (c.max_channels_per_connection, c.max_channels) == (4, 10)


def test_metrics_port_conflict_only_when_metrics_enabled_and_hosts_overlap() -> None:
    assert load_config({"METRICS_PORT": "8000", "ENABLE_METRICS": "false"}).metrics_port == 8000
    c = load_config({"WS_HOST": "127.0.0.1", "METRICS_HOST": "127.0.0.2", "METRICS_PORT": "8000"})
    assert c.metrics_host == "127.0.0.2"


def test_workers_with_broker() -> None:
    secret = {"JWT_SECRET": "s" * 32}
    c = load_config({"WORKERS": "4", "BROKER_URL": "redis://localhost:6379/0", **secret})
    assert c.workers == 4 and c.broker_url == "redis://localhost:6379/0"
    assert load_config({"BROKER_URL": "unix:///tmp/redis.sock", **secret}).broker_url
    assert load_config({"BROKER_URL": "rediss://h:6380", **secret}).broker_url


def test_workers_without_a_broker_get_the_private_redis() -> None:
    """WORKERS > 1 without BROKER_URL is no longer refused: the supervisor starts a
    redis-server of its own (workers.py, private_redis.py), bounded by this setting."""
    c = load_config({"WORKERS": "2", "JWT_SECRET": "s" * 32})
    assert c.workers == 2 and c.broker_url is None
    assert c.private_redis_maxmemory_mb == 512
    c = load_config({"WORKERS": "2", "JWT_SECRET": "s" * 32, "PRIVATE_REDIS_MAXMEMORY_MB": "0"})
    assert c.private_redis_maxmemory_mb == 0
    with pytest.raises(ConfigError) as err:
        load_config({"PRIVATE_REDIS_MAXMEMORY_MB": "-1"})
    assert err.value.variable == "PRIVATE_REDIS_MAXMEMORY_MB"


def test_shared_deployments_need_a_shared_secret() -> None:
    for env in (
        {"WORKERS": "2", "BROKER_URL": "redis://h"},
        {"BROKER_URL": "redis://h"},
        {"WORKERS": "2"},
    ):
        with pytest.raises(ConfigError) as err:
            load_config(env)
        assert err.value.variable == "JWT_SECRET"


def test_overrides_win_and_none_is_ignored() -> None:
    c = load_config(
        {"WS_PORT": "9000", "LOG_LEVEL": "error"},
        {"ws_port": 9100, "log_level": None, "workers": "1", "enable_metrics": False},
    )
    assert c.ws_port == 9100 and c.log_level == "error" and c.enable_metrics is False


def test_overrides_are_validated() -> None:
    assert _err({}, {"ws_port": 0}).variable == "WS_PORT"
    assert _err({}, {"ws_port": True}).variable == "WS_PORT"
    assert _err({}, {"ws_port": "x"}).variable == "WS_PORT"
    assert _err({}, {"rate_limit_window_s": -1.0}).variable == "RATE_LIMIT_WINDOW_S"
    assert _err({}, {"no_such_thing": 1}).variable == "NO_SUCH_THING"
    assert _err({}, {"jwt_secret_generated": True}).variable == "JWT_SECRET_GENERATED"
    assert load_config({}, {"allowed_origins": ["https://x.org"]}).allowed_origins == (
        "https://x.org",
    )
    assert load_config({}, {"rate_limit_window_s": 2}).rate_limit_window_s == 2.0


def test_rsa_keys_inline_and_from_files(tmp_path: Path) -> None:
    private, public = rsa_pems()
    c = load_config({"JWT_ALGORITHM": "rs256", "JWT_PUBLIC_KEY": public})
    assert c.jwt_algorithm == "RS256" and c.jwt_public_key == public
    assert c.jwt_secret == "" and c.jwt_secret_generated is False

    pub_file, priv_file = tmp_path / "pub.pem", tmp_path / "priv.pem"
    pub_file.write_text(public)
    priv_file.write_text(private)
    c = load_config(
        {
            "JWT_ALGORITHM": "RS256",
            "JWT_PUBLIC_KEY_FILE": str(pub_file),
            "JWT_PRIVATE_KEY_FILE": str(priv_file),
        }
    )
    assert c.jwt_public_key == public and c.jwt_private_key == private

    # one-line env var with literal \n escapes
    c = load_config({"JWT_ALGORITHM": "RS256", "JWT_PUBLIC_KEY": public.replace("\n", "\\n")})
    assert c.jwt_public_key == public


def test_key_errors(tmp_path: Path) -> None:
    private, public = rsa_pems()
    e = _err({"JWT_ALGORITHM": "RS256", "JWT_PUBLIC_KEY_FILE": str(tmp_path / "missing.pem")})
    assert e.variable == "JWT_PUBLIC_KEY_FILE" and "cannot read" in e.message
    e = _err({"JWT_ALGORITHM": "RS256", "JWT_PUBLIC_KEY_FILE": str(tmp_path)})
    assert e.variable == "JWT_PUBLIC_KEY_FILE"
    e = _err(
        {"JWT_ALGORITHM": "RS256", "JWT_PUBLIC_KEY": public, "JWT_PUBLIC_KEY_FILE": "/x"},
    )
    assert e.variable == "JWT_PUBLIC_KEY" and "not both" in e.message
    e = _err({"JWT_ALGORITHM": "RS256", "JWT_PUBLIC_KEY": private})
    assert e.variable == "JWT_PUBLIC_KEY" and "private key" in e.message
    assert private not in str(e)
    e = _err({"JWT_ALGORITHM": "RS256", "JWT_PUBLIC_KEY": public, "JWT_PRIVATE_KEY": public})
    assert e.variable == "JWT_PRIVATE_KEY"
    ec_public = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    e = _err({"JWT_ALGORITHM": "RS256", "JWT_PUBLIC_KEY": ec_public})
    assert e.variable == "JWT_PUBLIC_KEY"
    assert load_config({"JWT_ALGORITHM": "ES256", "JWT_PUBLIC_KEY": ec_public}).jwt_public_key
    e = _err({"JWT_ALGORITHM": "ES384", "JWT_PUBLIC_KEY": ec_public})
    assert e.variable == "JWT_PUBLIC_KEY" and "curve" in e.message


def test_small_rsa_key_refused() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    public = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    e = _err({"JWT_ALGORITHM": "RS256", "JWT_PUBLIC_KEY": public})
    assert e.variable == "JWT_PUBLIC_KEY" and "1024" in e.message


def test_tls_files(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("cert")
    key.write_text("key")
    c = load_config({"TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key)})
    assert c.tls_cert_file == str(cert) and c.tls_key_file == str(key)
    e = _err({"TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(tmp_path / "nope.pem")})
    assert e.variable == "TLS_KEY_FILE" and "cannot read" in e.message
    e = _err({"TLS_CERT_FILE": str(tmp_path), "TLS_KEY_FILE": str(key)})
    assert e.variable == "TLS_CERT_FILE"


def test_masked() -> None:
    private, public = rsa_pems()
    c = load_config(
        {
            "JWT_ALGORITHM": "RS256",
            "JWT_PUBLIC_KEY": public,
            "JWT_PRIVATE_KEY": private,
            "ADMIN_TOKEN": "adm1n-t0ken-" + "0123456789" * 2,
            "BROKER_URL": "redis://user:hunter2@redis:6379/0?password=hunter3&db=1",
            "WORKERS": "2",
        }
    )
    m = masked(c)
    assert list(m) == [f.name for f in dataclasses.fields(Config)]
    assert m["jwt_private_key"] == "***" and m["admin_token"] == "***"
    assert m["jwt_secret"] == ""  # RS256: no HMAC secret at all
    assert m["broker_url"] == "redis://user:***@redis:6379/0?password=***&db=1"
    assert m["jwt_public_key"] == public and m["workers"] == 2
    text = repr(m)
    assert "hunter" not in text and "adm1n" not in text and "PRIVATE" not in text

    plain = masked(load_config({"BROKER_URL": "redis://:pw@h/0", "JWT_SECRET": "k" * 32}))
    assert plain["broker_url"] == "redis://:***@h/0"
    assert plain["admin_token"] is None and plain["jwt_private_key"] is None
    assert plain["jwt_secret"] == "***"
    bare = load_config({"BROKER_URL": "redis://h:1", "JWT_SECRET": "k" * 32})
    assert masked(bare)["broker_url"] == "redis://h:1"


# -- BROKER_URL lists (shards) ---------------------------------------------------------------


def test_broker_url_list_is_put_in_canonical_order() -> None:
    secret = {"JWT_SECRET": "k" * 32}
    a = load_config(
        {"BROKER_URL": " redis://b:6379/0 , redis://:pw@a:6379/1,unix:///r.sock", **secret}
    )
    b = load_config(
        {"BROKER_URL": "unix:///r.sock,redis://:pw@a:6379/1,redis://b:6379/0", **secret}
    )
    assert a.broker_url == b.broker_url
    assert a.broker_urls == ("redis://:pw@a:6379/1", "redis://b:6379/0", "unix:///r.sock")
    assert masked(a)["broker_url"] == "redis://:***@a:6379/1,redis://b:6379/0,unix:///r.sock"
    # one URL is kept as given
    one = load_config({"BROKER_URL": "redis://B:6379", **secret})
    assert one.broker_url == "redis://B:6379" and one.broker_urls == ("redis://B:6379",)
    assert load_config(secret).broker_urls == ()


def test_shard_key_names_the_server_and_database_only() -> None:
    assert shard_key("redis://user:pw@Host:6380/3?socket_timeout=2") == "host:6380 db 3"
    assert shard_key("redis://host") == shard_key("rediss://host:6379/0") == "host:6379 db 0"
    assert shard_key("redis://host/1?db=2") == "host:6379 db 2"  # as redis-py: the query wins
    assert shard_key("unix:///run/redis.sock?db=4") == "unix:/run/redis.sock db 4"
    assert shard_key("redis://[::1]:7000") == "[::1]:7000 db 0"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("redis://a,redis://b,", "entry 3 of 3: empty"),
        ("redis://a,,redis://b", "entry 2 of 3: empty"),
        ("redis://a,http://b", "entry 2 of 2: must be a URL starting with redis://"),
        ("redis://a,redis://", "entry 2 of 2: must be a URL"),
        ("redis://a,redis://b:port", "entry 2 of 2: the port must be a number"),
        ("redis://a:99999", "the port must be a number"),
        ("redis://a,redis://b/?db=x", "entry 2 of 2: the db must be a database number"),
        ("redis://a:6379/0,redis://:secret@A", "entry 2 of 2: names a:6379 db 0 again"),
        ("redis://a/1,rediss://a:6379?db=1", "names a:6379 db 1 again"),
        ("unix:///s.sock,unix:///s.sock?db=0", "names unix:/s.sock db 0 again"),
    ],
)
def test_bad_broker_url_lists_are_refused(value: str, fragment: str) -> None:
    e = _err({"BROKER_URL": value, "JWT_SECRET": "k" * 32})
    assert e.variable == "BROKER_URL" and fragment in e.message, e.message
    assert "secret" not in str(e)  # never the URL itself: it may hold a password


def test_redis_cluster_url() -> None:
    """redis+cluster:// names seed nodes: each becomes a redis:// URL with the credentials
    and options; bad or mixed forms are refused without echoing a password."""
    secret = {"JWT_SECRET": "s" * 32}
    url = "redis+cluster://:hunter2@10.0.0.1:7000, 10.0.0.2:7001?username=u"
    c = load_config({"BROKER_URL": url, **secret})
    assert c.broker_cluster and c.broker_url == url.strip()
    assert cluster_seed_urls(c.broker_url) == [
        "redis://:hunter2@10.0.0.1:7000?username=u",
        "redis://:hunter2@10.0.0.2:7001?username=u",
    ]
    assert masked(c)["broker_url"] == (
        "redis+cluster://:***@10.0.0.1:7000, 10.0.0.2:7001?username=u"
    )
    assert not load_config({"BROKER_URL": "redis://h:1", **secret}).broker_cluster
    tls = "rediss+cluster://u:hunter2@h1:7000,h2:7000?ssl_cert_reqs=none"
    c = load_config({"BROKER_URL": tls, **secret})
    assert c.broker_cluster and cluster_seed_urls(tls) == [
        "rediss://u:hunter2@h1:7000?ssl_cert_reqs=none",
        "rediss://u:hunter2@h2:7000?ssl_cert_reqs=none",
    ]
    assert masked(c)["broker_url"] == "rediss+cluster://u:***@h1:7000,h2:7000?ssl_cert_reqs=none"
    for bad, fragment in (
        ("redis+cluster://:hunter2@a:1,redis://b:2", "seed 2 of 2"),
        ("redis://:hunter2@b:2,redis+cluster://a:1", "must be the only URL"),
        ("redis+cluster://:hunter2@a:1/1", "database 0 only"),
        ("redis+cluster://:hunter2@a:99999", "bad port"),
        ("redis+cluster://a:1,b:2?password=hunter2&ssl_ca_certs=x", "'ssl_ca_certs'"),
        ("redis+cluster://a:1,x@b:2", "credentials go before the first seed"),
        ("rediss+cluster://:hunter2@a:1?ssl_cert_reqs=bogus", "ssl_cert_reqs must be"),
    ):
        text = str(_err({"BROKER_URL": bad, **secret}))
        assert fragment in text and "hunter2" not in text, (bad, text)
