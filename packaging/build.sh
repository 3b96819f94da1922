#!/usr/bin/env bash
# Builds deckhand's Debian packages into target/debian/ (amd64) or target/aarch64-unknown-linux-gnu/debian/
# (arm64), under $CARGO_TARGET_DIR when that is set:
#   deckhand-agent_<version>-1_<arch>.deb  the daemon, its systemd unit, /etc/deckhand/agent.toml
#   deckhand_<version>-1_amd64.deb         the operator's CLI (x86_64 only: it runs on the operator's machine)
#
#   packaging/build.sh [--target x86_64|aarch64] [--profile dist|release|dev] [--features hailo] [--no-build]
#
# aarch64 is cross-built from an x86_64 Debian machine: the linker and the C/C++ compilers are set in
# .cargo/config.toml; this script installs what is missing (Debian's gcc-aarch64-linux-gnu,
# g++-aarch64-linux-gnu, libc6-dev-arm64-cross, the rustup target, cargo-deb). --features hailo links the
# Hailo backend against libhailort.so in DECKHAND_HAILORT_LIB_DIR (HailoRT's own aarch64 library, from
# Hailo's packages for the Pi); without it the package runs on the CPU backend. --no-build packages
# binaries already built with that profile.
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir=${CARGO_TARGET_DIR:-target}

target=x86_64
profile=dist
features=
build=1
usage="usage: packaging/build.sh [--target x86_64|aarch64] [--profile dist|release|dev] [--features hailo] [--no-build]"
while [ $# -gt 0 ]; do
  case "$1" in
    --target) target="$2"; shift 2 ;;
    --profile) profile="$2"; shift 2 ;;
    --features) features="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
case "$features" in
  ""|hailo) ;;
  *) echo "packaging/build.sh: unknown --features $features (hailo)" >&2; exit 2 ;;
esac
if [ "$features" = hailo ] && [ -z "${DECKHAND_HAILORT_LIB_DIR:-}" ] && [ ! -e /usr/lib/libhailort.so ]; then
  echo "packaging/build.sh: --features hailo needs libhailort.so: set DECKHAND_HAILORT_LIB_DIR" >&2
  exit 2
fi
feature_args=()
[ -n "$features" ] && feature_args=(--features "deckhand-agent/$features")

if ! command -v cargo-deb >/dev/null 2>&1; then
  # Pinned: the CI check packages dev-profile binaries, which later cargo-deb releases may refuse.
  cargo install cargo-deb --version 3.8.0 --locked
fi

case "$target" in
  x86_64)
    if [ "$build" = 1 ]; then
      # The two binaries, in one build whose features are resolved over the whole workspace, as the
      # test build's are (CI then reuses its compiled dependencies instead of compiling them again for
      # another feature set). No test-only feature reaches a package: the agent's `fault-injection` is
      # switched on only by the tests' dev-dependency, which a build does not use.
      cargo build --profile "$profile" --workspace --bin deckhand-agent --bin deckhand "${feature_args[@]}"
    fi
    cargo deb --no-build --profile "$profile" -p deckhand-agent
    cargo deb --no-build --profile "$profile" -p deckhand-tools
    ls -l "$target_dir"/debian/*.deb
    ;;
  aarch64)
    triple=aarch64-unknown-linux-gnu
    missing=()
    for pkg in gcc-aarch64-linux-gnu g++-aarch64-linux-gnu libc6-dev-arm64-cross; do
      dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
    done
    if [ ${#missing[@]} -gt 0 ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
    fi
    rustup target list --installed | grep -qx "$triple" || rustup target add "$triple"
    if [ "$build" = 1 ]; then
      cargo build --target "$triple" --profile "$profile" -p deckhand-agent "${feature_args[@]}" --bin deckhand-agent
    fi
    cargo deb --no-build --target "$triple" --profile "$profile" -p deckhand-agent
    ls -l "$target_dir/$triple/debian/"*.deb
    ;;
  *) echo "packaging/build.sh: unknown --target $target (x86_64, aarch64)" >&2; exit 2 ;;
esac
