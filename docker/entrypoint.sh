#!/usr/bin/env bash
# Roles of the rabo_flwr image: simulation (flwr run on the bundled app), superlink, supernode.
set -euo pipefail
role="${1:-simulation}"
shift || true
case "$role" in
  simulation)
    exec flwr run /app --stream --federation-config "num-supernodes=${NUM_SUPERNODES:-5} client-resources-num-cpus=${CLIENT_CPUS:-1}" "$@"
    ;;
  superlink)
    # Add --ssl-ca-certfile/--ssl-certfile/--ssl-keyfile (and drop --insecure) for a real deployment.
    exec flower-superlink --insecure "$@"
    ;;
  supernode)
    : "${SUPERLINK:?set SUPERLINK=host:9092}" "${PARTITION_ID:?set PARTITION_ID}" "${CAPACITY:?set CAPACITY in (0, 1]}"
    exec flower-supernode --insecure --superlink "$SUPERLINK" \
      --node-config "partition-id=${PARTITION_ID} capacity=${CAPACITY}" "$@"
    ;;
  *)
    exec "$role" "$@"
    ;;
esac
