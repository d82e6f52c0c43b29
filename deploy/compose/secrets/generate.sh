#!/bin/sh
# Creates the secret files compose mounts under /run/secrets (once; existing files are kept).
# The pseudonymization key must be the same for every worker and must survive re-deployments:
# tokens are only comparable under one key (docs/operations.md, "Rotate the pseudonymization key").
set -eu
cd "$(dirname "$0")"
# Compose bind-mounts these files into containers whose users are not you (the worker runs as
# uid 10001, Grafana as 472), so the files must be world-readable; the directory is closed to
# other users of this host instead.
chmod 700 .
umask 022
new() { [ -s "$1" ] || { python3 -c "import secrets; print(secrets.token_hex($2))" > "$1"; echo "created $1"; }; }
new clickhouse_password 24      # the database owner: migration, access, workers
new clickhouse_bi_password 24   # the read-only BI user Grafana connects as (access.toml)
new grafana_admin_password 16
new pseudo_key 32
