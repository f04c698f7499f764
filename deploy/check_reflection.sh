#!/usr/bin/env bash
# Lists and calls a running server through server reflection with a client that knows
# nothing of Creditline's .proto files: `buf curl` (Buf's grpcurl-like client, from npm's
# @bufbuild/buf; grpcurl itself is in neither Debian's packages nor PyPI, and speaks the
# same reflection protocol). The server must listen without TLS.
#
#   deploy/check_reflection.sh [HOST:PORT]    # default 127.0.0.1:50051
#
# It creates (or reuses) the account `reflection-check` and charges one SMS event to it.
# Needs npm; buf is installed into a temporary directory and removed afterwards.
set -euo pipefail
TARGET=${1:-127.0.0.1:50051}
BUF_VERSION=1.75.0
WORK=$(mktemp -d /tmp/creditline-reflection-XXXXXX)
trap 'rm -rf "$WORK"' EXIT
(cd "$WORK" && npm install --silent --no-audit --no-fund "@bufbuild/buf@$BUF_VERSION" >/dev/null)
buf() { "$WORK/node_modules/.bin/buf" curl --protocol grpc --http2-prior-knowledge "$@"; }

echo "== services and methods (reflection)"
buf --list-methods "http://$TARGET"
echo "== health"
buf -d '{}' "http://$TARGET/grpc.health.v1.Health/Check"
echo "== an account and an event charge, described by reflection only"
buf -d '{"account_id": "reflection-check", "initial_balance_micros": 1000000}' \
    "http://$TARGET/creditline.v1.Admin/CreateAccount" ||
  echo "(the account exists already: ALREADY_EXISTS is the answer)"
buf -d "{\"session_id\": \"reflection-check;$(date +%s%N)\", \"account_id\": \"reflection-check\",
         \"action\": \"DIRECT_DEBIT\",
         \"rating_groups\": [{\"rating_group\": 300, \"requested\": {\"service_specific_units\": 1}}]}" \
    "http://$TARGET/creditline.v1.Charging/Event"
