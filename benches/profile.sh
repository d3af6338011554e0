#!/usr/bin/env bash
# Instruction counts of the uplink path, which stay the same on a noisy
# machine (callgrind counts instructions, not time):
#   benches/profile.sh          (BIN=... OUT=... for another build)
# Runs the gateway under callgrind twice, for N1 and N2 messages from 10
# connections, against a tansu broker; the difference divided by N2 - N1 is
# what one message costs the gateway (its own code and librdkafka's, without
# start-up and shutdown). The raw librdkafka producer is measured the same
# way. Writes key=value lines and the top functions to benches/profile.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
n1="${N1:-20000}"
n2="${N2:-60000}"
.ci/install-tansu.sh
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
# The release profile with symbols, in a target directory of its own; or
# BIN=path (another build, e.g. before a change: totals need no symbols) and
# OUT=path for its figures; CONFIG=file: a configuration file for the gateway;
# BENCH=path: an edgegate-bench already built (then, with BIN, nothing is).
bin="${BIN:-$PWD/target/profiling/release/edgegate}"
bench="${BENCH:-$PWD/target/profiling/release/edgegate-bench}"
out="${OUT:-$PWD/benches/profile.txt}"
if [ -z "${BIN:-}" ] || [ -z "${BENCH:-}" ]; then
  CARGO_TARGET_DIR=target/profiling CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
    cargo build --release --locked --workspace >&2
fi
source benches/lib.sh
bench_init profile
broker=127.0.0.1:21192
start_broker "$broker"
create_topics "$broker" prof_up prof_raw

total_ir() { callgrind_annotate "$1" 2>/dev/null | awk '/PROGRAM TOTALS/ && !done { gsub(",", "", $1); print $1; done = 1 }'; }

gateway_ir() { # MESSAGES [CONFIG] -> total instructions of a gateway that took them
  local n=$1 config=${2:-${CONFIG:-}} run="$1${2:+-quiet}"
  local cg="$work/gw-$run.cg"
  # Not counted: sled's thread pool spinning on its lazy queue while the
  # thread that starts it spawns the rest. Natively that is a brief wait
  # once per process; under valgrind, which runs one thread at a time, the
  # spinners used whole time slices (975 M instructions in one run, none in
  # the next), which hid every per-message figure. Needs symbols (the
  # default build here); a stripped BIN counts the spin too.
  valgrind --tool=callgrind --toggle-collect='*sled::lazy::Lazy*deref*' --collect-atstart=yes --callgrind-out-file="$cg" "$bin" ${config:+--config "$config"} --brokers "$broker" \
    --listen 127.0.0.1:21400 --admin-listen 127.0.0.1:21480 --data-dir "$work/data-$run" \
    >/dev/null 2>"$work/gw-$run.log" &
  local pid=$!
  echo $pid >>"$work/pids"
  for _ in $(seq 600); do curl -sf http://127.0.0.1:21480/readyz >/dev/null && break; sleep 0.1; done
  EDGEGATE_KAFKA_PRODUCER_TOPIC=prof_up "$bench" uplink --gateway 127.0.0.1:21400 --brokers "$broker" \
    --topic prof_up --partitions 3 --connections 10 --window 64 --messages "$n" 2>/dev/null >"$work/uplink-$run"
  # Everything delivered to Kafka before the stop, so both runs do the same.
  for _ in $(seq 600); do
    [ "$(curl -s http://127.0.0.1:21480/metrics | awk '$1=="edgegate_outbox_records"{print $2}')" = "0" ] && break
    sleep 0.1
  done
  # How each request became durable: under callgrind the gateway runs
  # several times slower, and a request Kafka has not confirmed within
  # outbox.spill_after_ms takes the disk path too (written, read back).
  curl -s http://127.0.0.1:21480/metrics | awk '$1 ~ /^edgegate_outbox_(spilled|confirmed_in_memory)_total$/ {printf "%s=%s ", $1, $2}' >"$work/paths-$run"
  kill -TERM $pid; wait $pid || true
  total_ir "$cg"
}

raw_ir() {
  local n=$1 cg="$work/raw-$1.cg"
  valgrind --tool=callgrind --callgrind-out-file="$cg" "$bench" raw --brokers "$broker" \
    --topic prof_raw --messages "$n" >/dev/null 2>&1
  total_ir "$cg"
}

export EDGEGATE_KAFKA_PRODUCER_TOPIC=prof_up
# Under callgrind the gateway runs 20 to 50 times slower than natively, so
# Kafka's confirmations come later than the 50 ms spill and most requests
# would also be written to the outbox and read back, which at native speed
# they are not (benches/compare.sh: 0 of 1.2 million spilled). The default
# here keeps requests in memory as they are natively: the memory path.
# SPILL_AFTER_MS=0 measures the disk path (every request written first).
export EDGEGATE_OUTBOX_SPILL_AFTER_MS="${SPILL_AFTER_MS:-10000}"
g1=$(gateway_ir "$n1"); g2=$(gateway_ir "$n2")
# The same with librdkafka's statistics (once a second from the producer
# and from the consumer, as shipped) moved out of the window. They cost by
# the second, not by the message: about 1.7 M instructions each (per-
# centiles of the latency histograms, then the JSON parse), which natively
# is well under 1% of a core; but under callgrind a second carries 20 to 50
# times fewer messages, and the longer run has more seconds, so they were
# charged to messages. Both figures are printed. (A CONFIG with its own
# [kafka.properties] table needs the setting added there by hand.)
quiet="$work/quiet.toml"
{
  [ -z "${CONFIG:-}" ] || cat "$CONFIG"
  printf '\n[kafka.properties]\n"statistics.interval.ms" = "3600000"\n'
} >"$quiet"
q1=$(gateway_ir "$n1" "$quiet"); q2=$(gateway_ir "$n2" "$quiet")
r1=$(raw_ir "$n1"); r2=$(raw_ir "$n2")
per_gw=$(( (g2 - g1) / (n2 - n1) ))
per_quiet=$(( (q2 - q1) / (n2 - n1) ))
per_raw=$(( (r2 - r1) / (n2 - n1) ))
{
  echo "mode=profile spill_after_ms=$EDGEGATE_OUTBOX_SPILL_AFTER_MS config=${CONFIG:-none} n1=$n1 n2=$n2 gateway_ir_n1=$g1 gateway_ir_n2=$g2 raw_ir_n1=$r1 raw_ir_n2=$r2 gateway_instructions_per_message=$per_gw gateway_instructions_per_message_without_statistics=$per_quiet raw_instructions_per_message=$per_raw"
  grep -h "verified" "$work/uplink-$n2" | sed 's/^/# uplink under callgrind: /'
  echo "# durable by, $n2 messages: $(cat "$work/paths-$n2")"
  # The differences above move by a thousand or so from run to run: how
  # many messages share a batch (and its compression context, about 65 k
  # instructions to set up) depends on timing. What one stage costs per
  # message, counted inside that stage, moves far less.
  echo "# per message, inclusive, by stage ($n2 messages, statistics out of the window):"
  callgrind_annotate --threshold=100 --inclusive=yes "$work/gw-$n2-quiet.cg" 2>/dev/null | awk -v n="$n2" '
    BEGIN { split("Connection::take_input [|Pipeline::run::{{closure}} [|rd_kafka_msgset_create_ProduceRequest [|rd_kafka_zstd_compress [", pat, "|")
            split("device_frames_to_batch|producer_handoff|librdkafka_produce_request|of_which_zstd", name, "|") }
    { for (i in pat) if (!(i in seen) && index($0, pat[i])) { c = $1; gsub(",", "", c); v[i] = int(c / n); seen[i] = 1 } }
    END { for (i = 1; i <= 4; i++) printf "# %s=%s\n", name[i], v[i] }'
  echo "# top functions of the gateway by own instructions, $n2 messages (callgrind_annotate):"
  callgrind_annotate --threshold=90 "$work/gw-$n2.cg" 2>/dev/null | sed -n '/file:function/,$p' \
    | sed -n '1,22s/^/# /p'
} | tee "$out"
# KEEP=dir: keep the gateway's callgrind output for callgrind_annotate
# --inclusive=yes --tree=caller (who calls what).
[ -z "${KEEP:-}" ] || cp "$work/gw-$n2.cg" "$work/gw-$n2-quiet.cg" "$work/gw-$n2.log" "$KEEP/"
