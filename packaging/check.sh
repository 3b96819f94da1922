#!/usr/bin/env bash
# Checks the amd64 packages in target/debian/ on this (Debian) machine, as root: lintian finds no errors,
# the agent package installs with dpkg, its binary runs from /usr/bin, its unit passes systemd-analyze
# verify, the deckhand user exists and the unit is enabled; remove keeps /var/lib/deckhand and purge
# removes it. It leaves the machine as it found it (the packages are purged at the end, even on failure).
set -euo pipefail
cd "$(dirname "$0")/.."

for tool in lintian systemd-analyze; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq lintian systemd
  fi
done

agent_deb=$(ls target/debian/deckhand-agent_*_amd64.deb)
cli_deb=$(ls target/debian/deckhand_*_amd64.deb)
fail() { echo "packaging check: $*" >&2; exit 1; }
cleanup() { dpkg --purge deckhand-agent deckhand >/dev/null 2>&1 || true; }
trap cleanup EXIT

# lintian: no errors (warnings are printed for the reader).
lintian --fail-on error --suppress-tags no-manual-page "$agent_deb" "$cli_deb"

dpkg -i "$agent_deb" "$cli_deb"
/usr/bin/deckhand-agent --version
/usr/bin/deckhand --version
getent passwd deckhand >/dev/null || fail "the deckhand user was not created"
[ -f /etc/deckhand/agent.toml ] || fail "/etc/deckhand/agent.toml is missing"
dpkg-query -W -f='${Conffiles}\n' deckhand-agent | grep -q /etc/deckhand/agent.toml \
  || fail "/etc/deckhand/agent.toml is not a conffile"
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
echo "packaging check: both packages pass"
