#!/usr/bin/env bash
# `make install`: the dataplane as a systemd service.
#   $PREFIX/venv             a venv holding the dataplane (not editable: the clone may go)
#   $UNIT_DIR/dataplane.service   deploy/dataplane.service with this installation's paths
#   $CONFIG_DIR/env          the service's settings (made once, 0600; never overwritten)
# `make setup` has already put the system packages and the guest kernel/initrd in place.
set -euo pipefail
cd "$(dirname "$0")/.."

PREFIX=${PREFIX:-/opt/dataplane}
UNIT_DIR=${UNIT_DIR:-/etc/systemd/system}
CONFIG_DIR=${CONFIG_DIR:-/etc/dataplane}
DATA_DIR=${DATA_DIR:-/var/lib/dataplane}
python=${PYTHON:-python3}

for path in "$PREFIX" "$UNIT_DIR" "$CONFIG_DIR" "$DATA_DIR"; do
  [[ "$path" == /* ]] || { echo "install: $path must be an absolute path" >&2; exit 1; }
done

echo "install: $PREFIX/venv"
[[ -x "$PREFIX/venv/bin/python" ]] || "$python" -m venv "$PREFIX/venv"
"$PREFIX/venv/bin/pip" install -q --upgrade pip
"$PREFIX/venv/bin/pip" install -q --upgrade .

echo "install: $UNIT_DIR/dataplane.service"
mkdir -p "$UNIT_DIR"
# Verified before it replaces anything (systemd-analyze wants a file named *.service).
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
unit="$scratch/dataplane.service"
sed -e "s#^ExecStart=.*#ExecStart=$PREFIX/venv/bin/dataplane#" \
    -e "s#^EnvironmentFile=.*#EnvironmentFile=-$CONFIG_DIR/env#" \
    -e "s#^Environment=DATA_DIR=.*#Environment=DATA_DIR=$DATA_DIR#" \
    -e "s#^ReadWritePaths=.*#ReadWritePaths=$DATA_DIR#" \
    deploy/dataplane.service >"$unit"
systemd-analyze verify "$unit"
install -m 0644 "$unit" "$UNIT_DIR/dataplane.service"

install -d -m 0700 "$CONFIG_DIR" "$DATA_DIR"
if [[ ! -e "$CONFIG_DIR/env" ]]; then
  echo "install: $CONFIG_DIR/env (settings; see README.md's Configuration)"
  umask 077
  cat >"$CONFIG_DIR/env" <<'SETTINGS'
# The dataplane's settings, one VARIABLE=value per line (README.md lists them all).
# With neither AUTH_TOKEN nor JWT_SECRET the API listens on 127.0.0.1 only.
#AUTH_TOKEN=
#LISTEN_ADDR=0.0.0.0
#TLS_CERT_FILE=/etc/dataplane/tls/cert.pem
#TLS_KEY_FILE=/etc/dataplane/tls/key.pem
#TLS_CLIENT_CA_FILE=/etc/dataplane/tls/clients.pem
SETTINGS
fi

if [[ -d /run/systemd/system ]] && [[ "$UNIT_DIR" == /etc/systemd/system ]]; then
  systemctl daemon-reload
  echo "install: done; start it with: systemctl enable --now dataplane"
else
  echo "install: done (systemd is not running here: the unit is installed, not loaded)"
fi
