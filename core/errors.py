"""Every error the gateway itself produces. Each class carries its HTTP status
and its stable problem ``code`` (DESIGN §3); the HTTP edge renders them once,
as RFC 9457 problem JSON (``gateway.problems``).

    GatewayError
    ├── BadRequestError                   400 bad-request
    │   └── ValidationFailedError         400 bad-request  (names the field)
    ├── AuthenticationError
    │   ├── TokenRequiredError            401 token-required
    │   ├── InvalidTokenError             401 invalid-token
    │   ├── SenderConstraintError         401 sender-constraint-failed
    │   └── InvalidClientError            401 invalid-client   (OAuth client authentication)
    ├── AdminAuthError                    401 admin-token-required
    ├── PaymentRequiredError              402 payment-required
    ├── ForbiddenError                    403 forbidden        (admin role lacks the right)
    ├── LicenceError
    │   ├── LicenceInactiveError          403 licence-inactive
    │   ├── DatasetNotLicensedError       403 dataset-not-licensed
    │   ├── PurposeNotAllowedError        403 purpose-not-allowed
    │   └── DatasetClosedError            403 dataset-closed
    ├── NotFoundError                     404 not-found
    │   ├── UnknownDatasetError           404 unknown-dataset
    │   └── UnknownOperationError         404 unknown-operation  (a path not served)
    ├── MethodNotAllowedError             405 method-not-allowed (with ``Allow``)
    ├── ConflictError                     409 conflict
    ├── RequestTooLargeError              413 request-too-large
    ├── IdempotencyMismatchError          422 idempotency-mismatch
    ├── RateLimitedError                  429 rate-limited
    ├── QuotaExhaustedError               429 quota-exhausted
    ├── UpstreamUnavailableError          502/503/504 upstream-unavailable
    ├── ServiceUnavailableError           503 service-unavailable
    ├── QuotaUnavailableError             503 quota-unavailable
    └── LedgerUnavailableError            503 ledger-unavailable
"""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    """Base: an error with an HTTP status, a stable code and a short title."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal-error"
    title: ClassVar[str] = "Internal error"

    def __init__(self, detail: str = "", *, headers: dict[str, str] | None = None, **extra: Any) -> None:
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = dict(headers or {})
        #: Extension members of the problem document.
        self.extra = extra

    @property
    def http_status(self) -> int:
        return self.status


class BadRequestError(GatewayError):
    status, code, title = 400, "bad-request", "Bad request"


class ValidationFailedError(BadRequestError):
    """A request field is missing or malformed; ``field`` names it."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}" if field else detail, field=field)
        self.field = field


class AuthenticationError(GatewayError):
    status, code, title = 401, "invalid-token", "Authentication failed"


class TokenRequiredError(AuthenticationError):
    code, title = "token-required", "Access token required"


class InvalidTokenError(AuthenticationError):
    code, title = "invalid-token", "Invalid access token"


class SenderConstraintError(AuthenticationError):
    code, title = "sender-constraint-failed", "Sender constraint failed"


class InvalidClientError(AuthenticationError):
    code, title = "invalid-client", "Client authentication failed"


class AdminAuthError(GatewayError):
    status, code, title = 401, "admin-token-required", "Admin token required"


class ForbiddenError(GatewayError):
    status, code, title = 403, "forbidden", "Not allowed for this role"


class LicenceError(GatewayError):
    status = 403


class LicenceInactiveError(LicenceError):
    code, title = "licence-inactive", "Licence not active"


class DatasetNotLicensedError(LicenceError):
    code, title = "dataset-not-licensed", "Dataset not licensed"


class PurposeNotAllowedError(LicenceError):
    code, title = "purpose-not-allowed", "Purpose not allowed"


class DatasetClosedError(LicenceError):
    code, title = "dataset-closed", "Dataset on the negative list"


class UnsupportedMediaTypeError(GatewayError):
    """A request body not sent as ``application/json`` (RFC 9110 §15.5.16)."""

    status, code, title = 415, "unsupported-media-type", "Unsupported media type"


class NotFoundError(GatewayError):
    status, code, title = 404, "not-found", "Not found"


class UnknownDatasetError(NotFoundError):
    code, title = "unknown-dataset", "Unknown dataset"


class UnknownOperationError(NotFoundError):
    code, title = "unknown-operation", "Unknown operation"


class MethodNotAllowedError(GatewayError):
    """A method not served; ``allowed`` (in order) becomes the ``Allow`` header."""

    status, code, title = 405, "method-not-allowed", "Method not allowed"

    def __init__(self, detail: str = "", *, allowed: tuple[str, ...] = (), **extra: Any) -> None:
        super().__init__(detail, **extra)
        self.headers["Allow"] = ", ".join(allowed)


class ConflictError(GatewayError):
    status, code, title = 409, "conflict", "Conflict"


class RequestTooLargeError(GatewayError):
    status, code, title = 413, "request-too-large", "Request body too large"


class IdempotencyMismatchError(GatewayError):
    """An ``Idempotency-Key`` reused with another method, path, query or body."""

    status, code, title = 422, "idempotency-mismatch", "Idempotency-Key used for another request"


class UpstreamUnavailableError(GatewayError):
    """The upstream failed (502), is unreachable (503) or timed out (504)."""

    status, code, title = 502, "upstream-unavailable", "Upstream unavailable"

    def __init__(self, detail: str = "", *, status: int = 502, **extra: Any) -> None:
        super().__init__(detail, **extra)
        self._status = status

    @property
    def http_status(self) -> int:
        return self._status


class ServiceUnavailableError(GatewayError):
    status, code, title = 503, "service-unavailable", "Service unavailable"


class PaymentRequiredError(GatewayError):
    status, code, title = 402, "payment-required", "No paid balance or credit left"


class RateLimitedError(GatewayError):
    status, code, title = 429, "rate-limited", "Burst limit exceeded"


class QuotaExhaustedError(GatewayError):
    status, code, title = 429, "quota-exhausted", "Free allowance used up"


class QuotaUnavailableError(GatewayError):
    status, code, title = 503, "quota-unavailable", "Quota store unavailable"


class LedgerUnavailableError(GatewayError):
    status, code, title = 503, "ledger-unavailable", "Call record unavailable"
