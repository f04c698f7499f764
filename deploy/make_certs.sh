#!/usr/bin/env bash
# Makes a CA and the certificates for a first try of mutual TLS with roles, with openssl:
#
#   deploy/make_certs.sh DIR [HOST...]               the CA, the server and three clients
#   deploy/make_certs.sh DIR --client NAME ROLE...   one more client, from DIR's CA
#
# In DIR: ca.crt (clients verify the server with it, the server its clients), ca.key,
# server.crt/.key (for localhost, 127.0.0.1, ::1 and each HOST: the names clients dial),
# and the clients admin (role admin), network-function (role network-function) and health
# (no role: health only, for health checks), each NAME.crt/.key. A ROLE is one of
# network-function, admin, subscriber:<account>; it is written as the URI subject
# alternative name creditline:role:ROLE, which server/creditline/api/security.py reads.
#
#   creditline serve --listen-address 0.0.0.0:50051 --tls-cert-file DIR/server.crt \
#       --tls-key-file DIR/server.key --tls-client-ca-file DIR/ca.crt
#   creditline account --tls-ca-file DIR/ca.crt --tls-cert-file DIR/admin.crt \
#       --tls-key-file DIR/admin.key create alice --balance-micros 5000000
#
# A DIR that holds a CA already is left as it is, so a container may run this at every
# start (compose.yaml does). DIR is made mode 0700, every file 0600. For a first try: a
# deployment's certificates come from its own PKI, its CA key kept off the server.
set -euo pipefail
usage="usage: $0 DIR [HOST...] | $0 DIR --client NAME ROLE..."
DIR=${1:?$usage}
shift
DAYS=${CERT_DAYS:-825}
umask 077

san_of_hosts() {  # localhost and the loopback addresses, then each HOST: IP or DNS name
  local san="DNS:localhost,IP:127.0.0.1,IP:::1" host
  for host in "$@"; do
    if [[ $host =~ ^[0-9.]+$ || $host == *:* ]]; then san+=",IP:$host"; else san+=",DNS:$host"; fi
  done
  echo "$san"
}

san_of_roles() {  # creditline:role:ROLE for each ROLE, as URI names
  local san="" role
  for role in "$@"; do san+="${san:+,}URI:creditline:role:$role"; done
  echo "$san"
}

issue() {  # NAME serverAuth|clientAuth SAN: NAME.key and NAME.crt, signed by the CA
  local name=$1 usage=$2 san=$3
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$name" \
      -keyout "$DIR/$name.key" -out "$DIR/$name.csr" 2>/dev/null
  {
    echo "basicConstraints=critical,CA:FALSE"
    echo "keyUsage=critical,digitalSignature"
    echo "extendedKeyUsage=$usage"
    [ -z "$san" ] || echo "subjectAltName=$san"
  } > "$DIR/$name.ext"
  openssl x509 -req -in "$DIR/$name.csr" -CA "$DIR/ca.crt" -CAkey "$DIR/ca.key" \
      -set_serial "0x$(openssl rand -hex 16)" -days "$DAYS" -extfile "$DIR/$name.ext" \
      -out "$DIR/$name.crt" 2>/dev/null
  rm -f "$DIR/$name.csr" "$DIR/$name.ext"
  echo "  $DIR/$name.crt ${san:-(no role)}"
}

if [ "${1:-}" = "--client" ]; then
  [ $# -ge 3 ] || { echo "$usage" >&2; exit 2; }
  [ -f "$DIR/ca.key" ] || { echo "$DIR/ca.key: no CA here (make one first: $0 DIR)" >&2; exit 2; }
  name=$2
  shift 2
  [ ! -e "$DIR/$name.crt" ] || { echo "$DIR/$name.crt exists already" >&2; exit 2; }
  issue "$name" clientAuth "$(san_of_roles "$@")"
  exit 0
fi

if [ -e "$DIR/ca.crt" ]; then
  echo "$DIR holds a CA already: nothing made"
  exit 0
fi
mkdir -p "$DIR"
chmod 700 "$DIR"
openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=creditline first-try CA" -days "$DAYS" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$DIR/ca.key" -out "$DIR/ca.crt" 2>/dev/null
echo "made in $DIR: the CA (ca.crt, ca.key) and"
issue server serverAuth "$(san_of_hosts "$@")"
issue admin clientAuth "$(san_of_roles admin)"
issue network-function clientAuth "$(san_of_roles network-function)"
issue health clientAuth ""
