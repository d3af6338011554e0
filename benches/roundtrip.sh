#!/usr/bin/env bash
# The round trip of two gateway builds side by side, against one broker:
#   benches/roundtrip.sh BIN_A BIN_B [ROUNDS]
# Device -> gateway -> Kafka -> the bench's echo worker -> Kafka -> gateway
# -> device, 50 connections at 5,000 requests/s for 10 s, through A then B
# each round (default 3), each gateway on a fresh data directory. Prints
# each run's line, then per build the median p50/p99 from send to echo and
# of the way up and the way down, and the bytes its Kafka producer sent per
# request (edgegate_kafka_tx_bytes_total: the WAN's cost at this rate).
# RATE=requests/s (default 5,000); PAYLOAD=telemetry sends sensor readings;
# CONFIG_A / CONFIG_B give a build a config file (two settings of one build).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: benches/roundtrip.sh BIN_A BIN_B [ROUNDS]" >&2; exit 64; }
bin_a=$(realpath "$1") bin_b=$(realpath "$2") rounds="${3:-3}"
.ci/install-tansu.sh
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
bench="${BENCH:-}"
if [ -z "$bench" ]; then
  cargo build --release --locked -p edgegate-bench >&2
  bench="$PWD/target/release/edgegate-bench"
fi
source benches/lib.sh
bench_init roundtrip
broker=127.0.0.1:21692
start_broker "$broker"
run() { # LABEL BIN N
  local label=$1 bin=$2 n=$3 up="rt_up_$1_$3" down="rt_down_$1_$3"
  for t in "$up" "$down"; do
    tansu topic create "$t" --broker "tcp://$broker" --partitions 3 >/dev/null
  done
  local config=${CONFIG_A:-}
  [ "$label" = b ] && config=${CONFIG_B:-}
  # tansu answers a fetch only when its wait is over: 10 ms, not the
  # default 500, so the figures are the gateway's and not that wait.
  env EDGEGATE_KAFKA_PRODUCER_TOPIC="$up" EDGEGATE_KAFKA_CONSUMER_TOPICS="$down" RUST_LOG=warn \
    EDGEGATE_KAFKA_FETCH_WAIT_MS="${FETCH_WAIT_MS:-10}" "$bin" ${config:+--config "$config"} --brokers "$broker" --listen 127.0.0.1:21603 \
    --admin-listen 127.0.0.1:21683 --data-dir "$work/$label$n" >"$work/$label$n.log" 2>&1 &
  local pid=$!
  echo "$pid" >>"$work/pids"
  wait_http 127.0.0.1:21683 readyz
  local line
  line=$("$bench" roundtrip --gateway 127.0.0.1:21603 --admin 127.0.0.1:21683 \
    --brokers "$broker" --topic "$up" --reply-topic "$down" --partitions 3 --connections 50 \
    --rate "${RATE:-5000}" --seconds 10 ${PAYLOAD:+--payload "$PAYLOAD"} 2>/dev/null)
  sleep 1.2 # librdkafka's statistics come once a second
  local tx sent
  tx=$(curl -sf http://127.0.0.1:21683/metrics | awk '/^edgegate_kafka_tx_bytes_total /{print $2}')
  sent=$(tr ' ' '\n' <<<"$line" | sed -n 's/^sent=//p')
  echo "build=$label $line kafka_bytes_per_request=$(( ${tx:-0} / (sent > 0 ? sent : 1) ))" | tee -a "$work/results"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}
for i in $(seq "$rounds"); do
  run a "$bin_a" "$i"
  run b "$bin_b" "$i"
done
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
field() { grep "build=$1 " "$work/results" | tr ' ' '\n' | sed -n "s/^$2=//p" | median; }
for b in a b; do
  echo "build $b: p50 $(field $b p50_ms) ms, p99 $(field $b p99_ms) ms; up p50/p99 $(field $b up_p50_ms)/$(field $b up_p99_ms) ms, down p50/p99 $(field $b down_p50_ms)/$(field $b down_p99_ms) ms; lost $(field $b lost); $(field $b kafka_bytes_per_request) bytes to Kafka per request (medians of $rounds)"
done
