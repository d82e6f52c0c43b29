"""``yibao registry serve``: the manifest's schemas over Confluent's Schema Registry API.

For dev, demos and tests: tools that resolve the schema id in yibao's frames (confluent-kafka's
``AvroDeserializer``, Kafka Connect, kafka-ui, ClickHouse's ``AvroConfluent``) are pointed at it.
Production uses the shop's own registry. The interface is described in yibao/schema_registry.py.
"""

from __future__ import annotations

import errno
from typing import Annotated

import typer

from .common import console, fail, guard, settings_from

registry_app = typer.Typer(help="A Confluent-compatible Schema Registry API over the schema manifest.",
                           no_args_is_help=True)


@registry_app.command("serve")
def registry_serve(
    host: Annotated[str, typer.Option("--host", help="Address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (Confluent's is 8081; 0: any free port)")] = 8081,
    writable: Annotated[bool, typer.Option(
        "--writable", help="Accept registrations and mode changes (READWRITE/IMPORT), kept in memory and lost "
                           "on exit: for tests of registry clients")] = False,
    empty: Annotated[bool, typer.Option(
        "--empty", help="With --writable: start with no subjects, like a new registry")] = False,
) -> None:
    """Serve the manifest's subjects (<topic>-value) and ids, read-only, until Ctrl-C or SIGTERM."""

    def run() -> None:
        from ..schema_registry import SchemaStore, serve

        if empty and not writable:
            fail("--empty needs --writable", "a read-only registry serves the manifest's schemas")
        if not 0 <= port <= 65535:
            fail(f"--port {port}: must be 0 to 65535")
        s = settings_from()
        store = SchemaStore.from_manifest(topic_prefix=s.topic_prefix, writable=writable, empty=empty)
        n = len(store.subjects)
        what = "read-only" if not writable else "writable, in memory"

        def ready(url: str) -> None:
            console.print(f"schema registry ({what}, {n} subject{'' if n == 1 else 's'}) at {url}", highlight=False)
            console.file.flush()

        try:
            serve(store, host, port, ready)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                fail(f"cannot listen on {host}:{port}: the port is in use",
                     "stop what holds it, or choose another port with --port")
            fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
        console.print("schema registry stopped")

    guard(run)
