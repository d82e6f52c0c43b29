"""Keyed-HMAC pseudonymization of personal identifiers before anything leaves the worker.

Health data is sensitive personal information (PIPL art. 28). The person number, ID-card number,
names, phone numbers and a tip reporter's identity are replaced by tokens
``<key_id>.<base32 of HMAC-SHA256(key, domain || 0x00 || value)[:15]>``. The same value under the
same key always gives the same token, so joins and per-person detectors still work; without the key
a token cannot be reversed or even confirmed by hashing candidate IDs (that is why it is keyed, not
a bare hash: ID numbers have little entropy). The key id travels in the token so a key can be
rotated: tokens made under different keys never collide and the runbook says how to re-key.
Domains ("psn", "rptr") keep a person's token distinct from the same person's token as a reporter.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from structlog import get_logger

log = get_logger(__name__)
_MIN_KEY_BYTES = 16


#: A personal identifier inside free text (an exception message, a log line): a run of 15 or more
#: digits, or 14 and an ID number's check character X, wherever it stands, even glued to letters
#: (resident ID numbers, old and new; person numbers are long digit strings); and a mainland
#: mobile number (optionally +86, spaced or dashed), unless it is the tail of a code
#: ("H13010200011" is a hospital, not a phone).
IDENTIFIER_IN_TEXT = re.compile(
    r"\d{14,}[\dXx]"
    r"|(?<![0-9A-Za-z])(?:\+?86[-\s]?)?1[3-9]\d(?:[-\s]?\d{4}){2}(?!\d)"
)
#: A cheap first look: text without 11 digits in a row (spaces and dashes allowed) has none.
_IDENTIFIER_HINT = re.compile(r"\d[\d\s-]{9,}[\dXx]")
REDACTED = "[redacted]"


def scrub(text: str) -> str:
    """``text`` with every identifier-shaped run replaced: for messages made from data the code
    does not control (exception texts, log lines), which may quote a value of a personal field."""
    if _IDENTIFIER_HINT.search(text) is None:
        return text
    return IDENTIFIER_IN_TEXT.sub(REDACTED, text)


#: Exceptions whose message the interpreter builds from names in the code (a missing key, a
#: wrong type, an absent attribute), not from the values being processed.
_MESSAGE_FROM_CODE = (KeyError, TypeError, AttributeError, IndexError, ZeroDivisionError)


def safe_error(exc: BaseException) -> str:
    """One line naming an exception for logs and dead letters, made so that it cannot quote the
    data being processed: a ``ValueError`` from ``int(psn_name)`` would quote a name, which no
    pattern can recognise. So the message is kept only when the interpreter builds it from the
    code's own names (and is scrubbed even then); otherwise the line says where it was raised.
    """
    name = type(exc).__name__
    if isinstance(exc, _MESSAGE_FROM_CODE):
        return f"{name}: {scrub(str(exc))[:300]}"
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return name
    code = tb.tb_frame.f_code
    return f"{name} raised in {code.co_name} ({Path(code.co_filename).name}:{tb.tb_lineno})"


class PrivacyError(RuntimeError):
    """No usable pseudonymization key."""


class Pseudonymizer:
    """Deterministic tokens for identifiers; memoized because persons settle again and again."""

    def __init__(self, key: bytes, key_id: str, cache_size: int = 500_000) -> None:
        if len(key) < _MIN_KEY_BYTES:
            raise PrivacyError(f"pseudonymization key must be at least {_MIN_KEY_BYTES} bytes")
        self.key_id = key_id
        self._key = key
        self._cache: dict[tuple[str, str], str] = {}
        self._cache_size = cache_size

    def token(self, value: str | None, domain: str = "psn") -> str:
        """Token for ``value`` in ``domain``; '' for empty input (nothing to protect)."""
        if not value:
            return ""
        k = (domain, value)
        tok = self._cache.get(k)
        if tok is None:
            mac = hmac.new(self._key, domain.encode() + b"\x00" + value.encode("utf-8"), hashlib.sha256)
            tok = f"{self.key_id}.{base64.b32encode(mac.digest()[:15]).decode('ascii').lower()}"
            if len(self._cache) >= self._cache_size:
                self._cache.clear()
            self._cache[k] = tok
        return tok

    def tokens(self, values: list[str], domain: str = "psn") -> list[str]:
        tok = self.token
        return [tok(v, domain) for v in values]


def load_key(key: str | None, key_file: Path | None, data_dir: Path, *, create: bool) -> bytes:
    """The configured key; or, for a local/dev setup only, one generated once under ``data_dir``.

    Several workers must share one key (tokens must agree), so production sets
    ``YIBAO_PSEUDO_KEY_FILE`` from a secret; the generated key is for the embedded demo.
    """
    if key:
        return _decode_key(key)
    if key_file is not None:
        return _decode_key(key_file.read_text(encoding="utf-8").strip())
    path = data_dir / "pseudo.key"
    if path.exists():
        return _decode_key(path.read_text(encoding="utf-8").strip())
    if not create:
        raise PrivacyError(
            "no pseudonymization key: set YIBAO_PSEUDO_KEY_FILE (a file holding at least 32 random "
            "bytes as hex, e.g. `openssl rand -hex 32 > key`) or YIBAO_PSEUDO_KEY"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    log.warning("generated a local pseudonymization key; set YIBAO_PSEUDO_KEY_FILE in production", path=str(path))
    return _decode_key(path.read_text(encoding="utf-8").strip())


def load_old_keys(path: Path | None) -> dict[str, bytes]:
    """Retired keys by key id, from ``YIBAO_PSEUDO_OLD_KEYS_FILE`` (one ``key_id=hex`` per line).

    After a rotation the worker seals with the new key only, but dead letters sealed earlier carry
    the old key id in their envelope; ``yibao dlq show/replay`` open them with these. Blank lines
    and ``#`` comments are ignored; a malformed line is an error naming its line number (never
    its content: it holds a key).
    """
    if path is None:
        return {}
    keys: dict[str, bytes] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        kid, sep, value = line.partition("=")
        kid = kid.strip()
        if not sep or not kid or not kid.replace("-", "").replace("_", "").isalnum():
            raise PrivacyError(f"{path}:{n}: expected key_id=hex")
        try:
            keys[kid] = _decode_key(value.strip())
        except PrivacyError as exc:
            raise PrivacyError(f"{path}:{n}: {exc}") from None
    return keys


def _decode_key(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = text.encode("utf-8")
    if len(raw) < _MIN_KEY_BYTES:
        raise PrivacyError(f"pseudonymization key is shorter than {_MIN_KEY_BYTES} bytes")
    return raw


class Sealer:
    """AES-256-GCM sealing of payloads that must be kept whole but not readable (dead letters).

    A dead letter keeps the original bytes so it can be replayed after a fix, but those bytes hold
    clear identifiers; sealed, the topic and the table stay free of them. The sealing key is
    derived from the pseudonymization key with HKDF (distinct purpose, one secret to manage), and
    the key id is stored in the envelope so old dead letters stay readable across a rotation.
    Envelope: b"YBS1" | len(key_id) | key_id | 12-byte nonce | ciphertext+tag.
    """

    MAGIC = b"YBS1"

    def __init__(self, key: bytes, key_id: str, old_keys: dict[str, bytes] | None = None) -> None:
        self.key_id = key_id
        self._keys = {key_id: self._derive(key), **{k: self._derive(v) for k, v in (old_keys or {}).items()}}

    @staticmethod
    def _derive(key: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"yibao dead-letter seal v1").derive(key)

    def digest(self, data: bytes) -> str:
        """Keyed digest of a payload: recognizes the same bytes again without revealing them."""
        return hmac.new(self._keys[self.key_id], data, hashlib.sha256).hexdigest()

    def seal(self, data: bytes) -> bytes:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        nonce = secrets.token_bytes(12)
        kid = self.key_id.encode("ascii")
        ct = AESGCM(self._keys[self.key_id]).encrypt(nonce, data, self.MAGIC + kid)
        return self.MAGIC + bytes([len(kid)]) + kid + nonce + ct

    def open(self, envelope: bytes) -> bytes:
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if not envelope.startswith(self.MAGIC) or len(envelope) < 6:
            raise PrivacyError("not a sealed payload")
        n = envelope[4]
        kid = envelope[5 : 5 + n]
        key = self._keys.get(kid.decode("ascii", "replace"))
        if key is None:
            raise PrivacyError(f"payload sealed with unknown key id {kid.decode('ascii', 'replace')!r}")
        nonce, ct = envelope[5 + n : 17 + n], envelope[17 + n :]
        if len(nonce) != 12 or len(ct) < 16:
            raise PrivacyError("sealed payload is truncated")
        try:
            return AESGCM(key).decrypt(nonce, ct, self.MAGIC + kid)
        except (InvalidTag, ValueError):
            raise PrivacyError("sealed payload failed authentication (corrupt or wrong key)") from None
