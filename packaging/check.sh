#!/usr/bin/env bash
# Checks the amd64 packages in target/debian/ (under $CARGO_TARGET_DIR when set) on this (Debian) machine, as root: lintian finds no errors,
# the agent package installs with dpkg, its binary runs from /usr/bin, its unit passes systemd-analyze
# verify, the deckhand user exists and the unit is enabled; remove keeps /var/lib/deckhand and purge
# removes it. It leaves the machine as it found it (the packages are purged at the end, even on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
target_dir=${CARGO_TARGET_DIR:-target}

for tool in lintian systemd-analyze; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq lintian systemd
  fi
done

command -v file >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq file; }

agent_deb=$(ls "$target_dir"/debian/deckhand-agent_*_amd64.deb)
cli_deb=$(ls "$target_dir"/debian/deckhand_*_amd64.deb)
fail() { echo "packaging check: $*" >&2; exit 1; }
cleanup() { dpkg --purge deckhand-agent deckhand >/dev/null 2>&1 || true; }
trap cleanup EXIT

# lintian: no errors (warnings are printed for the reader).
lintian --fail-on error --suppress-tags no-manual-page "$agent_deb" "$cli_deb"

# The CPU backend's XNNPACK engine comes with the agent unless the admin declines recommended packages.
dpkg-deb -f "$agent_deb" Recommends | grep -qw libxnnpack0 || fail "the agent does not recommend libxnnpack0"

dpkg -i "$agent_deb" "$cli_deb"
/usr/bin/deckhand-agent --version
/usr/bin/deckhand --version
getent passwd deckhand >/dev/null || fail "the deckhand user was not created"
[ -f /etc/deckhand/agent.toml ] || fail "/etc/deckhand/agent.toml is missing"
dpkg-query -W -f='${Conffiles}\n' deckhand-agent | grep -q /etc/deckhand/agent.toml \
  || fail "/etc/deckhand/agent.toml is not a conffile"
# It may hold secrets (webhook_secret, MQTT credentials): the service's group reads it, nobody else.
[ "$(stat -c '%a %U %G' /etc/deckhand/agent.toml)" = "640 root deckhand" ] \
  || fail "/etc/deckhand/agent.toml is $(stat -c '%a %U %G' /etc/deckhand/agent.toml), not 640 root deckhand"
unit=$(dpkg -L deckhand-agent | grep '/systemd/system/deckhand-agent.service$') \
  || fail "the unit is not installed"
systemd-analyze verify --man=no "$unit"
[ -L /etc/systemd/system/multi-user.target.wants/deckhand-agent.service ] \
  || fail "the unit is not enabled"

# remove keeps the store; purge removes it.
mkdir -p /var/lib/deckhand/blobs && echo data > /var/lib/deckhand/blobs/x
dpkg -r deckhand-agent
[ ! -e /usr/bin/deckhand-agent ] || fail "remove left /usr/bin/deckhand-agent"
[ -f /var/lib/deckhand/blobs/x ] || fail "remove deleted the store"
dpkg -P deckhand-agent
[ ! -e /var/lib/deckhand ] || fail "purge left /var/lib/deckhand"
[ ! -e /etc/deckhand/agent.toml ] || fail "purge left /etc/deckhand/agent.toml"
! dpkg-statoverride --list /etc/deckhand/agent.toml >/dev/null || fail "purge left the statoverride"
echo "packaging check: both amd64 packages pass"

# The arm64 agent package, when built (packaging/build.sh --target aarch64): lintian finds no errors, it
# holds the same files as the amd64 one, and its binary is an aarch64 executable. (It cannot be installed
# on this amd64 machine; the aarch64 binary itself runs under qemu-user in tests/aarch64.rs.)
arm_deb=$(ls "$target_dir"/aarch64-unknown-linux-gnu/debian/deckhand-agent_*_arm64.deb 2>/dev/null || true)
if [ -n "$arm_deb" ]; then
  lintian --fail-on error --suppress-tags no-manual-page "$arm_deb"
  [ "$(dpkg-deb -f "$arm_deb" Architecture)" = arm64 ] || fail "$arm_deb is not arm64"
  files() { dpkg-deb -c "$1" | awk '{print $6}' | sort; }
  diff <(files "$agent_deb") <(files "$arm_deb") || fail "the arm64 and amd64 packages hold different files"
  unpacked=$(mktemp -d)
  dpkg-deb -x "$arm_deb" "$unpacked"
  file "$unpacked/usr/bin/deckhand-agent" | grep -q 'ARM aarch64' \
    || fail "the arm64 package's binary is not an aarch64 executable"
  rm -rf "$unpacked"
  echo "packaging check: the arm64 agent package passes"
fi
