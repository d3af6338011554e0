#!/usr/bin/env bash
# Builds the Debian package for one target from its static binary:
#   packaging/build-deb.sh TARGET   -> target/debian/edgegate_<version>_<arch>.deb
# TARGET as for cross/build.sh (which this runs first; cargo makes it a no-op
# when the binary is up to date).
set -euo pipefail
target="${1:?usage: packaging/build-deb.sh TARGET}"
cd "$(dirname "$0")/.."
case "$target" in
  x86_64-unknown-linux-musl) arch=amd64 ;;
  aarch64-unknown-linux-musl) arch=arm64 ;;
  armv7-unknown-linux-musleabihf) arch=armhf ;;
  *) echo "packaging/build-deb.sh: unsupported target $target" >&2; exit 2 ;;
esac
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
cross/build.sh "$target"
command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
out="target/debian/edgegate_${version}_${arch}.deb"
mkdir -p target/debian
# The binary is already stripped by the release profile; the host's strip
# cannot read ARM binaries.
cargo deb --no-build --no-strip --target "$target" --output "$out"
echo "$out"
