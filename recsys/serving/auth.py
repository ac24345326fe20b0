"""Transport security: TLS / mutual TLS credentials and bearer-token authentication.

Tokens travel as `authorization: Bearer <token>` metadata and are compared in constant time. Health
checking and reflection stay open (load balancers and grpcurl probe them); the ModelAdmin service is
protected whenever a token is configured, and every RPC with `auth_all`. Use tokens over TLS: in
plaintext they are readable on the wire.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from recsys.errors import ConfigError

ADMIN_PREFIX = "/recsys.v1.ModelAdmin/"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def check_tls_files(cert: Path, key: Path, client_ca: Path | None = None) -> None:
    """Each PEM file readable and the key the certificate's own, checked with the ssl module before
    gRPC sees them (gRPC only says "Failed to bind to address"); ConfigError names the file."""
    import ssl

    for flag, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-client-ca", client_ca)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag} {path} does not exist")
    for flag, path in (("--tls-cert", cert), ("--tls-client-ca", client_ca)):
        if path is not None:
            try:
                ssl.create_default_context().load_verify_locations(cafile=str(path))
            except ssl.SSLError as exc:
                raise ConfigError(f"{flag} {path} is not a PEM certificate ({exc.reason or exc})") from exc
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        problem = "does not match the certificate" if "MISMATCH" in str(exc).upper() else "cannot be used with the certificate"
        raise ConfigError(
            f"--tls-key {key} {problem} --tls-cert {cert} ({exc.reason or exc}): pass the private key the "
            "certificate was issued for (unencrypted PEM)"
        ) from exc


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS with the server's certificate chain; with client_ca, clients must present a certificate
    signed by it (mutual TLS)."""
    check_tls_files(cert, key, client_ca)
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, token: str, protect_all: bool = False) -> None:
        self._expected = f"Bearer {token}".encode()
        self.protect_all = protect_all

    def _protected(self, method: str) -> bool:
        if method.startswith(OPEN_PREFIXES):
            return False
        return self.protect_all or method.startswith(ADMIN_PREFIX)

    def _authorised(self, metadata: Any) -> bool:
        for key, value in metadata or ():
            if key == "authorization":
                given = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(given, self._expected)
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self._protected(method):
            return handler
        if self._authorised(handler_call_details.invocation_metadata):
            return handler

        async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"{method} needs 'authorization: Bearer <token>' metadata with the server's token",
            )

        kwargs = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(deny, **kwargs)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(deny, **kwargs)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(deny, **kwargs)
        return grpc.stream_stream_rpc_method_handler(deny, **kwargs)
