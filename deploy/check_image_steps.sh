#!/usr/bin/env bash
# Runs the Dockerfile's steps without a Docker engine, in fresh virtual environments:
# the build stage (wheels, the venv from those wheels only, the self-check) and then the
# runtime stage as a non-root user (nobody): `creditline serve` with the image's
# environment, the HEALTHCHECK command, SIGTERM and a clean exit.
#
#   deploy/check_image_steps.sh [GIT_REF]     # default: HEAD of this repository
#
# BASE_PYTHON (default python3) stands in for the image's interpreter; it must be one the
# non-root user can run (e.g. /usr/bin/python3, not one under /root).
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
"${BASE_PYTHON:-python3}" -m venv "$WORK/base"
PY="$WORK/base/bin/python"
(cd "$WORK/src" && "$PY" -m pip wheel -q --wheel-dir "$WORK/wheels" .)
"$PY" -m venv "$WORK/opt"
"$WORK/opt/bin/pip" install -q --no-index --find-links "$WORK/wheels" creditline
"$WORK/opt/bin/python" -c "import creditline.app, creditline.cli"
"$WORK/opt/bin/python" -c "import importlib.util as u, sys; \
spec = u.find_spec('creditline.native'); \
sys.exit(0) if spec is None else __import__('creditline.native.kernels')"
"$WORK/opt/bin/creditline" serve --help > /dev/null
"$WORK/opt/bin/python" -c "import importlib.util as u; s = u.find_spec('creditline.native'); \
print('compiled kernels:', 'none in this tree' if s is None else \
u.find_spec('creditline.native.kernels').origin)"

echo "== runtime stage, as nobody"
PORT=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); \
print(s.getsockname()[1])")
as_nobody() { env -i PATH="$WORK/opt/bin:/usr/bin:/bin" HOME=/tmp \
    setpriv --reuid=65534 --regid=65534 --clear-groups "$@"; }
# run directly (not through the function), so $! is the server itself: env and setpriv
# exec into it, and SIGTERM reaches creditline
env -i PATH="$WORK/opt/bin:/usr/bin:/bin" HOME=/tmp PYTHONUNBUFFERED=1 \
    CREDITLINE_LISTEN_ADDRESS="127.0.0.1:$PORT" CREDITLINE_LOG_FORMAT=json \
    setpriv --reuid=65534 --regid=65534 --clear-groups creditline serve \
    > "$WORK/serve.log" 2>&1 &
SERVER=$!
healthy=no
for _ in $(seq 1 60); do
  if as_nobody creditline health --server "127.0.0.1:$PORT" --timeout-s 2 > /dev/null 2>&1; then
    healthy=yes; break
  fi
  sleep 1
done
echo "health check: $healthy"
kill -TERM "$SERVER"
code=0; wait "$SERVER" || code=$?
SERVER=""
cat "$WORK/serve.log"
echo "serve exit code after SIGTERM: $code"
[ "$healthy" = yes ] && [ "$code" = 0 ]
echo "IMAGE STEPS OK"
