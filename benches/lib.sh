# Sourced by the bench scripts (bash, set -euo pipefail): a work directory
# whose processes are killed and which is removed on exit, a tansu broker
# (memory storage) and topics in it, and a wait for a gateway's endpoint.
#   bench_init NAME    -> $work, the trap (bench_stop); PATH with cargo's bin
#   start_broker ADDR  -> $broker_pid (also in $work/pids)
#   create_topics ADDR TOPIC...   (3 partitions each)
#   wait_http HOST:PORT PATH
#   cpu_secs PID      -> user + system CPU seconds of a process so far

bench_init() {
  export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
  work=$(mktemp -d "${DATA_ROOT:-${TMPDIR:-/tmp}}/$1.XXXXXX")
  touch "$work/pids"
  trap 'bench_stop; rm -rf "$work"' EXIT
  ulimit -n "$(ulimit -Hn)"
}

# Kills what the run started and waits (up to 10 s) until it is gone, so
# the next script's broker and gateways find their ports free: a run right
# after another once found the old broker still listening and failed.
bench_stop() {
  local pid
  xargs -r kill 2>/dev/null <"$work/pids" || true
  for pid in $(cat "$work/pids"); do
    wait "$pid" 2>/dev/null || true # reaps it if it is this shell's child
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}

start_broker() {
  local addr=$1
  (cd "$work" && exec tansu broker --listener-url "tcp://$addr" --advertised-listener-url "tcp://$addr" \
    --storage-engine memory://tansu/ >tansu.log 2>&1) &
  broker_pid=$!
  echo "$broker_pid" >>"$work/pids"
  for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/${addr%:*}/${addr#*:}") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "tansu did not start on $addr (see $work/tansu.log)" >&2
  return 1
}

create_topics() {
  local addr=$1 t
  shift
  for t in "$@"; do tansu topic create "$t" --broker "tcp://$addr" --partitions 3 >/dev/null; done
}

wait_http() { for _ in $(seq 400); do curl -sf "http://$1/$2" >/dev/null && return 0; sleep 0.025; done; return 1; }

# Fields counted after the command name, which may hold spaces.
cpu_secs() { awk -v hz="$(getconf CLK_TCK)" '{ sub(/^.*\) /, ""); print ($12 + $13) / hz }' "/proc/$1/stat"; }
