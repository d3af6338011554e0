#!/usr/bin/env bash
# Replay of a backlog: a gateway with no broker acks MESSAGES requests of
# 200 bytes (50 connections), stops; a new one on the same data directory
# drains them into a tansu broker. Prints the drain (msgs/s, peak RSS),
# the RSS when it was ready and 5 s after the drain, then the raw
# librdkafka producer sending as many to the same broker, for the ratio.
#   benches/replay.sh [BIN] [MESSAGES]     (BENCH=path: the load client)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/release/edgegate}") messages="${2:-1000000}"
.ci/install-tansu.sh
source benches/lib.sh
bench_init replay
bench="${BENCH:-}"
if [ -z "$bench" ]; then
  cargo build --release --locked -p edgegate-bench >&2
  bench="$PWD/target/release/edgegate-bench"
fi
broker=127.0.0.1:21292
start_broker "$broker"
create_topics "$broker" replay replay_raw
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
gateway() { # BROKERS -> PID of a gateway on the backlog's data directory
  env EDGEGATE_KAFKA_PRODUCER_TOPIC=replay EDGEGATE_KAFKA_DRAIN_TIMEOUT_SECS=0 \
    EDGEGATE_OUTBOX_MAX_BYTES=4294967296 RUST_LOG=warn "$bin" --brokers "$1" \
    --listen 127.0.0.1:21600 --admin-listen 127.0.0.1:21681 --data-dir "$work/data" \
    >>"$work/gateway.log" 2>&1 &
  echo $! | tee -a "$work/pids"
}
pid=$(gateway 127.0.0.1:1)
wait_http 127.0.0.1:21681 readyz
"$bench" uplink --gateway 127.0.0.1:21600 --connections 50 --messages "$messages" --no-verify 2>/dev/null \
  | sed 's/^/backlog: /'
kill "$pid"
while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
pid=$(gateway "$broker")
wait_http 127.0.0.1:21681 readyz
ready=$(rss "$pid")
"$bench" replay --admin 127.0.0.1:21681 --pid "$pid" 2>/dev/null | sed 's/ curve=.*//'
sleep 5
echo "rss_ready_kib=$ready rss_5s_after_drain_kib=$(rss "$pid")"
"$bench" raw --brokers "$broker" --topic replay_raw --messages "$messages" 2>/dev/null
