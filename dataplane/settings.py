"""Settings from the environment, validated once at start-up.

A bad value raises :class:`SettingsError` whose message is one line naming the
variable, what it must be, and what it was; the CLI prints that line and exits.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast
from urllib.parse import urlsplit

from dataplane.tls import TlsFileError, TlsFiles, build_context
from managers.hypervisors.types import MemoryRestoreMode
from managers.network.errors import NetworkConfigError
from managers.network.types import NetworkSettings
from managers.resources import Ratios

HypervisorChoice = Literal["auto", "cloud-hypervisor", "qemu"]
LogFormat = Literal["json", "console"]

_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
_LOG_LEVELS = ("debug", "info", "warning", "error")
_HYPERVISORS = ("auto", "cloud-hypervisor", "qemu")
_LOG_FORMATS = ("json", "console")
_RESTORE_MODES = tuple(mode.value for mode in MemoryRestoreMode)
_REGISTRY = re.compile(r"^[A-Za-z0-9.-]+(:[0-9]{1,5})?$")
_DEFAULT_SUBNET = ipaddress.IPv4Network("192.168.100.0/24")
_DEFAULT_GATEWAY = ipaddress.IPv4Address("192.168.100.1")
_DEFAULT_DNS = ipaddress.IPv4Address("1.1.1.1")


class SettingsError(ValueError):
    """One environment variable has a value the dataplane cannot run with."""

    def __init__(self, variable: str, requirement: str, value: str) -> None:
        self.variable = variable
        super().__init__(f"{variable} must be {requirement}, got {value!r}")

    @classmethod
    def from_message(cls, variable: str, message: str) -> SettingsError:
        error = cls.__new__(cls)
        error.variable = variable
        ValueError.__init__(error, message)
        return error


@dataclass(frozen=True)
class Settings:
    port: int = 8080
    listen_addr: str = "127.0.0.1"
    listen_socket: Path | None = None
    data_dir: Path = Path("/var/lib/dataplane")
    hypervisor: HypervisorChoice = "auto"
    cloud_hypervisor_bin: str | None = None
    qemu_bin: str | None = None
    kernel_path: Path | None = None
    initrd_path: Path | None = None
    bridge_name: str = "vmbr0"
    subnet_cidr: ipaddress.IPv4Network = _DEFAULT_SUBNET
    subnet_gateway: ipaddress.IPv4Address = _DEFAULT_GATEWAY
    dns_server: ipaddress.IPv4Address | ipaddress.IPv6Address = _DEFAULT_DNS
    auth_token: str | None = None
    jwt_secret: str | None = None
    node_id: str = "NODE_1"
    webhook_endpoints: tuple[str, ...] = ()
    webhook_secret: str | None = None
    webhook_max_age_seconds: int = 24 * 3600
    event_retention_bytes: int = 256 << 20
    log_retention_bytes: int = 64 << 20
    event_retention_seconds: int = 7 * 24 * 3600
    cache_seconds: int | None = None
    image_max_unpacked_bytes: int = 64 << 30
    max_concurrent_builds: int = 2
    log_format: LogFormat = "console"
    log_level: str = "info"
    contract_validation: bool = True
    network_nat: bool = True
    network_isolation: bool = True
    insecure_registries: frozenset[str] = frozenset()
    sse_keepalive_seconds: int = 15
    memory_restore_mode: MemoryRestoreMode = MemoryRestoreMode.COPY
    cpu_oversub_ratio: float = 4.0
    memory_oversub_ratio: float = 1.0
    disk_oversub_ratio: float = 1.0
    metrics_public: bool = False
    tls: TlsFiles | None = None

    @property
    def network(self) -> NetworkSettings:
        return NetworkSettings(
            bridge_name=self.bridge_name,
            subnet=self.subnet_cidr,
            gateway=self.subnet_gateway,
            dns_server=self.dns_server,
            nat=self.network_nat,
            isolation=self.network_isolation,
        )

    @property
    def oversubscription(self) -> Ratios:
        return Ratios(self.cpu_oversub_ratio, self.memory_oversub_ratio, self.disk_oversub_ratio)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth_token or self.jwt_secret)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable; the first bad one raises :class:`SettingsError`."""
        env = _Env(os.environ if environ is None else environ)
        auth_token = env.secret("AUTH_TOKEN")
        jwt_secret = env.secret("JWT_SECRET")
        # Without any authentication the API must not be reachable from other hosts
        # unless the operator says so explicitly.
        default_listen = "0.0.0.0" if (auth_token or jwt_secret) else "127.0.0.1"
        subnet = env.network("SUBNET_CIDR", cls.subnet_cidr)
        # A custom subnet without a gateway gets its first host address as the gateway.
        default_gateway = cls.subnet_gateway if subnet == cls.subnet_cidr else subnet[1]
        gateway = env.address_in("SUBNET_GATEWAY", default_gateway, subnet)
        settings = cls(
            port=env.integer("PORT", cls.port, low=1, high=65535),
            listen_addr=env.ip("LISTEN_ADDR", default_listen),
            listen_socket=env.socket_path("LISTEN_SOCKET"),
            data_dir=env.absolute_path("DATA_DIR", cls.data_dir),
            hypervisor=cast(HypervisorChoice, env.choice("HYPERVISOR", _HYPERVISORS, "auto")),
            cloud_hypervisor_bin=env.optional("CLOUD_HYPERVISOR_BIN"),
            qemu_bin=env.optional("QEMU_BIN"),
            kernel_path=env.existing_file("KERNEL_PATH"),
            initrd_path=env.existing_file("INITRD_PATH"),
            bridge_name=env.ifname("BRIDGE_NAME", cls.bridge_name),
            subnet_cidr=subnet,
            subnet_gateway=gateway,
            dns_server=ipaddress.ip_address(env.ip("DNS_SERVER", str(cls.dns_server))),
            auth_token=auth_token,
            jwt_secret=jwt_secret,
            node_id=env.node_id("NODE_ID", cls.node_id),
            webhook_endpoints=env.urls("WEBHOOK_ENDPOINT"),
            webhook_secret=env.webhook_secret("WEBHOOK_SECRET"),
            webhook_max_age_seconds=env.integer(
                "WEBHOOK_MAX_AGE", cls.webhook_max_age_seconds, low=60, high=30 * 24 * 3600
            ),
            log_retention_bytes=env.integer(
                "LOG_RETENTION_BYTES", cls.log_retention_bytes, low=1 << 20, high=1 << 40
            ),
            event_retention_bytes=env.integer(
                "EVENT_RETENTION_BYTES", cls.event_retention_bytes, low=1 << 20, high=1 << 40
            ),
            event_retention_seconds=env.integer(
                "EVENT_RETENTION_SECONDS",
                cls.event_retention_seconds,
                low=60,
                high=10 * 365 * 86400,
            ),
            cache_seconds=env.optional_integer("CACHE_SECONDS", low=0),
            image_max_unpacked_bytes=env.integer(
                "IMAGE_MAX_UNPACKED_BYTES", cls.image_max_unpacked_bytes, low=1 << 20, high=1 << 50
            ),
            max_concurrent_builds=env.integer(
                "MAX_CONCURRENT_BUILDS", cls.max_concurrent_builds, low=1, high=64
            ),
            log_format=cast(LogFormat, env.choice("LOG_FORMAT", _LOG_FORMATS, cls.log_format)),
            log_level=env.choice("LOG_LEVEL", _LOG_LEVELS, cls.log_level),
            contract_validation=env.boolean("CONTRACT_VALIDATION", cls.contract_validation),
            network_nat=env.boolean("NETWORK_NAT", cls.network_nat),
            network_isolation=env.boolean("NETWORK_ISOLATION", cls.network_isolation),
            insecure_registries=env.registries("INSECURE_REGISTRIES"),
            sse_keepalive_seconds=env.integer(
                "SSE_KEEPALIVE_SECONDS", cls.sse_keepalive_seconds, low=1, high=3600
            ),
            memory_restore_mode=MemoryRestoreMode(
                env.choice("MEMORY_RESTORE_MODE", _RESTORE_MODES, cls.memory_restore_mode.value)
            ),
            cpu_oversub_ratio=env.ratio("CPU_OVERSUB_RATIO", cls.cpu_oversub_ratio),
            memory_oversub_ratio=env.ratio("MEMORY_OVERSUB_RATIO", cls.memory_oversub_ratio),
            disk_oversub_ratio=env.ratio("DISK_OVERSUB_RATIO", cls.disk_oversub_ratio),
            metrics_public=env.boolean("METRICS_PUBLIC", cls.metrics_public),
            tls=env.tls_files(),
        )
        if settings.webhook_endpoints and settings.webhook_secret is None:
            raise SettingsError.from_message(
                "WEBHOOK_SECRET",
                "WEBHOOK_SECRET must be set (whsec_<base64>) when WEBHOOK_ENDPOINT is: "
                "every delivery is signed",
            )
        try:
            settings.network  # noqa: B018 - the network subsystem's own invariants
        except NetworkConfigError as error:
            raise SettingsError.from_message(str(error).split(" ", 1)[0], str(error)) from None
        return settings


class _Env:
    """Typed readers over an environment mapping; empty values count as unset."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def optional(self, name: str) -> str | None:
        value = self._environ.get(name, "").strip()
        return value or None

    def secret(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None or value == "":
            return None
        if value != value.strip():
            raise SettingsError(name, "free of leading or trailing whitespace", "<hidden>")
        if len(value) < 16:
            raise SettingsError(name, "at least 16 characters long", "<hidden>")
        return value

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        raw = self.optional(name)
        if raw is None:
            return default
        return self._parse_int(name, raw, low, high)

    def optional_integer(self, name: str, *, low: int) -> int | None:
        raw = self.optional(name)
        if raw is None:
            return None
        return self._parse_int(name, raw, low, None)

    @staticmethod
    def _parse_int(name: str, raw: str, low: int, high: int | None) -> int:
        bounds = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"
        try:
            value = int(raw, 10)
        except ValueError:
            raise SettingsError(name, bounds, raw) from None
        if value < low or (high is not None and value > high):
            raise SettingsError(name, bounds, raw)
        return value

    def tls_files(self) -> TlsFiles | None:
        """TLS_CERT_FILE and TLS_KEY_FILE together (and TLS_CLIENT_CA_FILE with them), each
        loaded once here so a bad one stops start-up naming itself."""
        cert = self.existing_file("TLS_CERT_FILE")
        key = self.existing_file("TLS_KEY_FILE")
        client_ca = self.existing_file("TLS_CLIENT_CA_FILE")
        if cert is None and key is None:
            if client_ca is not None:
                raise SettingsError.from_message(
                    "TLS_CLIENT_CA_FILE",
                    "TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE: "
                    "client certificates are asked for only over HTTPS",
                )
            return None
        if cert is None or key is None:
            missing = "TLS_KEY_FILE" if cert is not None else "TLS_CERT_FILE"
            raise SettingsError.from_message(
                missing, f"{missing} must be set too: HTTPS needs a certificate and its key"
            )
        files = TlsFiles(cert=cert, key=key, client_ca=client_ca)
        try:
            build_context(files)
        except TlsFileError as error:
            raise SettingsError.from_message(error.variable, str(error)) from None
        return files

    def ratio(self, name: str, default: float) -> float:
        """A positive number of at most 1000 (an oversubscription ratio)."""
        raw = self.optional(name)
        if raw is None:
            return default
        requirement = "a number above 0 and at most 1000"
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(name, requirement, raw) from None
        if not 0 < value <= 1000:  # also refuses nan
            raise SettingsError(name, requirement, raw)
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self.optional(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(name, "one of true/false, 1/0, yes/no, on/off", raw)

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        raw = self.optional(name)
        if raw is None:
            return default
        if raw not in options:
            raise SettingsError(name, "one of " + ", ".join(options), raw)
        return raw

    def ip(self, name: str, default: str) -> str:
        raw = self.optional(name) or default
        try:
            return str(ipaddress.ip_address(raw))
        except ValueError:
            raise SettingsError(name, "an IP address", raw) from None

    def network(self, name: str, default: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            network = ipaddress.IPv4Network(raw, strict=True)
        except ValueError:
            raise SettingsError(
                name, "an IPv4 network in CIDR form like 10.0.0.0/24", raw
            ) from None
        if network.prefixlen > 30:
            raise SettingsError(name, "a network of /30 or larger", raw)
        return network

    def address_in(
        self, name: str, default: ipaddress.IPv4Address, network: ipaddress.IPv4Network
    ) -> ipaddress.IPv4Address:
        raw = self.optional(name)
        try:
            address = ipaddress.IPv4Address(raw) if raw is not None else default
        except ValueError:
            raise SettingsError(name, "an IPv4 address", raw or "") from None
        if address not in network or address in (
            network.network_address,
            network.broadcast_address,
        ):
            raise SettingsError(name, f"a host address inside SUBNET_CIDR {network}", str(address))
        return address

    def absolute_path(self, name: str, default: Path) -> Path:
        raw = self.optional(name)
        if raw is None:
            return default
        path = Path(raw)
        if not path.is_absolute():
            raise SettingsError(name, "an absolute path", raw)
        if path.exists() and not path.is_dir():
            raise SettingsError(name, "a directory (or a path where one can be made)", raw)
        return path

    def socket_path(self, name: str) -> Path | None:
        raw = self.optional(name)
        if raw is None:
            return None
        path = Path(raw)
        if not path.is_absolute() or not path.parent.is_dir():
            raise SettingsError(name, "an absolute path in an existing directory", raw)
        if len(raw.encode()) > 107:
            raise SettingsError(name, "at most 107 bytes long (a Unix socket path)", raw)
        return path

    def existing_file(self, name: str) -> Path | None:
        raw = self.optional(name)
        if raw is None:
            return None
        path = Path(raw)
        if not path.is_file():
            raise SettingsError(name, "the path of an existing file", raw)
        return path

    def ifname(self, name: str, default: str) -> str:
        raw = self.optional(name) or default
        if not _IFNAME.fullmatch(raw):
            raise SettingsError(
                name, "a network interface name of 1-15 letters, digits, '_', '.' or '-'", raw
            )
        return raw

    def node_id(self, name: str, default: str) -> str:
        raw = self.optional(name) or default
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}", raw):
            raise SettingsError(
                name, "1-63 letters, digits, '_', '.' or '-', starting with a letter or digit", raw
            )
        return raw

    def registries(self, name: str) -> frozenset[str]:
        raw = self.optional(name)
        if raw is None:
            return frozenset()
        hosts = [item.strip() for item in raw.split(",") if item.strip()]
        for host in hosts:
            if not _REGISTRY.fullmatch(host):
                raise SettingsError(name, "a comma-separated list of host[:port]", raw)
        return frozenset(hosts)

    def urls(self, name: str) -> tuple[str, ...]:
        """A comma-separated list of http(s) URLs, each once."""
        raw = self.optional(name)
        if raw is None:
            return ()
        found: list[str] = []
        for item in (part.strip() for part in raw.split(",")):
            parts = urlsplit(item)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise SettingsError(name, "http:// or https:// URLs separated by commas", raw)
            if item not in found:
                found.append(item)
        return tuple(found)

    def webhook_secret(self, name: str) -> str | None:
        """``whsec_`` + base64 of at least 16 random bytes (the Standard Webhooks form)."""
        raw = self._environ.get(name, "")
        if not raw:
            return None
        requirement = "whsec_ followed by base64 of at least 16 bytes"
        if not raw.startswith("whsec_"):
            raise SettingsError(name, requirement, "<hidden>")
        try:
            key = base64.b64decode(raw[len("whsec_") :], validate=True)
        except ValueError:
            raise SettingsError(name, requirement, "<hidden>") from None
        if len(key) < 16:
            raise SettingsError(name, requirement, "<hidden>")
        return raw
