#!/usr/bin/env bash
# Builds deckhand's Debian packages into target/debian/:
#   deckhand-agent_<version>-1_<arch>.deb  the daemon, its systemd unit, /etc/deckhand/agent.toml
#   deckhand_<version>-1_<arch>.deb        the operator's CLI
#
#   packaging/build.sh [--target x86_64] [--profile release|dev] [--no-build]
#
# It installs what it needs when missing (cargo-deb). --no-build packages binaries already built with that
# profile. The aarch64 target (the Pi) is issue 11's next step: its cross compilers and usearch's NEON
# kernels are not wired up yet, so it is refused here rather than half done.
set -euo pipefail
cd "$(dirname "$0")/.."

target=x86_64
profile=release
build=1
while [ $# -gt 0 ]; do
  case "$1" in
    --target) target="$2"; shift 2 ;;
    --profile) profile="$2"; shift 2 ;;
    --no-build) build=0; shift ;;
    *) echo "usage: packaging/build.sh [--target x86_64] [--profile release|dev] [--no-build]" >&2; exit 2 ;;
  esac
done
case "$target" in
  x86_64) ;;
  aarch64) echo "packaging/build.sh: --target aarch64 is not supported yet (issue 11)" >&2; exit 2 ;;
  *) echo "packaging/build.sh: unknown --target $target (x86_64)" >&2; exit 2 ;;
esac

if ! command -v cargo-deb >/dev/null 2>&1; then
  # Pinned: the CI check packages dev-profile binaries, which later cargo-deb releases may refuse.
  cargo install cargo-deb --version 3.8.0 --locked
fi
if [ "$build" = 1 ]; then
  # The two binaries alone: no test-only feature reaches a packaged binary.
  cargo build --profile "$profile" -p deckhand-agent -p deckhand-tools --bins
fi
cargo deb --no-build --profile "$profile" -p deckhand-agent
cargo deb --no-build --profile "$profile" -p deckhand-tools
ls -l target/debian/*.deb
