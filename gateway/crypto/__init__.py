"""Certificates, identities and key material for Silogate's mutual TLS.

Modules:

- ``dev_ca``: the *development* certificate authority (``init_dev_pki``) that issues the gateway,
  silo and consumer certificates used by the demo and the tests; the SPIFFE-style identities those
  certificates carry (``GATEWAY_IDENTITY``, ``silo_identity``, ``consumer_identity``) and
  ``peer_identities``, which reads them back from a gRPC auth context; ``TlsFiles``, the three PEM
  files one process needs, and ``CertificateError``.
- ``channels``: gRPC server and channel credentials built from ``TlsFiles``, always with mutual TLS.

Nothing in this package ever creates plaintext credentials or skips certificate verification.
"""
