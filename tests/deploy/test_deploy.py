"""deploy/ validated offline: what operators run must at least be well-formed and consistent.

- The compose file passes Debian's ``docker-compose config`` (no engine needed) and has the
  services and ordering the operations runbook relies on.
- Kubernetes manifests validate against the Kubernetes JSON schemas (``kubernetes-validate``,
  strict: unknown fields are errors) and wire probes, secrets and scaling consistently.
- systemd units pass ``systemd-analyze verify`` without a single warning.
- Every ``YIBAO_*`` variable any of them sets is a real setting with a valid value, so a typo is
  caught here and not by a worker that silently ignores it.
- Dashboards and alert rules only name metrics the worker exports, and promtool accepts the
  Prometheus config, the alert rules and every dashboard query.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.metrics_core import Metric

from streams import metrics
from yibao.settings import Settings, load_settings

from ..conftest import require_infra

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
K8S_VERSION = "1.30.0"
VAR = re.compile(r"\bYIBAO_[A-Z0-9_]+\b")


# --- helpers ------------------------------------------------------------------------------------
def env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (compose ``env_file``, systemd ``EnvironmentFile``)."""
    out: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def k8s_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc:
                yield path, doc


def k8s(kind: str, name: str) -> dict[str, Any]:
    for _, doc in k8s_documents():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise AssertionError(f"no {kind}/{name} in deploy/k8s")


def setting_of(variable: str) -> str:
    return variable.removeprefix("YIBAO_").lower()


#: Settings naming a file the settings read or check when loaded (secrets, TLS material).
FILE_SETTINGS = frozenset({"kafka_ssl_cafile", "kafka_ssl_certfile", "kafka_ssl_keyfile", "ch_ca_certs"})


def assert_valid_settings(env: dict[str, str], where: str) -> Settings:
    """Every YIBAO_* key is a setting, and the values together pass the settings' validation.

    Secret and TLS files do not exist here, so their paths are checked for being absolute and
    then left out.
    """
    kw: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith("YIBAO_"):
            continue
        name = setting_of(key)
        assert name in Settings.model_fields, f"{where}: {key} is not a setting (yibao/settings.py)"
        if name.endswith("_file") or name in FILE_SETTINGS:
            assert value.startswith(("/", "%d/")), f"{where}: {key}={value} must be an absolute path"
            continue
        kw[name] = value
    return load_settings(**kw)


def exported_metric_names() -> set[str]:
    """Sample names the worker's /metrics can carry (also for labelled metrics with no sample yet)."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",), "summary": ("_sum", "_count", "_created")}
    names: set[str] = set()
    family: Metric
    for family in metrics.REGISTRY.collect():
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


# --- compose ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose_config() -> dict[str, Any]:
    """``docker-compose config``: the file as the real tool resolves it (env files, anchors)."""
    binary = shutil.which("docker-compose")
    if binary is None:
        require_infra("docker-compose (Debian package docker-compose) to validate deploy/compose")
    done = subprocess.run([binary, "-f", "compose.yaml", "config"], cwd=COMPOSE, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def test_compose_config_validates_and_orders_migrate_before_workers(compose_config: dict[str, Any]) -> None:
    services = compose_config["services"]
    assert set(services) == {"kafka", "clickhouse", "migrate", "access", "worker", "prometheus", "grafana"}

    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    assert "controller" in kafka["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert not any("zookeeper" in k.lower() for k in kafka["environment"])

    worker, migrate = services["worker"], services["migrate"]
    assert worker["image"] == migrate["image"]
    assert worker["build"]["dockerfile"] == "deploy/Containerfile"
    assert (Path(worker["build"]["context"]) / worker["build"]["dockerfile"]).is_file()
    assert migrate["command"] == ["migrate"] and migrate.get("restart") == "no"
    assert worker["command"] == ["worker", "--no-migrate"]
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert worker["depends_on"]["clickhouse"]["condition"] == "service_healthy"
    assert worker["deploy"]["replicas"] >= 2
    s = assert_valid_settings(worker["environment"], "compose worker")
    assert worker["deploy"]["replicas"] <= s.topic_partitions
    assert s.ch_backend.value == "server" and s.ch_host == "clickhouse"
    assert s.kafka_bootstrap.split(":")[0] == "kafka"
    # the rule state on disk in each replica's own filesystem: no volume the replicas would share
    assert s.state_store == "disk" and not worker.get("volumes")
    assert _seconds(worker["stop_grace_period"]) > s.shutdown_deadline_s
    # the secret files the settings point at are the secrets compose mounts
    mounted = {f"/run/secrets/{x['source']}" for x in worker["secrets"]}
    files = {v for k, v in worker["environment"].items() if k.endswith("_FILE")}
    assert files <= mounted

    grafana = services["grafana"]
    assert "grafana-clickhouse-datasource" in grafana["environment"]["GF_INSTALL_PLUGINS"]
    assert set(compose_config["secrets"]) >= {"clickhouse_password", "pseudo_key"}

    # the BI user exists before anything reads as it: `yibao access apply` after every migration
    access = services["access"]
    assert access["image"] == migrate["image"] and access.get("restart") == "no"
    assert access["command"][:3] == ["access", "apply", "--roles"]
    assert access["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for reader in ("worker", "grafana"):
        assert services[reader]["depends_on"]["access"]["condition"] == "service_completed_successfully", reader


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(?:(\d+)m)?(?:([\d.]+)s)?", text)
    assert match and any(match.groups()), text
    return int(match.group(1) or 0) * 60 + float(match.group(2) or 0)


def test_prometheus_scrapes_every_worker_on_its_metrics_port(compose_config: dict[str, Any]) -> None:
    port = int(compose_config["services"]["worker"]["environment"]["YIBAO_WEB_PORT"])
    prom = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "yibao-worker")
    assert job["metrics_path"] == "/metrics"
    sd = job["dns_sd_configs"][0]
    assert sd["names"] == ["worker"] and sd["port"] == port  # the service name resolves to every replica
    assert compose_config["services"]["worker"]["expose"] == [str(port)]


def test_grafana_provisions_both_data_sources_and_the_dashboard_folders(compose_config: dict[str, Any]) -> None:
    grafana = compose_config["services"]["grafana"]
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in grafana["volumes"] if v.startswith("/")}
    provisioning = mounts["/etc/grafana/provisioning"]
    sources = yaml.safe_load((provisioning / "datasources" / "datasources.yaml").read_text(encoding="utf-8"))
    by_type = {d["type"]: d for d in sources["datasources"]}
    assert by_type["prometheus"]["url"] == "http://prometheus:9090"
    ch = by_type["grafana-clickhouse-datasource"]
    assert ch["jsonData"]["host"] == "clickhouse" and ch["jsonData"]["defaultDatabase"] == "yibao"
    secret = re.fullmatch(r"\$__file\{(/run/secrets/\w+)\}", ch["secureJsonData"]["password"])
    assert secret and secret.group(1).rsplit("/", 1)[1] in {x["source"] for x in grafana["secrets"]}

    providers = yaml.safe_load((provisioning / "dashboards" / "dashboards.yaml").read_text(encoding="utf-8"))
    dashboards_root = mounts["/var/lib/grafana/dashboards"]
    paths = {p["name"]: p["options"]["path"] for p in providers["providers"]}
    assert set(paths) == {"yibao-workers", "yibao-bi"}
    for path in paths.values():
        local = dashboards_root / Path(path).relative_to("/var/lib/grafana/dashboards")
        assert local.is_dir(), local
    workers = list((dashboards_root / "workers").glob("*.json"))
    assert workers
    for f in workers:
        dash = json.loads(f.read_text(encoding="utf-8"))
        uids = {t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])}
        assert uids == {by_type["prometheus"]["uid"]}


def _roles_file(compose_config: dict[str, Any], tmp_path: Path) -> tuple[Path, Any]:
    """The roles file the access service applies (host path), loaded by yibao.access with every
    password file replaced by a local one (the secrets are not generated here)."""
    from yibao.access import load_roles

    access = compose_config["services"]["access"]
    in_container = access["command"][3]
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in access["volumes"] if v.startswith("/")}
    path = mounts[in_container]
    secret = tmp_path / "secret"
    secret.write_text("not-the-real-one\n", encoding="utf-8")
    text = re.sub(r'password_file = "[^"]*"', f'password_file = "{secret}"', path.read_text(encoding="utf-8"))
    local = tmp_path / "roles.toml"
    local.write_text(text, encoding="utf-8")
    worker_env = compose_config["services"]["worker"]["environment"]
    return path, load_roles(local, worker_env["YIBAO_CH_DATABASE"])


def test_grafana_reads_clickhouse_as_a_read_only_bi_user_not_the_writer(compose_config: dict[str, Any],
                                                                       tmp_path: Path) -> None:
    """Grafana's ClickHouse data source is a reader of the roles file the access service applies,
    with that user's password secret and the database that user reads; it never gets the
    writer's password."""
    import tomllib

    from yibao.access import MODERN_ACCESS_VERSION, mart_name

    services = compose_config["services"]
    grafana, worker, access = services["grafana"], services["worker"], services["access"]
    mounts = {v.split(":")[1]: Path(v.split(":")[0]) for v in grafana["volumes"] if v.startswith("/")}
    sources = yaml.safe_load((mounts["/etc/grafana/provisioning"] / "datasources" / "datasources.yaml")
                             .read_text(encoding="utf-8"))
    ch = next(d for d in sources["datasources"] if d["type"] == "grafana-clickhouse-datasource")
    user = ch["jsonData"]["username"]
    writer = worker["environment"]["YIBAO_CH_USER"]
    assert user != writer and user != services["clickhouse"]["environment"]["CLICKHOUSE_USER"]

    path, roles = _roles_file(compose_config, tmp_path)
    reader = next((u for u in roles.users if u.name == user), None)
    assert reader is not None, f"Grafana's user {user} is not in {path.name}"
    assert reader.role.kind == "reader" and reader.region is None
    # its password is the secret compose gives Grafana and the access service, and nothing else is
    password_file = tomllib.loads(path.read_text(encoding="utf-8"))["users"][user]["password_file"]
    secret = re.fullmatch(r"\$__file\{(/run/secrets/\w+)\}", ch["secureJsonData"]["password"])
    assert secret and secret.group(1) == password_file
    name = password_file.rsplit("/", 1)[1]
    grafana_secrets = {x["source"] for x in grafana["secrets"]}
    assert name in grafana_secrets and name in {x["source"] for x in access["secrets"]}
    writer_secret = worker["environment"]["YIBAO_CH_PASSWORD_FILE"].rsplit("/", 1)[1]
    assert writer_secret not in grafana_secrets
    # the database it reads: the pipeline's own (column grants, ClickHouse >= 20.5) or its mart (18.16)
    tag = services["clickhouse"]["image"].rsplit(":", 1)[1]
    version = tuple(int(x) for x in tag.split(".")[:2])
    expected = roles.database if version >= MODERN_ACCESS_VERSION else mart_name(roles.database, reader.role, None)
    assert ch["jsonData"]["defaultDatabase"] == expected
    # the server's owner may manage access, or `yibao access apply` could not create the user
    assert services["clickhouse"]["environment"]["CLICKHOUSE_DEFAULT_ACCESS_MANAGEMENT"] == "1"


# --- the BI dashboard ---------------------------------------------------------------------------
BI_DASHBOARD = COMPOSE / "grafana/dashboards/bi/yibao-bi.json"
#: Columns a region prefix is matched against (a hospital's code carries its region's 6 digits).
REGION_COLUMNS = {"insu_admdvs", "mdtrt_admdvs", "admdvs", "fixmedins_code"}
MONTH_COLUMNS = {"month", "day"}
VARIABLES = ("region", "month")


def _macro_args(sql: str, start: int) -> tuple[list[str], int]:
    """Arguments of the macro call whose "(" is at ``start`` (split on top-level commas), and the
    index after its ")"."""
    depth, args, last = 0, [], start + 1
    for i in range(start, len(sql)):
        c = sql[i]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                args.append(sql[last:i])
                return args, i + 1
        elif c == "," and depth == 1:
            args.append(sql[last:i])
            last = i + 1
    raise AssertionError(f"unbalanced macro call in {sql!r}")


def interpolate(sql: str, values: dict[str, str | None]) -> str:
    """What the ClickHouse plugin sends for ``values`` (None: All): ``$__conditionalAll(cond, $v)``
    becomes ``1=1`` for All, else ``cond``; then ``$__dateFilter(col)`` a date range and ``$v``/``${v}``
    the value. A variable used outside ``$__conditionalAll`` while All is selected is an error."""
    while (i := sql.find("$__conditionalAll(")) >= 0:
        (cond, var), end = _macro_args(sql, i + len("$__conditionalAll"))
        name = var.strip().strip("${}")
        assert name in values, f"$__conditionalAll on an unknown variable {var!r}"
        sql = sql[:i] + ("1=1" if values[name] is None else cond) + sql[end:]
    while (i := sql.find("$__dateFilter(")) >= 0:
        (col,), end = _macro_args(sql, i + len("$__dateFilter"))
        sql = sql[:i] + f"{col} >= toDate('2020-01-01') AND {col} <= toDate('2030-12-31')" + sql[end:]
    for name, value in values.items():
        if "$" + name in sql or "${" + name + "}" in sql:
            assert value is not None, f"${name} is used outside $__conditionalAll: All would break it\n{sql}"
            sql = sql.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in sql, sql
    return sql


_RUN_ON_CHDB = """
import json, sys, tempfile
from pathlib import Path
from sinks import ClickHouseConfig, connect
from sinks.migrate import migrate
queries = json.load(sys.stdin)
with tempfile.TemporaryDirectory() as tmp:
    be = connect(ClickHouseConfig(chdb_path=Path(tmp) / "chdb", database="yibao"))
    migrate(be)
    be.use_database()
    cols = {}
    for t, c in be.query("SELECT table, name FROM system.columns WHERE database = 'yibao' "
                         "AND table LIKE 'bi\\_%'").rows:
        cols.setdefault(str(t), []).append(str(c))
    errors = {}
    for key, sql in queries.items():
        try:
            be.query(sql)
        except Exception as exc:
            errors[key] = str(exc)[:400]
    be.close()
print(json.dumps({"columns": cols, "errors": errors}))
"""


@pytest.fixture(scope="module")
def bi_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(BI_DASHBOARD.read_text(encoding="utf-8"))
    return dashboard


def _bi_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """Each panel target's SQL, keyed "panel title/refId"."""
    return {f"{p['title']}/{t['refId']}": t["rawSql"] for p in dashboard["panels"] for t in p.get("targets", [])}


@pytest.fixture(scope="module")
def bi_checked(bi_dashboard: dict[str, Any]) -> dict[str, Any]:
    """Every panel and variable query, interpolated with All and with one value of each variable,
    run on a freshly migrated chDB database (in a child process: chDB holds one data dir per process)."""
    pytest.importorskip("chdb")
    runs: dict[str, str] = {}
    chosen = {"region": "3301", "month": "202609"}
    for key, sql in _bi_queries(bi_dashboard).items():
        runs[f"{key} (All)"] = interpolate(sql, dict.fromkeys(VARIABLES))
        runs[f"{key} (chosen)"] = interpolate(sql, dict(chosen))
    for v in bi_dashboard["templating"]["list"]:
        runs[f"variable {v['name']}"] = interpolate(v["query"], dict.fromkeys(VARIABLES))
    done = subprocess.run([sys.executable, "-c", _RUN_ON_CHDB], input=json.dumps(runs), capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_bi_dashboard_has_region_and_month_variables(bi_dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in bi_dashboard["templating"]["list"]}
    assert set(VARIABLES) <= set(variables)
    for name in VARIABLES:
        v = variables[name]
        assert v["type"] == "query" and v["datasource"]["uid"] == "yibao-clickhouse", v
        assert v["includeAll"] and not v["multi"] and v["current"]["value"] == "$__all", v
        assert v["query"].strip() and v["definition"] == v["query"]


def test_every_bi_panel_query_uses_the_variables_where_its_view_has_the_column(
        bi_dashboard: dict[str, Any], bi_checked: dict[str, Any]) -> None:
    columns = {t: set(c) for t, c in bi_checked["columns"].items()}
    queries = _bi_queries(bi_dashboard)
    assert len(queries) >= 12
    for key, sql in queries.items():
        views = re.findall(r"\bFROM\s+(bi_\w+)", sql)
        assert views and all(v in columns for v in views), (key, views)
        for view in views:
            if columns[view] & REGION_COLUMNS:
                assert "$region" in sql, f"{key}: {view} has a region column but the query ignores $region"
            if columns[view] & MONTH_COLUMNS:
                assert "$month" in sql, f"{key}: {view} has a month column but the query ignores $month"


def test_every_bi_query_runs_on_the_migrated_schema(bi_checked: dict[str, Any]) -> None:
    """Panels and variables, with All and with one region and month, on the views as migrated."""
    assert not bi_checked["errors"], json.dumps(bi_checked["errors"], indent=1, ensure_ascii=False)


def test_interpolate_follows_the_plugin() -> None:
    sql = "WHERE $__conditionalAll((a LIKE '${region}%' OR b LIKE '${region}%'), $region) AND $__dateFilter(day)"
    assert interpolate(sql, {"region": None}) == ("WHERE 1=1 AND day >= toDate('2020-01-01') AND "
                                                  "day <= toDate('2030-12-31')")
    assert interpolate(sql, {"region": "33"}).startswith("WHERE (a LIKE '33%' OR b LIKE '33%') AND day >= ")
    with pytest.raises(AssertionError, match="outside"):
        interpolate("WHERE a LIKE '${region}%'", {"region": None})


def _exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def test_dashboards_and_alert_rules_only_name_exported_metrics() -> None:
    exported = exported_metric_names()
    dashboard = json.loads((COMPOSE / "grafana/dashboards/workers/yibao-workers.json").read_text(encoding="utf-8"))
    rules = yaml.safe_load((COMPOSE / "prometheus" / "alerts.yml").read_text(encoding="utf-8"))
    exprs = [*_exprs(dashboard), *_exprs(rules)]
    used = {name for e in exprs for name in re.findall(r"\byibao_[a-z0-9_]+\b", e)}
    assert used and used <= exported, sorted(used - exported)
    # the dashboard covers what the issue names: in, landed, dead letters, latency, rows, alerts, state
    for needed in ("yibao_events_in_total", "yibao_events_landed_total", "yibao_dead_letters_total",
                   "yibao_sink_batch_seconds_bucket", "yibao_rows_written_total", "yibao_alerts_total",
                   "yibao_window_state_keys"):
        assert needed in {n for e in _exprs(dashboard) for n in re.findall(r"\byibao_[a-z0-9_]+\b", e)}, needed


def _promtool() -> str:
    binary = shutil.which("promtool")
    if binary is None:
        require_infra("promtool (Debian package prometheus) to check the alert rules and PromQL")
    return binary


def test_prometheus_config_and_alert_rules_pass_promtool(tmp_path: Path) -> None:
    promtool = _promtool()
    rules = COMPOSE / "prometheus" / "alerts.yml"
    done = subprocess.run([promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    # the config names the rules file by its path inside the container
    config = (COMPOSE / "prometheus" / "prometheus.yml").read_text(encoding="utf-8")
    assert "/etc/prometheus/alerts.yml" in config
    local = tmp_path / "prometheus.yml"
    local.write_text(config.replace("/etc/prometheus/alerts.yml", str(rules)), encoding="utf-8")
    done = subprocess.run([promtool, "check", "config", str(local)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, parses as PromQL (checked by promtool
    as a recording rule, the one offline PromQL parser at hand)."""
    promtool = _promtool()
    dashboard = json.loads((COMPOSE / "grafana/dashboards/workers/yibao-workers.json").read_text(encoding="utf-8"))
    exprs = [e.replace("$__rate_interval", "5m").replace("$topic", ".*") for e in _exprs(dashboard)]
    assert len(exprs) >= 15 and not any("$" in e for e in exprs)
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --- Kubernetes ---------------------------------------------------------------------------------
def test_kubernetes_manifests_validate_against_the_schemas() -> None:
    docs = list(k8s_documents())
    assert {d["kind"] for _, d in docs} >= {"StatefulSet", "ConfigMap", "Secret", "PodDisruptionBudget", "Job"}
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = set(kustomization["resources"])
    assert all((K8S / r).is_file() for r in listed)
    # the Job and the example Secret are applied by hand, never by `kubectl apply -k`
    assert listed == {p.name for p, _ in docs} - {"migrate-job.yaml", "secret.example.yaml"}


def test_worker_statefulset_probes_secrets_and_scaling_fit_the_settings() -> None:
    config = k8s("ConfigMap", "yibao-worker")["data"]
    deployment = k8s("StatefulSet", "yibao-worker")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {**config, **{e["name"]: e["value"] for e in container["env"]}}
    s = assert_valid_settings(env, "k8s worker")

    assert container["args"] == ["worker", "--no-migrate"]
    port = next(p for p in container["ports"] if p["name"] == "http-metrics")["containerPort"]
    assert port == s.web_port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert container["resources"]["requests"]["cpu"] and container["resources"]["requests"]["memory"]
    assert pod["terminationGracePeriodSeconds"] > s.shutdown_deadline_s
    assert deployment["spec"]["replicas"] <= s.topic_partitions
    assert s.processes == 1

    # secrets: mounted files, referenced through YIBAO_*_FILE, never as plain environment values
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = next(m for m in container["volumeMounts"] if volumes[m["name"]].get("secret"))
    assert mount["readOnly"] is True
    secret_name = volumes[mount["name"]]["secret"]["secretName"]
    keys = set(k8s("Secret", secret_name)["stringData"])
    for name, value in env.items():
        if name.endswith("_FILE") or name == "YIBAO_KAFKA_SSL_CAFILE":
            assert value.startswith(mount["mountPath"] + "/") and value.rsplit("/", 1)[1] in keys, name
    assert not any(setting_of(n) in ("ch_password", "pseudo_key", "kafka_sasl_password") for n in env)

    pdb = k8s("PodDisruptionBudget", "yibao-worker")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = k8s("Service", "yibao-worker-metrics")
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["serviceName"] == "yibao-worker-metrics" and service["spec"]["clusterIP"] == "None"

    # the persons' rule state on disk, on the pod's own claim (kept across restarts), not in memory
    assert s.state_store == "disk"
    claims = {c["metadata"]["name"]: c for c in deployment["spec"]["volumeClaimTemplates"]}
    (state_mount,) = [m for m in container["volumeMounts"] if m["name"] in claims]
    assert s.state_path() == Path(state_mount["mountPath"])
    assert claims[state_mount["name"]]["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claims[state_mount["name"]]["spec"]["resources"]["requests"]["storage"]
    assert state_mount["name"] not in volumes  # a claim per pod, never a volume the pods share

    job = k8s("Job", "yibao-migrate")
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert migrate["args"] == ["migrate"] and migrate["image"] == container["image"]
    assert migrate["envFrom"] == container["envFrom"]


# --- systemd ------------------------------------------------------------------------------------
def test_systemd_units_verify_without_warnings(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        require_infra("systemd-analyze (Debian package systemd) to verify deploy/systemd")
    # ExecStart must name an existing executable for verify: the venv's own `yibao`
    yibao = shutil.which("yibao", path=str(Path(sys.executable).parent)) or "/bin/true"
    units = []
    for unit in [*SYSTEMD.glob("*.service"), *SYSTEMD.glob("*.target")]:
        text = unit.read_text(encoding="utf-8").replace("/opt/yibao/.venv/bin/yibao", yibao)
        # a template is verified as one of its instances
        name = unit.name.replace("@.service", "@1.service")
        (tmp_path / name).write_text(text, encoding="utf-8")
        units.append(f"./{name}")
    done = subprocess.run([analyze, "verify", "--man=no", *units], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), done.stderr + done.stdout


def test_systemd_workers_need_a_successful_migration_and_stop_gracefully() -> None:
    worker = (SYSTEMD / "yibao-worker@.service").read_text(encoding="utf-8")
    assert "Requires=yibao-migrate.service" in worker and "After=network-online.target yibao-migrate.service" in worker
    assert "--no-migrate" in worker
    stop = int(re.search(r"^TimeoutStopSec=(\d+)$", worker, re.M).group(1))  # type: ignore[union-attr]
    example = env_file(SYSTEMD / "worker.env.example")
    s = assert_valid_settings(example, "systemd worker.env.example")
    assert stop > s.shutdown_deadline_s
    unit_env = dict(re.findall(r"^Environment=(YIBAO_[A-Z0-9_]+)=(.*)$", worker, re.M))
    assert_valid_settings(unit_env, "yibao-worker@.service")
    # the rule state on disk, one directory per instance (RocksDB holds its directory exclusively)
    assert s.state_store == "disk" and "YIBAO_STATE_DIR" not in example
    assert "%i" in unit_env["YIBAO_STATE_DIR"] and unit_env["YIBAO_STATE_DIR"].startswith(str(s.data_dir) + "/")
    # every credential the unit points a *_FILE variable at is loaded
    credentials = set(re.findall(r"^LoadCredential=([\w-]+):", worker, re.M))
    for var, value in unit_env.items():
        if var.endswith("_FILE"):
            assert value.startswith("%d/") and value[3:] in credentials, var


# --- everything together ------------------------------------------------------------------------
def test_every_yibao_variable_in_deploy_is_a_setting() -> None:
    """A scan of every file under deploy/ for YIBAO_* names, whatever its format."""
    found: dict[str, set[str]] = {}
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.suffix not in (".png",):
            for var in VAR.findall(path.read_text(encoding="utf-8", errors="replace")):
                found.setdefault(var, set()).add(str(path.relative_to(ROOT)))
    assert len(found) > 20
    unknown = {var: sorted(where) for var, where in found.items() if setting_of(var) not in Settings.model_fields}
    assert not unknown, unknown


def test_container_image_is_multistage_non_root_and_checks_health() -> None:
    text = (DEPLOY / "Containerfile").read_text(encoding="utf-8")
    stages = re.findall(r"^FROM\s+\S+(?:\s+AS\s+(\w+))?", text, re.M | re.I)
    assert len(stages) >= 2
    assert re.search(r"^COPY --from=build \S+\.whl", text, re.M)  # the wheel is what gets installed
    user = re.findall(r"^USER\s+(\S+)", text, re.M)[-1]
    assert user.split(":")[0] not in ("0", "root")
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)
    assert re.search(r'^CMD \["worker", "--no-migrate"\]', text, re.M)
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for item in source.split():
            assert (ROOT / item).exists(), item
    image_env = dict(re.findall(r"(YIBAO_[A-Z0-9_]+)=(\S+)", text))
    assert image_env and assert_valid_settings(image_env, "Containerfile ENV").ch_backend.value == "server"
