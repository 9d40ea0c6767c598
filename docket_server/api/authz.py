"""Who may call what: every RPC and every registry route, and the roles allowed to call it.

One table, checked in one place (``Guard``, used by the gRPC interceptor and the registry
face's middleware), and walked whole by tests/test_security.py. A call that is not in the
table is refused: a new RPC must say who may call it.

Roles (docket_server/domain/security.py): ``admin`` may do everything; ``publisher`` pushes
and deletes images; ``operator`` runs rollouts and manages agents; ``viewer`` reads;
``agent`` (a join token) only enrolls a host; ``node`` is an enrolled agent calling with its
certificate on the agent port.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

from docket_common.errors import Reason
from docket_server.domain.errors import PermissionDenied, Unauthenticated
from docket_server.domain.security import ANONYMOUS, Caller, Identities, Role, Tokens

ADMIN, PUBLISHER, OPERATOR, VIEWER, JOIN, NODE = (
    Role.ADMIN,
    Role.PUBLISHER,
    Role.OPERATOR,
    Role.VIEWER,
    Role.AGENT,
    Role.NODE,
)
READ = frozenset({ADMIN, PUBLISHER, OPERATOR, VIEWER})


@dataclass(frozen=True)
class Rule:
    roles: frozenset[Role]
    changes: bool = False  # audited


def _r(*roles: Role | frozenset[Role], changes: bool = False) -> Rule:
    out: set[Role] = set()
    for role in roles:
        out |= role if isinstance(role, frozenset) else {role}
    return Rule(frozenset(out), changes)


_IMAGES = "/docket.v1.ImageService/"
_AGENTS = "/docket.v1.AgentService/"
_ADMIN = "/docket.v1.AgentAdminService/"
_ROLLOUTS = "/docket.v1.RolloutService/"
_PULLS = "/docket.v1.PullService/"
_TOKENS = "/docket.v1.TokenService/"
_AUDIT = "/docket.v1.AuditService/"

RPCS: dict[str, Rule] = {
    _IMAGES + "StatBlobs": _r(ADMIN, PUBLISHER),
    _IMAGES + "UploadBlob": _r(ADMIN, PUBLISHER),
    _IMAGES + "PutImage": _r(ADMIN, PUBLISHER, changes=True),
    _IMAGES + "DeleteImage": _r(ADMIN, PUBLISHER, changes=True),
    _IMAGES + "GetImage": _r(READ, NODE),
    _IMAGES + "GetManifest": _r(READ, NODE),
    _IMAGES + "ListTags": _r(READ, NODE),
    _IMAGES + "ListImages": _r(READ),
    _IMAGES + "ReadBlob": _r(READ, NODE),
    _IMAGES + "GetTorrent": _r(READ, NODE),
    _IMAGES + "CollectGarbage": _r(ADMIN, changes=True),
    _AGENTS + "Connect": _r(NODE),
    _AGENTS + "ClaimFirstPieces": _r(NODE),
    _AGENTS + "StartPull": _r(NODE),
    _AGENTS + "EnrollAgent": _r(JOIN, changes=True),
    _AGENTS + "RenewCertificate": _r(NODE, changes=True),
    _ADMIN + "ListAgents": _r(READ),
    _ADMIN + "GetAgent": _r(READ),
    _ADMIN + "RemoveAgent": _r(ADMIN, OPERATOR, changes=True),
    _ROLLOUTS + "CreateRollout": _r(ADMIN, OPERATOR, changes=True),
    _ROLLOUTS + "CancelRollout": _r(ADMIN, OPERATOR, changes=True),
    _ROLLOUTS + "ListRollouts": _r(READ),
    _ROLLOUTS + "GetRollout": _r(READ),
    _ROLLOUTS + "ListRolloutRecords": _r(READ),
    _ROLLOUTS + "WatchRollout": _r(READ),
    _PULLS + "ListPulls": _r(READ),
    _PULLS + "WatchPulls": _r(READ),
    _TOKENS + "CreateToken": _r(ADMIN, changes=True),
    _TOKENS + "ListTokens": _r(ADMIN),
    _TOKENS + "RevokeToken": _r(ADMIN, changes=True),
    _AUDIT + "ListAuditRecords": _r(ADMIN),
}

# Anyone may call these, with no token: load balancers probing liveness, API discovery.
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# The registry face: (route name in api/registry_http.py, method) -> rule.
ROUTES: dict[tuple[str, str], Rule] = {
    ("base", "GET"): _r(READ),
    ("base", "HEAD"): _r(READ),
    ("catalog", "GET"): _r(READ),
    ("tags", "GET"): _r(READ),
    ("manifest", "GET"): _r(READ),
    ("manifest", "HEAD"): _r(READ),
    ("manifest", "PUT"): _r(ADMIN, PUBLISHER, changes=True),
    ("manifest", "DELETE"): _r(ADMIN, PUBLISHER, changes=True),
    ("blob", "GET"): _r(READ),
    ("blob", "HEAD"): _r(READ),
    ("blob", "DELETE"): _r(ADMIN, PUBLISHER, changes=True),
    ("uploads", "POST"): _r(ADMIN, PUBLISHER),
    ("upload", "GET"): _r(ADMIN, PUBLISHER),
    ("upload", "HEAD"): _r(ADMIN, PUBLISHER),
    ("upload", "PATCH"): _r(ADMIN, PUBLISHER),
    ("upload", "PUT"): _r(ADMIN, PUBLISHER),
    ("upload", "DELETE"): _r(ADMIN, PUBLISHER),
    ("referrers", "GET"): _r(READ),
}

# Who is calling, for the servicers that need to know (set for the call by the guard).
current_caller: contextvars.ContextVar[Caller] = contextvars.ContextVar(
    "current_caller", default=ANONYMOUS
)


class Guard:
    """Identifies callers (a bearer token, or an enrolled agent's certificate) and checks
    the table. On an insecure server (``tokens`` None) everybody may call everything."""

    def __init__(self, tokens: Tokens | None, identities: Identities | None) -> None:
        self.tokens = tokens
        self.identities = identities

    @property
    def secure(self) -> bool:
        return self.tokens is not None

    def identify(self, token: str, agent: str = "", serial: str = "") -> Caller:
        """The caller, from its token or (agent port) its certificate's agent and serial;
        UNAUTHENTICATED when neither is good."""
        if self.tokens is None:
            return ANONYMOUS
        if agent:
            if self.identities is not None and self.identities.holds(agent, serial):
                return Caller(f"agent:{agent}", Role.NODE, agent=agent)
            raise Unauthenticated(
                Reason.AGENT_NOT_ENROLLED,
                f"agent {agent}'s certificate is not one the server issued to an enrolled "
                "agent (it was removed, or enrolled again elsewhere)",
                agent=agent,
            )
        record = self.tokens.authenticate(token) if token else None
        if record is None:
            raise Unauthenticated(
                Reason.UNAUTHENTICATED,
                "a valid token is required (missing, unknown, expired or revoked)",
            )
        return Caller(f"token:{record.id}", record.role, token=record)

    def check(self, caller: Caller, rule: Rule | None, action: str) -> None:
        if caller.role is None:  # an insecure server
            return
        if rule is None or caller.role not in rule.roles:
            raise PermissionDenied(
                Reason.PERMISSION_DENIED,
                f"{caller.label} may not call {action}",
                action=action,
                role=str(caller.role),
            )
