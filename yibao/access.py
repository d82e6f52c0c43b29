"""`yibao access`: ClickHouse users and what they may see, generated from one roles file (TOML).

Three kinds of account, so a fund supervisor can trust that nobody sees what they should not:

* **writer** (the worker): inserts into the staging tables ``T_in`` and reads the raw tables for
  the redelivery lookup.
* **reader** (BI): reads the tables and views the role lists by pattern (``bi_*`` for the views the
  rule engine adds), never the columns it hides: by default ``dead_letters.payload``,
  ``source_key`` and ``payload_digest`` (sealed originals and their fingerprint). Pseudonymous
  tokens (``psn_token``, ``rptr_token``) stay visible: per-person analytics need them, and they
  cannot be reversed without the key (streams/privacy.py).
* **regional reader**: a reader restricted to the rows of one region, given as a GB/T 2260
  prefix (``"33"`` a province, ``"3301"`` a city, ``"330106"`` a county); each table is filtered on
  its insured-region column (``insu_admdvs``, else ``admdvs``). A table without one is not visible
  to regional readers at all (fail closed): dead letters have no trustworthy region.

How it is enforced depends on the server, gated on ``SELECT version()``:

* **ClickHouse ≥ 20.5** (SQL access control): roles, column-level ``GRANT SELECT(...)``,
  ``CREATE ROW POLICY`` per regional user, and a permissive policy for everybody else (a table
  with any row policy hides its rows from users no policy names).
* **ClickHouse 18.16** has none of that: users live in ``users.xml`` with ``allow_databases`` and
  ``readonly``; measured here, it has *no* row filters (the ``<databases><db><table><filter>``
  users.xml setting came with 19.x: 18.16 ignores it), no table or column rights, and a view is
  executed with the caller's database rights, so a view over a hidden database is refused. The only
  enforceable separation is physical: each reader role (and each region) gets its own database
  (a "mart", ``<db>_bi``, ``<db>_r33``) holding only the columns and rows it may see, kept up to
  date by materialized views on the staging tables (18.16 does not cascade a view into another
  view's target, so they hang off ``T_in`` and convert like ``T_in_mv`` does), and backfilled once
  when created. Readers are allowed only their mart; views matching the role's patterns are copied
  into it, reading the mart's tables. Apply it like a migration: workers stopped, after every
  ``yibao migrate``. 18.16 cannot give a user a default database either (measured: it ignores
  users.xml ``<default_database>``, which came with 21.x), so a reader must name its mart when it
  connects (``clickhouse-client -u bi -d yibao_bi``), or it lands in ``default`` and is refused:
  :func:`accounts` says, per user, which database(s) it reads and how to connect.

Passwords never appear in the roles file or the output in clear: ``password_sha256_hex``, or
``password_file`` (hashed when rendering).
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

from sinks.base import Backend, check_identifier, literal
from sinks.tables import TABLES

MODERN_ACCESS_VERSION = (20, 5)
#: ``CREATE USER … DEFAULT DATABASE`` (ClickHouse PR 25687, in 21.7; the LTS after it is 21.8)
DEFAULT_DATABASE_VERSION = (21, 8)
REGION_COLUMNS = ("insu_admdvs", "admdvs")
DEFAULT_HIDDEN = {"dead_letters": ("payload", "source_key", "payload_digest")}
DEFAULT_EXCLUDE = ("schema_migrations", "*_in", "*_in_mv", "*_in_mv_*", "*staging*", "*_all")
_REGION = re.compile(r"\d{2}(\d{2}){0,2}")

EXAMPLE = """\
# yibao access roles: `yibao access render --roles this.toml` / `yibao access apply --roles this.toml`
# database = "yibao"                      # default: YIBAO_CH_DATABASE

[roles.ingest]
kind = "writer"                           # insert into staging tables, read for the redelivery lookup

[roles.bi]
kind = "reader"
tables = ["*"]                            # fnmatch patterns over the database's tables
views = ["bi_*"]                          # and views
# exclude = [...]                         # default: bookkeeping, staging and internal tables
# hidden_columns = { dead_letters = ["payload", "source_key", "payload_digest"] }   # the default

[roles.bi_regional]
kind = "reader"
tables = ["*"]
views = ["bi_*"]
regional = true                           # each user names its region

[users.yibao_ingest]
role = "ingest"
password_file = "/run/secrets/clickhouse-ingest"
networks = ["10.0.0.0/8"]

[users.bi]
role = "bi"
password_sha256_hex = "<sha256 of the password>"

[users.bi_zhejiang]
role = "bi_regional"
region = "33"                             # GB/T 2260 prefix: province, city (4) or county (6)
password_file = "/run/secrets/clickhouse-bi-zhejiang"
"""


class AccessError(ValueError):
    """The roles file is wrong; the message names the entry."""


@dataclass(frozen=True)
class Role:
    name: str
    kind: str  # writer | reader
    tables: tuple[str, ...] = ("*",)
    views: tuple[str, ...] = ()
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    hidden: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(DEFAULT_HIDDEN))
    regional: bool = False


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    password_sha256: str
    networks: tuple[str, ...] = ("::/0",)
    region: str | None = None


@dataclass(frozen=True)
class Roles:
    database: str
    roles: dict[str, Role]
    users: list[User]
    region_columns: dict[str, str] = field(default_factory=dict)


def load_roles(path: Path, default_database: str) -> Roles:
    """Parse and check a roles file (passwords from files are hashed here and never kept)."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise AccessError(f"{path}: {exc}") from None
    db = check_identifier(str(data.get("database", default_database)), "database")
    roles: dict[str, Role] = {}
    for name, r in (data.get("roles") or {}).items():
        kind = r.get("kind")
        if kind not in ("writer", "reader"):
            raise AccessError(f"roles.{name}.kind must be 'writer' or 'reader', not {kind!r}")
        hidden = {t: tuple(cs) for t, cs in (r.get("hidden_columns") or DEFAULT_HIDDEN).items()}
        roles[name] = Role(name=check_identifier(name, "role name"), kind=kind,
                           tables=tuple(r.get("tables", ["*"])), views=tuple(r.get("views", [])),
                           exclude=tuple(r.get("exclude", DEFAULT_EXCLUDE)), hidden=hidden,
                           regional=bool(r.get("regional", False)))
    users: list[User] = []
    for name, u in (data.get("users") or {}).items():
        check_identifier(name, "user name")
        role = roles.get(u.get("role", ""))
        if role is None:
            raise AccessError(f"users.{name}.role {u.get('role')!r} is not a role of {path}")
        if "password" in u:
            raise AccessError(f"users.{name}: no clear password in the roles file; use password_sha256_hex "
                              "or password_file")
        if "password_sha256_hex" in u:
            digest = str(u["password_sha256_hex"]).lower()
        elif "password_file" in u:
            try:
                secret = Path(u["password_file"]).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise AccessError(f"users.{name}.password_file: {exc.strerror}") from None
            digest = hashlib.sha256(secret.encode("utf-8")).hexdigest()
        else:
            raise AccessError(f"users.{name}: needs password_sha256_hex or password_file")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise AccessError(f"users.{name}.password_sha256_hex is not 64 hex digits")
        region = u.get("region")
        if role.regional and (not isinstance(region, str) or not _REGION.fullmatch(region)):
            raise AccessError(f"users.{name}: role {role.name} is regional; give region = a 2-, 4- or 6-digit "
                              "GB/T 2260 prefix")
        if not role.regional and region is not None:
            raise AccessError(f"users.{name}: region given but role {role.name} is not regional")
        users.append(User(name, role, digest, tuple(u.get("networks", ["::/0"])), region))
    region_columns = {check_identifier(t): check_identifier(c) for t, c in (data.get("region_columns") or {}).items()}
    return Roles(db, roles, users, region_columns)


# --- what exists in the database ----------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    name: str
    type: str
    default_kind: str
    default_expression: str


@dataclass
class Catalog:
    """Tables, views and columns of the pipeline's database, as the server reports them."""

    tables: dict[str, str]  # name -> engine
    columns: dict[str, list[Column]]

    @classmethod
    def read(cls, backend: Backend, database: str) -> Catalog:
        tables = {str(r[0]): str(r[1]) for r in backend.query(
            f"SELECT name, engine FROM system.tables WHERE database = {literal(database)}").rows}
        columns: dict[str, list[Column]] = {}
        for r in backend.query(f"SELECT table, name, type, default_kind, default_expression FROM system.columns "
                               f"WHERE database = {literal(database)}").rows:
            columns.setdefault(str(r[0]), []).append(Column(str(r[1]), str(r[2]), str(r[3]), str(r[4])))
        return cls(tables, columns)

    def stored(self, name: str) -> bool:
        return self.tables.get(name, "").endswith("MergeTree")

    def view(self, name: str) -> bool:
        return self.tables.get(name) == "View"


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def region_column(roles: Roles, catalog: Catalog, table: str) -> str | None:
    if table in roles.region_columns:
        return roles.region_columns[table]
    names = {c.name for c in catalog.columns.get(table, [])}
    return next((c for c in REGION_COLUMNS if c in names), None)


def visible(role: Role, roles: Roles, catalog: Catalog) -> dict[str, list[str]]:
    """Stored tables the role may read, with the columns it may see (views are handled apart)."""
    out: dict[str, list[str]] = {}
    for t in sorted(catalog.tables):
        if not catalog.stored(t) or not _matches(t, role.tables) or _matches(t, role.exclude):
            continue
        if role.regional and region_column(roles, catalog, t) is None:
            continue  # fail closed: no region column, no way to restrict it
        hidden = set(role.hidden.get(t, ()))
        out[t] = [c.name for c in catalog.columns.get(t, []) if c.name not in hidden]
    return out


def visible_views(role: Role, catalog: Catalog) -> list[str]:
    return sorted(t for t in catalog.tables if catalog.view(t) and _matches(t, role.views)
                  and not _matches(t, role.exclude))


def _region_filter(column: str, region: str) -> str:
    return f"{column} LIKE {literal(region + '%')}"


# --- rendering ----------------------------------------------------------------------------------
@dataclass
class Rendered:
    """What to install: users.xml parts (18.16) and SQL statements (both)."""

    modern: bool
    profiles_xml: str = ""
    users_xml: str = ""
    sql: list[str] = field(default_factory=list)
    marts: dict[str, str] = field(default_factory=dict)  # user -> database it reads (18.16)
    #: user -> the databases it may read, the one its queries should go to first
    reads: dict[str, tuple[str, ...]] = field(default_factory=dict)
    #: the server makes ``reads[user][0]`` each user's default database (else clients must name it)
    default_database: bool = False

    def users_document(self) -> str:
        """A complete file for the server's ``users.d/`` directory (18.16)."""
        return (f'<?xml version="1.0"?>\n<yandex>\n<profiles>\n{self.profiles_xml}</profiles>\n'
                f"<users>\n{self.users_xml}</users>\n</yandex>\n")


def mart_name(db: str, role: Role, region: str | None) -> str:
    return f"{db}_r{region}" if role.regional else f"{db}_{role.name}"


def render(roles: Roles, catalog: Catalog, version: tuple[int, ...]) -> Rendered:
    if version >= MODERN_ACCESS_VERSION:
        return _render_modern(roles, catalog, default_database=version >= DEFAULT_DATABASE_VERSION)
    return _render_legacy(roles, catalog)


def _render_modern(roles: Roles, catalog: Catalog, *, default_database: bool) -> Rendered:
    db = roles.database
    out = Rendered(modern=True, default_database=default_database)
    out.reads = {u.name: (db,) for u in roles.users}  # grants and row policies on the one database
    sql = out.sql
    regional_users = [u.name for u in roles.users if u.region is not None]
    for role in roles.roles.values():
        r = f"yibao_{role.name}"
        sql.append(f"CREATE ROLE IF NOT EXISTS {r}")
        if role.kind == "writer":
            for t in sorted(catalog.tables):
                if t.endswith("_in"):
                    sql.append(f"GRANT INSERT ON {db}.{t} TO {r}")
            sql.append(f"GRANT SELECT ON {db}.* TO {r}")
            continue
        for t, cols in visible(role, roles, catalog).items():
            sql.append(f"GRANT SELECT({', '.join(cols)}) ON {db}.{t} TO {r}")
        if not role.regional:
            for v in visible_views(role, catalog):
                sql.append(f"GRANT SELECT ON {db}.{v} TO {r}")
    for u in roles.users:
        hosts = ", ".join(f"IP {literal(n)}" for n in u.networks)
        default = f" DEFAULT DATABASE {db}" if default_database else ""
        sql.append(f"CREATE USER IF NOT EXISTS {u.name} IDENTIFIED WITH sha256_hash BY {literal(u.password_sha256)} "
                   f"HOST {hosts}{default}")
        sql.append(f"GRANT yibao_{u.role.name} TO {u.name}")
        sql.append(f"SET DEFAULT ROLE yibao_{u.role.name} TO {u.name}")
    regional_tables = {t for u in roles.users if u.region is not None for t in visible(u.role, roles, catalog)}
    for t in sorted(regional_tables):
        col = region_column(roles, catalog, t)
        assert col is not None
        for u in roles.users:
            if u.region is not None and t in visible(u.role, roles, catalog):
                sql.append(f"CREATE ROW POLICY IF NOT EXISTS yibao_region_{u.name} ON {db}.{t} FOR SELECT "
                           f"USING {_region_filter(col, u.region)} TO {u.name}")
        # A table with a row policy shows nothing to users no policy names: everybody else sees all.
        sql.append(f"CREATE ROW POLICY IF NOT EXISTS yibao_unrestricted ON {db}.{t} FOR SELECT USING 1 "
                   f"TO ALL EXCEPT {', '.join(regional_users)}")
    return out


def _render_legacy(roles: Roles, catalog: Catalog) -> Rendered:
    from sinks.migrate import to_target

    db = roles.database
    out = Rendered(modern=False)
    out.profiles_xml = ("<yibao_writer><allow_experimental_low_cardinality_type>1"
                        "</allow_experimental_low_cardinality_type></yibao_writer>\n"
                        "<yibao_reader><readonly>1</readonly></yibao_reader>\n")
    marts: dict[str, tuple[Role, str | None]] = {}
    for u in roles.users:
        if u.role.kind == "reader":
            marts.setdefault(mart_name(db, u.role, u.region), (u.role, u.region))
            out.marts[u.name] = mart_name(db, u.role, u.region)
    for mart, (role, region) in marts.items():
        out.sql.append(f"CREATE DATABASE IF NOT EXISTS {mart}")
        for t, cols in visible(role, roles, catalog).items():
            spec = TABLES.get(t)
            if spec is None or f"{t}_in" not in catalog.tables:
                continue  # not fed through a staging table: nothing to hang a view on
            where = _region_filter(region_column(roles, catalog, t) or "", region) if region else "1"
            cols = [c for c in cols if c in {x.name for x in catalog.columns[t]}]
            info = {c.name: c for c in catalog.columns[t]}
            exprs = []
            for c in cols:
                ci = info[c]
                exprs.append(f"{ci.default_expression} AS {c}" if ci.default_kind == "DEFAULT"
                             else to_target(c, ci.type))
            key_ok = all(k in cols for k in spec.order_by)
            order = ", ".join(spec.order_by) if key_ok else "tuple()"
            part_col = spec.partition_column or spec.time_column
            partition = f" PARTITION BY {spec.partition_by}" if part_col in cols else ""
            engine = spec.engine if all(a in cols for a in re.findall(r"\((\w+)\)", spec.engine)) else "MergeTree()"
            out.sql.append(f"CREATE TABLE IF NOT EXISTS {mart}.{t} ENGINE = {engine}{partition} ORDER BY ({order}) "
                           f"AS SELECT {', '.join(cols)} FROM {db}.{t} WHERE 0")
            out.sql.append(f"-- backfill-if-new {mart}.{t}\nINSERT INTO {mart}.{t} ({', '.join(cols)}) "
                           f"SELECT {', '.join(cols)} FROM {db}.{t} WHERE {where}")
            out.sql.append(f"CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{t}_in_mv_{mart} TO {mart}.{t} AS "
                           f"SELECT {', '.join(exprs)} FROM {db}.{t}_in WHERE {where}")
        if not role.regional:
            # aggregates fed by views (0003 agg_*): the bi_* views read them, so the mart needs its own
            for t in visible(role, roles, catalog):
                if t not in TABLES:
                    out.sql.append(f"-- copy-aggregate {db}.{t} -> {mart}.{t}")
            for v in visible_views(role, catalog):
                out.sql.append(f"-- copy-view {db}.{v} -> {mart}.{v}")
    writer_dbs = [db, *marts]
    for u in roles.users:
        dbs = writer_dbs if u.role.kind == "writer" else [out.marts[u.name]]
        out.reads[u.name] = tuple(dbs)
        networks = "".join(f"<ip>{escape(n)}</ip>" for n in u.networks)
        profile = "yibao_writer" if u.role.kind == "writer" else "yibao_reader"
        allow = "".join(f"<database>{d}</database>" for d in dbs)
        out.users_xml += (f"<!-- {u.name} reads {', '.join(dbs)}; 18.16 sets no default database: connect with "
                          f"-d {dbs[0]} -->\n"
                          f"<{u.name}><password_sha256_hex>{u.password_sha256}</password_sha256_hex>"
                          f"<networks>{networks}</networks><profile>{profile}</profile><quota>default</quota>"
                          f"<allow_databases>{allow}</allow_databases></{u.name}>\n")
    return out


@dataclass(frozen=True)
class Account:
    """A user as its administrator must hand it out: where its data is and how to reach it."""

    user: str
    kind: str  # writer | reader | regional reader
    region: str | None
    databases: tuple[str, ...]  # what it may read; its queries go to the first
    default_database: bool  # the server makes databases[0] its default; else every client must name it

    def describe(self) -> str:
        """One line: who it is and what it reads."""
        who = f"{self.kind}, region {self.region}" if self.region else self.kind
        what = f"writes and reads {self.databases[0]}" if self.kind == "writer" else f"reads {self.databases[0]}"
        also = f"; also reads {', '.join(self.databases[1:])}" if len(self.databases) > 1 else ""
        return f"{self.user} ({who}) {what}{also}"

    def client_command(self, host: str, port: int, *, secure: bool = False, password: str = "PASSWORD") -> str:
        """The clickhouse-client line that reaches this user's data (``password``: what to type there)."""
        tls = " --secure" if secure else ""
        return (f"clickhouse-client --host {host} --port {port}{tls} -u {self.user} -d {self.databases[0]} "
                f"--password {password}")


def accounts(roles: Roles, rendered: Rendered) -> list[Account]:
    """Each user of ``roles``: what it reads once ``rendered`` is installed, in roles-file order.

    Why: on 18.16 a reader's data is in its own database (``<db>_bi``, ``<db>_r33``), not the
    pipeline's, and nothing makes that its default: a client that does not name it is refused
    ("Access denied to database yibao" or "… default"), so the administrator must be told.
    """
    out = []
    for u in roles.users:
        kind = "writer" if u.role.kind == "writer" else ("regional reader" if u.region is not None else "reader")
        out.append(Account(u.name, kind, u.region, rendered.reads[u.name], rendered.default_database))
    return out


def apply(backend: Backend, rendered: Rendered, database: str) -> list[str]:
    """Run the rendered SQL as an administrator; returns what was done (for the CLI to print).

    On 18.16 a mart table is backfilled only when this run created it (re-running ``apply`` must
    not copy the rows twice), and views are copied with their database name switched to the mart.
    """
    done: list[str] = []
    existing = {(str(r[0]), str(r[1])) for r in backend.query("SELECT database, name FROM system.tables").rows}
    created: set[str] = set()
    for stmt in rendered.sql:
        if stmt.startswith("-- copy-aggregate "):
            src, dst = stmt[len("-- copy-aggregate "):].split(" -> ")
            done.extend(_copy_aggregate(backend, database, src, dst, existing))
            continue
        if stmt.startswith("-- copy-view "):
            src, dst = stmt[len("-- copy-view "):].split(" -> ")
            ddl = str(backend.query(f"SHOW CREATE TABLE {src}").scalar())
            mart = dst.split(".")[0]
            ddl = ddl.replace(f"{src}", dst, 1).replace(f"{database}.", f"{mart}.")
            verb = "copied"
            if tuple(dst.split(".")) in existing:  # a migration may have re-created the view since
                current = str(backend.query(f"SHOW CREATE TABLE {dst}").scalar())
                if " ".join(current.split()) == " ".join(ddl.split()):
                    continue
                backend.execute(f"DROP TABLE {dst}")  # a view holds no data
                verb = "refreshed"
            backend.execute(re.sub(r"^CREATE VIEW", "CREATE VIEW IF NOT EXISTS", ddl))
            done.append(f"{verb} view {src} -> {dst}")
            continue
        if stmt.startswith("-- backfill-if-new "):
            target = stmt.split("\n", 1)[0][len("-- backfill-if-new "):]
            if target not in created:
                continue
            backend.execute(stmt.split("\n", 1)[1])
            done.append(f"backfilled {target}")
            continue
        m = re.match(r"CREATE TABLE IF NOT EXISTS (\w+)\.(\w+) ", stmt)
        if m and (m.group(1), m.group(2)) not in existing:
            created.add(f"{m.group(1)}.{m.group(2)}")
        backend.execute(stmt)
        done.append(stmt.split(" AS SELECT")[0][:160])
    return done


def _copy_aggregate(backend: Backend, database: str, src: str, dst: str, existing: set[tuple[str, str]]) -> list[str]:
    """A mart copy of an aggregate table (18.16), backfilled once, and a copy of every view feeding it,
    re-targeted at the copy (they read the staging tables, as the mart's other views do)."""
    done = []
    mart = dst.split(".")[0]
    if tuple(dst.split(".")) not in existing:
        ddl = str(backend.query(f"SHOW CREATE TABLE {src}").scalar())
        backend.execute(re.sub(r"^CREATE TABLE \S+", f"CREATE TABLE IF NOT EXISTS {dst}", ddl))
        backend.execute(f"INSERT INTO {dst} SELECT * FROM {src}")
        done.append(f"copied aggregate {src} -> {dst} (backfilled)")
    feeders = backend.query(
        f"SELECT name, create_table_query FROM system.tables WHERE database = {literal(database)} "
        f"AND engine = 'MaterializedView' AND position(create_table_query, {literal(f' TO {src} ')}) > 0").rows
    for name, query in feeders:
        copy = f"{database}.{name}_{mart}"
        if (database, f"{name}_{mart}") in existing:
            continue
        ddl = str(query).replace(f"CREATE MATERIALIZED VIEW {database}.{name} ",
                                 f"CREATE MATERIALIZED VIEW IF NOT EXISTS {copy} ", 1)
        backend.execute(ddl.replace(f" TO {src} ", f" TO {dst} ", 1))
        done.append(f"view {copy} feeds {dst}")
    return done
