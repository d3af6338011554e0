#!/usr/bin/env bash
# The benchmark set, one command:
#   benches/run.sh [ROUNDS]
# Starts its own tansu broker (memory storage) and gateways on loopback
# ports, builds the release binary, then measures:
#   - raw (librdkafka straight to the broker) and uplink (50 connections
#     through edgegate, durable acks, every ack verified in the topic),
#     alternated ROUNDS times (default 3) so that the ratio is fair, with the
#     CPU seconds of gateway, broker and load client during each uplink run;
#   - uplink at 1, 10, 50, 200 and 1000 connections (the plot);
#   - round trip device -> Kafka -> echo worker -> device at 5,000 msgs/s,
#     and one hop through the broker alone at the same rate (its floor);
#   - idle connections: RSS per connection at 10,000 connections;
#   - replay of a 1,000,000-message backlog built while Kafka was unreachable
#     (REPLAY=N to change), time and RSS curve;
#   - footprint: binary size, idle RSS, start-to-ready time.
# Every result line goes to benches/results.txt; the plot to
# benches/results.svg; the report to BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
replay="${REPLAY:-1000000}"
sweep="${SWEEP:-1 10 50 200 1000}"
.ci/install-tansu.sh
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
cargo build --release --locked --workspace >&2
bin="$PWD/target/release/edgegate"
bench="$PWD/target/release/edgegate-bench"
results="$PWD/benches/results.txt"
# Every process started here goes to $work/pids, for the cleanup (gateways
# are started in command substitutions, so an array would not see them).
source benches/lib.sh
bench_init run
: >"$results"
record() { echo "$*" | tee -a "$results"; }

broker=127.0.0.1:21092
start_broker "$broker"
tansu_pid=$broker_pid
create_topics "$broker" bench_raw bench_up bench_down bench_replay rt_up rt_down hop
gateway() { # NAME LISTEN ADMIN BROKERS [extra env...]
  local name=$1 listen=$2 admin=$3 brokers=$4; shift 4
  env EDGEGATE_KAFKA_PRODUCER_TOPIC=bench_up EDGEGATE_KAFKA_CONSUMER_TOPICS=bench_down RUST_LOG=warn "$@" \
    "$bin" --brokers "$brokers" --listen "$listen" --admin-listen "$admin" --data-dir "$work/$name" \
    >"$work/$name.log" 2>&1 &
  local pid=$!
  echo "$pid" >>"$work/pids"
  wait_http "$admin" readyz
  echo "$pid"
}

machine="$(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
cpu_model=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //; s/ /_/g')
record "mode=machine cores=$(nproc) arch=$(uname -m) cpu=${cpu_model:-unknown} date=$(date -u +%Y-%m-%dT%H:%MZ)"
echo "machine: $machine" >&2

gw=$(gateway main 127.0.0.1:21300 127.0.0.1:21380 "$broker")
for i in $(seq "$rounds"); do
  echo "round $i" >&2
  record "phase=ratio $("$bench" raw --brokers "$broker" --topic bench_raw --messages 400000 2>/dev/null)"
  g0=$(cpu_secs "$gw"); b0=$(cpu_secs "$tansu_pid")
  line=$("$bench" uplink --gateway 127.0.0.1:21300 --brokers "$broker" --topic bench_up --partitions 3 \
    --connections 50 --window 64 --messages 400000 2>/dev/null)
  record "phase=ratio $line gateway_cpu_secs=$(awk "BEGIN{print $(cpu_secs "$gw") - $g0}") broker_cpu_secs=$(awk "BEGIN{print $(cpu_secs "$tansu_pid") - $b0}")"
done
# The binary the .deb ships is static, with musl's allocator instead of
# glibc's: one more uplink run with it, if the cross build is there.
musl_bin=/var/cache/edgegate-cross/target/x86_64-unknown-linux-musl/release/edgegate
if [ -x "$musl_bin" ]; then
  echo "uplink through the static musl build" >&2
  kill "$gw"; while kill -0 "$gw" 2>/dev/null; do sleep 0.05; done
  gw=$(bin="$musl_bin" gateway musl 127.0.0.1:21300 127.0.0.1:21380 "$broker")
  record "phase=musl $("$bench" uplink --gateway 127.0.0.1:21300 --brokers "$broker" --topic bench_up \
    --partitions 3 --connections 50 --window 64 --messages 400000 2>/dev/null)"
  kill "$gw"; while kill -0 "$gw" 2>/dev/null; do sleep 0.05; done
  gw=$(gateway main2 127.0.0.1:21300 127.0.0.1:21380 "$broker")
fi
for c in $sweep; do
  echo "sweep: $c connections" >&2
  record "phase=sweep $("$bench" uplink --gateway 127.0.0.1:21300 --brokers "$broker" --topic bench_up \
    --partitions 3 --connections "$c" --window 64 --messages 200000 2>/dev/null)"
done
kill "$gw"

echo "round trip" >&2
# tansu answers a fetch only when its wait is over (see roundtrip.sh).
rt=$(gateway rt 127.0.0.1:21303 127.0.0.1:21383 "$broker" EDGEGATE_KAFKA_PRODUCER_TOPIC=rt_up \
  EDGEGATE_KAFKA_CONSUMER_TOPICS=rt_down EDGEGATE_KAFKA_FETCH_WAIT_MS=10)
record "$("$bench" roundtrip --gateway 127.0.0.1:21303 --admin 127.0.0.1:21383 --brokers "$broker" \
  --topic rt_up --reply-topic rt_down --partitions 3 --connections 50 --rate 5000 --seconds 10 2>/dev/null)"
kill "$rt"
# The floor under the round trip: one hop through the broker alone.
record "$("$bench" hop --brokers "$broker" --topic hop --partitions 3 --rate 5000 --seconds 10 2>/dev/null)"

echo "footprint" >&2
ready_ms=()
for i in 1 2 3 4 5; do
  t0=$(date +%s%N)
  pid=$(gateway "start$i" 127.0.0.1:21304 127.0.0.1:21384 "$broker")
  ready_ms+=($(( ($(date +%s%N) - t0) / 1000000 )))
  sleep 0.5
  idle_rss=$(awk '/VmRSS/{print $2}' "/proc/$pid/status")
  kill "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.02; done
done
median_ready=$(printf '%s\n' "${ready_ms[@]}" | sort -n | sed -n 3p)
static=""
for t in aarch64-unknown-linux-musl armv7-unknown-linux-musleabihf x86_64-unknown-linux-musl; do
  f=/var/cache/edgegate-cross/target/$t/release/edgegate
  [ -f "$f" ] && static="$static static_${t%%-*}_bytes=$(stat -c %s "$f")"
done
record "mode=footprint binary_bytes=$(stat -c %s "$bin") idle_rss_kib=$idle_rss ready_ms_median=$median_ready ready_ms_all=$(IFS=,; echo "${ready_ms[*]}")$static"

echo "idle connections" >&2
idle=$(gateway idle 127.0.0.1:21301 127.0.0.1:21381 "$broker")
record "$("$bench" idle --gateway 127.0.0.1:21301 --pid "$idle" --connections 10000 2>/dev/null)"
kill "$idle"

# Replay: build the backlog with Kafka unreachable, then restart against it.
echo "replay: building a backlog of $replay" >&2
backlog=$(gateway replay 127.0.0.1:21302 127.0.0.1:21382 127.0.0.1:1 \
  EDGEGATE_KAFKA_PRODUCER_TOPIC=bench_replay EDGEGATE_KAFKA_DRAIN_TIMEOUT_SECS=0 EDGEGATE_OUTBOX_MAX_BYTES=4294967296)
"$bench" uplink --gateway 127.0.0.1:21302 --connections 50 --messages "$replay" --no-verify 2>/dev/null >/dev/null
kill "$backlog"; while kill -0 "$backlog" 2>/dev/null; do sleep 0.05; done
echo "replay: draining" >&2
t0=$(date +%s%N)
drain=$(gateway replay 127.0.0.1:21302 127.0.0.1:21382 "$broker" EDGEGATE_KAFKA_PRODUCER_TOPIC=bench_replay \
  EDGEGATE_OUTBOX_MAX_BYTES=4294967296)
up_ms=$(( ($(date +%s%N) - t0) / 1000000 ))
record "$("$bench" replay --admin 127.0.0.1:21382 --pid "$drain" 2>/dev/null) ready_ms=$up_ms"
kill "$drain"
record "phase=replay-raw $("$bench" raw --brokers "$broker" --topic bench_raw --messages "$replay" 2>/dev/null)"
if [ -x "$musl_bin" ]; then
  # The same backlog drained by the static musl build the .deb ships (its
  # allocator returns memory differently).
  echo "replay with the static musl build" >&2
  tansu topic create bench_replay_musl --broker "tcp://$broker" --partitions 3 >/dev/null
  backlog=$(gateway replay-musl 127.0.0.1:21305 127.0.0.1:21385 127.0.0.1:1 \
    EDGEGATE_KAFKA_PRODUCER_TOPIC=bench_replay_musl EDGEGATE_KAFKA_DRAIN_TIMEOUT_SECS=0 EDGEGATE_OUTBOX_MAX_BYTES=4294967296)
  "$bench" uplink --gateway 127.0.0.1:21305 --connections 50 --messages "$replay" --no-verify 2>/dev/null >/dev/null
  kill "$backlog"; while kill -0 "$backlog" 2>/dev/null; do sleep 0.05; done
  drain=$(bin="$musl_bin" gateway replay-musl 127.0.0.1:21305 127.0.0.1:21385 "$broker" \
    EDGEGATE_KAFKA_PRODUCER_TOPIC=bench_replay_musl EDGEGATE_OUTBOX_MAX_BYTES=4294967296)
  record "phase=musl $("$bench" replay --admin 127.0.0.1:21385 --pid "$drain" 2>/dev/null)"
  kill "$drain"
fi

"$bench" plot --input "$results" --output benches/results.svg >/dev/null
profile=()
[ -f benches/profile.txt ] && profile=(--profile benches/profile.txt)
"$bench" report --input "$results" "${profile[@]}" >BENCHMARKS.md
echo "wrote BENCHMARKS.md, benches/results.txt, benches/results.svg" >&2
