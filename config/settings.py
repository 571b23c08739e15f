"""Settings: one frozen tree, built in one place from a TOML file, ``PDG_*``
environment variables and command-line flags (later sources win).

Every setting, its environment variable and its default is listed in
``ENVIRONMENT`` below and documented in ``config/pdg.example.toml``.
This module imports nothing of the project's own.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigurationError(Exception):
    """A setting is missing, malformed or inconsistent (one line, for humans)."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(1, ge=1, le=64)
    #: The gateway's own address as clients see it: the token issuer (``iss``),
    #: the base of the OAuth metadata. Empty: ``http://{host}:{port}``.
    public_url: str = ""
    #: Peers whose ``X-Forwarded-For`` is trusted and extended; from anyone else
    #: the header is replaced by the peer address.
    trusted_proxies: tuple[str, ...] = ()
    #: Seconds between checks for catalogue / licence changes made elsewhere.
    catalogue_refresh_seconds: float = Field(1.0, gt=0, le=60)
    #: With the SQL database out of reach, data calls go on from the licence
    #: view in memory (kept current through Redis) this long, then are
    #: refused (503 service-unavailable) until it is back.
    degraded_max_seconds: float = Field(300.0, ge=0, le=86400)
    #: Run database migrations at start-up (safe with several replicas: they
    #: serialise on a lock).
    auto_migrate: bool = True
    #: ``HOST:PORT`` for the operations endpoints (``/metrics``, ``/healthz``,
    #: ``/readyz``) apart from the public port, e.g. ``127.0.0.1:9464``; the
    #: public port then serves no ``/metrics``. Empty: the public port.
    metrics_listen: str = ""
    #: A bearer token ``/metrics`` requires (``Authorization: Bearer …``).
    #: Empty: none (keep ``/metrics`` on a private ``metrics_listen`` then).
    metrics_token: str = ""
    #: ``HOST:PORT`` for the admin API (``/admin/v1``) apart from the public
    #: port, e.g. ``10.0.0.5:8081`` on an internal network; the public port
    #: then serves no ``/admin/v1``. Empty: the public port.
    admin_listen: str = ""
    #: On SIGTERM / SIGINT: seconds ``/readyz`` answers 503 (``accepting``
    #: false) while calls are still served, so a load balancer stops sending
    #: new ones; then the listeners close and the calls in flight finish
    #: (within ``shutdown_seconds``), their records flushed, and the process
    #: exits.
    drain_seconds: float = Field(0.0, ge=0, le=300)
    #: The longest the calls in flight may take to finish once the listeners
    #: have closed; past it they are cut (and recorded ``incomplete``).
    shutdown_seconds: float = Field(15.0, ge=0, le=600)

    @field_validator("metrics_listen", "admin_listen")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        if value:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
                raise ValueError(f"{value!r} is not HOST:PORT")
        return value

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        return _address(self.metrics_listen)

    @property
    def admin_address(self) -> tuple[str, int] | None:
        return _address(self.admin_listen)


def _address(listen: str) -> tuple[str, int] | None:
    if not listen:
        return None
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


class StorageSettings(_Section):
    #: SQLAlchemy async URL. Empty: a SQLite file in the data folder.
    database_url: str = ""
    #: Redis / Valkey URL. Empty: an embedded Valkey server in the data folder.
    redis_url: str = ""
    #: The URL names one node of a Redis Cluster (the client discovers the rest).
    redis_cluster: bool = False
    #: When the embedded Valkey writes its append-only file to disk:
    #: ``always``, before it replies (a call's record is on disk before its
    #: response leaves); ``everysec``, once a second (faster; a crash of the
    #: machine can lose the last second of records and counters).
    embedded_fsync: Literal["always", "everysec"] = "always"


class TrustedIssuer(_Section):
    """An external issuer whose access tokens the data plane accepts
    (``[[tokens.issuers]]``), verified through its published keys
    (``licensing.issuers``). Its claims name a pdg app and purpose; the
    licence rules apply as to the gateway's own tokens."""

    #: The exact ``iss`` of its tokens (an ``https`` URL, ``http`` on loopback).
    issuer: str = Field(min_length=1)
    #: Its JWKS. Empty: read ``jwks_uri`` from its RFC 8414 metadata
    #: (``metadata_url``, else ``/.well-known/oauth-authorization-server``
    #: inserted into the issuer URL).
    jwks_url: str = ""
    metadata_url: str = ""
    #: The ``aud`` its tokens must carry. Empty: the gateway's audience.
    audience: str = ""
    #: Signature algorithms accepted from it (never ``none`` or HS*).
    algorithms: tuple[
        Literal["ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "EdDSA"], ...
    ] = ("ES256", "RS256", "PS256", "EdDSA")
    #: Accepted ``typ`` headers (RFC 9068 says ``at+jwt``; add ``JWT`` for an
    #: issuer that does not follow it).
    token_types: tuple[str, ...] = ("at+jwt",)
    #: How long fetched keys are used; past it, with the issuer out of reach,
    #: its tokens are refused (fail closed). Refreshed at half of it.
    cache_seconds: float = Field(300.0, ge=1, le=86400)
    #: A token naming a key not in the cache refetches the keys at most this
    #: often.
    refetch_min_seconds: float = Field(30.0, ge=1, le=3600)
    #: The claim holding the pdg app id (the OAuth ``client_id`` registered here).
    app_claim: str = "client_id"
    #: The claim holding the purpose; ``scope`` reads its ``purpose:<p>`` item.
    purpose_claim: str = "purpose"
    #: Optional: a claim that must equal the app's licensee.
    licensee_claim: str = ""
    #: Optional: a claim naming the licence (else chosen as the token endpoint does).
    licence_claim: str = ""
    #: Optional: a claim listing datasets (``scope``: its ``dataset:<id>``
    #: items). Empty: every dataset the licence grants.
    datasets_claim: str = ""

    @field_validator("issuer", "jwks_url", "metadata_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value:
            parts = urlsplit(value)
            loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
            if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
                raise ValueError(f"{value!r} must be an https URL (http only on loopback)")
            if not parts.hostname or parts.fragment:
                raise ValueError(f"{value!r} is not a URL without a fragment")
        return value


class TokenSettings(_Section):
    #: Lifetime of issued access tokens.
    access_token_ttl_seconds: int = Field(300, ge=30, le=3600)
    #: Clock skew accepted on ``exp`` / ``nbf`` / ``iat``.
    leeway_seconds: int = Field(10, ge=0, le=120)
    #: Signing algorithm of the gateway's own key (``SM2``: SM2/SM3, the
    #: ``[sm]`` extra; ``core.sm2`` gives the JOSE profile).
    algorithm: Literal["ES256", "EdDSA", "SM2"] = "ES256"
    #: PEM file of this replica's own signing key. Empty (the default): the
    #: keys are shared by every replica through the database and rotate with
    #: ``pdg keys rotate`` (``licensing.keys``).
    signing_key_file: str = ""
    #: Encrypts the shared signing keys' private halves at rest (PKCS#8).
    key_passphrase: str = ""
    #: ... or read it from this file (a mounted secret); it wins over the above.
    key_passphrase_file: str = ""
    #: Audience of issued tokens. Empty: ``{public_url}/data``.
    audience: str = ""
    #: Lifetime of a ``private_key_jwt`` client assertion that is accepted.
    client_assertion_max_age_seconds: int = Field(300, ge=10, le=3600)
    #: How old a DPoP proof (RFC 9449) may be, by its ``iat``; its ``jti`` is
    #: remembered (in Redis, for every replica) this long and refused again.
    dpop_proof_max_age_seconds: int = Field(60, ge=5, le=600)
    #: Require DPoP proofs to carry a server nonce (``DPoP-Nonce``), renewed
    #: every ``dpop_nonce_seconds``: a proof cannot be made ahead of time.
    dpop_nonce: bool = False
    dpop_nonce_seconds: int = Field(300, ge=10, le=86400)
    #: Failed credential checks (token endpoint, admin API) allowed per
    #: minute for one client id (or admin token id) and for one address, on
    #: all replicas together; past either, 429 ``rate-limited`` until the
    #: minute ends, even for the right credentials.
    failures_per_client_per_minute: int = Field(10, ge=1, le=100_000)
    failures_per_address_per_minute: int = Field(300, ge=1, le=1_000_000)
    #: External issuers whose tokens are accepted (``[[tokens.issuers]]``).
    issuers: tuple[TrustedIssuer, ...] = ()

    @field_validator("issuers")
    @classmethod
    def _distinct(cls, value: tuple[TrustedIssuer, ...]) -> tuple[TrustedIssuer, ...]:
        names = [i.issuer for i in value]
        if len(set(names)) != len(names):
            raise ValueError("each issuer may be listed once")
        return value


class ClientCertificate(_Section):
    """A certificate (chain) and its private key, PEM files, that the gateway
    shows to upstreams asking for mutual TLS. Named by datasets
    (``upstream_tls.client_certificate``); the key never enters the database."""

    cert_file: str
    key_file: str


class ProxySettings(_Section):
    #: Largest request body forwarded upstream, in bytes.
    max_body_bytes: int = Field(10 * 1024 * 1024, ge=0)
    #: Largest response body kept for the retries of a call with an
    #: ``Idempotency-Key`` (24 h, in the quota store). A retry of a call whose
    #: response was larger gets 409 ``conflict`` naming the first call.
    idempotent_response_max_bytes: int = Field(1024 * 1024, ge=0, le=64 * 1024 * 1024)
    #: Largest response body relayed, in bytes, when a dataset sets no
    #: ``max_response_bytes``: a larger ``Content-Length`` gets 502 before
    #: anything is sent; a longer streamed body is cut, recorded
    #: ``incomplete`` and never charged.
    max_response_bytes: int = Field(64 * 1024 * 1024, ge=1, le=2**40)
    #: Records counted from a JSON array body hold no copy of it: between
    #: chunks, one byte per bracket still open below the top level, at most
    #: this many; a body that would need more counts no records.
    max_counted_depth: int = Field(1024, ge=2, le=65536)
    #: A call's whole time upstream when a dataset sets none: from forwarding
    #: to the response's last byte relayed (connecting, the upstream's answer,
    #: a body that trickles, a caller that reads slowly).
    default_timeout_seconds: float = Field(30.0, gt=0, le=600)
    #: The longest silence of the upstream (connecting, before the answer,
    #: between two chunks) when a dataset sets none; never more than the
    #: call's whole time.
    default_idle_timeout_seconds: float = Field(10.0, gt=0, le=600)
    #: Connection pool size towards all upstreams.
    pool_size: int = Field(200, ge=1, le=10000)
    #: Client certificates for upstream mutual TLS, by name (TOML tables
    #: ``[proxy.client_certificates.<name>]``; no environment variable).
    client_certificates: dict[str, ClientCertificate] = Field(default_factory=dict)


class SellerSettings(_Section):
    """The operating company, as every issued invoice and note names it."""

    #: Its legal name.
    name: str = Field("", max_length=200)
    #: Its unified social credit code (GB 32100-2015; its check digit is
    #: checked when a document is issued), or empty.
    credit_code: str = Field("", pattern=r"^([0-9A-HJ-NPQRTUWXY]{18})?$")
    address: str = Field("", max_length=300)
    #: The bank and the account payments go to.
    bank: str = Field("", max_length=200)
    account: str = Field("", max_length=64)


#: The fields a document number format may name.
_NUMBER_FIELDS = {"year", "n"}


class BillingSettings(_Section):
    #: Periods are calendar months in this IANA time zone.
    time_zone: str = "Asia/Shanghai"
    #: VAT on invoices, shown as its own amount (a decimal, at most 4 places).
    vat_rate: str = "0.06"
    #: The tax classification code (税收分类编码) of a line whose dataset names
    #: none; empty: none.
    tax_code: str = Field("", pattern=r"^[0-9]{0,19}$")
    #: Days from an invoice's issue to its due date.
    payment_terms_days: int = Field(30, ge=0, le=365)
    #: Numbers given at issue, gap-free per series: ``{n}`` is the number in
    #: the series (with a format spec, ``{n:06d}``), ``{year}`` the year of
    #: issue in the billing time zone (a series per year when named).
    invoice_number_format: str = "PDG-{year}-{n:06d}"
    credit_note_number_format: str = "PDG-CN-{year}-{n:06d}"
    debit_note_number_format: str = "PDG-DN-{year}-{n:06d}"
    seller: SellerSettings = SellerSettings()

    @field_validator("invoice_number_format", "credit_note_number_format", "debit_note_number_format")
    @classmethod
    def _number_format(cls, value: str) -> str:
        import string

        try:
            names = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
            sample = value.format(year=2026, n=1)
        except (ValueError, KeyError, IndexError) as exc:
            raise ValueError(f"{value!r} is not a number format ({exc})") from exc
        if "n" not in names or not names <= _NUMBER_FIELDS:
            raise ValueError(f"{value!r} must name {{n}} and nothing but {{n}} and {{year}}")
        if not 0 < len(sample) <= 40:
            raise ValueError(f"{value!r} makes numbers of more than 40 characters")
        return value

    @field_validator("vat_rate")
    @classmethod
    def _vat_rate(cls, value: str) -> str:
        from core.money import parse_vat_rate

        return str(parse_vat_rate(value))

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value


class LedgerSettings(_Section):
    #: Hash of the call-record chain and of response digests. Fixed once the
    #: ledger holds records.
    hash_algorithm: Literal["sha256", "sm3"] = "sha256"
    #: A signed checkpoint every this many records ...
    checkpoint_records: int = Field(1000, ge=1, le=1_000_000)
    #: ... or every this many seconds, whichever comes first.
    checkpoint_seconds: float = Field(10.0, gt=0, le=3600)
    #: PEM file of the key that signs checkpoints. Empty:
    #: ``{data_dir}/keys/ledger-key.pem``, generated on first start.
    signing_key_file: str = ""
    #: The Ed25519 key that signs the whole-log tree's C2SP checkpoints
    #: (``/audit/v1/checkpoint``, what witnesses poll). Empty:
    #: ``{data_dir}/keys/log-key.pem``, generated on first start.
    log_key_file: str = ""
    #: The checkpoints' origin line (and key name): a schema-less URL naming
    #: this log. Empty: ``{public host}/pdg-ledger``.
    log_origin: str = ""

    @field_validator("log_origin")
    @classmethod
    def _origin(cls, value: str) -> str:
        if any(c.isspace() or c == "+" for c in value):
            raise ValueError("an origin holds no spaces and no '+'")
        return value

    #: The algorithm of a ledger key generated on first start: ECDSA P-256
    #: (``ES256``) or ``SM2`` (SM2/SM3, the ``[sm]`` extra). A key file that
    #: exists signs with its own algorithm.
    signing_algorithm: Literal["ES256", "SM2"] = "ES256"
    #: The key (32 bytes) of the digests the call record keeps of personal
    #: path segments (``{personal}`` in a dataset's paths). Empty:
    #: ``{data_dir}/keys/personal-digest.key``, made on first start. Every
    #: replica must read the same one; keep it apart from the ledger.
    personal_digest_key_file: str = ""
    #: Move the log into the SQL ledger beside this gateway: ``pdg serve``
    #: runs the writer in a process of its own (one per ``pdg serve``, however
    #: many ``--workers``), ``pdg demo`` as a task. One writer works at a time,
    #: the others stand by. Turn off where ``pdg worker`` runs apart.
    run_writer: bool = True
    #: Records that may wait in the log (the SQL database down, the writer
    #: behind) before data calls fail closed with 503 ``ledger-unavailable``.
    max_backlog: int = Field(100_000, ge=100, le=100_000_000)
    #: Records the writer moves per transaction, at most.
    writer_batch: int = Field(5000, ge=1, le=100_000)
    #: Each batch costs the same fixed work (a transaction, the chain state,
    #: trimming the log) whatever its size, so the writer lets records gather:
    #: it starts a batch at most this often unless a whole batch is waiting
    #: (3,000-record batches cost the writer 10-20 % less CPU per record on
    #: SQLite than 800-record ones). Records are durable in the log meanwhile;
    #: this only delays when they show in the SQL ledger. 0: move each record
    #: as soon as it arrives.
    writer_linger_seconds: float = Field(1.0, ge=0, le=10)
    #: A replica not heard from for this long is dead: the writer releases its
    #: unfinished calls and records them as ``incomplete``.
    replica_timeout_seconds: float = Field(15.0, ge=3, le=600)


class LoggingSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    access_log: bool = False
    #: ``text`` for terminals, or ``json``: one JSON object per line
    #: (``gateway.logs``), access lines with the call's fields.
    format: Literal["text", "json"] = "text"


class TracingSettings(_Section):
    """OpenTelemetry traces of data calls (``gateway.tracing``; the ``[otel]``
    extra): a span per call, its stages as children, ``traceparent``
    continued to the upstream."""

    #: The OTLP/HTTP traces endpoint, e.g.
    #: ``http://otel-collector:4318/v1/traces``. Empty: no traces.
    otlp_endpoint: str = ""
    #: The share of calls traced. A caller's ``traceparent`` continues its
    #: trace, but whether a call is sampled is decided here, not by callers.
    sample_ratio: float = Field(1.0, ge=0, le=1)
    #: ``service.name`` of the spans.
    service_name: str = Field("pdg", min_length=1, max_length=100)

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value


class ConsoleSettings(_Section):
    """The browser console, ``/console/`` (``console``)."""

    #: Serve the console on the public port.
    enabled: bool = True
    #: Mark the console's cookies ``Secure`` on every response. Off: only
    #: when the request came over https or ``server.public_url`` is https.
    secure_cookies: bool = False
    #: A console session ends after this long without a request ...
    idle_timeout_seconds: int = Field(1800, ge=60, le=86400)
    #: ... and this long after sign-in, whatever happens.
    session_max_seconds: int = Field(43200, ge=300, le=604800)
    #: Failed sign-ins in a row (password or TOTP code) that lock a console
    #: user out ...
    lockout_failures: int = Field(5, ge=1, le=100)
    #: ... for this long (even the right password is refused meanwhile).
    lockout_seconds: int = Field(900, ge=1, le=86400)


class Settings(_Section):
    data_dir: Path = Path("pdg-data")
    server: ServerSettings = ServerSettings()
    storage: StorageSettings = StorageSettings()
    tokens: TokenSettings = TokenSettings()
    proxy: ProxySettings = ProxySettings()
    billing: BillingSettings = BillingSettings()
    ledger: LedgerSettings = LedgerSettings()
    logging: LoggingSettings = LoggingSettings()
    tracing: TracingSettings = TracingSettings()
    console: ConsoleSettings = ConsoleSettings()

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @model_validator(mode="after")
    def _not_our_issuer(self) -> Settings:
        if any(i.issuer.rstrip("/") == self.issuer for i in self.tokens.issuers):
            raise ValueError("tokens.issuers may not list the gateway's own issuer")
        return self

    # Derived values, so every caller agrees on them.
    @property
    def database_url(self) -> str:
        return self.storage.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'pdg.sqlite3'}"

    @property
    def embedded_redis(self) -> bool:
        return not self.storage.redis_url

    @property
    def public_url(self) -> str:
        if self.server.public_url:
            return self.server.public_url.rstrip("/")
        host = self.server.host if self.server.host not in ("0.0.0.0", "::", "") else "127.0.0.1"  # noqa: S104
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.server.port}"

    @property
    def public_host(self) -> str:
        """The host (and port) of :attr:`public_url`."""
        return urlsplit(self.public_url).netloc

    @property
    def issuer(self) -> str:
        return self.public_url

    @property
    def audience(self) -> str:
        return self.tokens.audience or f"{self.public_url}/data"

    @property
    def signing_key_path(self) -> Path:
        if self.tokens.signing_key_file:
            return Path(self.tokens.signing_key_file).expanduser().absolute()
        return self.data_dir / "keys" / "signing-key.pem"

    @property
    def shared_signing_keys(self) -> bool:
        """Signing keys shared through the database (no key file set)."""
        return not self.tokens.signing_key_file

    @property
    def key_passphrase(self) -> bytes | None:
        """The signing keys' passphrase, from its file or the setting."""
        if self.tokens.key_passphrase_file:
            path = Path(self.tokens.key_passphrase_file).expanduser()
            try:
                value = path.read_text().strip()
            except OSError as exc:
                raise ConfigurationError(
                    f"cannot read tokens.key_passphrase_file {path}: {exc.strerror}"
                ) from exc
            if not value:
                raise ConfigurationError(f"tokens.key_passphrase_file {path} is empty")
            return value.encode()
        return self.tokens.key_passphrase.encode() or None

    @property
    def sm2_required(self) -> bool:
        """A setting asks for SM2 keys (start-up needs the ``[sm]`` extra)."""
        return "SM2" in (self.tokens.algorithm, self.ledger.signing_algorithm)

    @property
    def personal_key_path(self) -> Path:
        if self.ledger.personal_digest_key_file:
            return Path(self.ledger.personal_digest_key_file).expanduser().absolute()
        return self.data_dir / "keys" / "personal-digest.key"

    @property
    def log_key_path(self) -> Path:
        if self.ledger.log_key_file:
            return Path(self.ledger.log_key_file).expanduser().absolute()
        return self.data_dir / "keys" / "log-key.pem"

    @property
    def log_origin(self) -> str:
        return self.ledger.log_origin or f"{self.public_host}/pdg-ledger"

    @property
    def ledger_key_path(self) -> Path:
        if self.ledger.signing_key_file:
            return Path(self.ledger.signing_key_file).expanduser().absolute()
        return self.data_dir / "keys" / "ledger-key.pem"


#: Environment variable -> dotted setting.
ENVIRONMENT: dict[str, str] = {
    "PDG_DATA_DIR": "data_dir",
    "PDG_HOST": "server.host",
    "PDG_PORT": "server.port",
    "PDG_WORKERS": "server.workers",
    "PDG_PUBLIC_URL": "server.public_url",
    "PDG_TRUSTED_PROXIES": "server.trusted_proxies",
    "PDG_CATALOGUE_REFRESH_SECONDS": "server.catalogue_refresh_seconds",
    "PDG_DEGRADED_MAX_SECONDS": "server.degraded_max_seconds",
    "PDG_AUTO_MIGRATE": "server.auto_migrate",
    "PDG_METRICS_LISTEN": "server.metrics_listen",
    "PDG_METRICS_TOKEN": "server.metrics_token",
    "PDG_ADMIN_LISTEN": "server.admin_listen",
    "PDG_DRAIN_SECONDS": "server.drain_seconds",
    "PDG_SHUTDOWN_SECONDS": "server.shutdown_seconds",
    "PDG_DATABASE_URL": "storage.database_url",
    "PDG_REDIS_URL": "storage.redis_url",
    "PDG_REDIS_CLUSTER": "storage.redis_cluster",
    "PDG_EMBEDDED_FSYNC": "storage.embedded_fsync",
    "PDG_BILLING_TIME_ZONE": "billing.time_zone",
    "PDG_BILLING_VAT_RATE": "billing.vat_rate",
    "PDG_BILLING_TAX_CODE": "billing.tax_code",
    "PDG_BILLING_PAYMENT_TERMS_DAYS": "billing.payment_terms_days",
    "PDG_INVOICE_NUMBER_FORMAT": "billing.invoice_number_format",
    "PDG_CREDIT_NOTE_NUMBER_FORMAT": "billing.credit_note_number_format",
    "PDG_DEBIT_NOTE_NUMBER_FORMAT": "billing.debit_note_number_format",
    "PDG_SELLER_NAME": "billing.seller.name",
    "PDG_SELLER_CREDIT_CODE": "billing.seller.credit_code",
    "PDG_SELLER_ADDRESS": "billing.seller.address",
    "PDG_SELLER_BANK": "billing.seller.bank",
    "PDG_SELLER_ACCOUNT": "billing.seller.account",
    "PDG_ACCESS_TOKEN_TTL_SECONDS": "tokens.access_token_ttl_seconds",
    "PDG_TOKEN_LEEWAY_SECONDS": "tokens.leeway_seconds",
    "PDG_TOKEN_ALGORITHM": "tokens.algorithm",
    "PDG_SIGNING_KEY_FILE": "tokens.signing_key_file",
    "PDG_TOKEN_AUDIENCE": "tokens.audience",
    "PDG_KEY_PASSPHRASE": "tokens.key_passphrase",
    "PDG_KEY_PASSPHRASE_FILE": "tokens.key_passphrase_file",
    "PDG_DPOP_PROOF_MAX_AGE_SECONDS": "tokens.dpop_proof_max_age_seconds",
    "PDG_DPOP_NONCE": "tokens.dpop_nonce",
    "PDG_DPOP_NONCE_SECONDS": "tokens.dpop_nonce_seconds",
    "PDG_FAILURES_PER_CLIENT_PER_MINUTE": "tokens.failures_per_client_per_minute",
    "PDG_FAILURES_PER_ADDRESS_PER_MINUTE": "tokens.failures_per_address_per_minute",
    "PDG_MAX_BODY_BYTES": "proxy.max_body_bytes",
    "PDG_IDEMPOTENT_RESPONSE_MAX_BYTES": "proxy.idempotent_response_max_bytes",
    "PDG_MAX_RESPONSE_BYTES": "proxy.max_response_bytes",
    "PDG_MAX_COUNTED_DEPTH": "proxy.max_counted_depth",
    "PDG_UPSTREAM_TIMEOUT_SECONDS": "proxy.default_timeout_seconds",
    "PDG_UPSTREAM_IDLE_TIMEOUT_SECONDS": "proxy.default_idle_timeout_seconds",
    "PDG_UPSTREAM_POOL_SIZE": "proxy.pool_size",
    "PDG_LEDGER_HASH_ALGORITHM": "ledger.hash_algorithm",
    "PDG_LEDGER_CHECKPOINT_RECORDS": "ledger.checkpoint_records",
    "PDG_LEDGER_CHECKPOINT_SECONDS": "ledger.checkpoint_seconds",
    "PDG_LEDGER_SIGNING_KEY_FILE": "ledger.signing_key_file",
    "PDG_LEDGER_SIGNING_ALGORITHM": "ledger.signing_algorithm",
    "PDG_LEDGER_LOG_KEY_FILE": "ledger.log_key_file",
    "PDG_LEDGER_LOG_ORIGIN": "ledger.log_origin",
    "PDG_PERSONAL_DIGEST_KEY_FILE": "ledger.personal_digest_key_file",
    "PDG_LEDGER_RUN_WRITER": "ledger.run_writer",
    "PDG_LEDGER_MAX_BACKLOG": "ledger.max_backlog",
    "PDG_LEDGER_WRITER_BATCH": "ledger.writer_batch",
    "PDG_LEDGER_WRITER_LINGER_SECONDS": "ledger.writer_linger_seconds",
    "PDG_LEDGER_REPLICA_TIMEOUT_SECONDS": "ledger.replica_timeout_seconds",
    "PDG_LOG_LEVEL": "logging.level",
    "PDG_ACCESS_LOG": "logging.access_log",
    "PDG_LOG_FORMAT": "logging.format",
    "PDG_OTLP_ENDPOINT": "tracing.otlp_endpoint",
    "PDG_TRACE_SAMPLE_RATIO": "tracing.sample_ratio",
    "PDG_TRACE_SERVICE_NAME": "tracing.service_name",
    "PDG_CONSOLE_ENABLED": "console.enabled",
    "PDG_CONSOLE_SECURE_COOKIES": "console.secure_cookies",
    "PDG_CONSOLE_IDLE_TIMEOUT_SECONDS": "console.idle_timeout_seconds",
    "PDG_CONSOLE_SESSION_MAX_SECONDS": "console.session_max_seconds",
    "PDG_CONSOLE_LOCKOUT_FAILURES": "console.lockout_failures",
    "PDG_CONSOLE_LOCKOUT_SECONDS": "console.lockout_seconds",
}
_LISTS = {"server.trusted_proxies"}


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise ConfigurationError(f"setting {name!r} must be a table")
        node = child
    node[leaf] = value


#: ``PDG_*`` names of the tools around pdg (its test suite, contract checks),
#: which pdg leaves alone.
_TOOLS = ("PDG_TEST_", "PDG_BIN")


def _refuse_unknown(env: Mapping[str, str]) -> None:
    """A ``PDG_*`` variable that is no setting (nor its ``_FILE`` form) is a
    mistake that would otherwise be silently ignored: refuse it, naming the
    nearest setting when one is near. Only the tools around pdg
    (``PDG_BIN``, ``PDG_TEST_*``) share the prefix. (Kubernetes' service
    links would inject ``PDG_PORT=tcp://…`` for a Service named ``pdg``: the
    chart turns them off.)"""
    known = [*ENVIRONMENT, *(f"{name}_FILE" for name in ENVIRONMENT), "PDG_CONFIG"]
    for name in sorted(env):
        if not name.startswith("PDG_") or name in known or name.startswith(_TOOLS):
            continue
        # Compared without the prefix all share, which would make any two alike.
        near = difflib.get_close_matches(name[4:], [k[4:] for k in known], n=1, cutoff=0.75)
        if near:
            raise ConfigurationError(f"unknown variable {name}: did you mean PDG_{near[0]}?")
        raise ConfigurationError(
            f"unknown variable {name}: no setting has that name (config/pdg.example.toml lists them)"
        )


def _from_file(env: Mapping[str, str], name: str) -> str:
    """``{name}_FILE``: the value of ``name`` read from a file (a mounted
    secret), without its trailing newline; not both."""
    if name in env:
        raise ConfigurationError(f"set {name} or {name}_FILE, not both")
    path = Path(env[f"{name}_FILE"]).expanduser()
    try:
        return path.read_text(encoding="utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ConfigurationError(f"cannot read {name}_FILE {path}: {reason}") from exc


#: Settings whose values are secrets (``pdg config show`` masks them).
SECRETS: frozenset[str] = frozenset(
    {"tokens.key_passphrase", "server.metrics_token", "storage.database_url", "storage.redis_url"}
)


def masked(settings: Settings) -> dict[str, Any]:
    """The effective settings as plain data, secrets masked: a passphrase or
    token as ``***`` (when set), a URL's password as ``***``."""
    tree: dict[str, Any] = settings.model_dump(mode="json")
    for dotted in SECRETS:
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node[part]
        value = node.get(leaf)
        if not value:
            continue
        if "url" not in leaf:
            node[leaf] = "***"
            continue
        parts = urlsplit(str(value))
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            user = parts.username or ""
            node[leaf] = parts._replace(netloc=f"{user}:***@{host}").geturl()
    return tree


def load_settings(
    config_file: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build the settings: TOML file, then ``PDG_*`` variables, then ``overrides``
    (dotted names, e.g. ``{"server.port": 9000}``; ``None`` values are ignored).

    The file is ``config_file``, else ``$PDG_CONFIG``, else none.
    """
    env = os.environ if env is None else env
    tree: dict[str, Any] = {}
    path = config_file or env.get("PDG_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                tree = tomllib.load(fh)
        except FileNotFoundError as exc:
            raise ConfigurationError(f"config file not found: {path}") from exc
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"cannot read config file {path}: {exc}") from exc
    _refuse_unknown(env)
    for name, dotted in ENVIRONMENT.items():
        raw = _from_file(env, name) if f"{name}_FILE" in env else env.get(name)
        if raw is None:
            continue
        value: Any = [p.strip() for p in raw.split(",") if p.strip()] if dotted in _LISTS else raw
        _put(tree, dotted, value)
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _put(tree, dotted, value)
    try:
        return Settings.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigurationError(f"invalid setting {where}: {first['msg']}") from exc
