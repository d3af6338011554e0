#!/usr/bin/env bash
# Two gateway builds side by side in one run, against one broker:
#   benches/compare.sh BIN_A BIN_B [ROUNDS]
# e.g. the build before a change against the build after it. Each round runs
# the raw librdkafka producer, then the same uplink load (50 connections,
# 400,000 requests of 200 bytes, every ack verified in the topic) through A,
# then through B, each gateway on its own fresh data directory under
# DATA_ROOT (default: a temporary directory, so the real disk's fsync cost is
# in the figures). Prints each line, then per build the median msgs/s, its
# ratio to raw, the median ack p50/p99, the bytes the gateway process
# wrote to disk per acked request (write_bytes in /proc/PID/io: flash wear),
# the bytes its Kafka producer sent per acked request (the WAN's cost:
# edgegate_kafka_tx_bytes_total, where the build has it), and the memory an
# idle connection costs each (IDLE=N connections, default 5,000; 0 skips it).
# PAYLOAD=telemetry sends realistic sensor readings instead of 200-byte
# padded frames; CONFIG_A / CONFIG_B give a build a config file (e.g. one
# setting kafka.properties to compare two settings of one build).
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: benches/compare.sh BIN_A BIN_B [ROUNDS]" >&2; exit 64; }
bin_a=$(realpath "$1") bin_b=$(realpath "$2") rounds="${3:-5}"
.ci/install-tansu.sh
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
# The load client: this checkout's edgegate-bench (BENCH=path for another).
bench="${BENCH:-}"
if [ -z "$bench" ]; then
  cargo build --release --locked -p edgegate-bench >&2
  bench="$PWD/target/release/edgegate-bench"
fi
source benches/lib.sh
bench_init compare
broker=127.0.0.1:21592
start_broker "$broker"
create_topics "$broker" cmp_raw cmp_a cmp_b cmp_down
gateway() { # BIN NAME LISTEN ADMIN TOPIC [CONFIG]
  env EDGEGATE_KAFKA_PRODUCER_TOPIC="$5" EDGEGATE_KAFKA_CONSUMER_TOPICS=cmp_down RUST_LOG=warn \
    "$1" --brokers "$broker" --listen "$3" --admin-listen "$4" --data-dir "$work/$2" \
    ${6:+--config "$6"} >"$work/$2.log" 2>&1 &
  local pid=$!
  echo "$pid" >>"$work/pids"
  wait_http "$4" readyz
  echo "$pid"
}
uplink() { # LISTEN TOPIC
  "$bench" uplink --gateway "$1" --brokers "$broker" --topic "$2" --partitions 3 \
    --connections 50 --window 64 --messages 400000 ${PAYLOAD:+--payload "$PAYLOAD"} 2>/dev/null
}

gw_a=$(gateway "$bin_a" a 127.0.0.1:21600 127.0.0.1:21680 cmp_a "${CONFIG_A:-}")
gw_b=$(gateway "$bin_b" b 127.0.0.1:21601 127.0.0.1:21681 cmp_b "${CONFIG_B:-}")
: >"$work/lines"
for i in $(seq "$rounds"); do
  echo "raw $("$bench" raw --brokers "$broker" --topic cmp_raw --messages 400000 ${PAYLOAD:+--payload "$PAYLOAD"} 2>/dev/null)" | tee -a "$work/lines"
  echo "A $(uplink 127.0.0.1:21600 cmp_a)" | tee -a "$work/lines"
  echo "B $(uplink 127.0.0.1:21601 cmp_b)" | tee -a "$work/lines"
done

idle_conns="${IDLE:-5000}"
idle_line() { # SIDE BIN PORT ADMIN
  [ "$idle_conns" -gt 0 ] || return 0
  local pid
  pid=$(gateway "$2" "idle-$1" "127.0.0.1:$3" "127.0.0.1:$4" cmp_raw)
  echo "$1-idle $("$bench" idle --gateway "127.0.0.1:$3" --pid "$pid" --connections "$idle_conns" 2>/dev/null)" | tee -a "$work/lines"
  kill "$pid"
}
idle_line A "$bin_a" 21602 21682
idle_line B "$bin_b" 21603 21683

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
field() { grep "^$1 " "$work/lines" | tr ' ' '\n' | sed -n "s/^$2=//p" | median; }
raw=$(field raw msgs_per_sec)
for side in A B; do
  pid=$gw_a; [ "$side" = B ] && pid=$gw_b
  written=$(awk '/^write_bytes/{print $2}' "/proc/$pid/io")
  admin=127.0.0.1:21680; [ "$side" = B ] && admin=127.0.0.1:21681
  sleep 1.2 # librdkafka's statistics come once a second
  metrics=$(curl -sf "http://$admin/metrics" || true)
  tx=$(awk '/^edgegate_kafka_tx_bytes_total /{print $2}' <<<"$metrics")
  wire=-; [ -n "$tx" ] && wire=$(( tx / (rounds * 400000) ))
  spilled=$(awk '/^edgegate_outbox_spilled_total /{print $2}' <<<"$metrics")
  in_memory=$(awk '/^edgegate_outbox_confirmed_in_memory_total /{print $2}' <<<"$metrics")
  rate=$(field "$side" msgs_per_sec)
  missing=$(grep "^$side " "$work/lines" | tr ' ' '\n' | sed -n 's/^missing=//p' | paste -sd+ | bc)
  idle=$( (grep "^$side-idle " "$work/lines" || true) | tr ' ' '\n' | sed -n 's/^bytes_per_connection=//p')
  echo "$side: median msgs_per_sec=$rate ratio_to_raw=$(awk "BEGIN{printf \"%.3f\", $rate / $raw}") p50_ms=$(field "$side" p50_ms) p99_ms=$(field "$side" p99_ms) missing=$missing disk_bytes_per_request=$(( written / (rounds * 400000) )) kafka_bytes_per_request=$wire records_spilled=${spilled:--} records_confirmed_in_memory=${in_memory:--} idle_bytes_per_connection=${idle:--}"
done
echo "raw: median msgs_per_sec=$raw; A=$bin_a B=$bin_b; $rounds rounds"
