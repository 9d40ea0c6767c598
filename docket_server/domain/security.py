"""Who may call the server: tokens with roles, enrolled agents bound to their keys, and the
audit log of every call that changes something.

Tokens look like ``dkt_<id>_<secret>``. The server keeps the id, the sha256 of the secret and
what the token may do; the token itself is shown once, when it is made. Join tokens (role
``agent``) enroll hosts: they expire (24 hours unless said otherwise), may have a use limit,
and may pin the groups and labels an enrolled host may claim.

An enrolled agent is its name bound to the hash of its public key (the key never leaves its
host): its certificates, signed by the fleet CA, name it, and the server accepts a
certificate only if it is one it issued to that agent and that agent is still enrolled. A name
another key enrolled is refused until an operator removes the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Protocol, TypeVar

import structlog
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from docket_common.errors import Reason
from docket_common.pki import CertificateError, public_key_hash, read_csr, write_private
from docket_common.selector import is_label, is_name
from docket_server.domain.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)

log = structlog.get_logger()

T = TypeVar("T")
JOIN_TOKEN_TTL = timedelta(hours=24)
# (request, agent name) -> (certificate PEM, its serial in hex, when it expires)
Signer = Callable[[x509.CertificateSigningRequest, str], tuple[bytes, str, datetime]]
_TOKEN_RE = re.compile(r"^dkt_([0-9a-f]{12})_([A-Za-z0-9_-]{20,})$")


class Role(StrEnum):
    ADMIN = "admin"
    PUBLISHER = "publisher"
    OPERATOR = "operator"
    VIEWER = "viewer"
    AGENT = "agent"  # a join token
    NODE = "node"  # an enrolled agent, by its certificate (never a token's role)


@dataclass(frozen=True)
class TokenRecord:
    id: str
    secret_hash: str
    role: Role
    description: str
    create_time: datetime
    expire_time: datetime | None
    max_uses: int = 0
    uses: int = 0
    groups: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()  # KEY=VALUE
    revoked: bool = False
    creator: str = ""

    def usable(self, now: datetime) -> bool:
        return not self.revoked and (self.expire_time is None or now < self.expire_time)


@dataclass(frozen=True)
class Caller:
    """Who makes a call: a token, an enrolled agent, or anybody (an insecure server)."""

    actor: str
    role: Role | None  # None: an insecure server, where every call is allowed
    token: TokenRecord | None = None
    agent: str = ""

    @property
    def label(self) -> str:
        return f"{self.actor} ({self.role})" if self.role and self.token else self.actor


ANONYMOUS = Caller("anonymous", None)


@dataclass(frozen=True)
class AgentIdentity:
    name: str
    key_hash: str
    serials: tuple[str, ...]  # the certificates issued to it, hex
    groups: tuple[str, ...] | None  # what it may claim; None for anything
    labels: tuple[str, ...] | None
    token_id: str
    enroll_time: datetime


@dataclass(frozen=True)
class AuditEntry:
    time: datetime
    actor: str
    action: str
    target: str
    outcome: str
    peer: str
    id: int = 0  # its place in the log, once written


class SecurityStore(Protocol):
    async def save_token(self, token: TokenRecord) -> None: ...

    async def list_tokens(self) -> list[TokenRecord]: ...

    async def save_identity(self, identity: AgentIdentity) -> None: ...

    async def delete_identity(self, name: str) -> bool: ...

    async def list_identities(self) -> list[AgentIdentity]: ...

    async def add_audit(self, entry: AuditEntry) -> None: ...

    async def list_audit(
        self, since: datetime | None, before_id: int, limit: int
    ) -> list[AuditEntry]:
        """Newest first; only entries older than ``before_id`` unless it is 0."""


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Tokens:
    """Tokens, kept in memory (for the check every call makes) and in the store."""

    def __init__(self, store: SecurityStore, clock: Callable[[], datetime] | None = None) -> None:
        self.store = store
        self.clock = clock or (lambda: datetime.now(UTC))
        self._tokens: dict[str, TokenRecord] = {}
        self._lock = asyncio.Lock()

    async def load(self) -> None:
        self._tokens = {t.id: t for t in await self.store.list_tokens()}

    async def bootstrap(self, path: Path) -> bool:
        """Makes the first admin token and writes it to ``path`` (0600) when the server has
        no token at all; True when it did."""
        if self._tokens:
            return False
        token, _ = await self.create(
            Role.ADMIN, None, "the first admin token, made at the first start", creator="server"
        )
        write_private(path, (token + "\n").encode())
        return True

    async def create(
        self,
        role: Role,
        ttl: timedelta | None,
        description: str = "",
        *,
        max_uses: int = 0,
        groups: Sequence[str] = (),
        labels: Sequence[str] = (),
        creator: str = "",
    ) -> tuple[str, TokenRecord]:
        if role is Role.NODE:
            raise InvalidArgument(Reason.INVALID_TOKEN_REQUEST, "tokens cannot be agents' own")
        if max_uses < 0 or (ttl is not None and ttl <= timedelta(0)):
            raise InvalidArgument(
                Reason.INVALID_TOKEN_REQUEST, "the ttl must be positive, the use limit not negative"
            )
        if role is not Role.AGENT and (groups or labels or max_uses):
            raise InvalidArgument(
                Reason.INVALID_TOKEN_REQUEST,
                "groups, labels and use limits are for join tokens (role agent)",
            )
        for group in groups:
            if not is_name(group):
                raise InvalidArgument(Reason.INVALID_TOKEN_REQUEST, f"invalid group {group!r}")
        for label in labels:
            key, sep, value = label.partition("=")
            if not sep or not is_label(key, value):
                raise InvalidArgument(Reason.INVALID_TOKEN_REQUEST, f"invalid label {label!r}")
        if role is Role.AGENT and ttl is None:
            ttl = JOIN_TOKEN_TTL
        now = self.clock()
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(24)
        record = TokenRecord(
            id=token_id,
            secret_hash=_hash(secret),
            role=role,
            description=description,
            create_time=now,
            expire_time=now + ttl if ttl is not None else None,
            max_uses=max_uses,
            groups=tuple(dict.fromkeys(groups)),
            labels=tuple(dict.fromkeys(labels)),
            creator=creator,
        )
        await self.store.save_token(record)
        self._tokens[token_id] = record
        log.info("token created", token=token_id, role=str(role), by=creator)
        return f"dkt_{token_id}_{secret}", record

    def authenticate(self, token: str) -> TokenRecord | None:
        match = _TOKEN_RE.match(token.strip())
        if match is None:
            return None
        record = self._tokens.get(match[1])
        if record is None or not hmac.compare_digest(record.secret_hash, _hash(match[2])):
            return None
        return record if record.usable(self.clock()) else None

    async def use(self, record: TokenRecord, action: Callable[[TokenRecord], Awaitable[T]]) -> T:
        """Runs ``action`` as one use of a join token, counted when it succeeds;
        PERMISSION_DENIED once the token has been used as often as it may."""
        async with self._lock:
            current = self._tokens.get(record.id, record)
            if not current.usable(self.clock()):
                raise PermissionDenied(
                    Reason.PERMISSION_DENIED, f"token {record.id} expired or was revoked"
                )
            if current.max_uses and current.uses >= current.max_uses:
                raise PermissionDenied(
                    Reason.TOKEN_USED_UP,
                    f"join token {record.id} has enrolled {current.max_uses} host(s), its limit",
                    token=record.id,
                )
            result = await action(current)
            used = replace(current, uses=current.uses + 1)
            await self.store.save_token(used)
            self._tokens[record.id] = used
            return result

    async def revoke(self, token_id: str) -> TokenRecord:
        record = self._tokens.get(token_id)
        if record is None:
            raise NotFound(Reason.TOKEN_NOT_FOUND, f"token {token_id} not found", token=token_id)
        revoked = replace(record, revoked=True)
        await self.store.save_token(revoked)
        self._tokens[token_id] = revoked
        log.info("token revoked", token=token_id)
        return revoked

    def list(self) -> list[TokenRecord]:
        return sorted(self._tokens.values(), key=lambda t: t.create_time, reverse=True)


class Identities:
    """Enrolled agents: names bound to keys, and the certificates issued to them."""

    def __init__(self, store: SecurityStore) -> None:
        self.store = store
        self._by_name: dict[str, AgentIdentity] = {}

    async def load(self) -> None:
        self._by_name = {i.name: i for i in await self.store.list_identities()}

    def get(self, name: str) -> AgentIdentity | None:
        return self._by_name.get(name)

    def holds(self, name: str, serial: str) -> bool:
        """Whether the certificate with ``serial`` is one issued to the enrolled ``name``."""
        identity = self._by_name.get(name)
        return identity is not None and serial in identity.serials

    async def enroll(
        self,
        name: str,
        csr_pem: bytes,
        token: TokenRecord,
        sign: Signer,
    ) -> tuple[bytes, datetime]:
        """Binds ``name`` to the request's key (or finds it bound to that key) and signs a
        certificate for it; the token's pins become what the agent may claim."""
        if not is_name(name):
            raise InvalidArgument(
                Reason.INVALID_AGENT,
                f"invalid agent name {name!r}: letters, digits, '.', '_', '-', up to 64",
                agent=name,
            )
        csr = _csr(csr_pem)
        key_hash = public_key_hash(_public_key(csr))
        current = self._by_name.get(name)
        if current is not None and current.key_hash != key_hash:
            raise AlreadyExists(
                Reason.AGENT_NAME_TAKEN,
                f"agent {name} is enrolled by another install: an operator frees the name "
                f"with `docketctl agents remove {name}`",
                agent=name,
            )
        cert_pem, serial, expires = sign(csr, name)
        identity = AgentIdentity(
            name=name,
            key_hash=key_hash,
            serials=(*(current.serials if current else ()), serial),
            groups=token.groups or None,
            labels=token.labels or None,
            token_id=token.id,
            enroll_time=datetime.now(UTC),
        )
        await self.store.save_identity(identity)
        self._by_name[name] = identity
        log.info("agent enrolled", agent=name, token=token.id, again=current is not None)
        return cert_pem, expires

    async def renew(
        self,
        name: str,
        csr_pem: bytes,
        sign: Signer,
    ) -> tuple[bytes, datetime]:
        current = self._by_name.get(name)
        if current is None:
            raise NotFound(Reason.AGENT_NOT_FOUND, f"agent {name} is not enrolled", agent=name)
        csr = _csr(csr_pem)
        key_hash = public_key_hash(_public_key(csr))
        cert_pem, serial, expires = sign(csr, name)
        # The last few certificates stay good (one may still be on a stream being replaced).
        renewed = replace(current, key_hash=key_hash, serials=(*current.serials[-2:], serial))
        await self.store.save_identity(renewed)
        self._by_name[name] = renewed
        log.info("agent certificate renewed", agent=name)
        return cert_pem, expires

    async def remove(self, name: str) -> bool:
        removed = self._by_name.pop(name, None) is not None
        if removed:
            log.info("agent unenrolled: its certificates stop working", agent=name)
        return await self.store.delete_identity(name) or removed

    def check_claims(self, name: str, groups: Sequence[str], labels: dict[str, str]) -> None:
        """PERMISSION_DENIED when an agent claims a group or label its join token did not
        allow."""
        identity = self._by_name.get(name)
        if identity is None:
            return
        if identity.groups is not None:
            extra = [g for g in groups if g not in identity.groups]
            if extra:
                raise PermissionDenied(
                    Reason.GROUP_NOT_ALLOWED,
                    f"agent {name} may not claim the groups {', '.join(extra)} (its join token "
                    f"allowed {', '.join(identity.groups)})",
                    agent=name,
                )
        if identity.labels is not None:
            extra = [f"{k}={v}" for k, v in labels.items() if f"{k}={v}" not in identity.labels]
            if extra:
                raise PermissionDenied(
                    Reason.GROUP_NOT_ALLOWED,
                    f"agent {name} may not claim the labels {', '.join(extra)}",
                    agent=name,
                )


def _csr(pem: bytes) -> x509.CertificateSigningRequest:
    try:
        return read_csr(pem)
    except CertificateError as e:
        raise InvalidArgument(Reason.INVALID_CSR, str(e)) from e


def _public_key(csr: x509.CertificateSigningRequest) -> ec.EllipticCurvePublicKey:
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InvalidArgument(Reason.INVALID_CSR, "the certificate request's key is not ECDSA")
    return key


@dataclass
class Audit:
    """The audit log: written in the background, in the order things happened."""

    store: SecurityStore
    _queue: asyncio.Queue[AuditEntry] = field(default_factory=asyncio.Queue)
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._write_forever(), name="audit-writer")

    async def stop(self) -> None:
        await self._queue.join()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def record(self, caller: Caller, action: str, target: str, outcome: str, peer: str) -> None:
        entry = AuditEntry(datetime.now(UTC), caller.label, action, target, outcome, peer)
        log.info(
            "audit", actor=entry.actor, action=action, target=target, outcome=outcome, peer=peer
        )
        self._queue.put_nowait(entry)

    async def list(self, since: datetime | None, before_id: int, limit: int) -> list[AuditEntry]:
        await self._queue.join()
        return await self.store.list_audit(since, before_id, limit)

    async def _write_forever(self) -> None:
        while True:
            entry = await self._queue.get()
            try:
                await self.store.add_audit(entry)
            except Exception:
                log.exception("cannot write an audit record")
            finally:
                self._queue.task_done()
