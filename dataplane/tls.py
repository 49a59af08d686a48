"""HTTPS and mutual TLS: the server's certificate, an optional client CA, reloads on SIGHUP.

The listening socket keeps one :class:`ssl.SSLContext` for its whole life (uvicorn hands it
to asyncio once), so a reload cannot replace it. Instead its SNI callback, which OpenSSL runs
in every handshake whether or not the client names a server, moves each new connection onto
the *current* context, which a reload swaps. Connections already open keep the session they
negotiated; only handshakes after the reload see the new certificate and CA.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("dataplane.tls")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    cert: Path
    key: Path
    client_ca: Path | None = None


class TlsFileError(ValueError):
    """A TLS file cannot be used; ``variable`` names the setting that points at it."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(message)
        self.variable = variable


def build_context(files: TlsFiles) -> ssl.SSLContext:
    """A server context for ``files``; a client certificate is required when a CA is given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(files.cert, files.key)
    except (ssl.SSLError, OSError) as error:
        raise _blame(files, error) from None
    if files.client_ca is not None:
        try:
            context.load_verify_locations(cafile=files.client_ca)
        except (ssl.SSLError, OSError) as error:
            raise TlsFileError(
                "TLS_CLIENT_CA_FILE",
                f"TLS_CLIENT_CA_FILE {files.client_ca} holds no usable CA certificate: {error}",
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _blame(files: TlsFiles, error: Exception) -> TlsFileError:
    """Which of the two files made ``load_cert_chain`` fail."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=files.cert)
    except (ssl.SSLError, OSError):
        return TlsFileError(
            "TLS_CERT_FILE", f"TLS_CERT_FILE {files.cert} holds no PEM certificate: {error}"
        )
    return TlsFileError(
        "TLS_KEY_FILE",
        f"TLS_KEY_FILE {files.key} is not the private key of TLS_CERT_FILE's certificate "
        f"(or not a PEM key): {error}",
    )


class ReloadableContext:
    """The listening context, and the current one each handshake is moved onto."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self.current = build_context(files)
        self.listening = build_context(files)
        self.listening.sni_callback = self._choose

    def _choose(
        self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        connection.context = self.current

    def reload(self) -> bool:
        """Read the files again; on a bad file keep serving with the old ones."""
        try:
            self.current = build_context(self.files)
        except TlsFileError as error:
            log.error("TLS reload refused, still serving the previous certificate: %s", error)
            return False
        log.info("TLS certificate, key and client CA reloaded")
        return True
