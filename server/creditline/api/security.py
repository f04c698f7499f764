"""TLS credentials for the gRPC port, and who may call what.

Roles come from the client certificate of a mutual-TLS connection. A certificate carries
its roles as URI subject alternative names (or, failing any, as its common name):

    creditline:role:network-function     may call the Charging service
    creditline:role:admin                may call the Admin service (and read any account's
                                         notification stream)
    creditline:role:subscriber:<account> may read the notification stream of <account> only

A certificate may carry several. Health is open to every client that completed the TLS
handshake (a load balancer's probe needs no role); reflection, which describes every
service and method, to a client whose certificate carries any role. A call refused here
never reaches its servicer: nothing is read or written. No client identity:
UNAUTHENTICATED; an identity without the role the service needs: PERMISSION_DENIED.

Without TLS, or with TLS but no client CA (tls_client_ca_file), there are no client
identities: every caller has every role (the server behaves as before TLS existed).

The notification stream (a future `creditline.v1.Notifications` service) is authorised in
two steps: the call wrapper (interceptors.CallWrapper) lets in callers with a subscriber or
admin role, and the stream handler filters with `current_principal().may_read_account(account_id)`.
"""

from __future__ import annotations

import contextvars
import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from creditline.errors import CreditlineError
from creditline.settings import Settings

ROLE_PREFIX = "creditline:role:"
SUBSCRIBER_PREFIX = "subscriber:"


class Role(enum.Enum):
    NETWORK_FUNCTION = "network-function"
    ADMIN = "admin"
    SUBSCRIBER = "subscriber"


# Which role each service needs; services not named here are refused to everyone except
# the open ones (a new service must be given a role before it can be called with mTLS).
SERVICE_ROLES: Mapping[str, frozenset[Role]] = {
    "creditline.v1.Charging": frozenset({Role.NETWORK_FUNCTION}),
    "creditline.v1.Admin": frozenset({Role.ADMIN}),
    "creditline.v1.Notifications": frozenset({Role.SUBSCRIBER, Role.ADMIN}),
}
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
# Services a caller with any role may call: a certificate the CA signed is not enough
ANY_ROLE_SERVICES = frozenset({
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a name for logs, the roles, and the accounts of subscriber roles."""

    name: str
    roles: frozenset[Role]
    subscriber_accounts: frozenset[str] = frozenset()

    def may_call_service(self, service: str) -> bool:
        if service in OPEN_SERVICES:
            return True
        if service in ANY_ROLE_SERVICES:
            return bool(self.roles)
        needed = SERVICE_ROLES.get(service)
        return needed is not None and bool(needed & self.roles)

    def may_read_account(self, account_id: str) -> bool:
        """The notification stream's filter: admins read all, subscribers their own."""
        return Role.ADMIN in self.roles or account_id in self.subscriber_accounts


# Every role: the caller when the server has no client identities (no mutual TLS).
TRUSTED = Principal(name="trusted", roles=frozenset(Role))

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar(
    "creditline_principal", default=TRUSTED)


def current_principal() -> Principal:
    """The caller of the call being served (TRUSTED without mutual TLS)."""
    return _current.get()


def set_current_principal(principal: Principal) -> contextvars.Token[Principal]:
    return _current.set(principal)


def reset_current_principal(token: contextvars.Token[Principal]) -> None:
    _current.reset(token)


def parse_role(text: str) -> tuple[Role, str] | None:
    """`creditline:role:<role>` -> (role, account for subscribers else ""); None if not one."""
    if not text.startswith(ROLE_PREFIX):
        return None
    value = text[len(ROLE_PREFIX):]
    if value.startswith(SUBSCRIBER_PREFIX):
        account = value[len(SUBSCRIBER_PREFIX):]
        return (Role.SUBSCRIBER, account) if account else None
    try:
        return Role(value), ""
    except ValueError:
        return None


def principal_from_auth_context(auth: Mapping[str, Iterable[bytes]]) -> Principal | None:
    """The caller named by a TLS client certificate; None when it showed none."""
    sans = [value.decode(errors="replace")
            for value in auth.get("x509_subject_alternative_name", ())]
    common_names = [value.decode(errors="replace")
                    for value in auth.get("x509_common_name", ())]
    if not sans and not common_names:
        return None
    roles: set[Role] = set()
    accounts: set[str] = set()
    candidates = [san for san in sans if san.startswith(ROLE_PREFIX)] or common_names
    for text in candidates:
        parsed = parse_role(text)
        if parsed is None:
            continue
        role, account = parsed
        roles.add(role)
        if account:
            accounts.add(account)
    name = common_names[0] if common_names else (sans[0] if sans else "?")
    return Principal(name=name, roles=frozenset(roles), subscriber_accounts=frozenset(accounts))


class CallRefusedError(CreditlineError):
    """The caller may not make this call: the status and reason to answer with."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def authorize(service: str, auth: Mapping[str, Iterable[bytes]]) -> Principal:
    """The caller, if it may call the service; else CallRefusedError."""
    principal = principal_from_auth_context(auth)
    if principal is None:
        raise CallRefusedError(grpc.StatusCode.UNAUTHENTICATED,
                               "a client certificate is required")
    if not principal.may_call_service(service):
        raise CallRefusedError(grpc.StatusCode.PERMISSION_DENIED,
                               f"{principal.name!r} has no role that may call {service}")
    return principal


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS (or mutual TLS with tls_client_ca_file) from the PEM files; None: insecure."""
    if not settings.tls_enabled:
        return None
    key = Path(settings.tls_key_file).read_bytes()
    chain = Path(settings.tls_cert_file).read_bytes()
    client_ca = (Path(settings.tls_client_ca_file).read_bytes()
                 if settings.tls_client_ca_file else None)
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca,
        require_client_auth=client_ca is not None)
