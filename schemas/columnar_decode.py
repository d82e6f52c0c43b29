"""Columnar decoding of Avro bodies in a killable helper process (polars-avro, i.e. Rust arrow-avro).

:class:`ArrowDecoder` turns the bodies of one record into the raw columnar frame of
:func:`schemas.columnar.raw_polars_schema` at a small fraction of :meth:`schemas.codec.Codec.decode`'s
cost, or answers ``None``, after which the caller decodes those messages the old way. ``None`` is
always safe; a frame is returned only when every body is one complete datum that fastavro decodes
to the same values.

Why a helper process: arrow-avro spins forever, inside Rust and beyond any interruption, on an
Object Container File block whose record count does not use up its bytes (a body with trailing
bytes). The parent gives every request a deadline and SIGKILLs the helper past it.

How soundness is obtained (arrow-avro 59 read and measured against fastavro 1.13):

* Each body is its own OCF block (count 1, its own size), so no record can borrow bytes from a
  neighbour: a short body is an EOF error, a long one the hang above, and an empty block yields no
  row, which the row count check catches.
* arrow-avro reads a ``[null, T]`` union tag as "null iff the varint is 0", so tags that fastavro
  rejects (index 2) or reads as null (index -2) would silently become values. The writer schema
  handed to arrow-avro therefore gives such unions a third, never-written branch: arrow-avro then
  uses its general union decoder, which rejects negative and out-of-range tags, and a body that
  picks the extra branch is refused here.
* arrow validates UTF-8 and checks ints against i32 and enum indices against the symbols (fastavro
  accepts negative enum and union indices Python-style; refusing those is merely slower).
* Decimals are read as ``decimal(38, 0)``, i.e. as their unscaled integer whatever the declared
  precision (fastavro ignores it too), and narrowed to Int64 only when exact.
* uuid/date/timestamp logical types are dropped from that schema (same encoding), so their strings
  and integers come out as fastavro returns them.

The wire protocol, both ways length-prefixed on the helper's stdin/stdout: a request is a header,
the record schema as JSON, the body lengths (native ``uint32``) and the bodies back to back; a reply
is a status byte, a length and a payload (an Arrow IPC stream, or an error message).
"""

from __future__ import annotations

import array
import contextlib
import itertools
import json
import os
import selectors
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    import polars as pl
    import pyarrow as pa

_REQUEST = struct.Struct("<4sIQQ")  # magic, schema JSON bytes, body count, body bytes
_REPLY = struct.Struct("<BQ")  # status, payload bytes
_MAGIC = b"YBC1"
_OK, _ERROR, _READY = 0, 1, 2
_SYNC = b"yibao-col-sync!!"
_NEVER = "YibaoNeverWritten"
#: Longest wait for a fresh helper to import its libraries and say it is ready.
STARTUP_TIMEOUT_S = 30.0
_WRITE_CHUNK = 1 << 20
_PIPE_BYTES = 1 << 20  # the unprivileged Linux maximum: fewer wake-ups per megabyte
_MAX_CACHED_SCHEMAS = 64


class _Failed(Exception):
    """This request cannot be answered; the decoder returns None."""


class _TimedOut(Exception):
    """The helper did not answer in time and was killed."""


class ArrowDecoder:
    """Decode many Avro bodies of one record into the raw columnar frame, or give up with ``None``.

    The helper process is started by the first :meth:`decode` and kept for the next ones. One that
    timed out is killed at once and a replacement started, which imports its libraries while the
    caller falls back; one that died is replaced by the following call. ``timeouts`` and
    ``failures`` count the calls that returned ``None`` for either reason; ``last_error`` says why
    the last failure happened, for logs. After a timeout the decoder rests: for ``cooldown_s`` every
    call answers None at once (``skipped``), the rest doubling with each timeout that follows one, up
    to ``max_cooldown_s``, and starting over after a frame. So a producer whose bodies carry
    trailing bytes (each one costs the whole deadline, the loop waiting on it) costs a deadline per
    rest, not one per batch; its messages are dead-lettered by the record path meanwhile. Calls are
    serialised. On Linux the helper is killed when
    the *thread* that started it ends (``PR_SET_PDEATHSIG``), so use the decoder from a long-lived
    thread; the helper also exits when the parent process is gone or closes its stdin.
    """

    def __init__(self, timeout_s: float = 1.0, timeout_per_mb_s: float = 0.1, cooldown_s: float = 30.0,
                 max_cooldown_s: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.timeout_per_mb_s = timeout_per_mb_s
        self.cooldown_s = cooldown_s
        self.max_cooldown_s = max_cooldown_s
        self.timeouts = 0
        self.failures = 0
        #: calls answered None at once, in the cool-down after a timeout
        self.skipped = 0
        self._clock = clock
        self._rest_until = 0.0
        self._next_rest = cooldown_s
        self.last_error: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready = False  # the helper said it has imported its libraries
        self._owner = os.getpid()
        self._lock = threading.Lock()
        self._schemas: dict[int, tuple[dict[str, Any], bytes, pl.Schema]] = {}

    def decode(self, record_schema: dict[str, Any], bodies: Sequence[bytes | memoryview]) -> pl.DataFrame | None:
        """The frame of ``bodies`` (Avro bodies of ``record_schema``), one row per body in order, or None."""
        import polars as pl

        with self._lock:
            if self._clock() < self._rest_until:
                self.skipped += 1
                return None
            try:
                schema_json, expected = self._schema(record_schema)
                if not bodies:
                    return pl.DataFrame(schema=expected)
                lengths = array.array("I", map(len, bodies))
                blob = b"".join(bodies)
                if sum(lengths) != len(blob):
                    raise _Failed("a body is not a flat byte buffer")
                header = _REQUEST.pack(_MAGIC, len(schema_json), len(bodies), len(blob))
                request = (header, schema_json, memoryview(lengths).cast("B"), blob)
                timeout = self.timeout_s + self.timeout_per_mb_s * sum(map(len, request)) / 1e6
                frame = _frame(self._call(request, timeout))
                if frame.height != len(bodies):
                    raise _Failed(f"{frame.height} rows for {len(bodies)} bodies")
                if frame.schema != expected:
                    raise _Failed(f"frame schema {frame.schema} is not {expected}")
                self._next_rest = self.cooldown_s
                return frame
            except _TimedOut:
                self.timeouts += 1
                self.last_error = "timed out: the helper was killed"
                self._rest_until = self._clock() + self._next_rest
                self._next_rest = min(self.max_cooldown_s, 2 * self._next_rest)
            except Exception as exc:
                self.failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"[:1000]
            return None

    def poll_ready(self) -> bool:
        """Whether a :meth:`decode` now would find a helper ready, never waiting: starts one if there
        is none. For a caller with another path, which would rather take it than wait the second or so
        a new helper takes to import its libraries (a worker that never sees a batch big enough never
        starts one)."""
        return self.wait_ready(0.0)

    def wait_ready(self, timeout_s: float = STARTUP_TIMEOUT_S) -> bool:
        """Start the helper if needed and wait until it is ready, or ``timeout_s`` has passed."""
        with self._lock:
            try:
                return self._await_ready(wait_s=timeout_s)
            except _Failed as exc:
                self.failures += 1
                self.last_error = str(exc)
                return False

    def _await_ready(self, wait_s: float) -> bool:
        """True once the helper said READY; False while it has not yet; _Failed if it died first."""
        if self._owner != os.getpid():  # a forked copy of the decoder: the helper is the original's
            self._proc, self._owner = None, os.getpid()
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._drop(kill=True)
            proc = self._spawn()
        if self._ready:
            return True
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            if not sel.select(wait_s):
                return False
        try:  # the helper's first reply is READY (or it died): readable means it has come
            status, _ = self._exchange(proc, (), time.monotonic() + STARTUP_TIMEOUT_S)
        except (_Failed, _TimedOut) as exc:
            raise _Failed(f"the helper did not start: {exc}") from None
        if status != _READY:
            self._drop(kill=True)
            raise _Failed("the helper did not start")
        self._ready = True
        return True

    def close(self) -> None:
        """End the helper: EOF on its stdin, SIGKILL if it has not gone within a second. Idempotent."""
        with self._lock:
            self._drop(kill=False, grace_s=1.0)

    def __enter__(self) -> ArrowDecoder:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The helper's process id while one runs."""
        return None if self._proc is None else self._proc.pid

    # --- parent side ------------------------------------------------------------------------------
    def _schema(self, record_schema: dict[str, Any]) -> tuple[bytes, pl.Schema]:
        from .columnar import raw_polars_schema

        hit = self._schemas.get(id(record_schema))
        if hit is not None and hit[0] is record_schema:
            return hit[1], hit[2]
        expected = raw_polars_schema(record_schema)
        text = json.dumps(record_schema, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        if len(self._schemas) >= _MAX_CACHED_SCHEMAS:
            self._schemas.clear()
        self._schemas[id(record_schema)] = (record_schema, text, expected)  # the reference keeps the id unique
        return text, expected

    def _call(self, request: tuple[bytes | memoryview, ...], timeout_s: float) -> memoryview:
        if not self._await_ready(wait_s=STARTUP_TIMEOUT_S):
            self._drop(kill=True)
            raise _Failed(f"the helper did not start within {STARTUP_TIMEOUT_S:.0f} s")
        proc = self._proc
        assert proc is not None
        try:
            status, payload = self._exchange(proc, request, time.monotonic() + timeout_s)
        except _TimedOut:
            with contextlib.suppress(OSError):  # the replacement starts while the caller falls back
                self._spawn()
            raise
        if status != _OK:
            raise _Failed(bytes(payload).decode("utf-8", "replace"))
        return payload

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "schemas.columnar_decode", str(os.getpid())],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, close_fds=True,
        )
        self._proc, self._ready = proc, False
        for pipe in (proc.stdin, proc.stdout):
            assert pipe is not None
            os.set_blocking(pipe.fileno(), False)
            with contextlib.suppress(OSError, AttributeError):  # Linux only
                import fcntl

                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
        return proc

    def _exchange(self, proc: subprocess.Popen[bytes], request: tuple[bytes | memoryview, ...],
                  deadline: float) -> tuple[int, memoryview]:
        """Write ``request`` and read one reply before ``deadline``, else kill the helper (_TimedOut).

        Any other way out (the helper died, an exception) also drops the helper, so that a half-sent
        request can never put the next one out of step.
        """
        assert proc.stdin is not None and proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout
        pending = [memoryview(part).cast("B") for part in request if len(part)]
        head = memoryview(bytearray(_REPLY.size))
        body: memoryview | None = None
        status, got = -1, 0
        try:
            with selectors.DefaultSelector() as sel:
                if pending:
                    sel.register(stdin, selectors.EVENT_WRITE)
                sel.register(stdout, selectors.EVENT_READ)
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise _TimedOut
                    for key, _ in sel.select(left):
                        if key.fileobj is stdin:
                            try:
                                sent = os.write(stdin.fileno(), pending[0][:_WRITE_CHUNK])
                            except BlockingIOError:
                                continue
                            except OSError as exc:
                                raise _Failed(f"the helper stopped reading: {exc}") from None
                            pending[0] = pending[0][sent:]
                            if not pending[0]:
                                pending.pop(0)
                                if not pending:
                                    sel.unregister(stdin)
                            continue
                        n = stdout.readinto(head[got:] if body is None else body[got:])  # type: ignore[attr-defined]
                        if n is None:
                            continue
                        if n == 0:
                            raise _Failed("the helper died")
                        got += n
                        if body is None and got == len(head):
                            status, size = _REPLY.unpack(head)
                            body, got = memoryview(bytearray(size)), 0
                        if body is not None and got == len(body):
                            if pending:
                                raise _Failed("the helper answered before reading the request")
                            return status, body
        except BaseException:
            self._drop(kill=True)
            raise

    def _drop(self, kill: bool, grace_s: float = 0.0) -> None:
        """Forget the helper: close its pipes, then reap it (SIGKILL first when ``kill`` or past grace)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                pipe.close()
        if not kill:
            try:
                proc.wait(timeout=grace_s)
                return
            except subprocess.TimeoutExpired:
                pass
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):  # else left to subprocess's own reaping
            proc.wait(timeout=10.0)


def _frame(payload: memoryview) -> pl.DataFrame:
    import polars as pl
    import pyarrow as pa

    table = pa.ipc.open_stream(pa.py_buffer(payload)).read_all()
    frame = pl.from_arrow(table, rechunk=False)
    if not isinstance(frame, pl.DataFrame):
        raise _Failed("the helper's reply is not a table")
    return frame


# --- helper side ----------------------------------------------------------------------------------

def _writer_schema(schema: Any, never: Iterator[int]) -> Any:
    """The schema handed to arrow-avro: the same binary encoding, arranged for a sound decode.

    Docs and defaults go (nothing is resolved); logical types other than decimal go; decimals become
    ``decimal(38, 0)``; each ``[null, T]`` union gets a never-written third branch (module docstring).
    """
    if isinstance(schema, list):
        out = [_writer_schema(s, never) for s in schema]
        if len(schema) == 2 and "null" in schema:
            out.append({"type": "fixed", "name": f"{_NEVER}{next(never)}", "size": 1})
        return out
    if not isinstance(schema, dict):
        return schema
    t = schema["type"]
    if isinstance(t, dict | list):
        return _writer_schema(t, never)
    if t == "record":
        fields = [{"name": f["name"], "type": _writer_schema(f["type"], never)} for f in schema["fields"]]
        return {**{k: schema[k] for k in ("type", "name", "namespace") if k in schema}, "fields": fields}
    if t in ("enum", "fixed"):
        return {k: schema[k] for k in ("type", "name", "namespace", "symbols", "size") if k in schema}
    if t == "array":
        return {"type": "array", "items": _writer_schema(schema["items"], never)}
    if t == "map":
        return {"type": "map", "values": _writer_schema(schema["values"], never)}
    if t == "bytes" and schema.get("logicalType") == "decimal":
        return {"type": "bytes", "logicalType": "decimal", "precision": 38, "scale": 0}
    return t


def _varint(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _ocf_header(writer_schema: Any) -> bytes:
    meta = {b"avro.schema": json.dumps(writer_schema, separators=(",", ":")).encode("utf-8"), b"avro.codec": b"null"}
    parts = [b"Obj\x01", _varint(len(meta))]
    for k, v in meta.items():
        parts += [_varint(len(k)), k, _varint(len(v)), v]
    parts += [b"\x00", _SYNC]
    return b"".join(parts)


class _Helper:
    """One request in the helper: bodies → in-memory OCF → polars-avro → raw columns → Arrow IPC."""

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.prefixes = [b"\x02" + _varint(n) for n in range(1 << 14)]  # block count 1, then the size

    def ocf(self, schema_json: bytes, lengths: Sequence[int], blob: memoryview) -> bytes:
        header = self.headers.get(schema_json)
        if header is None:
            header = _ocf_header(_writer_schema(json.loads(schema_json), itertools.count(1)))
            if len(self.headers) >= _MAX_CACHED_SCHEMAS:
                self.headers.clear()
            self.headers[schema_json] = header
        parts: list[bytes | memoryview] = [header]
        prefixes, short = self.prefixes, len(self.prefixes)
        pos = 0
        for n in lengths:
            parts += (prefixes[n] if n < short else b"\x02" + _varint(n), blob[pos:pos + n], _SYNC)
            pos += n
        return b"".join(parts)

    def decode(self, schema_json: bytes, lengths: Sequence[int], blob: memoryview) -> pa.Buffer:
        import io

        import pyarrow as pa
        from polars_avro._avro_rs import AvroSource

        source = _Source(io.BytesIO(self.ocf(schema_json, lengths, blob)))
        reader = AvroSource([lambda: source], False, False)
        batches = [pa.record_batch(b) for b in reader.batch_iter(max(1, len(lengths)), None)]
        raw = [pa.record_batch([_raw(c) for c in b.columns], names=b.schema.names) for b in batches]
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, raw[0].schema if raw else pa.schema([])) as out:
            for batch in raw:
                out.write_batch(batch)
        buf: pa.Buffer = sink.getvalue()
        return buf


class _Source:
    """The re-enterable context manager polars-avro wants around a buffer (it never closes it)."""

    def __init__(self, buf: BinaryIO) -> None:
        self.buf = buf

    def __enter__(self) -> BinaryIO:
        self.buf.seek(0)
        return self.buf

    def __exit__(self, *exc: object) -> None:
        return None


def _raw(arr: pa.Array) -> pa.Array:
    """arrow-avro's column in the raw representation; ValueError where fastavro's values would differ."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    t = arr.type
    if pa.types.is_union(t):
        return _union(arr)
    if pa.types.is_decimal(t):
        width = t.byte_width // 8
        if width == 0 or arr.null_count:
            raise ValueError(f"unexpected decimal column {t} with {arr.null_count} nulls")
        words = np.frombuffer(arr.buffers()[1], dtype="<i8", count=(arr.offset + len(arr)) * width)
        words = words[arr.offset * width:].reshape(len(arr), width)
        low = np.ascontiguousarray(words[:, 0])
        if width > 1 and not (words[:, 1:] == (low >> 63)[:, None]).all():
            raise ValueError("a decimal's unscaled value does not fit Int64")
        return pa.Array.from_buffers(pa.int64(), len(arr), [None, pa.py_buffer(low)])
    if pa.types.is_dictionary(t):
        return pc.cast(arr.dictionary_decode(), pa.string())
    if pa.types.is_struct(t):
        children = [_raw(arr.field(i)) for i in range(t.num_fields)]
        fields = [pa.field(t.field(i).name, c.type) for i, c in enumerate(children)]
        return pa.StructArray.from_arrays(children, fields=fields, mask=_mask(arr))
    if pa.types.is_list(t):
        return pa.ListArray.from_arrays(arr.offsets, _raw(arr.values), mask=_mask(arr))
    if pa.types.is_fixed_size_binary(t) or pa.types.is_binary(t):
        raise ValueError(f"unexpected column type {t}")
    return arr


def _mask(arr: pa.Array) -> pa.Array | None:
    import pyarrow.compute as pc

    return pc.is_null(arr) if arr.null_count else None


def _union(arr: pa.Array) -> pa.Array:
    """A ``[null, T, never]`` dense union as a nullable ``T``; a body that chose ``never`` is refused."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = arr.type
    nulls = [i for i in range(t.num_fields) if pa.types.is_null(t.field(i).type)]
    if t.mode != "dense" or t.num_fields != 3 or nulls not in ([0], [1]) or _NEVER not in t.field(2).name:
        raise ValueError(f"unexpected union {t}")
    null_at, value_at = nulls[0], 1 - nulls[0]
    type_ids = arr.type_codes.to_numpy(zero_copy_only=True)
    is_value = type_ids == t.type_codes[value_at]
    if not (is_value | (type_ids == t.type_codes[null_at])).all():
        raise ValueError("a union branch index that fastavro rejects")
    indices = pc.if_else(pa.array(is_value), arr.offsets, pa.scalar(None, pa.int32()))
    return pc.take(_raw(arr.field(value_at)), indices)


def _read_exact(stream: BinaryIO, n: int) -> bytes | None:
    data = stream.read(n)
    return data if len(data) == n else None


def _watch_parent(parent: int) -> None:
    """Exit when the parent is gone, even while the main thread is stuck inside arrow-avro."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, 9)  # PR_SET_PDEATHSIG = SIGKILL: the kernel's guarantee (Linux)
    if os.getppid() != parent:
        os._exit(0)

    def watch() -> None:  # for where prctl is missing: arrow-avro releases the GIL while it spins
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


_WARM_UP_SCHEMA = json.dumps({
    "type": "record", "name": "WarmUp", "fields": [
        {"name": "s", "type": "string"}, {"name": "l", "type": "long"}, {"name": "i", "type": "int"},
        {"name": "b", "type": "boolean"}, {"name": "n", "type": ["null", "string"]},
        {"name": "m", "type": {"type": "bytes", "logicalType": "decimal", "precision": 16, "scale": 2}},
        {"name": "a", "type": {"type": "array", "items": {
            "type": "record", "name": "Line", "fields": [{"name": "d", "type": "double"}]}}},
    ]}).encode()
# s="x", l=1, i=1, b=true, n=null, m=0.01, a=[{d: 1.0}]
_WARM_UP_BODY = b"\x02x\x02\x02\x01\x00\x02\x01\x02" + struct.pack("<d", 1.0) + b"\x00"


def _warm_up(helper: _Helper) -> None:
    """Decode one small record before saying ready: a new helper's first decode costs ~0.3 s of lazy
    set-up, which would otherwise count against the first request's deadline."""
    helper.decode(_WARM_UP_SCHEMA, [len(_WARM_UP_BODY)], memoryview(_WARM_UP_BODY))


def _serve(parent: int) -> None:
    """The helper's request loop, until EOF on stdin."""
    os.environ["POLARS_MAX_THREADS"] = "1"  # the helper's own setting, before polars is imported
    _watch_parent(parent)
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the replies
    requests = sys.stdin.buffer
    import numpy  # noqa: F401  (before saying ready: the first request is not charged for imports)
    import polars_avro  # noqa: F401
    import pyarrow
    import pyarrow.compute

    pyarrow.set_cpu_count(1)  # like POLARS_MAX_THREADS: the helper shares a few cores with its parent

    helper = _Helper()
    _warm_up(helper)

    def reply(status: int, payload: bytes | pa.Buffer) -> None:
        replies.write(_REPLY.pack(status, len(payload)))
        replies.write(payload)
        replies.flush()

    reply(_READY, b"")
    while True:
        head = _read_exact(requests, _REQUEST.size)
        if head is None:
            return
        magic, schema_len, count, size = _REQUEST.unpack(head)
        if magic != _MAGIC:
            return
        schema_json = _read_exact(requests, schema_len)
        raw_lengths = _read_exact(requests, 4 * count)
        blob = _read_exact(requests, size)
        if schema_json is None or raw_lengths is None or blob is None:
            return
        lengths = array.array("I")
        lengths.frombytes(raw_lengths)
        try:
            result = helper.decode(schema_json, lengths, memoryview(blob))
        except Exception as exc:
            reply(_ERROR, f"{type(exc).__name__}: {exc}"[:1000].encode("utf-8", "replace"))
        else:
            reply(_OK, result)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
