#!/usr/bin/env bash
# What an idle gateway costs the hub's link: bytes it exchanges with the
# broker (TCP payload on its sockets to the broker, from `ss -ti`; IP and
# TCP headers come on top) and its CPU time, over SECS seconds with no
# device connected, once per kafka.fetch_wait_ms setting.
#   benches/idle.sh [BIN]      (WAITS="500 100 10", SECS=20)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/release/edgegate}")
secs=${SECS:-20}
source benches/lib.sh
bench_init idle
broker=127.0.0.1:21292
start_broker "$broker"
create_topics "$broker" idle_up idle_down
command -v ss >/dev/null || { apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null; }
# "sent received": summed over the sockets of gateway $1 to the broker.
sample() {
  ss -tinp "dport = :${broker##*:}" | awk -v p="pid=$1," '
    index($0, p) { on = 1; next }
    on { for (i = 1; i <= NF; i++) {
           if ($i ~ /^bytes_sent:/) { split($i, a, ":"); s += a[2] }
           if ($i ~ /^bytes_received:/) { split($i, b, ":"); r += b[2] } }
         on = 0 }
    END { print s + 0, r + 0 }'
}

for wait in ${WAITS:-500 100 10}; do
  EDGEGATE_KAFKA_PRODUCER_TOPIC=idle_up EDGEGATE_KAFKA_CONSUMER_TOPICS=idle_down \
    EDGEGATE_KAFKA_FETCH_WAIT_MS="$wait" RUST_LOG=warn "$bin" --brokers "$broker" \
    --listen 127.0.0.1:21500 --admin-listen 127.0.0.1:21580 --data-dir "$work/data-$wait" \
    >/dev/null 2>"$work/gw-$wait.log" &
  pid=$!
  echo $pid >>"$work/pids"
  wait_http 127.0.0.1:21580 readyz
  sleep 5 # the consumer group joined, the first metadata fetched
  read -r s0 r0 < <(sample "$pid")
  c0=$(cpu_secs "$pid")
  sleep "$secs"
  read -r s1 r1 < <(sample "$pid")
  c1=$(cpu_secs "$pid")
  echo "mode=idle fetch_wait_ms=$wait seconds=$secs sent_bytes_per_sec=$(( (s1 - s0) / secs )) received_bytes_per_sec=$(( (r1 - r0) / secs )) cpu_percent_of_a_core=$(awk -v a="$c0" -v b="$c1" -v s="$secs" 'BEGIN { printf "%.2f", 100 * (b - a) / s }')"
  kill -TERM "$pid"
  wait "$pid" || true
done
