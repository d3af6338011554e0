#!/usr/bin/env bash
# Runs the benchmark set on this machine and prints one key=value line per
# measurement (progress on stderr):
#   benches/run.sh [ROUNDS]
# Starts its own tansu broker (memory storage) and gateways on loopback ports,
# builds the release binary, and alternates `raw` (librdkafka straight to the
# broker) with `uplink` (50 connections through edgegate) so that their ratio
# is measured under the same load. Then: idle RSS per connection at 10,000
# connections, and the replay of a 100,000-message backlog built while the
# broker was unreachable.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-3}"
.ci/install-tansu.sh
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
cargo build --release --locked >&2
bin="$PWD/target/release/edgegate"
work=$(mktemp -d)
# Every process started here, for the cleanup (gateways are started in
# command substitutions, so an array would not see them).
cleanup() { xargs -r kill 2>/dev/null <"$work/pids" || true; rm -rf "$work"; }
touch "$work/pids"
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"

broker=127.0.0.1:21092
(cd "$work" && exec tansu broker --listener-url "tcp://$broker" --advertised-listener-url "tcp://$broker" \
  --storage-engine memory://tansu/ >tansu.log 2>&1) &
echo $! >>"$work/pids"
for _ in $(seq 100); do (exec 3<>"/dev/tcp/${broker%:*}/${broker#*:}") 2>/dev/null && break; sleep 0.1; done
for t in bench_raw bench_up bench_down bench_replay; do
  tansu topic create "$t" --broker "tcp://$broker" --partitions 3 >/dev/null
done

wait_http() { for _ in $(seq 200); do curl -sf "http://$1/healthz" >/dev/null && return 0; sleep 0.05; done; return 1; }
gateway() { # NAME LISTEN ADMIN BROKERS [extra env...]
  local name=$1 listen=$2 admin=$3 brokers=$4; shift 4
  env EDGEGATE_KAFKA_PRODUCER_TOPIC=bench_up EDGEGATE_KAFKA_CONSUMER_TOPICS=bench_down RUST_LOG=warn "$@" \
    "$bin" --brokers "$brokers" --listen "$listen" --admin-listen "$admin" --data-dir "$work/$name" \
    >"$work/$name.log" 2>&1 &
  local pid=$!
  echo "$pid" >>"$work/pids"
  wait_http "$admin"
  echo "$pid"
}

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -m)" >&2
gw=$(gateway main 127.0.0.1:21300 127.0.0.1:21380 "$broker")
for i in $(seq "$rounds"); do
  echo "round $i" >&2
  "$bin" bench raw --brokers "$broker" --topic bench_raw --messages 400000 2>/dev/null
  "$bin" bench uplink --gateway 127.0.0.1:21300 --brokers "$broker" --topic bench_up --partitions 3 \
    --connections 50 --window 64 --messages 400000 2>/dev/null
done

idle=$(gateway idle 127.0.0.1:21301 127.0.0.1:21381 "$broker")
"$bin" bench idle --gateway 127.0.0.1:21301 --pid "$idle" --connections 10000 2>/dev/null
kill "$idle"

# Replay: build the backlog with Kafka unreachable, then restart against it.
backlog=$(gateway replay 127.0.0.1:21302 127.0.0.1:21382 127.0.0.1:1 \
  EDGEGATE_KAFKA_PRODUCER_TOPIC=bench_replay EDGEGATE_KAFKA_DRAIN_TIMEOUT_SECS=0)
"$bin" bench uplink --gateway 127.0.0.1:21302 --connections 50 --messages 100000 --no-verify 2>/dev/null >/dev/null
kill "$backlog"; while kill -0 "$backlog" 2>/dev/null; do sleep 0.05; done
drain=$(gateway replay 127.0.0.1:21302 127.0.0.1:21382 "$broker" EDGEGATE_KAFKA_PRODUCER_TOPIC=bench_replay)
"$bin" bench drain --admin 127.0.0.1:21382 --pid "$drain" 2>/dev/null
