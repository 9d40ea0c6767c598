"""The fleet's certificates: the server's CA, its serving certificate, and the client
certificates agents enroll for. ECDSA P-256 keys and SHA-256 signatures throughout.

An agent's certificate names the agent (CN and a ``docket:agent:NAME`` URI SAN) and carries
the DNS SAN ``*``: libtorrent accepts a peer on an SSL torrent only if its certificate names
the torrent (an info-hash) or ``*``, and every blob is its own torrent. ``*`` matches no host
name in TLS host checks, so such a certificate cannot pass for the server's.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

AGENT_URI_PREFIX = "docket:agent:"
CA_DAYS = 3650
SERVER_DAYS = 825
CLOCK_SKEW = datetime.timedelta(minutes=5)

# RFC 7919's ffdhe2048 group, for libtorrent's SSL torrents (it asks for DH parameters even
# though the ECDHE suites it uses do not need them).
DH_PARAMS = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


class CertificateError(ValueError):
    """A certificate, key or request that is not what it should be; str() says why."""


@dataclass(frozen=True)
class KeyPair:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def cert_pem(self) -> bytes:
        return cert_pem(self.cert)

    @property
    def key_pem(self) -> bytes:
        return key_pem(self.key)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise CertificateError(f"not a PEM certificate: {e}") from e


def load_certs(pem: bytes) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise CertificateError(f"not PEM certificates: {e}") from e


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise CertificateError(f"not an unencrypted PEM private key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertificateError("the key is not an ECDSA key")
    return key


def fingerprint(cert: x509.Certificate) -> str:
    """``sha256:<hex>`` of the certificate's DER bytes (what `--ca-hash` takes)."""
    return "sha256:" + cert.fingerprint(hashes.SHA256()).hex()


def public_key_hash(key: ec.EllipticCurvePublicKey) -> str:
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(common_name: str = "Docket fleet CA") -> KeyPair:
    key = new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return KeyPair(key, cert)


def _leaf(
    ca: KeyPair,
    public_key: ec.EllipticCurvePublicKey,
    common_name: str,
    sans: list[x509.GeneralName],
    usages: list[x509.ObjectIdentifier],
    lifetime: datetime.timedelta,
) -> x509.Certificate:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
    )


def general_name(value: str) -> x509.GeneralName:
    """An IP SAN for an address, a DNS SAN for anything else."""
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


def issue_server(ca: KeyPair, names: list[str], days: int = SERVER_DAYS) -> KeyPair:
    """The server's serving certificate, for the host names and addresses it is reached at."""
    key = new_key()
    sans = [general_name(n) for n in dict.fromkeys(names)]
    cert = _leaf(
        ca,
        key.public_key(),
        names[0] if names else "docket-server",
        sans,
        [ExtendedKeyUsageOID.SERVER_AUTH],
        datetime.timedelta(days=days),
    )
    return KeyPair(key, cert)


def issue_peer(ca: KeyPair, common_name: str, lifetime: datetime.timedelta) -> KeyPair:
    """A certificate for the server's own BitTorrent seed on SSL torrents."""
    key = new_key()
    cert = _leaf(
        ca,
        key.public_key(),
        common_name,
        [x509.DNSName("*")],
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        lifetime,
    )
    return KeyPair(key, cert)


def make_csr(key: ec.EllipticCurvePrivateKey, name: str) -> bytes:
    csr = (
        x509.CertificateSigningRequestBuilder().subject_name(_name(name)).sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def read_csr(pem: bytes) -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(pem)
    except ValueError as e:
        raise CertificateError(f"not a PEM certificate request: {e}") from e
    if not csr.is_signature_valid:
        raise CertificateError("the certificate request's signature does not verify")
    if not isinstance(csr.public_key(), ec.EllipticCurvePublicKey):
        raise CertificateError("the certificate request's key is not an ECDSA key")
    return csr


def issue_agent(
    ca: KeyPair, csr: x509.CertificateSigningRequest, name: str, lifetime: datetime.timedelta
) -> x509.Certificate:
    """An agent's client certificate for the key in ``csr``, naming ``name`` only: whatever
    else the request asks for is ignored (Dragonfly's CVE-2025-59353 signed what was asked)."""
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise CertificateError("the certificate request's key is not an ECDSA key")
    return _leaf(
        ca,
        public_key,
        name,
        [x509.UniformResourceIdentifier(AGENT_URI_PREFIX + name), x509.DNSName("*")],
        [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH],
        lifetime,
    )


def agent_name_of(cert: x509.Certificate) -> str | None:
    """The agent a certificate names (its docket:agent: URI SAN), or None."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in sans.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith(AGENT_URI_PREFIX):
            return uri.removeprefix(AGENT_URI_PREFIX)
    return None


def verify_issued(ca: x509.Certificate, cert: x509.Certificate) -> None:
    """Checks that ``cert`` is signed by ``ca`` and valid now; CertificateError otherwise."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as e:
        raise CertificateError(f"the certificate is not issued by the fleet CA: {e}") from e
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CertificateError(
            f"the certificate is valid from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC, not now"
        )


def write_private(path: Path, data: bytes) -> None:
    """Writes a secret (a key, a token) readable by its owner only, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    tmp.replace(path)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
