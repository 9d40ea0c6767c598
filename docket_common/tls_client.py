"""The client half of the fleet's TLS, shared by docketctl and the agent: pinning a CA by its
hash, and one-line explanations of handshakes that fail. The channels that trust the fleet CA
(and present an agent's certificate) are in ``channel``, which does not import
``cryptography``: docketctl needs this module only when a handshake failed.

A server's TLS port sends its chain: the serving certificate, then the fleet CA. A client
that has no CA yet (``--ca-hash``, as ``kubeadm join --discovery-token-ca-cert-hash`` does)
reads that chain without trusting it, keeps the certificate whose hash it was told, and from
then on verifies against it.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from docket_common.hostport import split_host_port
from docket_common.pki import CertificateError, fingerprint, load_certs

HANDSHAKE_TIMEOUT = 5.0


def fetch_chain(server: str, timeout: float = HANDSHAKE_TIMEOUT) -> list[x509.Certificate]:
    """The certificates a TLS server presents, unverified; OSError when it cannot be
    reached, ssl.SSLError when it does not speak TLS."""
    host, port = split_host_port(server)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=host) as tls,
    ):
        # Python 3.13 has SSLSocket.get_unverified_chain(); 3.11 and 3.12 keep it on _sslobj.
        chain_of = getattr(tls, "get_unverified_chain", None) or getattr(
            tls._sslobj,  # type: ignore[attr-defined]
            "get_unverified_chain",
            None,
        )
        if chain_of is not None:
            ders = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain_of()]  # type: ignore[attr-defined]
        else:
            leaf = tls.getpeercert(binary_form=True)
            ders = [leaf] if leaf else []
    return [x509.load_der_x509_certificate(der) for der in ders]


def pick_ca(chain: Sequence[x509.Certificate], ca_hash: str, server: str) -> x509.Certificate:
    """The certificate of ``chain`` whose fingerprint is ``ca_hash`` (``sha256:HEX``)."""
    wanted = ca_hash.strip().lower()
    if not wanted.startswith("sha256:"):
        wanted = "sha256:" + wanted
    for cert in chain:
        if fingerprint(cert) == wanted:
            return cert
    offered = ", ".join(describe(c) for c in chain) or "no certificate"
    raise CertificateError(
        f"the server at {server} presented {offered}; none has the hash {ca_hash}: it is "
        "not the server you expected, or the hash is wrong"
    )


def describe(cert: x509.Certificate) -> str:
    """``'CN' (sha256:…)``: what one line can say of a certificate."""
    names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else cert.subject.rfc4514_string()
    return f"{common_name!r} ({fingerprint(cert)})"


def diagnose(server: str, ca_pem: bytes | None, ca_source: str) -> str | None:
    """Why a TLS connection to ``server`` fails, in one line naming the certificate it
    presents; None when the handshake is not the problem."""
    try:
        chain = fetch_chain(server)
    except ssl.SSLError:
        return (
            f"the server at {server} does not speak TLS (is it running with --insecure? then "
            "so must the client)"
        )
    except OSError:
        return None
    if not chain:
        return None
    leaf = chain[-1] if len(chain) == 1 else chain[0]
    if ca_pem is None:
        trusted: list[x509.Certificate] = []
    else:
        try:
            trusted = load_certs(ca_pem)
        except CertificateError:
            return f"{ca_source} holds no PEM certificate"
    issued_by_trusted = any(_issued_by(leaf, ca) for ca in trusted)
    if issued_by_trusted:
        return (
            f"the server at {server} presented {describe(leaf)}, issued by the trusted CA but "
            "not valid for this address or not valid now"
        )
    root = chain[-1]
    return (
        f"the server at {server} presented {describe(leaf)}, issued by {describe(root)}, "
        f"which {ca_source} does not trust; if that is your server's CA, trust it with "
        f"--ca-hash {fingerprint(root)}"
    )


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
