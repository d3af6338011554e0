#!/usr/bin/env bash
# What an outage costs the hub: a gateway whose Kafka is unreachable takes
# MESSAGES realistic telemetry requests (edgegate-bench --payload telemetry,
# 50 connections), once per outbox.compression setting. Prints, per request:
# the bytes devices sent, the bytes the gateway process wrote to disk
# (write_bytes in /proc/PID/io: flash wear), the outbox's live bytes and
# its size on disk; how many such requests a GiB of outbox holds; and the
# gateway's CPU time per request (start-up included).
#   benches/outage.sh [BIN] [MESSAGES]
# RATE=requests/s paces them (a hub's rate, not the fastest the disk
# allows: group commits are then small); COMPRESSIONS picks the settings
# (default "zstd lz4 none"); SIZE=BYTES sends fixed-size frames of that
# many bytes instead (large requests; listener.max_frame_bytes is raised to
# fit), CONNECTIONS and WINDOW set the load (default 50 and 64).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(realpath "${1:-target/release/edgegate}") messages="${2:-200000}"
bench="${BENCH:-}"
if [ -z "$bench" ]; then
  cargo build --release --locked -p edgegate-bench >&2
  bench="$PWD/target/release/edgegate-bench"
fi
work=$(mktemp -d "${DATA_ROOT:-${TMPDIR:-/tmp}}/outage.XXXXXX")
pid=
cleanup() { [ -z "$pid" ] || kill "$pid" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"
metric() { curl -sf "http://127.0.0.1:21781/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
for compression in ${COMPRESSIONS:-zstd lz4 none}; do
  env RUST_LOG=warn EDGEGATE_OUTBOX_COMPRESSION="$compression" \
    ${SIZE:+EDGEGATE_LISTENER_MAX_FRAME_BYTES=$(( SIZE > 65536 ? SIZE + 1024 : 65536 ))} \
    "$bin" --brokers 127.0.0.1:1 --listen 127.0.0.1:21700 --admin-listen 127.0.0.1:21781 \
    --data-dir "$work/$compression" >"$work/$compression.log" 2>&1 &
  pid=$!
  for _ in $(seq 400); do curl -sf http://127.0.0.1:21781/readyz >/dev/null && break; sleep 0.025; done
  payload=(--payload telemetry)
  [ -z "${SIZE:-}" ] || payload=(--size "$SIZE")
  line=$("$bench" uplink --gateway 127.0.0.1:21700 --connections "${CONNECTIONS:-50}" \
    --window "${WINDOW:-64}" --messages "$messages" ${RATE:+--rate "$RATE"} "${payload[@]}" \
    --no-verify 2>/dev/null)
  acked=$(tr ' ' '\n' <<<"$line" | sed -n 's/^acked=//p')
  sent=$(tr ' ' '\n' <<<"$line" | sed -n 's/^sent_bytes=//p')
  rate=$(tr ' ' '\n' <<<"$line" | sed -n 's/^msgs_per_sec=//p')
  written=$(awk '/^write_bytes/{print $2}' "/proc/$pid/io")
  live=$(metric edgegate_outbox_bytes)
  # The files themselves: the gateway's own gauge is measured every 0.5 s
  # and estimated in between, and a fast run ends between two measurements.
  disk=$(du -sb "$work/$compression/outbox" | cut -f1)
  records=$(metric edgegate_outbox_records)
  blobs=$(find "$work/$compression/outbox" -path '*/blobs/*' -type f | wc -l)
  large=$(find "$work/$compression/outbox" -path '*/large/*' -type f | wc -l)
  cpu=$(metric process_cpu_seconds_total)
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  echo "compression=$compression acked=$acked stored=$records msgs_per_sec=$rate" \
    "sent_per_request=$(( sent / acked )) written_per_request=$(( written / acked ))" \
    "outbox_live_per_request=$(( live / acked )) outbox_disk_per_request=$(( disk / acked ))" \
    "requests_per_gib=$(( (1 << 30) * acked / disk )) sled_blob_files=$blobs large_record_files=$large" \
    "gateway_cpu_us_per_request=$(awk -v c="$cpu" -v n="$acked" 'BEGIN { printf "%.1f", c * 1e6 / n }')"
done
