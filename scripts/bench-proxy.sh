#!/usr/bin/env bash
# Benchmarks the sidecar proxy's cached serve against nginx serving the same cached answer.
#
#   scripts/bench-proxy.sh                 # 10 s per run, 1 and 16 connections
#   DURATION=30 CONNECTIONS="1 8 64" scripts/bench-proxy.sh
#
# Installs nginx and wrk from Debian when missing (needs root or sudo). Everything binds
# 127.0.0.1 on free ports and is stopped on exit. Prints Markdown tables for BENCHMARKS.md: each
# server's figures, the sidecar's ratios to nginx's static `return` (issue 12's anchor), peak RSS.
#
# Set-up: nginx #1 plays the broker (a canned ECS answer, Cache-Control max-age=3300).
#   iam-broker-proxy  -> broker        (per-token cache; every measured request is a hit)
#   nginx #2 sidecar  -> broker        (proxy_cache keyed by URL + Authorization, as the seed's
#                                      nginx sidecar but keyed per token, so it is equivalent)
#   nginx #2 static   -> `return 200`  (nginx's best case: the answer in its config)
set -euo pipefail
source "$(dirname "$0")/lib.sh"
cd "$ROOT"

DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-"1 16"}
TOKEN="iamb_AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA" # not secret: bench only

need_pkg() {
  command -v "$1" >/dev/null && return
  log "installing $2 from Debian"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$2" >/dev/null
}
need_pkg wrk wrk
[ -x /usr/sbin/nginx ] || need_pkg nginx nginx
NGINX=/usr/sbin/nginx

ensure_rust
log "cargo build --release -p iam-broker-proxy"
cargo build --release --locked -p iam-broker-proxy
PROXY_BIN="$ROOT/target/release/iam-broker-proxy"

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

BROKER_PORT=$(free_port); SIDECAR_PORT=$(free_port); STATIC_PORT=$(free_port); PROXY_PORT=$(free_port)
EXPIRATION=$(date -u -d '+1 hour' +%Y-%m-%dT%H:%M:%SZ)
BODY="{\"AccessKeyId\":\"ASIABENCHMARK0000000\",\"SecretAccessKey\":\"bench-secret\",\"Token\":\"bench-session-token\",\"Expiration\":\"$EXPIRATION\",\"AccountId\":\"123456789012\",\"RoleArn\":\"arn:aws:iam::123456789012:role/bench\"}"
user_line=""
[ "$(id -u)" = 0 ] && user_line="user root;"
mkdir -p "$WORK/cache" "$WORK/tmp"
cat > "$WORK/nginx.conf" <<CONF
$user_line
worker_processes 1;
daemon on;
pid $WORK/nginx.pid;
error_log $WORK/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $WORK/tmp; proxy_temp_path $WORK/tmp; fastcgi_temp_path $WORK/tmp;
  uwsgi_temp_path $WORK/tmp; scgi_temp_path $WORK/tmp;
  proxy_cache_path $WORK/cache keys_zone=creds:1m;
  server {
    listen 127.0.0.1:$BROKER_PORT;
    location / { default_type application/json; add_header Cache-Control "max-age=3300"; return 200 '$BODY'; }
  }
  server {
    listen 127.0.0.1:$SIDECAR_PORT;
    location / {
      proxy_pass http://127.0.0.1:$BROKER_PORT;
      proxy_cache creds;
      proxy_cache_key "\$uri|\$http_authorization";
    }
  }
  server {
    listen 127.0.0.1:$STATIC_PORT;
    location / { default_type application/json; add_header Cache-Control "max-age=3300"; return 200 '$BODY'; }
  }
}
CONF
"$NGINX" -c "$WORK/nginx.conf" -e "$WORK/error.log"
wait_http "http://127.0.0.1:$BROKER_PORT/" 10

BROKER_URL="http://127.0.0.1:$BROKER_PORT/" LISTEN_ADDR="127.0.0.1:$PROXY_PORT" RUST_LOG=warn \
  "$PROXY_BIN" 2>"$WORK/proxy.log" &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
wait_http "http://127.0.0.1:$PROXY_PORT/healthz" 10

# Warm both caches and check they answer the same credentials.
for port in "$PROXY_PORT" "$SIDECAR_PORT" "$STATIC_PORT"; do
  got=$(curl -sf -H "Authorization: $TOKEN" "http://127.0.0.1:$port/")
  echo "$got" | grep -q ASIABENCHMARK0000000 || die "port $port did not serve the credentials: $got"
done
curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PROXY_PORT/" | grep -q 401 \
  || die "the proxy served a request without a token"

nginx_worker_pids() { pgrep -P "$(cat "$WORK/nginx.pid")"; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }

# wrk's latency distribution: "     99%  123.00us" -> microseconds.
to_us() {
  awk '{ v=$1; u=v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
         if (u=="us") print v; else if (u=="ms") print v*1000; else if (u=="s") print v*1000000; }'
}
bench() { # name url connections
  local out p50 p99 rps
  out=$(wrk -t1 -c"$3" -d"${DURATION}s" --latency -H "Authorization: $TOKEN" "$2")
  grep -q "Non-2xx" <<<"$out" && die "$1 answered errors under load: $out"
  p50=$(awk '$1=="50%" {print $2}' <<<"$out" | to_us)
  p99=$(awk '$1=="99%" {print $2}' <<<"$out" | to_us)
  rps=$(awk '/^Requests\/sec/ {printf "%d", $2}' <<<"$out")
  printf '| %s | %s | %s | %s | %s |\n' "$1" "$3" "$rps" "$p50" "$p99"
  printf '%s %s %s %s\n' "$1" "$3" "$rps" "$p99" >> "$WORK/figures"
}

# The sidecar as a ratio to nginx's static `return` (issue 12's anchor), per connection count.
ratios() {
  echo
  echo "| connections | requests/s: proxy / nginx static | p99: proxy / nginx static |"
  echo "|---|---|---|"
  awk '{ name = $1; for (i = 2; i <= NF - 3; i++) name = name " " $i
         c = $(NF - 2); rps[name, c] = $(NF - 1); p99[name, c] = $NF; seen[c] = 1 }
       END { for (c in seen) {
               p = "iam-broker-proxy (cached)"; n = "nginx static return"
               printf "| %s | %.2f | %.2f |\n", c, rps[p, c] / rps[n, c], p99[p, c] / p99[n, c] } }' \
    "$WORK/figures" | sort -t'|' -k2 -n
}

echo
echo "wrk -t1 -d${DURATION}s, $(nproc) CPUs, $(uname -m), $(date -u +%Y-%m-%d)"
echo
echo "| server | connections | requests/s | p50 µs | p99 µs |"
echo "|---|---|---|---|---|"
for c in $CONNECTIONS; do
  bench "iam-broker-proxy (cached)" "http://127.0.0.1:$PROXY_PORT/" "$c"
  bench "nginx proxy_cache sidecar" "http://127.0.0.1:$SIDECAR_PORT/" "$c"
  bench "nginx static return" "http://127.0.0.1:$STATIC_PORT/" "$c"
done
ratios
echo
worker=$(nginx_worker_pids | head -1)
echo "| process | RSS now KiB | peak RSS KiB |"
echo "|---|---|---|"
echo "| iam-broker-proxy | $(rss_kib "$PROXY_PID") | $(hwm_kib "$PROXY_PID") |"
echo "| nginx master | $(rss_kib "$(cat "$WORK/nginx.pid")") | $(hwm_kib "$(cat "$WORK/nginx.pid")") |"
echo "| nginx worker (serves all three nginx rows) | $(rss_kib "$worker") | $(hwm_kib "$worker") |"
