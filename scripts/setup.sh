#!/usr/bin/env bash
# Idempotent host set-up: system packages, the venv, and the guest artifacts.
# Safe to run on every `make run` / `make test`: each step checks before it acts.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
DATA_DIR=${DATA_DIR:-/var/lib/dataplane}

# Debian packages the dataplane and its tests use:
#   qemu-system-x86   the QEMU backend and real-VM tests
#   umoci skopeo      OCI unpack; skopeo is the hand-run baseline in the image benchmark
#   erofs-utils e2fsprogs  image disks (mkfs.erofs, mkfs.ext4, debugfs)
#   docker-registry   a real OCI registry for tests and benchmarks
#   busybox-static cpio kmod lz4 zstd binutils  the guest initrd and kernel extraction
#   iproute2 nftables bridge/TAP/NAT tooling (tests create namespaces with `ip netns`)
#   gcc libc6-dev     the guest's static init helper
#   python3-venv curl procps
#   systemd util-linux  `systemd-analyze verify` of the unit; setpriv runs tests with its capabilities
PACKAGES=(
  qemu-system-x86 umoci skopeo erofs-utils e2fsprogs docker-registry
  busybox-static cpio kmod lz4 zstd binutils iproute2 nftables
  gcc libc6-dev python3 python3-venv curl procps systemd util-linux
)

# The guest kernel comes from `apt-get download`, which needs the package lists.
lists_empty() { ! compgen -G "/var/lib/apt/lists/*_Packages*" >/dev/null; }

missing=()
if command -v dpkg-query >/dev/null; then
  for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
  done
fi
if ((${#missing[@]})) || lists_empty; then
  if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
    ((${#missing[@]})) || { echo "setup: apt package lists are missing; run apt-get update" >&2; exit 1; }
    echo "setup: missing system packages: ${missing[*]} (run as root on Debian, or install them)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    apt-get install -y -q --no-install-recommends "${missing[@]}"
  fi
  # The packaged registry starts a system service on port 5000; tests run their own.
  if [[ " ${missing[*]} " == *" docker-registry "* ]] && command -v systemctl >/dev/null; then
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
  fi
fi

# The venv is rebuilt when pyproject.toml changes (its hash is kept in a stamp).
python=${PYTHON:-python3}
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "setup: Python >= 3.11 is required ($python is $("$python" --version 2>&1))" >&2
  exit 1
}
stamp="$VENV/.pyproject.sha256"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -x "$VENV/bin/python" || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "setup: preparing $VENV"
  [[ -x "$VENV/bin/python" ]] || "$python" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -e '.[dev]'
  echo "$want" >"$stamp"
fi

# Guest kernel and initrd into $DATA_DIR/system; a no-op when they are current.
"$VENV/bin/python" -m managers.guest build --data-dir "$DATA_DIR"
