"""Small runnable OCI images for end-to-end tests: busybox plus a shell program.

The image is built in Python (tests.support.oci_builder) from the host's static
busybox and pushed to a test registry, so the guest runs real binaries without
any download.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.oci_builder import LayerBuilder, Pusher, make_image

BUSYBOX = Path("/bin/busybox")
APPLETS = (
    "sh", "cat", "echo", "printf", "ls", "sleep", "date", "wget", "ip", "env", "true",
    "expr", "seq", "hostname", "mkdir", "touch", "ping", "timeout", "id", "pwd", "stty",
    "head", "sha256sum", "ps", "grep", "kill", "httpd", "nc", "awk",
)  # fmt: skip

# Prints an increasing counter every 200 ms. The count lives only in the
# program's memory, so after standby and restore it must carry on where it
# stopped; a restore that rebooted the guest would start again from 0.
COUNTER = """#!/bin/sh
n=0
while :; do
  echo "count $n"
  n=$((n + 1))
  sleep 0.2
done
"""


def busybox_layers(programs: dict[str, str]) -> list[tuple[bytes, str]]:
    base = LayerBuilder().dir("bin").file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
    for applet in APPLETS:
        base.symlink(f"bin/{applet}", "busybox")
    base.dir("tmp", mode=0o1777).dir("etc")
    base.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/tmp:/bin/sh\n")
    base.file("etc/group", b"root:x:0:\napp:x:1000:\n")
    app = LayerBuilder().dir("app")
    for path, text in programs.items():
        app.file(path.lstrip("/"), text.encode(), mode=0o755)
    return [base.build(), app.build()]


def push_app(
    registry_host: str,
    repo: str,
    programs: dict[str, str],
    *,
    entrypoint: list[str],
    env: list[str] | None = None,
    tag: str = "v1",
) -> str:
    """Push the image; returns its reference as the dataplane should be asked for it."""
    image = make_image(
        busybox_layers(programs),
        config={"Entrypoint": entrypoint, "Env": env or ["PATH=/bin"], "WorkingDir": "/app"},
    )
    pusher = Pusher(registry_host)
    try:
        pusher.image(repo, tag, image)
    finally:
        pusher.close()
    return f"{registry_host}/{repo}:{tag}"
