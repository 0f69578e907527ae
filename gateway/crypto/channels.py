"""gRPC credentials for Silogate's mutual TLS, built from the PEM files in a ``TlsFiles``.

Servers always require and verify a client certificate signed by the configured CA; channels always
present their own certificate and verify the server's against the CA and the target host name. This
module never builds plaintext or one-way TLS credentials and never disables verification:
plaintext, where allowed at all, is an explicit development opt-in handled by the caller.
"""

from __future__ import annotations

import grpc

from gateway.crypto.dev_ca import TlsFiles


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials that refuse any client without a certificate signed by ``tls.ca``.

    Raises ``CertificateError`` naming the file if one of the files cannot be used.
    """
    ca, cert, key = tls.load()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """Channel credentials that present ``tls.cert`` and trust only servers signed by ``tls.ca``.

    Raises ``CertificateError`` naming the file if one of the files cannot be used.
    """
    ca, cert, key = tls.load()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )
