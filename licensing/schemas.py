"""The admin API's resource shapes (DESIGN §3), as pydantic models.

They validate input (a 400 problem naming the first bad field) and give the
OpenAPI document its JSON Schemas. Unit prices are decimal strings with at most
four decimal places of a fen; revenue-split parts are decimal strings with at
most four decimal places that sum to exactly 1.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import jwt
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    HttpUrl,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from core.errors import ValidationFailedError
from core.money import fen_to_e4, parse_vat_rate
from licensing.credit_code import CreditCodeError, validate_credit_code

Purpose = Literal["public-interest", "industrial"]
PURPOSES: tuple[str, ...] = ("public-interest", "industrial")
OpenClass = Literal["open", "conditional", "closed"]
LicenceStatus = Literal["active", "suspended", "revoked", "expired"]
Role = Literal["licence-admin", "finance", "auditor", "viewer", "licensee"]
ROLES: tuple[str, ...] = ("licence-admin", "finance", "auditor", "viewer", "licensee")

ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
Identifier = Annotated[str, Field(pattern=ID_PATTERN, description="lower-case letters, digits, . _ -")]
#: A dataset id, or ``provider/*`` for every dataset of a provider.
DatasetGrant = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}(/\*)?$")]
MAX_URL_LENGTH = 1000
MIN_YEAR, MAX_YEAR = 1970, 9998
M = TypeVar("M", bound=BaseModel)


def _fen_decimal(value: str) -> str:
    try:
        amount = Decimal(value)
    except InvalidOperation as exc:
        raise ValueError("must be a decimal number") from exc
    if not amount.is_finite() or amount < 0:
        raise ValueError("must be a finite, non-negative decimal")
    if amount.as_tuple().exponent < -4:  # type: ignore[operator]
        raise ValueError("at most 4 decimal places of a fen")
    if amount >= Decimal("1e12"):
        raise ValueError("too large")
    return value


FenDecimal = Annotated[
    str,
    Field(pattern=r"^[0-9]+(\.[0-9]{1,4})?$", examples=["2.5", "0.0125"]),
    AfterValidator(_fen_decimal),
]


def _vat_rate(value: str) -> str:
    return str(parse_vat_rate(value))


#: A VAT rate as a decimal string (0 <= rate < 1, at most 4 places), normalised: "0.060" -> "0.06".
VatRate = Annotated[str, Field(max_length=16, examples=["0.06"]), AfterValidator(_vat_rate)]
SplitPart = Annotated[str, Field(pattern=r"^(0(\.[0-9]{1,4})?|1(\.0{1,4})?)$", examples=["0.5"])]


def _upstream_base(value: HttpUrl) -> HttpUrl:
    if len(str(value)) > MAX_URL_LENGTH:
        raise ValueError(f"at most {MAX_URL_LENGTH} characters")
    if value.query or value.fragment:
        raise ValueError(
            "an upstream base URL has no query or fragment: calls append their own path and query"
        )
    if value.username or value.password:
        raise ValueError("credentials do not belong in the upstream URL")
    return value


#: An upstream base URL (http or https, no query, fragment or credentials),
#: as stored (at most 1000 characters).
UpstreamUrl = Annotated[HttpUrl, AfterValidator(_upstream_base)]


#: RFC 3339 ``date-time``: a full date, a time, a zone offset.
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def _rfc3339_text(value: object) -> object:
    """Times are RFC 3339 strings (or, from Python, datetimes): never numbers,
    nor digits taken as Unix time."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or _RFC3339.fullmatch(value.strip()) is None:
        raise ValueError("must be an RFC 3339 date-time string, e.g. 2026-01-01T00:00:00Z")
    return value


def _time_in_range(value: datetime) -> datetime:
    try:
        utc = value.astimezone(UTC)
    except OverflowError as exc:
        raise ValueError(f"must be between {MIN_YEAR} and {MAX_YEAR}") from exc
    if not MIN_YEAR <= utc.year <= MAX_YEAR:
        raise ValueError(f"must be between {MIN_YEAR} and {MAX_YEAR}")
    return value


#: An RFC 3339 time with a zone offset, in a range every database can store.
Time = Annotated[AwareDatetime, BeforeValidator(_rfc3339_text), AfterValidator(_time_in_range)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


def _patch_schema(schema: dict[str, Any], model: type[BaseModel]) -> None:
    """In the JSON schema of a PATCH body, a field that cannot be cleared
    takes no ``null`` (and has no default: an absent field is unchanged)."""
    clearable: frozenset[str] = getattr(model, "clearable", frozenset())
    for name, prop in schema.get("properties", {}).items():
        prop.pop("default", None)
        if name in clearable:
            continue
        options = [o for o in prop.get("anyOf", []) if o != {"type": "null"}]
        if len(options) == 1 and "anyOf" in prop:
            del prop["anyOf"]
            prop.update(options[0])
        elif options:
            prop["anyOf"] = options


class _Patch(_Model):
    """A PATCH body: a field given ``null`` is cleared when it is in
    ``clearable``, and refused otherwise (never ignored)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, json_schema_extra=_patch_schema)

    clearable: ClassVar[frozenset[str]] = frozenset()

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in data.items():
                if value is None and name in cls.model_fields and name not in cls.clearable:
                    raise ValueError(f"{name} cannot be cleared: give a value or leave it out")
        return data


class Tier(_Model):
    up_to: int | None = Field(
        None,
        ge=1,
        le=10**15,
        strict=True,
        description="calls in the month up to this count; null = no upper bound",
    )
    per_call_fen: FenDecimal


class Price(_Model):
    per_call_fen: FenDecimal = "0"
    per_record_fen: FenDecimal = "0"
    tiers: list[Tier] = Field(default_factory=list, max_length=20)

    @field_validator("tiers")
    @classmethod
    def _ascending(cls, tiers: list[Tier]) -> list[Tier]:
        bounds = [t.up_to for t in tiers]
        if None in bounds[:-1]:
            raise ValueError("only the last tier may have no upper bound")
        finite = [b for b in bounds if b is not None]
        if finite != sorted(set(finite)):
            raise ValueError("tier bounds must increase strictly")
        return tiers


class RevenueSplit(_Model):
    provider: SplitPart
    operator: SplitPart
    public_fund: SplitPart

    @model_validator(mode="after")
    def _sums_to_one(self) -> RevenueSplit:
        if Decimal(self.provider) + Decimal(self.operator) + Decimal(self.public_fund) != 1:
            raise ValueError("provider + operator + public_fund must sum to exactly 1")
        return self

    def basis_points(self) -> tuple[int, int, int]:
        return fen_to_e4(self.provider), fen_to_e4(self.operator), fen_to_e4(self.public_fund)


#: The methods a dataset may declare (RFC 9110 §9); CONNECT and TRACE are never relayed.
Method = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
DEFAULT_METHODS: tuple[str, ...] = ("GET", "HEAD")
#: One segment of a path pattern: literal characters (RFC 3986 unreserved and
#: sub-delimiters, ``:`` ``@``, percent-escapes), or ``*`` (any one segment),
#: or ``{personal}`` (any one segment, personal data: the call record keeps a
#: keyed digest of it), or, last, ``**`` (any rest, also none).
_PATTERN_SEGMENT = r"(\*\*?|\{personal\}|[A-Za-z0-9._~!$&'()+,;=:@%-]+)"
#: A path pattern relative to the dataset's upstream base, e.g. ``stations/*``,
#: ``observations``, ``archive/**``.
PathPattern = Annotated[
    str,
    Field(
        pattern=rf"^{_PATTERN_SEGMENT}(/{_PATTERN_SEGMENT})*$",
        max_length=512,
        examples=["stations/*", "observations", "archive/**"],
    ),
]
#: A licence's path pattern: ``{dataset id}/{pattern}``.
GrantedPathPattern = Annotated[
    str,
    Field(
        pattern=rf"^[a-z0-9][a-z0-9._-]{{0,63}}/{_PATTERN_SEGMENT}(/{_PATTERN_SEGMENT})*$",
        max_length=580,
        examples=["weather-obs/stations/*"],
    ),
]
MAX_RESPONSE_BYTES = 2**40
MAX_RECORDS_PER_CALL = 10**9


def _distinct_methods(methods: list[str] | None) -> list[str] | None:
    if methods is not None and len(set(methods)) != len(methods):
        raise ValueError("methods must not repeat")
    return methods


def _check_patterns(patterns: list[str] | None) -> list[str] | None:
    for pattern in patterns or ():
        segments = pattern.split("/")
        if "**" in segments[:-1]:
            raise ValueError(f"{pattern!r}: '**' may only be the last segment")
        if any(s in (".", "..") for s in segments):
            raise ValueError(f"{pattern!r}: no dot segments")
    if patterns is not None and len(set(patterns)) != len(patterns):
        raise ValueError("path patterns must not repeat")
    return patterns


def _check_granted(patterns: list[str]) -> list[str]:
    _check_patterns([p.split("/", 1)[1] for p in patterns])
    if len(set(patterns)) != len(patterns):
        raise ValueError("path patterns must not repeat")
    return patterns


Methods = Annotated[list[Method], Field(min_length=1, max_length=7), AfterValidator(_distinct_methods)]
PathPatterns = Annotated[list[PathPattern], Field(max_length=200), AfterValidator(_check_patterns)]
GrantedPaths = Annotated[list[GrantedPathPattern], Field(max_length=1000), AfterValidator(_check_granted)]


class Burst(_Model):
    per_second: float = Field(100.0, gt=0, le=1_000_000, strict=True)
    capacity: int = Field(100, ge=1, le=10_000_000, strict=True)


class PoolTarget(_Model):
    name: Identifier = Field(
        description="named in the call record of every call it answers (upstream_target)"
    )
    url: UpstreamUrl
    weight: int = Field(
        100, ge=1, le=1000, strict=True, description="share of calls, against the others' weights"
    )


class HealthCheck(_Model):
    """Active checks: ``GET {target}/{path}`` every ``interval_seconds``; a
    2xx or 3xx answer within ``timeout_seconds`` passes."""

    path: str = Field(
        "",
        max_length=512,
        pattern=r"^([A-Za-z0-9._~!$&'()+,;=:@%-]+(/[A-Za-z0-9._~!$&'()+,;=:@%-]+)*)?$",
        description="below the target's base URL, e.g. 'healthz' (empty: the base itself)",
    )
    interval_seconds: float = Field(10.0, ge=1, le=3600, strict=True)
    timeout_seconds: float = Field(2.0, gt=0, le=60, strict=True)
    #: Consecutive failed checks that take a target out, passed ones that bring it back.
    unhealthy_after: int = Field(2, ge=1, le=10, strict=True)
    healthy_after: int = Field(2, ge=1, le=10, strict=True)

    @field_validator("path")
    @classmethod
    def _no_dot_segments(cls, value: str) -> str:
        if any(s in (".", "..") for s in value.split("/")):
            raise ValueError("no dot segments")
        return value


class Breaker(_Model):
    """Passive health: ``failures`` failures in a row (no connection, a
    timeout, a 5xx answer) open a target's breaker for ``open_seconds``; then
    one call tries it again (a success closes the breaker, a failure opens it
    anew)."""

    failures: int = Field(5, ge=1, le=1000, strict=True)
    open_seconds: float = Field(30.0, gt=0, le=3600, strict=True)


class UpstreamPool(_Model):
    """Several targets serving the same API: calls are spread by weight
    (smooth weighted round robin) over the targets whose breaker is closed and
    whose active checks pass; a call none can take is refused 503
    ``upstream-unavailable`` without being forwarded or charged."""

    targets: list[PoolTarget] = Field(min_length=1, max_length=16)
    retries: int = Field(
        1,
        ge=0,
        le=5,
        strict=True,
        description="further targets tried for an idempotent call (GET, HEAD, OPTIONS, PUT, DELETE) "
        "whose body is held whole, when a target cannot be reached, resets, times out before answering "
        "or answers 5xx, before any byte reached the caller and within the call's timeout; the call is "
        "reserved and charged once",
    )
    breaker: Breaker = Field(default_factory=Breaker)
    health_check: HealthCheck | None = None

    @field_validator("targets")
    @classmethod
    def _distinct(cls, targets: list[PoolTarget]) -> list[PoolTarget]:
        if len({t.name for t in targets}) != len(targets):
            raise ValueError("target names must not repeat")
        if len({str(t.url).rstrip("/") for t in targets}) != len(targets):
            raise ValueError("target URLs must not repeat")
        return targets


MAX_PEM_LENGTH = 200_000


class UpstreamTls(_Model):
    """How the gateway meets an ``https`` upstream: the certificate
    authorities it trusts there (instead of the system's), and the client
    certificate it shows (mutual TLS). Client keys never pass through this
    API: ``client_certificate`` names a pair of files in the settings
    (``proxy.client_certificates``)."""

    ca_pem: str | None = Field(
        None,
        max_length=MAX_PEM_LENGTH,
        description="PEM bundle of the CA certificates trusted for this upstream",
    )
    client_certificate: Identifier | None = Field(
        None, description="name of a certificate and key pair in the settings (proxy.client_certificates)"
    )

    @field_validator("ca_pem")
    @classmethod
    def _certificates(cls, value: str | None) -> str | None:
        if value is None:
            return value
        from cryptography import x509

        try:
            x509.load_pem_x509_certificates(value.encode())
        except ValueError as exc:
            raise ValueError("not a PEM bundle of X.509 certificates") from exc
        return value


class DatasetIn(_Model):
    id: Identifier
    name: str = Field(min_length=1, max_length=200)
    provider: Identifier
    upstream_url: UpstreamUrl | None = Field(
        None, description="the upstream's base URL; required unless upstream_pool names the targets"
    )
    classification: int = Field(ge=1, le=4, strict=True)
    open_class: OpenClass
    free_monthly_calls: int = Field(0, ge=0, le=10**12, strict=True)
    price: Price = Field(default_factory=Price)
    revenue_split: RevenueSplit
    burst: Burst = Field(default_factory=Burst)
    timeout_seconds: float | None = Field(
        None,
        gt=0,
        le=600,
        strict=True,
        description="a call's whole time upstream, to the last byte relayed; default from settings "
        "(proxy.default_timeout_seconds)",
    )
    idle_timeout_seconds: float | None = Field(
        None,
        gt=0,
        le=600,
        strict=True,
        description="the longest silence of the upstream (before its answer, between chunks); default "
        "from settings (proxy.default_idle_timeout_seconds); never more than the whole time",
    )
    description: str = Field("", max_length=4000)
    tax_code: str | None = Field(
        None,
        pattern=r"^[0-9]{1,19}$",
        description="the tax classification code (税收分类编码) of its invoice lines; null: billing.tax_code",
    )
    vat_rate: VatRate | None = Field(
        None, description="the VAT rate of its invoice lines, e.g. 0.06; null: billing.vat_rate"
    )
    methods: Methods = Field(
        default_factory=lambda: list(DEFAULT_METHODS),  # type: ignore[arg-type]
        description="the HTTP methods the dataset serves; any other is refused (405) and never forwarded",
    )
    paths: PathPatterns = Field(
        default_factory=list,
        description="path patterns the dataset serves ('*' one segment, a last '**' any rest, "
        "'{personal}' one segment holding personal data, which the call record keeps only as a keyed "
        "digest); empty: every path; any other path is refused (404 unknown-operation)",
    )
    max_response_bytes: int | None = Field(
        None,
        ge=1,
        le=MAX_RESPONSE_BYTES,
        strict=True,
        description="largest response relayed; default from settings (proxy.max_response_bytes)",
    )
    upstream_pool: UpstreamPool | None = Field(
        None,
        description="several targets instead of upstream_url alone (which is then the first target's URL)",
    )
    upstream_tls: UpstreamTls | None = None
    max_records_per_call: int | None = Field(
        None,
        ge=1,
        le=MAX_RECORDS_PER_CALL,
        strict=True,
        validate_default=True,
        description="most records one call may return; required when records are priced (a credit "
        "reservation holds a call's worst case); a response over it is cut and never charged",
    )

    @field_validator("max_records_per_call")
    @classmethod
    def _records_bounded(cls, value: int | None, info: ValidationInfo) -> int | None:
        price = info.data.get("price")
        if value is None and price is not None and fen_to_e4(price.per_record_fen) > 0:
            raise ValueError(RECORDS_UNBOUNDED)
        return value

    @model_validator(mode="after")
    def _one_upstream(self) -> DatasetIn:
        if self.upstream_pool is None:
            if self.upstream_url is None:
                raise ValueError("give upstream_url, or upstream_pool with its targets")
        else:
            first = self.upstream_pool.targets[0].url
            if self.upstream_url is not None and str(self.upstream_url).rstrip("/") != str(first).rstrip("/"):
                raise ValueError(POOL_FIRST)
            if self.upstream_url is None:
                self.upstream_url = first
        return self


RECORDS_UNBOUNDED = "required when price.per_record_fen is above 0"
POOL_FIRST = "with upstream_pool, upstream_url is the first target's URL (or left out)"


class DatasetPatch(_Patch):
    """The fields to change; each given field replaces the stored value whole
    (``price``, ``revenue_split``, ``burst``, ``upstream_pool`` and
    ``upstream_tls`` are replaced as units). Only the optional limits may be
    ``null`` (cleared: the settings' defaults), and ``upstream_pool`` and
    ``upstream_tls`` (cleared: ``upstream_url`` alone, the system's CAs);
    ``null`` for any other field is refused, never ignored. A new
    ``upstream_pool`` makes ``upstream_url`` its first target's URL; while a
    pool is set, ``upstream_url`` changes only with it."""

    clearable: ClassVar[frozenset[str]] = frozenset(
        {
            "timeout_seconds",
            "idle_timeout_seconds",
            "max_response_bytes",
            "max_records_per_call",
            "upstream_pool",
            "upstream_tls",
        }
    )

    name: str | None = Field(None, min_length=1, max_length=200)
    provider: Identifier | None = None
    upstream_url: UpstreamUrl | None = None
    classification: int | None = Field(None, ge=1, le=4, strict=True)
    open_class: OpenClass | None = None
    free_monthly_calls: int | None = Field(None, ge=0, le=10**12, strict=True)
    price: Price | None = None
    revenue_split: RevenueSplit | None = None
    burst: Burst | None = None
    timeout_seconds: float | None = Field(None, gt=0, le=600, strict=True)
    idle_timeout_seconds: float | None = Field(None, gt=0, le=600, strict=True)
    description: str | None = Field(None, max_length=4000)
    tax_code: str | None = Field(None, pattern=r"^[0-9]{1,19}$")
    vat_rate: VatRate | None = None
    methods: Methods | None = None
    paths: PathPatterns | None = None
    max_response_bytes: int | None = Field(None, ge=1, le=MAX_RESPONSE_BYTES, strict=True)
    max_records_per_call: int | None = Field(None, ge=1, le=MAX_RECORDS_PER_CALL, strict=True)
    upstream_pool: UpstreamPool | None = None
    upstream_tls: UpstreamTls | None = None


class Dataset(DatasetIn):
    #: Absent for a licensee-scoped token, as ``timeout_seconds`` is.
    upstream_url: str | None = None  # type: ignore[assignment]
    #: The version of the terms (price, tiers, revenue split) in force: 1 at
    #: creation, one more at each change of them.
    terms_version: int = 1
    created_at: datetime
    updated_at: datetime


class Terms(_Model):
    """One version of a dataset's terms, in force from ``effective_from``
    until the next version's."""

    dataset_id: str
    version: int
    effective_from: datetime
    price: Price
    revenue_split: RevenueSplit


class LicenseeIn(_Model):
    id: Identifier | None = None
    name: str = Field(min_length=1, max_length=200)
    credit_code: str = Field(description="18-character unified social credit code (GB 32100-2015)")
    contact: str = Field("", max_length=200)
    #: What an invoice names its buyer by, besides the name and credit code.
    address: str = Field("", max_length=300)
    bank: str = Field("", max_length=200)
    account: str = Field("", max_length=64)

    @field_validator("credit_code")
    @classmethod
    def _credit_code(cls, value: str) -> str:
        try:
            return validate_credit_code(value)
        except CreditCodeError as exc:
            raise ValueError(str(exc)) from exc


class Licensee(LicenseeIn):
    id: str
    created_at: datetime


class Paid(_Model):
    """A licence's paid terms: a monthly credit limit, or a prepaid balance
    of calls. ``prepaid_calls`` is the balance's limit: calls granted
    (billed at list price when used, like credit calls) plus calls bought
    with top-ups (``POST /admin/v1/licences/{id}/top-ups``: invoiced when
    bought, at ``prepaid_unit_price_fen`` unless the top-up names a price,
    and billed at 0 when used)."""

    credit_limit_fen: int | None = Field(None, ge=0, le=10**15, strict=True)
    prepaid_calls: int | None = Field(None, ge=0, le=10**15, strict=True)
    prepaid_unit_price_fen: FenDecimal | None = Field(
        None, description="the agreed unit price of a prepaid call bought with a top-up"
    )

    @model_validator(mode="after")
    def _one(self) -> Paid:
        if (self.credit_limit_fen is None) == (self.prepaid_calls is None):
            raise ValueError("give exactly one of credit_limit_fen or prepaid_calls")
        if self.prepaid_unit_price_fen is not None and self.prepaid_calls is None:
            raise ValueError("prepaid_unit_price_fen goes with prepaid_calls")
        return self

    @model_serializer(mode="wrap")
    def _shown(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Without ``prepaid_unit_price_fen`` when no price was agreed."""
        shown: dict[str, Any] = handler(self)
        if shown.get("prepaid_unit_price_fen") is None:
            shown.pop("prepaid_unit_price_fen", None)
        return shown


class TopUpIn(_Model):
    """A purchase of prepaid calls for a licence with prepaid terms."""

    calls: int = Field(ge=1, le=10**12, strict=True)
    unit_price_fen: FenDecimal | None = Field(
        None, description="the price of each call bought; null: the licence's prepaid_unit_price_fen"
    )


class TopUp(_Model):
    id: str
    licence_id: str
    licensee_id: str
    calls: int
    #: The calls bought take positions first_position + 1 .. first_position +
    #: calls of the licence's prepaid balance (what it held before comes first).
    first_position: int
    unit_price_fen: str
    invoice_id: str
    bought_at: datetime


class LicenceIn(_Model):
    id: Identifier | None = None
    licensee_id: str = Field(min_length=1, max_length=64)
    datasets: list[DatasetGrant] = Field(min_length=1, max_length=1000)
    max_classification: int = Field(ge=1, le=4, strict=True)
    purposes: list[Purpose] = Field(min_length=1, max_length=2)
    valid_from: Time
    valid_until: Time
    security_officer: str = Field(min_length=1, max_length=200)
    conditions: str = Field("", max_length=4000)
    free_monthly_calls: int | None = Field(None, ge=0, le=10**12, strict=True)
    paid: Paid | None = None
    methods: Methods | None = Field(
        None, description="narrows the methods of every granted dataset; null: the datasets' own"
    )
    paths: GrantedPaths | None = Field(
        None,
        description="narrows a dataset's paths: '{dataset}/{pattern}'; a dataset named here is served "
        "only on its listed patterns (and its own); null: the datasets' own",
    )

    @field_validator("purposes")
    @classmethod
    def _distinct(cls, purposes: list[str]) -> list[str]:
        if len(set(purposes)) != len(purposes):
            raise ValueError("purposes must not repeat")
        return purposes

    @field_validator("valid_until")
    @classmethod
    def _window(cls, valid_until: datetime, info: ValidationInfo) -> datetime:
        valid_from = info.data.get("valid_from")
        if valid_from is not None and valid_until <= valid_from:
            raise ValueError("valid_until must be after valid_from")
        return valid_until


class LicencePatch(_Patch):
    """Changes to a licence's grant and terms, applied at once on every replica.
    A higher ``paid.prepaid_calls`` grants calls (billed at list price when
    used); calls bought are a top-up (``POST .../top-ups``). The quota counters
    are never touched, only the limit they are compared with. A field given as
    ``null`` is cleared (``paid``: no paid terms; ``free_monthly_calls``: the
    datasets' own allowances); ``null`` for any other field is refused."""

    clearable: ClassVar[frozenset[str]] = frozenset({"free_monthly_calls", "paid", "methods", "paths"})

    datasets: list[DatasetGrant] | None = Field(None, min_length=1, max_length=1000)
    max_classification: int | None = Field(None, ge=1, le=4, strict=True)
    purposes: list[Purpose] | None = Field(None, min_length=1, max_length=2)
    valid_until: Time | None = None
    security_officer: str | None = Field(None, min_length=1, max_length=200)
    conditions: str | None = Field(None, max_length=4000)
    free_monthly_calls: int | None = Field(None, ge=0, le=10**12, strict=True)
    paid: Paid | None = None
    methods: Methods | None = None
    paths: GrantedPaths | None = None

    @field_validator("purposes")
    @classmethod
    def _distinct(cls, purposes: list[str] | None) -> list[str] | None:
        if purposes is not None and len(set(purposes)) != len(purposes):
            raise ValueError("purposes must not repeat")
        return purposes


class Licence(LicenceIn):
    id: str
    status: LicenceStatus
    #: The stored status (``active``, ``suspended``, ``revoked``); ``status``
    #: above also says ``expired`` when the window has passed.
    stored_status: Literal["active", "suspended", "revoked"]
    created_at: datetime
    updated_at: datetime


def check_jwks(value: dict[str, Any]) -> dict[str, Any]:
    """A JWK Set of 1 to 10 usable public keys (``private_key_jwt``), or ValueError."""
    keys = value.get("keys")
    if set(value) != {"keys"} or not isinstance(keys, list) or not keys or len(keys) > 10:
        raise ValueError("jwks must be {'keys': [...]} with 1 to 10 keys")
    for key in keys:
        if not isinstance(key, dict) or key.get("kty") not in ("EC", "RSA", "OKP"):
            raise ValueError("each key needs kty EC, RSA or OKP")
        if any(private in key for private in ("d", "p", "q", "dp", "dq", "qi", "k", "oth")):
            raise ValueError("jwks must hold public keys only")
        for member in key.values():
            strings = member if isinstance(member, list) else [member]
            if not all(isinstance(s, str) and len(s) <= 16384 for s in strings) or len(strings) > 20:
                raise ValueError("JWK members are strings or lists of strings (RFC 7517)")
        try:
            # The whole key, as a client assertion would be verified with.
            jwt.PyJWK(key)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"a key is incomplete or unusable: {str(exc)[:200]}") from exc
    return value


class AppIn(_Model):
    id: Identifier | None = None
    licensee_id: str = Field(min_length=1, max_length=64)
    name: str = Field(min_length=1, max_length=200)
    jwks: dict[str, Any] | None = Field(
        None, description="public keys for private_key_jwt client authentication; omit to get a client_secret"
    )

    @field_validator("jwks")
    @classmethod
    def _jwks(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if value is None else check_jwks(value)


class AppJwksIn(_Model):
    """New public keys for an app that authenticates with ``private_key_jwt``."""

    jwks: dict[str, Any] = Field(description="the app's public keys, replacing the ones it had")

    @field_validator("jwks")
    @classmethod
    def _jwks(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_jwks(value)


class App(_Model):
    id: str
    client_id: str
    licensee_id: str
    name: str
    auth_method: Literal["client_secret", "private_key_jwt"]
    enabled: bool
    created_at: datetime
    client_secret: str | None = Field(None, description="returned once, at creation or rotation; never again")
    previous_secret_until: datetime | None = Field(
        None, description="after a rotation: the secret before it is accepted until then"
    )


class SecretRotationIn(_Model):
    overlap_seconds: int = Field(
        3600, ge=0, le=30 * 86400, description="how long the secret before stays valid (0: not at all)"
    )


class KeyRotationIn(_Model):
    algorithm: Literal["ES256", "EdDSA", "SM2"] | None = Field(
        None, description="of the new key; default: the settings' tokens.algorithm"
    )


class SigningKeyInfo(_Model):
    kid: str
    alg: str
    active: bool = Field(description="signs every replica's new tokens")
    created_at: datetime
    activated_at: datetime | None
    retired_at: datetime | None
    leaves_jwks_at: datetime | None = Field(
        description="a retired key verifies, and is in the JWKS, until then"
    )


class AdminTokenIn(_Model):
    role: Role
    licensee_id: str | None = Field(None, min_length=1, max_length=64, validate_default=True)
    description: str = Field("", max_length=200)
    expires_in_seconds: int | None = Field(
        None, ge=60, le=10 * 366 * 86400, description="refused from this many seconds on; none: until revoked"
    )

    @field_validator("licensee_id")
    @classmethod
    def _scoped(cls, licensee_id: str | None, info: ValidationInfo) -> str | None:
        role = info.data.get("role")
        if role is not None and (role == "licensee") != (licensee_id is not None):
            raise ValueError("role licensee needs licensee_id, and only it takes one")
        return licensee_id


def _storable(text: str) -> bool:
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _bad_text(data: Any) -> tuple[str, ...] | None:
    """The path of a string (key or value) in ``data`` that no database can
    store: one holding NUL or a lone surrogate. Iterative: any depth."""
    stack: list[tuple[Any, tuple[str, ...]]] = [(data, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if not _storable(item):
                return path
        elif isinstance(item, dict):
            for key, value in reversed(item.items()):
                where = (*path, str(key))
                if isinstance(key, str) and not _storable(key):
                    return where
                stack.append((value, where))
        elif isinstance(item, list | tuple):
            stack.extend((value, (*path, str(i))) for i, value in reversed(list(enumerate(item))))
    return None


def parse(model: type[M], data: Any) -> M:
    """Validate ``data`` as ``model``; a 400 naming the first bad field otherwise."""
    bad = _bad_text(data)
    if bad is not None:
        raise ValidationFailedError(
            ".".join(bad) or "body", "text must be valid Unicode without NUL characters"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "body"
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ValidationFailedError(field, message) from exc
