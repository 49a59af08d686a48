from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from dataplane.settings import Settings, SettingsError
from tests.support.server import ROOT

TOKEN = "a-static-token-of-some-length"


def test_defaults_follow_the_architecture_table() -> None:
    settings = Settings.from_env({})
    assert settings.port == 8080
    assert settings.data_dir == Path("/var/lib/dataplane")
    assert settings.hypervisor == "auto"
    assert settings.bridge_name == "vmbr0"
    assert settings.subnet_cidr == ipaddress.IPv4Network("192.168.100.0/24")
    assert settings.subnet_gateway == ipaddress.IPv4Address("192.168.100.1")
    assert str(settings.dns_server) == "1.1.1.1"
    assert settings.node_id == "NODE_1"
    assert settings.max_concurrent_builds == 2
    assert settings.log_format == "console"
    assert not settings.auth_enabled


def test_unauthenticated_server_listens_on_loopback_only() -> None:
    assert Settings.from_env({}).listen_addr == "127.0.0.1"
    assert Settings.from_env({"AUTH_TOKEN": TOKEN}).listen_addr == "0.0.0.0"
    assert Settings.from_env({"JWT_SECRET": TOKEN}).listen_addr == "0.0.0.0"
    assert Settings.from_env({"LISTEN_ADDR": "0.0.0.0"}).listen_addr == "0.0.0.0"
    assert Settings.from_env({"AUTH_TOKEN": TOKEN, "LISTEN_ADDR": "::1"}).listen_addr == "::1"


def test_values_are_parsed() -> None:
    settings = Settings.from_env(
        {
            "PORT": "9000",
            "HYPERVISOR": "qemu",
            "SUBNET_CIDR": "10.20.0.0/16",
            "SUBNET_GATEWAY": "10.20.0.1",
            "CACHE_SECONDS": "3600",
            "LOG_FORMAT": "json",
            "CONTRACT_VALIDATION": "off",
            "WEBHOOK_ENDPOINT": "https://hooks.example/dataplane, http://127.0.0.1:9/b",
            "WEBHOOK_SECRET": "whsec_" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldY",
            "WEBHOOK_MAX_AGE": "3600",
        }
    )
    assert settings.webhook_endpoints == ("https://hooks.example/dataplane", "http://127.0.0.1:9/b")
    assert settings.webhook_max_age_seconds == 3600
    assert settings.port == 9000
    assert settings.hypervisor == "qemu"
    assert settings.subnet_cidr.prefixlen == 16
    assert settings.cache_seconds == 3600
    assert settings.log_format == "json"
    assert settings.contract_validation is False


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"PORT": "eighty"}, "PORT"),
        ({"PORT": "0"}, "PORT"),
        ({"PORT": "70000"}, "PORT"),
        ({"LISTEN_ADDR": "localhost:80"}, "LISTEN_ADDR"),
        ({"DATA_DIR": "relative/dir"}, "DATA_DIR"),
        ({"HYPERVISOR": "firecracker"}, "HYPERVISOR"),
        ({"KERNEL_PATH": "/nonexistent/vmlinux"}, "KERNEL_PATH"),
        ({"INITRD_PATH": "/nonexistent/initrd"}, "INITRD_PATH"),
        ({"BRIDGE_NAME": "a-bridge-name-too-long"}, "BRIDGE_NAME"),
        ({"SUBNET_CIDR": "192.168.100.1/24"}, "SUBNET_CIDR"),
        ({"SUBNET_CIDR": "10.0.0.0/31"}, "SUBNET_CIDR"),
        ({"SUBNET_GATEWAY": "10.0.0.1"}, "SUBNET_GATEWAY"),
        ({"SUBNET_GATEWAY": "192.168.100.0"}, "SUBNET_GATEWAY"),
        ({"DNS_SERVER": "one.one.one.one"}, "DNS_SERVER"),
        ({"AUTH_TOKEN": "short"}, "AUTH_TOKEN"),
        ({"JWT_SECRET": " padded-secret-value "}, "JWT_SECRET"),
        ({"NODE_ID": "node id with spaces"}, "NODE_ID"),
        ({"WEBHOOK_ENDPOINT": "ftp://x"}, "WEBHOOK_ENDPOINT"),
        ({"WEBHOOK_ENDPOINT": "https://a.example,nonsense"}, "WEBHOOK_ENDPOINT"),
        ({"WEBHOOK_SECRET": "plain-secret-without-prefix"}, "WEBHOOK_SECRET"),
        ({"WEBHOOK_SECRET": "whsec_not*base64*at*all"}, "WEBHOOK_SECRET"),
        ({"WEBHOOK_SECRET": "whsec_c2hvcnQ="}, "WEBHOOK_SECRET"),
        ({"WEBHOOK_ENDPOINT": "https://hooks.example/x"}, "WEBHOOK_SECRET"),
        ({"WEBHOOK_MAX_AGE": "5"}, "WEBHOOK_MAX_AGE"),
        ({"EVENT_RETENTION_BYTES": "10"}, "EVENT_RETENTION_BYTES"),
        ({"CACHE_SECONDS": "-1"}, "CACHE_SECONDS"),
        ({"MAX_CONCURRENT_BUILDS": "0"}, "MAX_CONCURRENT_BUILDS"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"CONTRACT_VALIDATION": "maybe"}, "CONTRACT_VALIDATION"),
        ({"SSE_KEEPALIVE_SECONDS": "0"}, "SSE_KEEPALIVE_SECONDS"),
        ({"INSECURE_REGISTRIES": "good:5000,bad host"}, "INSECURE_REGISTRIES"),
        ({"LISTEN_SOCKET": "relative.sock"}, "LISTEN_SOCKET"),
        ({"MEMORY_RESTORE_MODE": "Lazy"}, "MEMORY_RESTORE_MODE"),
    ],
)
def test_a_bad_value_names_its_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    assert caught.value.variable == variable
    assert str(caught.value).startswith(f"{variable} must be")


def test_secrets_never_appear_in_the_error() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"AUTH_TOKEN": "tiny"})
    assert "tiny" not in str(caught.value)


def test_bad_configuration_stops_start_up_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dataplane"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PORT": "not-a-port", "DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "dataplane: invalid configuration: "
        "PORT must be an integer from 1 to 65535, got 'not-a-port'"
    ]


def test_network_settings_come_from_the_same_environment() -> None:
    network = Settings.from_env(
        {
            "BRIDGE_NAME": "br-test",
            "SUBNET_CIDR": "10.5.0.0/16",
            "DNS_SERVER": "2001:db8::53",
            "NETWORK_NAT": "off",
            "NETWORK_ISOLATION": "0",
        }
    ).network
    assert network.bridge_name == "br-test"
    assert network.gateway == ipaddress.IPv4Address("10.5.0.1")
    assert str(network.dns_server) == "2001:db8::53"
    assert (network.nat, network.isolation) == (False, False)


def test_network_invariants_are_settings_errors() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({"BRIDGE_NAME": "dp-bridge"})
    assert caught.value.variable == "BRIDGE_NAME"
