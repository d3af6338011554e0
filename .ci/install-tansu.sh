#!/usr/bin/env bash
# Installs the tansu broker (Kafka-compatible, used by the tests and the dev
# gateway) unless version 0.6.0 is already there. Building it takes 13-22
# minutes on a 2-core machine, so it is done only when missing.
set -euo pipefail
want="0.6.0"
bin="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
if [ -x "$bin" ] && "$bin" --version 2>/dev/null | grep -q "$want"; then
  exit 0
fi
echo "installing tansu $want (this takes a while)..." >&2
cargo install tansu --locked --version "$want" --features dynostore,libsql
