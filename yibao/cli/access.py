"""`yibao access`: ClickHouse users, roles, column rights and regional readers from a roles file
(what the roles mean and how they are rendered: yibao.access)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from sinks.base import Backend

from ..access import EXAMPLE, AccessError, Catalog, Rendered, Roles, accounts, apply, load_roles, render
from ..settings import Settings
from .common import CliConsole, console, err, fail, guard, settings_from

# --- commands -----------------------------------------------------------------------------------
access_app = typer.Typer(help="ClickHouse users, roles, column rights and regional row filters from a roles file.",
                         no_args_is_help=True)
RolesOpt = Annotated[Path, typer.Option("--roles", help="Roles file (TOML); `yibao access example` prints one")]


def _who_reads_what(out: CliConsole, s: Settings, roles: Roles, rendered: Rendered) -> None:
    """Per user: the database(s) it reads and the clickhouse-client line that reaches them.

    On 18.16 a reader's data is in its own database, which the server cannot make its default:
    without this, `clickhouse-client -u bi` meets "Access denied" and nothing says where to look.
    """
    from rich.markup import escape

    server = s.ch_backend.value == "server"  # embedded chDB has no users to connect as
    out.print("who reads what" + (" (PASSWORD: that user's password):" if server else ":"), highlight=False)
    for a in accounts(roles, rendered):
        out.print(f"  {escape(a.describe())}", highlight=False)
        if server:
            out.print(f"    {escape(a.client_command(s.ch_host, s.ch_port, secure=s.ch_secure))}", highlight=False)
    if not rendered.default_database:
        out.print("  this server sets no default database per user: name it when connecting (-d, or the "
                  "database field of a BI tool's data source)", highlight=False)


def _prepare(roles_path: Path) -> tuple[Any, Roles, Backend, Rendered]:
    from sinks import connect

    s = settings_from()
    roles = load_roles(roles_path, s.ch_database)
    backend = connect(s.clickhouse())
    catalog = Catalog.read(backend, roles.database)
    if not catalog.tables:
        backend.close()
        raise AccessError(f"database {roles.database} has no tables: run `yibao migrate` first")
    return s, roles, backend, render(roles, catalog, backend.version())


@access_app.command("example")
def example_cmd() -> None:
    """Print an example roles file."""
    print(EXAMPLE, end="")


@access_app.command("render")
def render_cmd(
    roles_path: RolesOpt,
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="Write users.xml / access.sql here")] = None,
) -> None:
    """Print (or write) what `apply` would install: SQL, and on 18.16 the users.xml for users.d/; and,
    per user, which database it reads and how to connect (on stderr when the SQL goes to stdout)."""
    def run() -> None:
        try:
            s, roles, backend, rendered = _prepare(roles_path)
        except AccessError as exc:
            fail(str(exc))
        backend.close()
        sql = ";\n".join(rendered.sql) + ";\n"
        if out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            written = [out_dir / "access.sql"]
            written[0].write_text(sql, encoding="utf-8")
            if not rendered.modern:
                written.append(out_dir / "yibao-access-users.xml")
                written[1].write_text(rendered.users_document(), encoding="utf-8")
            console.print(f"wrote {', '.join(str(w) for w in written)}", highlight=False)
            _who_reads_what(console, s, roles, rendered)
            return
        print(sql, end="")
        if not rendered.modern:
            print(rendered.users_document(), end="")
        sys.stdout.flush()
        _who_reads_what(err, s, roles, rendered)  # stdout is what to install: keep it so

    guard(run)


@access_app.command("apply")
def apply_cmd(
    roles_path: RolesOpt,
    users_d: Annotated[Path | None, typer.Option("--users-d", help="18.16: write the users file into this "
                                                 "users.d/ directory (the server reloads it)")] = None,
) -> None:
    """Create the users, rights and (18.16) reader databases on the configured server; then say, per
    user, which database it reads and how to connect."""
    def run() -> None:
        from rich.markup import escape

        try:
            s, roles, backend, rendered = _prepare(roles_path)
        except AccessError as exc:
            fail(str(exc))
        try:
            for line in apply(backend, rendered, roles.database):
                console.print(f"  {escape(line)}", highlight=False)
        finally:
            backend.close()
        if not rendered.modern:
            if users_d is not None:
                users_d.mkdir(parents=True, exist_ok=True)
                (users_d / "yibao-access.xml").write_text(rendered.users_document(), encoding="utf-8")
                console.print(f"wrote {users_d / 'yibao-access.xml'}")
            else:
                console.print("[yellow]18.16: users are defined in users.xml; pass --users-d "
                              "/etc/clickhouse-server/users.d (or install `yibao access render` output)[/yellow]")
        _who_reads_what(console, s, roles, rendered)

    guard(run)
