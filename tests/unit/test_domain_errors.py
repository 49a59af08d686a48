"""Every domain error has one base, a snake_case code, and reaches clients in one shape."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
from litestar import Litestar, get
from litestar.params import FromPath
from litestar.testing import TestClient

from dataplane.errors import DOMAIN_ERRORS, EXCEPTION_HANDLERS
from managers.agent import errors as agent
from managers.agent import protocol as agent_protocol
from managers.errors import DomainError
from managers.guest import errors as guest
from managers.hypervisors import errors as hypervisors
from managers.hypervisors.qmp import QmpConnectionLost
from managers.images import errors as images
from managers.ingresses import errors as ingresses
from managers.instances import errors as instances
from managers.network import errors as network
from managers.resources import ResourceKind
from managers.resources import errors as resources
from managers.volumes import errors as volumes

MODULES: tuple[ModuleType, ...] = (
    images,
    instances,
    network,
    hypervisors,
    guest,
    agent,
    agent_protocol,
    volumes,
    resources,
    ingresses,
)
SNAKE_CASE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


@dataclass(frozen=True)
class Sample:
    make: Callable[[], DomainError]
    code: str
    status: int
    details: dict[str, Any]


def plain(cls: type[DomainError], code: str, status: int) -> Sample:
    """A class built from a message alone, so it has nothing to put in ``details``."""
    return Sample(lambda: cls(f"{cls.__name__} happened"), code, status, {})


def guest_failure(cls: type[agent.GuestOperationFailed], code: str, status: int) -> Sample:
    return Sample(
        lambda: cls("the guest said no", 2, "/etc/x"),
        code,
        status,
        {"errno": "ENOENT", "path": "/etc/x"},
    )


def hyper(cls: type[hypervisors.HypervisorError]) -> Sample:
    return Sample(
        lambda: cls("vm-1", "it went wrong"), "hypervisor_error", 500, {"instance_id": "vm-1"}
    )


IMAGE_HOLDERS = {"holders": 1, "records": ["instances/vm-1/metadata.json"]}
QUARANTINE = {"id": "vm-2", "path": "/data/quarantine/vm-2", "reason": "not JSON"}
WRONG_STATE = {"id": "vm-1", "action": "pause", "state": "Stopped", "allowed_states": ["Running"]}

# The codes and statuses are pinned here, not read from the edge's table: clients match on
# them, so a change must show up as a failing test.
SAMPLES: dict[type[DomainError], Sample] = {
    DomainError: plain(DomainError, "domain_error", 500),
    images.ImageError: plain(images.ImageError, "image_error", 500),
    images.InvalidReference: Sample(
        lambda: images.InvalidReference("UPPER/Case", "repository must be lowercase"),
        "invalid_reference",
        400,
        {"reference": "UPPER/Case", "reason": "repository must be lowercase"},
    ),
    images.ImageNotFound: plain(images.ImageNotFound, "image_not_found", 404),
    images.RegistryAuthFailed: plain(images.RegistryAuthFailed, "image_not_found", 404),
    images.NoMatchingPlatform: plain(images.NoMatchingPlatform, "image_not_found", 404),
    images.RegistryUnreachable: plain(images.RegistryUnreachable, "registry_unreachable", 502),
    images.RegistryError: plain(images.RegistryError, "registry_error", 502),
    images.UnsupportedImage: plain(images.UnsupportedImage, "unsupported_image", 400),
    images.InvalidArchive: plain(images.InvalidArchive, "invalid_archive", 400),
    images.DigestMismatch: Sample(
        lambda: images.DigestMismatch("blob sha256:aa", "sha256:aa", "sha256:bb"),
        "digest_mismatch",
        500,
        {"content": "blob sha256:aa", "expected": "sha256:aa", "actual": "sha256:bb"},
    ),
    images.ImageInUse: Sample(
        lambda: images.ImageInUse("image alpine is in use", IMAGE_HOLDERS),
        "image_in_use",
        409,
        IMAGE_HOLDERS,
    ),
    images.FormatConflict: plain(images.FormatConflict, "format_conflict", 409),
    images.ImageTooLarge: plain(images.ImageTooLarge, "image_too_large", 413),
    images.StorageFull: plain(images.StorageFull, "insufficient_storage", 507),
    images.BuildFailed: plain(images.BuildFailed, "image_build_failed", 500),
    images.InvalidFormat: plain(images.InvalidFormat, "invalid_format", 400),
    images.ImageNotReady: plain(images.ImageNotReady, "image_not_ready", 409),
    instances.InstanceError: plain(instances.InstanceError, "instance_error", 500),
    instances.InvalidInstanceSpec: Sample(
        lambda: instances.InvalidInstanceSpec("vcpus must be >= 1", {"problems": ["vcpus"]}),
        "invalid_instance",
        400,
        {"problems": ["vcpus"]},
    ),
    instances.InstanceNotFound: Sample(
        lambda: instances.InstanceNotFound("web"), "instance_not_found", 404, {"instance": "web"}
    ),
    instances.InstanceExists: Sample(
        lambda: instances.InstanceExists("web", "vm-1"),
        "instance_exists",
        409,
        {"name": "web", "id": "vm-1"},
    ),
    instances.ImageUnusable: Sample(
        lambda: instances.ImageUnusable("image 'alpine' has no disk yet", {"image": "alpine"}),
        "image_not_ready",
        409,
        {"image": "alpine"},
    ),
    instances.ImageMissing: Sample(
        lambda: instances.ImageMissing("no image 'alpine' on this node", {"image": "alpine"}),
        "image_not_found",
        404,
        {"image": "alpine"},
    ),
    instances.WrongInstanceState: Sample(
        lambda: instances.WrongInstanceState("vm-1", "pause", "Stopped", ["Running"]),
        "wrong_state",
        409,
        WRONG_STATE,
    ),
    instances.InstanceQuarantined: Sample(
        lambda: instances.InstanceQuarantined("vm-2", "/data/quarantine/vm-2", "not JSON"),
        "instance_quarantined",
        409,
        QUARANTINE,
    ),
    instances.RecordInvalid: plain(instances.RecordInvalid, "instance_error", 500),
    instances.ActionFailed: Sample(
        lambda: instances.ActionFailed(
            "vm-1", "standby", "snapshot", hypervisors.VmmDied("vm-1", "gone", 137)
        ),
        "action_failed",
        500,
        {"id": "vm-1", "action": "standby", "step": "snapshot"},
    ),
    network.NetworkError: plain(network.NetworkError, "network_error", 500),
    network.NetworkConfigError: plain(network.NetworkConfigError, "network_error", 500),
    network.BridgeConflict: plain(network.BridgeConflict, "network_error", 500),
    network.AddressExhausted: plain(network.AddressExhausted, "addresses_exhausted", 409),
    network.InvalidAllocation: plain(network.InvalidAllocation, "network_error", 500),
    network.TapError: plain(network.TapError, "network_error", 500),
    network.NatError: plain(network.NatError, "network_error", 500),
    network.ShapingError: plain(network.ShapingError, "network_error", 500),
    network.NetlinkFailure: plain(network.NetlinkFailure, "network_error", 500),
    hypervisors.HypervisorError: hyper(hypervisors.HypervisorError),
    hypervisors.InvalidRequest: hyper(hypervisors.InvalidRequest),
    hypervisors.VmmNotFound: hyper(hypervisors.VmmNotFound),
    hypervisors.VmmStartTimeout: hyper(hypervisors.VmmStartTimeout),
    hypervisors.VmmDied: Sample(
        lambda: hypervisors.VmmDied("vm-1", "the VMM exited", 137),
        "hypervisor_error",
        500,
        {"instance_id": "vm-1", "exit_code": 137},
    ),
    hypervisors.VmmProtocolError: hyper(hypervisors.VmmProtocolError),
    QmpConnectionLost: hyper(QmpConnectionLost),
    hypervisors.VmmRequestFailed: Sample(
        lambda: hypervisors.VmmRequestFailed(
            "vm-1", "Cloud Hypervisor refused vm.resize (500)", ["Error resizing", "EINVAL"], 500
        ),
        "hypervisor_error",
        500,
        {"instance_id": "vm-1", "vmm_errors": ["Error resizing", "EINVAL"]},
    ),
    hypervisors.WrongState: Sample(
        lambda: hypervisors.wrong_state("vm-1", "resume", "Running"),
        "hypervisor_error",
        500,
        {"instance_id": "vm-1", "vmm_errors": []},
    ),
    hypervisors.UnsupportedVersion: hyper(hypervisors.UnsupportedVersion),
    hypervisors.OperationTimeout: hyper(hypervisors.OperationTimeout),
    agent.AgentError: plain(agent.AgentError, "agent_error", 500),
    agent.AgentUnavailable: plain(agent.AgentUnavailable, "agent_unavailable", 503),
    agent.AgentDisconnected: plain(agent.AgentDisconnected, "agent_disconnected", 409),
    agent.AgentProtocolError: plain(agent.AgentProtocolError, "agent_protocol_error", 502),
    agent_protocol.ProtocolError: plain(agent_protocol.ProtocolError, "agent_protocol_error", 502),
    agent.GuestOperationFailed: guest_failure(
        agent.GuestOperationFailed, "guest_operation_failed", 502
    ),
    agent.GuestPathNotFound: guest_failure(agent.GuestPathNotFound, "guest_path_not_found", 404),
    agent.GuestPermissionDenied: guest_failure(
        agent.GuestPermissionDenied, "guest_permission_denied", 403
    ),
    agent.InvalidGuestPath: guest_failure(agent.InvalidGuestPath, "invalid_guest_path", 400),
    agent.GuestStorageFull: guest_failure(agent.GuestStorageFull, "insufficient_storage", 507),
    agent.ExecFailed: guest_failure(agent.ExecFailed, "exec_failed", 400),
    guest.GuestError: plain(guest.GuestError, "guest_unavailable", 503),
    guest.ArtifactError: plain(guest.ArtifactError, "guest_unavailable", 503),
    guest.ToolMissingError: plain(guest.ToolMissingError, "guest_unavailable", 503),
    guest.KernelFetchError: plain(guest.KernelFetchError, "guest_unavailable", 503),
    guest.KernelUnpackError: plain(guest.KernelUnpackError, "guest_unavailable", 503),
    guest.KernelModuleError: plain(guest.KernelModuleError, "guest_unavailable", 503),
    guest.InitCompileError: plain(guest.InitCompileError, "guest_unavailable", 503),
    guest.InitrdBuildError: plain(guest.InitrdBuildError, "guest_unavailable", 503),
    guest.OverridePathError: plain(guest.OverridePathError, "guest_unavailable", 503),
    guest.InvalidGuestConfig: plain(guest.InvalidGuestConfig, "guest_unavailable", 503),
    guest.OverlayDiskError: plain(guest.OverlayDiskError, "guest_unavailable", 503),
    guest.TscUnavailableError: plain(guest.TscUnavailableError, "guest_unavailable", 503),
    instances.VolumeNotAttached: Sample(
        lambda: instances.VolumeNotAttached("vm-1", "data"),
        "volume_not_attached",
        404,
        {"id": "vm-1", "volume": "data"},
    ),
    ingresses.IngressError: plain(ingresses.IngressError, "ingress_error", 500),
    ingresses.InvalidIngressSpec: plain(ingresses.InvalidIngressSpec, "invalid_ingress", 400),
    ingresses.IngressNotFound: Sample(
        lambda: ingresses.IngressNotFound("web"), "ingress_not_found", 404, {"ingress": "web"}
    ),
    ingresses.TargetNotFound: Sample(
        lambda: ingresses.TargetNotFound("web"), "instance_not_found", 404, {"instance": "web"}
    ),
    ingresses.IngressExists: Sample(
        lambda: ingresses.IngressExists("web"), "ingress_exists", 409, {"name": "web"}
    ),
    ingresses.PortInUse: plain(ingresses.PortInUse, "port_in_use", 409),
    ingresses.PrivilegedPort: plain(ingresses.PrivilegedPort, "port_privileged", 403),
    ingresses.InstanceWithoutNetwork: plain(
        ingresses.InstanceWithoutNetwork, "instance_without_network", 409
    ),
    ingresses.IngressRecordInvalid: plain(ingresses.IngressRecordInvalid, "ingress_error", 500),
    volumes.VolumeError: plain(volumes.VolumeError, "volume_error", 500),
    volumes.InvalidVolumeSpec: plain(volumes.InvalidVolumeSpec, "invalid_volume", 400),
    volumes.InvalidVolumeArchive: plain(volumes.InvalidVolumeArchive, "invalid_archive", 400),
    volumes.VolumeTooSmall: Sample(
        lambda: volumes.VolumeTooSmall(16, 40),
        "volume_too_small",
        400,
        {"size_mb": 16, "needed_mb": 40},
    ),
    volumes.VolumeNotFound: Sample(
        lambda: volumes.VolumeNotFound("data"), "volume_not_found", 404, {"volume": "data"}
    ),
    volumes.VolumeExists: Sample(
        lambda: volumes.VolumeExists("data", "0123456789ab"),
        "volume_exists",
        409,
        {"name": "data", "id": "0123456789ab"},
    ),
    volumes.VolumeInUse: plain(volumes.VolumeInUse, "volume_in_use", 409),
    volumes.SourceImageMissing: Sample(
        lambda: volumes.SourceImageMissing("alpine"), "image_not_found", 404, {"image": "alpine"}
    ),
    volumes.SourceImageNotReady: Sample(
        lambda: volumes.SourceImageNotReady("alpine", "building"),
        "image_not_ready",
        409,
        {"image": "alpine"},
    ),
    volumes.VolumeBusy: plain(volumes.VolumeBusy, "volume_busy", 409),
    volumes.VolumeQuarantined: Sample(
        lambda: volumes.VolumeQuarantined("0123456789ab", "/q/v", "bad json"),
        "volume_quarantined",
        409,
        {"id": "0123456789ab", "path": "/q/v", "reason": "bad json"},
    ),
    volumes.InsufficientStorage: Sample(
        lambda: volumes.InsufficientStorage(2 << 20, 1 << 20),
        "insufficient_storage",
        507,
        {"needed_mb": 2, "free_mb": 1},
    ),
    volumes.VolumeRecordInvalid: plain(volumes.VolumeRecordInvalid, "volume_error", 500),
    volumes.VolumeBuildFailed: plain(volumes.VolumeBuildFailed, "volume_build_failed", 500),
    resources.ResourceError: plain(resources.ResourceError, "resource_error", 500),
    resources.InsufficientResources: Sample(
        lambda: resources.InsufficientResources(
            ResourceKind.MEMORY,
            requested=3 << 30,
            allocated=1 << 30,
            effective_limit=2 << 30,
            oversub_ratio=1.0,
        ),
        "insufficient_resources",
        409,
        {
            "resource": "memory",
            "requested": 3 << 30,
            "available": 1 << 30,
            "allocated": 1 << 30,
            "effective_limit": 2 << 30,
            "short_by": 2 << 30,
            "oversub_ratio": 1.0,
        },
    ),
}
CLASSES = list(SAMPLES)


def exception_classes(module: ModuleType) -> set[type[BaseException]]:
    return {
        value
        for value in vars(module).values()
        if inspect.isclass(value)
        and issubclass(value, BaseException)
        and value.__module__ == module.__name__
    }


def domain_subclasses(cls: type[DomainError]) -> Iterator[type[DomainError]]:
    for sub in cls.__subclasses__():
        # Tests may subclass domain errors for their fakes; only the domain's own count here.
        if sub.__module__.startswith("managers."):
            yield sub
        yield from domain_subclasses(sub)


def test_every_error_in_an_errors_module_is_a_domain_error() -> None:
    for module in MODULES:
        for cls in exception_classes(module):
            assert issubclass(cls, DomainError), f"{module.__name__}.{cls.__name__}"


def test_every_domain_error_has_a_sample() -> None:
    found = {cls for module in MODULES for cls in exception_classes(module)}
    found |= set(domain_subclasses(DomainError)) | {DomainError}
    assert found == set(SAMPLES)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_code_is_snake_case(cls: type[DomainError]) -> None:
    assert SNAKE_CASE.fullmatch(cls.code), cls.code


def test_a_class_with_its_own_code_has_its_own_status() -> None:
    # Otherwise a new code would silently inherit a status decided for another kind of error.
    own_code = {cls for cls in SAMPLES if "code" in vars(cls)}
    assert own_code == set(DOMAIN_ERRORS)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_error_carries_code_message_and_details(cls: type[DomainError]) -> None:
    sample = SAMPLES[cls]
    error = sample.make()
    assert type(error) is cls
    assert error.code == sample.code
    assert error.message
    assert error.message == str(error)
    assert error.details == sample.details


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient[Litestar]]:
    @get("/raise/{index:int}", sync_to_thread=False)
    def raise_sample(index: FromPath[int]) -> None:
        raise SAMPLES[CLASSES[index]].make()

    app = Litestar([raise_sample], exception_handlers=EXCEPTION_HANDLERS)
    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_edge_answers_with_code_message_and_details(
    client: TestClient[Litestar], cls: type[DomainError]
) -> None:
    sample = SAMPLES[cls]
    response = client.get(f"/raise/{CLASSES.index(cls)}")
    assert response.status_code == sample.status, response.text
    body = response.json()
    assert body["code"] == sample.code
    assert body["message"] == str(sample.make())
    # Empty details are left out of the body, as for every other error.
    assert body.get("details", {}) == sample.details
    assert set(body) <= {"code", "message", "details"}


def test_hypervisor_error_reaches_the_body_with_its_instance(
    client: TestClient[Litestar],
) -> None:
    response = client.get(f"/raise/{CLASSES.index(hypervisors.VmmStartTimeout)}")
    body = response.json()
    assert body["details"]["instance_id"] == "vm-1"
    assert "vm-1" in body["message"]


def test_errors_keep_their_own_attributes() -> None:
    died = hypervisors.VmmDied("vm-1", "gone", 9)
    assert (died.instance_id, died.exit_code) == ("vm-1", 9)
    refused = hypervisors.VmmRequestFailed("vm-1", "refused", ["no"], 400)
    assert (refused.vmm_errors, refused.status) == (["no"], 400)
    assert refused.message == "instance vm-1: refused: no"
    reference = images.InvalidReference("x y", "contains whitespace")
    assert reference.reference == "x y"
    mismatch = images.DigestMismatch("blob", "sha256:aa", "sha256:bb")
    assert (mismatch.expected, mismatch.actual) == ("sha256:aa", "sha256:bb")
    assert instances.WrongInstanceState("vm-1", "pause", "Stopped", []).state == "Stopped"
    cause = RuntimeError("disk full")
    assert instances.ActionFailed("vm-1", "standby", "snapshot", cause).step == "snapshot"


def test_details_default_to_a_fresh_empty_dict() -> None:
    first, second = images.ImageInUse("in use"), images.ImageInUse("in use")
    assert first.details == {}
    first.details["holders"] = 1
    assert second.details == {}
    given: dict[str, object] = {"image": "alpine"}
    error = instances.ImageUnusable("not ready", given)
    given["image"] = "busybox"
    assert error.details == {"image": "alpine"}
