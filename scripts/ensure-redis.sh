#!/usr/bin/env bash
# Make sure a Redis server answers on 127.0.0.1:6379: use a running one, else install and start one.
set -euo pipefail
ping_redis() {
  python3 - <<'PY' 2>/dev/null
import socket
s = socket.create_connection(("127.0.0.1", 6379), timeout=1)
s.sendall(b"PING\r\n")
assert s.recv(16).startswith(b"+PONG")
PY
}
if ping_redis; then
  exit 0
fi
if ! command -v redis-server >/dev/null 2>&1; then
  echo "ensure-redis: no Redis answers on 127.0.0.1:6379; installing redis-server with apt" >&2
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
echo "ensure-redis: starting redis-server on 127.0.0.1:6379 (nothing kept on disk)" >&2
redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
  --dir /tmp --logfile /tmp/glmv-redis.log
for _ in $(seq 1 50); do
  ping_redis && exit 0
  sleep 0.1
done
echo "ensure-redis: redis-server did not answer on 127.0.0.1:6379 (see /tmp/glmv-redis.log)" >&2
exit 1
