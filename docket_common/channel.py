"""gRPC channels to the server: TLS trusting the fleet CA unless told otherwise.

Apart from the certificate code of ``tls_client`` (which imports ``cryptography``, about 40 ms
of every start on these machines): docketctl opens a channel on every command, and needs that
code only to explain a handshake that failed.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc


def channel_credentials(
    ca_pem: bytes | None, cert_pem: bytes | None = None, key_pem: bytes | None = None
) -> grpc.ChannelCredentials:
    """TLS credentials trusting ``ca_pem`` (None: the system's roots), presenting
    ``cert_pem`` when given."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )


def open_channel(
    server: str,
    options: Sequence[tuple[str, object]],
    *,
    insecure: bool,
    ca_pem: bytes | None,
    cert_pem: bytes | None = None,
    key_pem: bytes | None = None,
) -> grpc.aio.Channel:
    """An aio channel to ``server``: plaintext only when ``insecure``."""
    if insecure:
        return grpc.aio.insecure_channel(server, options=list(options))
    return grpc.aio.secure_channel(
        server, channel_credentials(ca_pem, cert_pem, key_pem), options=list(options)
    )
