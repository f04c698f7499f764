#!/usr/bin/env bash
# Runs the Dockerfile's steps without a Docker engine, in fresh virtual environments:
# the build stage (wheels, the venv from those wheels only, the self-check) and then the
# runtime stage as a non-root user (nobody): the first-try certificates
# (creditline-make-certs), plaintext on every address refused, `creditline serve` with the
# image's environment (every address, mutual TLS), the HEALTHCHECK command, SIGTERM and a
# clean exit.
#
#   deploy/check_image_steps.sh [GIT_REF]     # default: HEAD of this repository
#
# BASE_PYTHON (default /usr/bin/python3 where there is one, else python3) stands in for
# the image's interpreter; it must be one the non-root user can run (not one under /root,
# such as pyenv's: nobody then runs another Python, with another standard library, than
# the one the wheels were chosen for). The runtime stage checks that it can.
set -euo pipefail
REF=${1:-HEAD}
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/creditline-image-XXXXXX)
chmod 755 "$WORK"
SERVER=""
trap '[ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; rm -rf "$WORK"' EXIT
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

echo "== build stage ($REF)"
mkdir "$WORK/src"
git -C "$REPO" archive "$REF" | tar -x -C "$WORK/src"   # COPY . . (tracked files only)
[ -f "$WORK/src/Dockerfile" ] || cp "$REPO/Dockerfile" "$WORK/src/Dockerfile"
if [ -z "${BASE_PYTHON:-}" ]; then
  BASE_PYTHON=python3
  [ -x /usr/bin/python3 ] && BASE_PYTHON=/usr/bin/python3
fi
"$BASE_PYTHON" -m venv "$WORK/base"
PY="$WORK/base/bin/python"
(cd "$WORK/src" && "$PY" -m pip wheel -q --wheel-dir "$WORK/wheels" .)
"$PY" -m venv "$WORK/opt"
"$WORK/opt/bin/pip" install -q --no-index --find-links "$WORK/wheels" creditline
"$WORK/opt/bin/python" -c "import creditline.api.app, creditline.cli"
"$WORK/opt/bin/python" -c "import importlib.util as u, sys; \
spec = u.find_spec('creditline.native'); \
sys.exit(0) if spec is None else __import__('creditline.native.kernels')"
"$WORK/opt/bin/creditline" serve --help > /dev/null
"$WORK/opt/bin/python" -c "import importlib.util as u; s = u.find_spec('creditline.native'); \
print('compiled kernels:', 'none in this tree' if s is None else \
u.find_spec('creditline.native.kernels').origin)"

echo "== runtime stage, as nobody"
# The image's environment, its /etc/creditline/tls here at $TLS: the Dockerfile must
# still say what this stands in for.
IMAGE_TLS=/etc/creditline/tls
TLS="$WORK/tls"
for said in "CREDITLINE_LISTEN_ADDRESS=0.0.0.0:50051" \
    "CREDITLINE_TLS_CERT_FILE=$IMAGE_TLS/server.crt" \
    "CREDITLINE_TLS_KEY_FILE=$IMAGE_TLS/server.key" \
    "CREDITLINE_TLS_CLIENT_CA_FILE=$IMAGE_TLS/ca.crt" \
    "\"$IMAGE_TLS/health.crt\"" "deploy/make_certs.sh /usr/local/bin/creditline-make-certs"; do
  grep -qF -- "$said" "$WORK/src/Dockerfile" ||
    { echo "the Dockerfile no longer says $said: bring this script in step"; exit 1; }
done
PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); \
print(s.getsockname()[1])")
nobody=(setpriv --reuid=65534 --regid=65534 --clear-groups)
as_nobody() { env -i PATH="$WORK/opt/bin:/usr/bin:/bin" HOME=/tmp "${nobody[@]}" "$@"; }
# a command, not a function: `... &` then makes $! the server itself (env and setpriv
# exec into it), and SIGTERM reaches creditline, not a subshell
image_env=(env -i PATH="$WORK/opt/bin:/usr/bin:/bin" HOME=/tmp PYTHONUNBUFFERED=1
           CREDITLINE_LISTEN_ADDRESS="0.0.0.0:$PORT" CREDITLINE_LOG_FORMAT=json)
tls_env=(CREDITLINE_TLS_CERT_FILE="$TLS/server.crt" CREDITLINE_TLS_KEY_FILE="$TLS/server.key"
         CREDITLINE_TLS_CLIENT_CA_FILE="$TLS/ca.crt")

as_nobody "$WORK/opt/bin/python" -c "import creditline.api.app, creditline.cli" ||
  { echo "nobody cannot run this environment ($BASE_PYTHON): set BASE_PYTHON"; exit 1; }

echo "-- the first-try certificates (creditline-make-certs)"
install -d -m 0700 -o 65534 -g 65534 "$TLS"    # the image's directory, its user's only
as_nobody bash "$WORK/src/deploy/make_certs.sh" "$TLS"

echo "-- without the image's TLS settings: plaintext on every address is refused"
code=0; "${image_env[@]}" "${nobody[@]}" creditline serve > "$WORK/refused.log" 2>&1 || code=$?
cat "$WORK/refused.log"
if [ "$code" != 2 ] || ! grep -q "every caller has every role" "$WORK/refused.log"; then
  echo "plaintext on every address was not refused (exit code $code)"; exit 1
fi

echo "-- serve with the image's environment"
"${image_env[@]}" "${tls_env[@]}" "${nobody[@]}" creditline serve > "$WORK/serve.log" 2>&1 &
SERVER=$!
health_flags=(--server "127.0.0.1:$PORT" --timeout-s 2 --tls-ca-file "$TLS/ca.crt"
              --tls-cert-file "$TLS/health.crt" --tls-key-file "$TLS/health.key")
healthy=no
for _ in $(seq 1 60); do
  if as_nobody creditline health "${health_flags[@]}" > /dev/null 2>&1; then
    healthy=yes; break
  fi
  sleep 1
done
echo "health check (mutual TLS, the health certificate): $healthy"
plaintext=answered
as_nobody creditline health --server "127.0.0.1:$PORT" --timeout-s 2 > /dev/null 2>&1 ||
  plaintext=refused
echo "health check in plaintext: $plaintext"
kill -TERM "$SERVER" 2>/dev/null || echo "the server had ended already"
code=0; wait "$SERVER" || code=$?
SERVER=""
cat "$WORK/serve.log"
echo "serve exit code after SIGTERM: $code"
# one test, not a list of them: set -e stops at no failure but a list's last
if [ "$healthy" != yes ] || [ "$plaintext" != refused ] || [ "$code" != 0 ]; then
  echo "IMAGE STEPS FAILED"; exit 1
fi
echo "IMAGE STEPS OK"
