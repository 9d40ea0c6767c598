"""The agent's place in the fleet: its key, its certificate, and the channel they open.

On its first start with TLS on, the agent makes an ECDSA key (it never leaves the host),
sends a certificate request with a join token to the server's API port, and keeps what it
gets back in ``<data-dir>/tls/``::

    agent.key      its private key (0600)
    agent.pem      its client certificate, naming it, signed by the fleet CA
    ca.pem         the fleet CA (peers' certificates are signed by it)
    server-ca.pem  what it verifies the server by (--ca, or the CA --ca-hash picked; absent:
                   the system's CA store, for a server whose certificate a public CA signed)
    endpoint       the server's agent port, as the server gave it (":PORT": the --server host)

From then on it calls the agent port with that certificate (mutual TLS), and presents it to
peers on SSL torrents. Two thirds of the way through the certificate's life it asks for a
new one (RenewCertificate, over the same mutual TLS); calls from then on use the new one,
while the stream that is open stays open.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
import structlog
from cryptography import x509

from docket_common.bt import split_host_port
from docket_common.channel import open_channel
from docket_common.errors import error_info
from docket_common.pb import agent_service_pb2 as pb
from docket_common.pb import agent_service_pb2_grpc as pb_grpc
from docket_common.pki import (
    CLOCK_SKEW,
    CertificateError,
    agent_name_of,
    cert_pem,
    fingerprint,
    key_pem,
    load_cert,
    load_certs,
    load_key,
    make_csr,
    new_key,
    verify_issued,
    write_private,
    write_public,
)
from docket_common.tls_client import diagnose, fetch_chain, pick_ca

log = structlog.get_logger()

RENEW_AT = 2 / 3  # of a certificate's life
RENEW_RETRY_SECONDS = 30.0
StubT = TypeVar("StubT")


class EnrollError(Exception):
    """The agent cannot join the fleet; str() says why and what to do, in one line."""


@dataclass(frozen=True)
class Credentials:
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes  # the fleet CA
    server_ca_pem: bytes | None  # what verifies the server; None: the system's CA store
    endpoint: str  # the agent port, HOST:PORT

    @property
    def cert(self) -> x509.Certificate:
        return load_cert(self.cert_pem)

    @property
    def renew_time(self) -> datetime.datetime:
        """Two thirds of the way from when it was issued to when it expires (certificates
        are valid from a few minutes before they are issued, for skewed clocks)."""
        cert = self.cert
        issued = cert.not_valid_before_utc + CLOCK_SKEW
        if issued >= cert.not_valid_after_utc:
            issued = cert.not_valid_before_utc
        return issued + (cert.not_valid_after_utc - issued) * RENEW_AT


@dataclass
class TrustSettings:
    server: str  # the API port, HOST:PORT
    name: str
    join_token: str | None
    ca_file: Path | None
    ca_hash: str | None


class Identity:
    """The key and certificate files, enrollment and renewal."""

    def __init__(self, data_dir: Path, settings: TrustSettings) -> None:
        self.dir = data_dir / "tls"
        self.settings = settings

    @property
    def key_path(self) -> Path:
        return self.dir / "agent.key"

    @property
    def cert_path(self) -> Path:
        return self.dir / "agent.pem"

    @property
    def ca_path(self) -> Path:
        return self.dir / "ca.pem"

    @property
    def server_ca_path(self) -> Path:
        return self.dir / "server-ca.pem"

    @property
    def endpoint_path(self) -> Path:
        return self.dir / "endpoint"

    def load(self) -> Credentials | None:
        """The credentials kept from an earlier enrollment, if they are good for this name
        and still valid; None otherwise (the reason is logged)."""
        try:
            key = self.key_path.read_bytes()
            cert = self.cert_path.read_bytes()
            ca = self.ca_path.read_bytes()
            endpoint = self.endpoint_path.read_text().strip()
            server_ca = self.server_ca_path.read_bytes() if self.server_ca_path.exists() else None
        except FileNotFoundError:
            return None
        try:
            load_key(key)
            parsed = load_cert(cert)
            verify_issued(load_certs(ca)[0], parsed)
        except CertificateError as e:
            log.warning("the kept certificate is not usable: enrolling again", why=str(e))
            return None
        if agent_name_of(parsed) != self.settings.name:
            log.warning(
                "the kept certificate names another agent: enrolling again",
                certificate_for=agent_name_of(parsed),
                name=self.settings.name,
            )
            return None
        return Credentials(key, cert, ca, server_ca, self._dial(endpoint))

    def _dial(self, endpoint: str) -> str:
        """``HOST:PORT`` of the agent port; ":PORT" takes the host of --server."""
        host, _, port = endpoint.rpartition(":")
        if not host:
            server_host, _ = split_host_port(self.settings.server)
            host = f"[{server_host}]" if ":" in server_host else server_host
        return f"{host}:{port}"

    def _key(self) -> bytes:
        """The agent's key: made once, kept for as long as the data dir."""
        try:
            pem = self.key_path.read_bytes()
            load_key(pem)
            return pem
        except (FileNotFoundError, CertificateError):
            pem = key_pem(new_key())
            write_private(self.key_path, pem)
            return pem

    def _trust(self) -> tuple[bytes | None, str]:
        """What the enrollment call verifies the server by, and how to name it in errors."""
        s = self.settings
        if s.ca_file is not None:
            try:
                return s.ca_file.read_bytes(), f"the CA in {s.ca_file}"
            except OSError as e:
                raise EnrollError(f"cannot read --ca {s.ca_file}: {e.strerror or e}") from e
        if s.ca_hash:
            try:
                chain = fetch_chain(s.server)
                return cert_pem(pick_ca(chain, s.ca_hash, s.server)), f"the CA {s.ca_hash}"
            except CertificateError as e:
                raise EnrollError(str(e)) from e
            except ssl.SSLError as e:  # a plaintext server
                raise EnrollError(
                    f"the server at {s.server} does not speak TLS ({e.reason}): is it running "
                    "with --insecure? then so must the agent"
                ) from e
            except OSError as e:
                raise EnrollError(f"cannot reach the server at {s.server}: {e}") from e
        if self.server_ca_path.exists():  # enrolled before
            return self.server_ca_path.read_bytes(), f"the CA in {self.server_ca_path}"
        return None, "the system's CA store"

    async def enroll(self) -> Credentials:
        """Sends a certificate request with the join token; keeps and returns what the
        server signs."""
        s = self.settings
        if not s.join_token:
            raise EnrollError(
                "this agent is not enrolled: start it once with --join-token (an admin makes "
                "one with `docketctl tokens create --role agent`) and --ca or --ca-hash"
            )
        key = self._key()
        ca_pem, ca_source = await asyncio.to_thread(self._trust)
        channel = open_channel(s.server, [], insecure=False, ca_pem=ca_pem)
        try:
            async with channel:
                response = await pb_grpc.AgentServiceStub(channel).EnrollAgent(
                    pb.EnrollAgentRequest(name=s.name, csr_pem=make_csr(load_key(key), s.name)),
                    metadata=(("authorization", f"Bearer {s.join_token}"),),
                    timeout=30,
                )
        except grpc.aio.AioRpcError as e:
            raise EnrollError(await self._why(e, ca_pem, ca_source)) from e
        write_public(self.ca_path, response.ca_pem)
        if ca_pem is not None:
            write_public(self.server_ca_path, ca_pem)
        write_public(self.cert_path, response.certificate_pem)
        write_public(self.endpoint_path, (response.agent_endpoint + "\n").encode())
        cert = load_cert(response.certificate_pem)
        log.info(
            "enrolled: the server signed this agent's certificate",
            fingerprint=fingerprint(cert),
            expires=cert.not_valid_after_utc.isoformat(),
            agent_port=self._dial(response.agent_endpoint),
        )
        return Credentials(
            key,
            response.certificate_pem,
            response.ca_pem,
            ca_pem,
            self._dial(response.agent_endpoint),
        )

    async def _why(self, e: grpc.aio.AioRpcError, ca_pem: bytes | None, ca_source: str) -> str:
        reason, _ = error_info(e.trailing_metadata())
        if e.code() == grpc.StatusCode.UNAVAILABLE and not reason:
            why = await asyncio.to_thread(diagnose, self.settings.server, ca_pem, ca_source)
            return why or f"cannot reach the server at {self.settings.server}"
        return f"enrollment refused: {e.details()}" + (f" [{reason}]" if reason else "")

    async def renew(self, channel: grpc.aio.Channel, current: Credentials) -> Credentials:
        """A new certificate for the same key, over the agent port."""
        response = await pb_grpc.AgentServiceStub(channel).RenewCertificate(
            pb.RenewCertificateRequest(
                csr_pem=make_csr(load_key(current.key_pem), self.settings.name)
            ),
            timeout=30,
        )
        write_public(self.cert_path, response.certificate_pem)
        log.info(
            "certificate renewed",
            fingerprint=fingerprint(load_cert(response.certificate_pem)),
            expires=response.expire_time.ToDatetime(tzinfo=datetime.UTC).isoformat(),
        )
        return replace(current, cert_pem=response.certificate_pem)


class ServerChannel:
    """The agent's channel to the server, replaced when its certificate is: ``stub(...)``
    gives stubs that always call on the current one."""

    def __init__(self, make: Callable[[], grpc.aio.Channel]) -> None:
        self._make = make
        self.channel = make()
        self._retired: list[grpc.aio.Channel] = []

    def replace(self) -> None:
        """Opens a channel with the current credentials for every call from now on; the old
        one carries on with the calls it has (the stream), and closes with ``close_retired``."""
        self._retired.append(self.channel)
        self.channel = self._make()

    async def close_retired(self) -> None:
        retired, self._retired = self._retired, []
        for channel in retired:
            await channel.close(grace=5)

    async def close(self) -> None:
        await self.close_retired()
        await self.channel.close()

    def stub(self, factory: Callable[[grpc.aio.Channel], StubT]) -> StubT:
        return _LiveStub(self, factory)  # type: ignore[return-value]


class _LiveStub(Generic[StubT]):
    def __init__(self, holder: ServerChannel, factory: Callable[[grpc.aio.Channel], StubT]):
        self._holder = holder
        self._factory = factory
        self._for: grpc.aio.Channel | None = None
        self._stub: StubT | None = None

    def __getattr__(self, name: str) -> Any:
        if self._for is not self._holder.channel or self._stub is None:
            self._for = self._holder.channel
            self._stub = self._factory(self._for)
        return getattr(self._stub, name)


def secure_channel(credentials: Credentials, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    return open_channel(
        credentials.endpoint,
        options,
        insecure=False,
        ca_pem=credentials.server_ca_pem,
        cert_pem=credentials.cert_pem,
        key_pem=credentials.key_pem,
    )
