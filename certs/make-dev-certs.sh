#!/usr/bin/env bash
# Makes a local CA and a server certificate signed by it, for development and tests only.
#
#   certs/make-dev-certs.sh [DIR] [NAME ...]
#
# DIR defaults to certs/ beside this script; NAMEs default to localhost and 127.0.0.1.
# Writes DIR/ca.crt, DIR/ca.key, DIR/localhost.crt (server certificate followed by the CA,
# a full chain) and DIR/localhost.key (PKCS#8). Keys never leave DIR; .gitignore keeps
# them out of the repository. Needs the openssl command.
set -euo pipefail

dir=${1:-$(dirname "$0")}
shift || true
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(localhost 127.0.0.1)

command -v openssl >/dev/null || { echo "make-dev-certs: the openssl command is missing (apt-get install openssl)" >&2; exit 1; }
mkdir -p "$dir"

san=""
for n in "${names[@]}"; do
  if [[ $n =~ ^[0-9.]+$ || $n == *:* ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
done
san=${san%,}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 30 \
  -subj "/CN=wsgate development CA" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null

openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=${names[0]}" -keyout "$dir/localhost.key" -out "$tmp/server.csr" 2>/dev/null

printf 'subjectAltName=%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' "$san" > "$tmp/ext"
openssl x509 -req -in "$tmp/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days 30 -extfile "$tmp/ext" -out "$tmp/server.crt" 2>/dev/null
cat "$tmp/server.crt" "$dir/ca.crt" > "$dir/localhost.crt"
rm -f "$dir/ca.srl"
chmod 600 "$dir/ca.key" "$dir/localhost.key"

echo "wrote $dir/ca.crt, $dir/localhost.crt and $dir/localhost.key for: ${names[*]}"
echo "trust $dir/ca.crt in your browser or client to connect without warnings (see certs/README.md)"
