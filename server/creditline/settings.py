"""One typed settings object for the server, from flags, environment variables and a file.

Every limit is named here with its unit; `creditline serve --help` lists them all.
Precedence: a flag, then `CREDITLINE_<NAME>` from the environment, then the TOML settings
file (`--config FILE` or `CREDITLINE_CONFIG`), then the default. Secrets (the Redis
password) have no flag, so they never show in a process list: give them through the
environment or a file (`redis_password_file`). Settings are checked when they are built
(`Settings(...)` raises ValueError naming the setting) and files are checked at start
(`check_files`); what is allowed but unsafe is said at start (`risks`).

Safe by default: without mutual TLS every caller has every role (Admin top-ups included),
so the server listens off loopback only with mutual TLS, unless allow_insecure_remote.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from creditline.errors import SettingsError

DEFAULT_PLAN_PATH = Path(__file__).resolve().parent / "charging" / "plans" / "default.toml"
ENV_PREFIX = "CREDITLINE_"
# The longest a SubscribeBatches message may wait for more events
# (subscriber_batch_linger_s): a bound on what the setting can cost a subscriber.
MAX_BATCH_LINGER_S = 1.0
CONFIG_ENV = ENV_PREFIX + "CONFIG"
# Settings that hold secrets: no flag, never printed (repr and logs show "***").
SECRET_SETTINGS = frozenset({"redis_password"})
LOG_FORMATS = ("text", "json")
DIAMETER_TRANSPORTS = ("tcp", "sctp")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True, slots=True, repr=False)
class Settings:
    # where the gRPC server listens: off loopback only with mutual TLS, or with
    # allow_insecure_remote (then every caller from anywhere has every role)
    listen_address: str = "127.0.0.1:50051"
    allow_insecure_remote: bool = field(default=False, metadata={"help": (
        "listen off loopback without mutual TLS: every caller from anywhere has every "
        "role, Admin included")})
    # server processes sharing the port (SO_REUSEPORT); 0: one per core
    workers: int = 0
    # Redis URL (redis://, rediss://, unix://); empty: start an embedded redis-server
    redis_url: str = field(default="", metadata={"help": (
        "redis://, rediss:// or unix:// URL; empty: an embedded redis-server on a private "
        "unix socket. No password in it (a flag shows in ps): secrets belong in the "
        "environment (CREDITLINE_REDIS_PASSWORD) or a file (--redis-password-file)")})
    # the Redis URL names one node of a Redis Cluster
    redis_cluster: bool = False
    # the charging script over a lean pipelined connection (hiredis) instead of redis-py,
    # where it applies: one Redis server (redis://, rediss://, unix://, with AUTH or not);
    # a cluster stays on redis-py
    redis_fast_path: bool = True
    # directory for the embedded redis-server's data; empty: a temporary directory
    embedded_redis_dir: str = ""
    # the TOML catalogue of price plans (charging/catalogue.py), or a plan file: one plan
    plan_path: str = str(DEFAULT_PLAN_PATH)
    # how long a closed session's or an event's answer is kept for retransmissions
    answer_retention_s: int = 600
    # accounts are spread over this many partitions (hash tags); each has its own
    # notification and CDR stream. Fixed once a Redis holds data.
    partitions: int = 16
    # notifications kept per partition stream: by length (stream entries, one per request
    # that made events: at least this many events), or by age when > 0
    events_max_length: int = 100_000
    events_retention_s: int = 0
    # usage spike: the rate over the fast window above `factor` x the slow window's
    spike_fast_window_s: int = 300
    spike_slow_window_s: int = 86_400
    spike_factor: float = 20.0
    # stale sessions: closed after supervision_factor x the validity time with no request;
    # every process sweeps every sweep interval, closing at most `batch` per partition
    supervision_factor: float = 2.0
    supervision_interval_s: float = 1.0
    supervision_batch: int = 100
    # notification subscribers: events queued per subscriber before it is ended as too
    # slow, and subscribers per process
    subscriber_queue_size: int = 1000
    max_subscribers: int = 5000
    # SubscribeBatches: how long a message waits for more events after its first one
    # (fewer, larger messages: a write costs far more than the events it carries);
    # 0..1 s
    subscriber_batch_linger_s: float = 0.0
    # the accepted event_time_unix_ms of a request, around the server's clock: usage may
    # be reported this late (a gateway's backlog after an outage), and the network's
    # clock may run this far ahead; outside it the request is refused with 5004
    max_event_age_s: int = 172_800
    max_event_ahead_s: int = 300
    # refuse an Initial whose session id is open on another account (session ids are
    # unique in the network); on a Redis Cluster it costs one more round trip per Initial
    # and per Terminate (the id's claim lives in another hash slot). false: for networks
    # whose session ids are unique by construction (Diameter's: <identity>;<high>;<low>)
    session_id_claims: bool = True
    # limits on one request
    max_rating_groups_per_request: int = 64
    max_session_id_bytes: int = 256
    max_account_id_bytes: int = 128
    max_message_bytes: int = 64 * 1024
    # calls (unary, streams and subscriptions) one process serves at once; past it
    # RESOURCE_EXHAUSTED
    max_concurrent_calls: int = 10_000
    # how long one Redis call may take before the request fails with UNABLE_TO_COMPLY
    redis_call_timeout_s: float = 2.0
    # Redis connections per server process
    redis_max_connections: int = 32
    # requests of one Charging.Stream worked on at once (then the stream is not read)
    max_in_flight_per_stream: int = 256
    # accounts on a plan other than the default whose plan one process remembers, so
    # that their requests are priced by it in one round trip (~170 bytes each); one it
    # forgot costs its next request a second round trip
    max_remembered_account_plans: int = 200_000
    # the server's clock runs this many seconds ahead of the machine's (behind when
    # negative): to try billing periods and renewals without waiting. 0 in production
    # (the server warns at start otherwise)
    clock_offset_s: int = field(default=0, metadata={"help": (
        "run the server's clock this many seconds ahead of the machine's (trials of "
        "period boundaries and renewals); 0 in production")})
    # recurring offers: every process looks for renewals due every renewal interval,
    # renewing at most `batch` per partition per pass
    renewal_interval_s: float = 1.0
    renewal_batch: int = 1000
    # grace given to calls in flight when the server stops
    shutdown_grace_s: float = 5.0
    # Redis AUTH: user (empty: the default user) and password (secret: environment
    # CREDITLINE_REDIS_PASSWORD or the file redis_password_file, never a flag)
    redis_username: str = ""
    redis_password: str = field(default="", metadata={"secret": True})
    redis_password_file: str = ""
    # Redis TLS (with a rediss:// URL): CA bundle to verify the server, and a client
    # certificate and key when Redis asks for one (tls-auth-clients)
    redis_tls_ca_file: str = ""
    redis_tls_cert_file: str = ""
    redis_tls_key_file: str = ""
    # gRPC TLS: server certificate and key (PEM); with tls_client_ca_file, mutual TLS:
    # clients must show a certificate signed by that CA, and its roles are enforced
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_client_ca_file: str = ""
    # logs: text or json (json carries trace_id and span_id), and the level
    log_format: str = "text"
    log_level: str = "INFO"
    # Prometheus scrape endpoint (host:port; 0.0.0.0:PORT to be scraped from another
    # container); empty: none. With workers, worker n serves PORT + n.
    metrics_listen_address: str = ""
    # how often the account count (the subscribers gauge) is refreshed from Redis
    metrics_accounts_interval_s: float = 60.0
    # the grpc.reflection service (grpcurl list / describe)
    reflection_enabled: bool = True
    # Diameter Gy/Ro (README "Connecting a gateway over Gy"): where it listens (TCP,
    # host:port; empty: no Diameter listener), who it is, and which peers it serves
    diameter_listen: str = field(default="", metadata={"help": (
        "host:port of the Diameter Gy listener (TCP, or SCTP: diameter_transport); "
        "empty: none")})
    # SCTP where the OS has it (RFC 6733 §2.1: one stream, one-to-one sockets; Linux:
    # the sctp kernel module), without TLS (DTLS/SCTP is not done); start fails naming
    # the cause where the OS has none
    diameter_transport: str = field(default="tcp", metadata={"help": (
        "the Diameter listener's transport: tcp, or sctp where the OS has it")})
    diameter_origin_host: str = "creditline.localdomain"
    diameter_origin_realm: str = "localdomain"
    # allowed peers, comma-separated: "<Origin-Host>" or "<Origin-Host>@<address>"; empty:
    # any peer connecting from a loopback address (a first try)
    diameter_peers: str = ""
    # the peers' realms allowed, comma-separated; empty: any
    diameter_peer_realms: str = ""
    # TLS from the first byte (RFC 6733 §2.1: TLS/TCP, conventionally port 5868): the
    # server's certificate and key (PEM); with diameter_tls_client_ca_file, peers must show
    # a certificate of that CA
    diameter_tls_cert_file: str = ""
    diameter_tls_key_file: str = ""
    diameter_tls_client_ca_file: str = ""
    # TLS negotiated in the capabilities exchange instead (RFC 3588's way, RFC 6733 §6.10;
    # freeDiameter's TLS_old_method): the listener is plain, a CER must offer
    # Inband-Security-Id TLS (else 5017) and the handshake follows its CEA
    diameter_tls_after_cer: bool = field(default=False, metadata={"help": (
        "TLS after the CER/CEA (Inband-Security-Id TLS, RFC 3588's way; freeDiameter's "
        "TLS_old_method) instead of from the first byte: needs diameter_tls_cert_file; "
        "a CER that does not offer TLS gets 5017 DIAMETER_NO_COMMON_SECURITY")})
    diameter_max_peers: int = 64
    # a peer's requests worked on at once; past it 3004 DIAMETER_TOO_BUSY
    diameter_max_pending_per_peer: int = 1024
    diameter_max_message_bytes: int = 64 * 1024
    # watchdog (RFC 3539 Tw): a DWR after this long without traffic, the peer dropped
    # when it does not answer in as long
    diameter_watchdog_s: float = 30.0
    # a connection with no CER this long is closed
    diameter_cer_timeout_s: float = 10.0
    # how long the server's own requests (RAR, ASR) wait for an answer
    diameter_request_timeout_s: float = 5.0
    # a Subscription-Id no identity maps: "none" (5030 DIAMETER_USER_UNKNOWN) or "data"
    # (its Subscription-Id-Data is the account id: trials)
    diameter_identity_fallback: str = "none"
    # ISO 4217 numeric currency code of Cost-Information (978: EUR)
    diameter_currency_code: int = 978
    # open sessions whose peer and account one process keeps (RAR, ASR; CCR-U without
    # Subscription-Id); the oldest forgotten past it
    diameter_max_sessions: int = 1_000_000

    def __post_init__(self) -> None:
        positive = (
            "answer_retention_s", "partitions", "events_max_length", "spike_fast_window_s",
            "spike_slow_window_s", "subscriber_queue_size", "max_subscribers",
            "supervision_factor", "supervision_interval_s", "supervision_batch",
            "max_in_flight_per_stream", "max_concurrent_calls",
            "max_rating_groups_per_request", "max_session_id_bytes",
            "max_account_id_bytes", "max_message_bytes", "redis_call_timeout_s",
            "redis_max_connections", "metrics_accounts_interval_s", "max_event_age_s",
            "max_event_ahead_s", "renewal_interval_s", "renewal_batch",
            "diameter_max_peers", "diameter_max_pending_per_peer",
            "diameter_max_message_bytes", "diameter_watchdog_s", "diameter_cer_timeout_s",
            "diameter_request_timeout_s", "diameter_max_sessions",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"setting {name}: must be greater than 0")
        for name in ("shutdown_grace_s", "events_retention_s", "spike_factor", "workers"):
            if getattr(self, name) < 0:
                raise SettingsError(f"setting {name}: must be 0 or more")
        if not 0 <= self.subscriber_batch_linger_s <= MAX_BATCH_LINGER_S:
            raise SettingsError(f"setting subscriber_batch_linger_s: 0..{MAX_BATCH_LINGER_S}")
        if self.spike_fast_window_s >= self.spike_slow_window_s:
            raise SettingsError("setting spike_fast_window_s: must be shorter than "
                             "spike_slow_window_s")
        if self.diameter_identity_fallback not in ("none", "data"):
            raise SettingsError("setting diameter_identity_fallback: \"none\" or \"data\"")
        if self.diameter_transport not in DIAMETER_TRANSPORTS:
            raise SettingsError(f"setting diameter_transport: {self.diameter_transport!r} is "
                                f"not one of {', '.join(DIAMETER_TRANSPORTS)}")
        if self.diameter_max_message_bytes < 20:
            raise SettingsError("setting diameter_max_message_bytes: at least 20 (a header)")
        for name in ("listen_address", "metrics_listen_address", "diameter_listen"):
            value = getattr(self, name)
            if (value or name == "listen_address") and ":" not in value:
                raise SettingsError(f"setting {name}: {value!r} is not host:port")
        if self.log_format not in LOG_FORMATS:
            raise SettingsError(f"setting log_format: {self.log_format!r} is not one of "
                             f"{', '.join(LOG_FORMATS)}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise SettingsError(f"setting log_level: {self.log_level!r} is not one of "
                             f"{', '.join(LOG_LEVELS)}")
        self._check_pairs()
        self._check_exposure()

    def _check_exposure(self) -> None:
        if self.mutual_tls or self.allow_insecure_remote or is_loopback(self.listen_address):
            return
        raise SettingsError(
            f"setting listen_address: {self.listen_address} is reachable from other hosts, "
            f"and without mutual TLS (tls_client_ca_file) every caller has every role, "
            f"Admin included: listen on 127.0.0.1, turn mutual TLS on "
            f"(deploy/make_certs.sh makes certificates for a first try), or set "
            f"allow_insecure_remote=true")

    def _check_pairs(self) -> None:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise SettingsError("settings tls_cert_file and tls_key_file: give both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise SettingsError("setting tls_client_ca_file: mutual TLS needs tls_cert_file and "
                             "tls_key_file too")
        if bool(self.redis_tls_cert_file) != bool(self.redis_tls_key_file):
            raise SettingsError("settings redis_tls_cert_file and redis_tls_key_file: give both "
                             "or neither")
        redis_tls = self.redis_tls_ca_file or self.redis_tls_cert_file
        if redis_tls and not self.redis_url.startswith("rediss://"):
            raise SettingsError("settings redis_tls_*: need a rediss:// redis_url")
        if bool(self.diameter_tls_cert_file) != bool(self.diameter_tls_key_file):
            raise SettingsError("settings diameter_tls_cert_file and diameter_tls_key_file: "
                                "give both or neither")
        if self.diameter_tls_client_ca_file and not self.diameter_tls_cert_file:
            raise SettingsError("setting diameter_tls_client_ca_file: needs "
                                "diameter_tls_cert_file and diameter_tls_key_file too")
        if self.diameter_transport == "sctp" and self.diameter_tls_cert_file:
            raise SettingsError("settings diameter_transport sctp and diameter_tls_*: RFC 6733 "
                                "protects SCTP with DTLS (RFC 6083), which Creditline does "
                                "not speak: TLS is over tcp")
        if self.diameter_tls_after_cer and not self.diameter_tls_cert_file:
            raise SettingsError("setting diameter_tls_after_cer: needs diameter_tls_cert_file "
                                "and diameter_tls_key_file")
        if self.redis_password and self.redis_password_file:
            raise SettingsError("settings redis_password and redis_password_file: give one")

    @property
    def tls_enabled(self) -> bool:
        return bool(self.tls_cert_file)

    @property
    def mutual_tls(self) -> bool:
        """Clients show certificates, and their roles are enforced."""
        return bool(self.tls_client_ca_file)

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={value!r}" for name, value in self.redacted().items())
        return f"Settings({shown})"

    def redacted(self) -> dict[str, object]:
        """The settings as they may be logged: secrets and URL passwords masked."""
        values: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in SECRET_SETTINGS and value:
                value = "***"
            elif f.name == "redis_url":
                value = redact_url(value)
            values[f.name] = value
        return values


def is_loopback(address: str) -> bool:
    """Whether a gRPC listen address is reachable from this host only: a loopback IP,
    localhost, or a unix socket. A host name other than localhost counts as remote (what
    it resolves to is not known here)."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _url_has_password(url: str) -> bool:
    try:
        return urlsplit(url).password is not None
    except ValueError:
        return False


def risks(settings: Settings) -> list[str]:
    """What the settings allow that is unsafe: the server says each as a WARNING at start."""
    found = []
    if _url_has_password(settings.redis_url):
        found.append("setting redis_url carries a password: a flag shows it in the process "
                     "list (ps), the environment to whoever may read it; give it in "
                     "CREDITLINE_REDIS_PASSWORD or in a file (redis_password_file)")
    if not settings.mutual_tls and not is_loopback(settings.listen_address):
        found.append(f"listening on {settings.listen_address} without mutual TLS "
                     f"(allow_insecure_remote): every caller from anywhere has every role, "
                     f"Admin included")
    if settings.clock_offset_s:
        found.append(f"setting clock_offset_s: the server's clock runs "
                     f"{settings.clock_offset_s} s off the machine's: every charge, deadline, "
                     f"expiry and renewal is dated by it (trials only)")
    return found


def redact_url(url: str) -> str:
    """The URL with its password (if any) replaced by ***: for logs and errors."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def redis_password(settings: Settings) -> str:
    """The Redis password: the setting, or the first line of redis_password_file."""
    if settings.redis_password_file:
        try:
            text = Path(settings.redis_password_file).read_text(encoding="utf-8")
        except OSError as error:
            raise SettingsError(f"setting redis_password_file: cannot read "
                             f"{settings.redis_password_file}: {error.strerror}") from None
        return text.splitlines()[0] if text else ""
    return settings.redis_password


def check_files(settings: Settings) -> None:
    """Every file a setting names exists and is readable: a clear error at start rather
    than a TLS handshake failing on the first call."""
    for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file",
                 "redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file",
                 "redis_password_file", "diameter_tls_cert_file", "diameter_tls_key_file",
                 "diameter_tls_client_ca_file"):
        path = getattr(settings, name)
        if not path:
            continue
        if not Path(path).is_file():
            raise SettingsError(f"setting {name}: {path} is not a file")
        if not os.access(path, os.R_OK):
            raise SettingsError(f"setting {name}: {path} is not readable")


def _kind(name: str) -> type:
    default = Settings.__dataclass_fields__[name].default
    assert default is not MISSING
    return type(default)


def _convert(name: str, text: str, source: str) -> object:
    kind = _kind(name)
    if kind is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise SettingsError(f"{source}: {text!r} is not a boolean (true/false)")
    try:
        return kind(text)
    except ValueError:
        raise SettingsError(f"{source}: {text!r} is not a {kind.__name__}") from None


def _from_file(path: str) -> dict[str, object]:
    try:
        with open(path, "rb") as file:
            data: dict[str, Any] = tomllib.load(file)
    except OSError as error:
        raise SettingsError(f"settings file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"settings file {path}: {error}") from None
    known = {f.name for f in fields(Settings)}
    values: dict[str, object] = {}
    for name, value in data.items():
        if name not in known:
            raise SettingsError(f"settings file {path}: unknown setting {name!r}")
        kind = _kind(name)
        accepted = (int, float) if kind is float else (kind,)
        if not isinstance(value, accepted) or (kind is not bool and isinstance(value, bool)):
            raise SettingsError(f"settings file {path}: {name}: {value!r} is not a "
                             f"{kind.__name__}")
        values[name] = float(value) if kind is float else value  # type: ignore[arg-type]
    return values


def _flag_converter(name: str) -> Callable[[str], object]:
    def convert(text: str) -> object:
        try:
            return _convert(name, text, "flag")
        except ValueError as error:
            # argparse reports ArgumentTypeError's message as it is
            raise argparse.ArgumentTypeError(str(error)) from None
    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per setting (none for secrets); each defaults to CREDITLINE_<NAME>."""
    parser.add_argument("--config", dest="config", default=None,
                        help=f"TOML settings file (env {CONFIG_ENV})")
    for f in fields(Settings):
        if f.name in SECRET_SETTINGS:
            continue
        flag = "--" + f.name.replace("_", "-")
        about = f"{f.metadata['help']} " if "help" in f.metadata else ""
        parser.add_argument(
            flag, dest=f.name, type=_flag_converter(f.name), default=None,
            help=f"{about}(env {ENV_PREFIX}{f.name.upper()}; default {f.default!r})",
        )


def from_arguments(
    namespace: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> Settings:
    config_path = getattr(namespace, "config", None) or environ.get(CONFIG_ENV)
    values: dict[str, object] = _from_file(config_path) if config_path else {}
    for f in fields(Settings):
        flag_value = getattr(namespace, f.name, None)
        env_name = ENV_PREFIX + f.name.upper()
        env_value = environ.get(env_name)
        if flag_value is not None and f.name not in SECRET_SETTINGS:
            values[f.name] = flag_value
        elif env_value is not None:
            values[f.name] = _convert(f.name, env_value, f"environment {env_name}")
    return Settings(**values)  # type: ignore[arg-type]


def parse(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> Settings:
    # no abbreviations: --redis-password must not pass as --redis-password-file
    parser = argparse.ArgumentParser(prog="creditline serve", allow_abbrev=False)
    add_arguments(parser)
    return from_arguments(parser.parse_args(argv), environ)
