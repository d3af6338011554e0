#!/usr/bin/env bash
# Builds a fully static, stripped edgegate for one target:
#   cross/build.sh TARGET      -> target/TARGET/release/edgegate
# TARGET: x86_64-unknown-linux-musl, aarch64-unknown-linux-musl or
# armv7-unknown-linux-musleabihf. librdkafka, its zlib and OpenSSL (for TLS to
# Kafka) are built from source for the target and linked in; zig (through
# cargo-zigbuild) is the cross linker, so no system cross toolchain is needed.
# Installs what it needs on first use; cargo caches the builds per target.
set -euo pipefail
target="${1:?usage: cross/build.sh TARGET}"
cd "$(dirname "$0")/.."

toolchain=stable
build_std=()
case "$target" in
  x86_64-unknown-linux-musl|aarch64-unknown-linux-musl) ;;
  armv7-unknown-linux-musleabihf)
    # No prebuilt rust-std for this target here: build std from source.
    toolchain=nightly
    build_std=(-Zbuild-std=std,panic_abort)
    ;;
  *) echo "cross/build.sh: unsupported target $target" >&2; exit 2 ;;
esac

cross/setup.sh "$target" "$toolchain"
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

# librdkafka issue #5135: a stub curl header on the target's include path.
export TARGET_CFLAGS="-I$PWD/cross/include ${TARGET_CFLAGS:-}"
export TARGET_CXXFLAGS="-I$PWD/cross/include ${TARGET_CXXFLAGS:-}"
if [ "$target" = armv7-unknown-linux-musleabihf ]; then
  # zig provides the C runtime; Rust's self-contained musl objects would clash.
  export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_MUSLEABIHF_RUSTFLAGS="-C link-self-contained=no"
fi

start=$(date +%s)
# CROSS_TARGET_DIR: a cargo target directory kept across clones (CI
# uses one), so librdkafka and OpenSSL are built once per target.
cache="${CROSS_TARGET_DIR:-}"
cargo +"$toolchain" zigbuild --release --locked --target "$target" --features static \
  ${cache:+--target-dir "$cache"} "${build_std[@]}"
bin="target/$target/release/edgegate"
if [ -n "$cache" ]; then
  mkdir -p "target/$target/release"
  cp "$cache/$target/release/edgegate" "$bin"
fi
echo "built $bin in $(( $(date +%s) - start ))s: $(stat -c %s "$bin") bytes"
file "$bin"
