#!/usr/bin/env bash
# Roles of the rabo_flwr image: simulation (flwr run on the bundled app), superlink, supernode.
set -euo pipefail
role="${1:-simulation}"
shift || true
cd /app && . ./offline.env

# --insecure unless the arguments bring TLS: flower-superlink ignores certificates given with
# --insecure, and flower-supernode refuses --root-certificates together with it.
insecure_unless() {
  local flag="$1"; shift
  for arg in "$@"; do [[ "$arg" == "$flag" || "$arg" == "$flag="* ]] && return 0; done
  echo --insecure
}

case "$role" in
  simulation)
    exec flwr run /app --stream --federation-config "num-supernodes=${NUM_SUPERNODES:-5} client-resources-num-cpus=${CLIENT_CPUS:-1}" "$@"
    ;;
  superlink)
    # One HTTP port (8000) serves the Fleet API (SuperNodes), the Control API (flwr run/ls) and the
    # ServerApp's runtime API. Listen on all interfaces, else -p cannot reach it (a later --host wins).
    # TLS: add --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile (then --insecure is left out).
    # shellcheck disable=SC2046
    exec flower-superlink $(insecure_unless --ssl-certfile "$@") --host 0.0.0.0 --port "${SUPERLINK_PORT:-8000}" "$@"
    ;;
  supernode)
    : "${SUPERLINK:?set SUPERLINK=host:8000}" "${PARTITION_ID:?set PARTITION_ID}" "${CAPACITY:?set CAPACITY in (0, 1]}"
    # TLS: add --root-certificates /certs/ca.crt (then --insecure is left out).
    # shellcheck disable=SC2046
    exec flower-supernode $(insecure_unless --root-certificates "$@") --superlink "$SUPERLINK" \
      --node-config "partition-id=${PARTITION_ID} capacity=${CAPACITY}" "$@"
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
