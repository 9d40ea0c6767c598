"""The server's TLS: the fleet CA it makes on first start, its serving certificate, the
certificates it signs for agents and for its own BitTorrent seed, and reloading what an
operator replaces on disk without a restart.

Files in the data dir (keys 0600):

    ca.pem, ca.key          the fleet CA: signs agents' certificates, is the root of SSL torrents
    server.pem, server.key  the serving certificate (and the CA), for the host names and
                            addresses the server is told it is reached at

An operator may bring their own instead: the serving certificate and key (``--tls-cert``,
``--tls-key``), and the fleet CA (``--tls-ca-cert``, ``--tls-ca-key``: an intermediate of their
own PKI, say), which then signs agents' certificates and roots the SSL torrents. The serving
files are looked at again when a connection starts (gRPC) or every few seconds (the registry
face): a replaced certificate is used from the next handshake on, with no restart. The CA is
read at start: it is in every torrent's info-hash.
"""

from __future__ import annotations

import datetime
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog
from cryptography import x509

from docket_common.pki import (
    CertificateError,
    KeyPair,
    cert_pem,
    fingerprint,
    general_name,
    issue_agent,
    issue_peer,
    issue_server,
    key_pem,
    load_cert,
    load_certs,
    load_key,
    make_ca,
    write_private,
    write_public,
)

log = structlog.get_logger()


@dataclass
class TlsSettings:
    data_dir: Path
    names: list[str]  # host names and addresses for a generated serving certificate
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_cert_file: Path | None = None
    ca_key_file: Path | None = None
    agent_cert_lifetime: datetime.timedelta = datetime.timedelta(days=30)


@dataclass
class _Material:
    key: bytes
    chain: bytes
    client_ca: bytes
    stamp: tuple[float, ...] = field(default_factory=tuple)


class ServerTls:
    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self.ca = self._load_or_make_ca()
        self.seed = issue_peer(self.ca, "docket-seed", datetime.timedelta(days=365))
        if settings.cert_file is None:
            self._ensure_serving_cert()
        self._lock = threading.Lock()
        self._material = self._read()
        self._contexts: list[ssl.SSLContext] = []
        self._context_stamp = self._material.stamp

    # Files

    @property
    def ca_path(self) -> Path:
        return self.settings.data_dir / "ca.pem"

    @property
    def ca_pem(self) -> bytes:
        return cert_pem(self.ca.cert)

    @property
    def ca_fingerprint(self) -> str:
        return fingerprint(self.ca.cert)

    def _load_or_make_ca(self) -> KeyPair:
        s = self.settings
        if s.ca_cert_file is not None and s.ca_key_file is not None:
            ca = KeyPair(
                load_key(s.ca_key_file.read_bytes()), load_cert(s.ca_cert_file.read_bytes())
            )
            write_public(self.ca_path, ca.cert_pem)  # what clients and agents are told to trust
            return ca
        cert_path, key_path = self.ca_path, s.data_dir / "ca.key"
        if cert_path.exists() and key_path.exists():
            return KeyPair(load_key(key_path.read_bytes()), load_cert(cert_path.read_bytes()))
        ca = make_ca()
        write_private(key_path, ca.key_pem)
        write_public(cert_path, ca.cert_pem)
        log.info("made the fleet CA", ca=str(cert_path), fingerprint=fingerprint(ca.cert))
        return ca

    def _serving_paths(self) -> tuple[Path, Path]:
        s = self.settings
        if s.cert_file is not None and s.key_file is not None:
            return s.cert_file, s.key_file
        return s.data_dir / "server.pem", s.data_dir / "server.key"

    def _ensure_serving_cert(self) -> None:
        """Makes the serving certificate, again when it lacks a name the server is now told
        it is reached at, or is about to expire."""
        cert_path, key_path = self._serving_paths()
        wanted = [general_name(n) for n in dict.fromkeys(self.settings.names)]
        if cert_path.exists() and key_path.exists():
            current = load_certs(cert_path.read_bytes())[0]
            try:
                sans = current.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                have = list(sans.value)
            except x509.ExtensionNotFound:
                have = []
            left = current.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
            signed_by_ca = current.issuer == self.ca.cert.subject
            if (
                all(n in have for n in wanted)
                and left > datetime.timedelta(days=30)
                and signed_by_ca
            ):
                return
        pair = issue_server(self.ca, self.settings.names)
        write_private(key_path, pair.key_pem)
        write_public(cert_path, pair.cert_pem + self.ca_pem)
        log.info("made the serving certificate", names=self.settings.names, cert=str(cert_path))

    def _watched(self) -> list[Path]:
        return [*self._serving_paths()]

    def _stamp(self) -> tuple[float, ...]:
        stamps: list[float] = []
        for path in self._watched():
            try:
                stamps.append(path.stat().st_mtime)
            except FileNotFoundError:
                stamps.append(0.0)
        return tuple(stamps)

    def _read(self) -> _Material:
        cert_path, key_path = self._serving_paths()
        client_ca = self.ca_pem
        stamp = self._stamp()
        chain = cert_path.read_bytes()
        key = key_path.read_bytes()
        # A broken file, or a key that is not the certificate's (one of the two replaced,
        # the other not yet), is refused, not served.
        leaf = load_certs(chain)[0]
        if leaf.public_key() != load_key(key).public_key():
            raise CertificateError(f"the key in {key_path} is not the key of {cert_path}")
        return _Material(key, chain, client_ca, stamp)

    def _current(self) -> _Material:
        """The serving material, read again when a file changed. Each user (gRPC, the
        registry face) compares its stamp with the one it loaded last."""
        with self._lock:
            if self._stamp() == self._material.stamp:
                return self._material
            try:
                self._material = self._read()
            except (OSError, ValueError) as e:
                log.error(
                    "a replaced TLS file is unreadable: keeping the last good one", error=str(e)
                )
                return self._material
            log.info("TLS certificate reloaded", files=[str(p) for p in self._watched()])
            return self._material

    # gRPC and HTTP

    def grpc_credentials(self, *, require_client_cert: bool) -> grpc.ServerCredentials:
        """Credentials that look at the files again at every handshake."""

        def configuration(material: _Material) -> object:
            return grpc.ssl_server_certificate_configuration(
                [(material.key, material.chain)],
                root_certificates=material.client_ca if require_client_cert else None,
            )

        served = [self._material.stamp]

        def fetch() -> object | None:
            material = self._current()
            if material.stamp == served[0]:
                return None
            served[0] = material.stamp
            return configuration(material)

        return grpc.dynamic_ssl_server_credentials(
            configuration(self._material), fetch, require_client_authentication=require_client_cert
        )

    def ssl_context(self) -> ssl.SSLContext:
        """A server context for the registry face; refresh() loads replaced files into it."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._load_into(context, self._material)
        self._contexts.append(context)
        return context

    def refresh(self) -> None:
        material = self._current()
        if material.stamp != self._context_stamp:
            for context in self._contexts:
                self._load_into(context, material)
            self._context_stamp = material.stamp

    def _load_into(self, context: ssl.SSLContext, material: _Material) -> None:
        # ssl loads only from files: the checked bytes go through a private temporary pair.
        with tempfile.TemporaryDirectory(prefix="docket-tls-") as tmp:
            cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
            write_private(key_path, material.key)
            write_private(cert_path, material.chain)
            context.load_cert_chain(cert_path, key_path)

    # Signing

    def sign_agent(
        self, csr: x509.CertificateSigningRequest, name: str
    ) -> tuple[bytes, str, datetime.datetime]:
        cert = issue_agent(self.ca, csr, name, self.settings.agent_cert_lifetime)
        return cert_pem(cert), format(cert.serial_number, "x"), cert.not_valid_after_utc

    @property
    def seed_cert_pem(self) -> bytes:
        return self.seed.cert_pem

    @property
    def seed_key_pem(self) -> bytes:
        return key_pem(self.seed.key)


def peer_certificate(auth_context: dict[str, list[bytes]]) -> x509.Certificate | None:
    """The verified client certificate of a gRPC call (on the mutual-TLS port)."""
    pem = (auth_context.get("x509_pem_cert") or [b""])[0]
    return _parse(pem) if pem else None


_PARSED: dict[bytes, x509.Certificate] = {}


def _parse(pem: bytes) -> x509.Certificate:
    cert = _PARSED.get(pem)
    if cert is None:
        if len(_PARSED) > 10_000:
            _PARSED.clear()
        cert = _PARSED[pem] = load_cert(pem)
    return cert
