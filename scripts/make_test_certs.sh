#!/usr/bin/env bash
# Self-signed TLS certificates for trying a SuperLink with TLS: a CA and a server certificate
# signed by it. For tests and trials only; a real deployment uses its organisation's CA.
#
#   scripts/make_test_certs.sh [OUT_DIR] [NAME ...]
#
# OUT_DIR (default: certificates) receives ca.key, ca.crt, server.key, server.pem.
# The server certificate is valid for 127.0.0.1 and localhost plus every NAME given (IP
# addresses or DNS names by which SuperNodes and `flwr` reach the SuperLink, e.g. its LAN IP).
# Start the SuperLink with --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile
# server.key; give SuperNodes --root-certificates ca.crt and `flwr` root-certificates = ca.crt.
set -euo pipefail

out="${1:-certificates}"
shift || true
days="${CERT_DAYS:-365}"

san="IP:127.0.0.1,DNS:localhost"
for name in "$@"; do
  if [[ "$name" =~ ^[0-9.]+$ || "$name" == *:* ]]; then san+=",IP:$name"; else san+=",DNS:$name"; fi
done

mkdir -p "$out"
cd "$out"
umask 077  # private keys readable by their owner only

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -nodes -days "$days" \
  -keyout ca.key -out ca.crt -subj "/CN=rabo-flwr test CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"

openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -nodes -keyout server.key -out server.csr \
  -subj "/CN=rabo-flwr SuperLink"
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 -days "$days" \
  -out server.pem -extfile <(printf '%s\n' \
    "subjectAltName=$san" "basicConstraints=CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyAgreement" "extendedKeyUsage=serverAuth")
rm -f server.csr ca.srl
chmod 644 ca.crt server.pem

openssl verify -CAfile ca.crt server.pem >/dev/null
echo "certificates in $(pwd): ca.crt server.pem server.key (SAN $san)"
