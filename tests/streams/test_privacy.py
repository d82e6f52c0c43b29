"""Pseudonymization tokens, key loading and sealed payloads (streams.privacy)."""

from __future__ import annotations

import hashlib
import os
import re
import stat
from pathlib import Path

import pytest

from streams.privacy import PrivacyError, Pseudonymizer, Sealer, load_key

KEY = bytes.fromhex("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff")
OTHER_KEY = bytes.fromhex("ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100")

# realistic identifiers: a person number, an ID-card number, a phone number, a name
CLEAR = ["31000007922213101851", "310115195106147592", "13504810906", "袁志强", "11010519491231002X"]


# --- tokens --------------------------------------------------------------------------------------


def test_token_is_deterministic_for_key_value_and_domain() -> None:
    a, b = Pseudonymizer(KEY, "k1"), Pseudonymizer(KEY, "k1")
    for v in CLEAR:
        assert a.token(v) == a.token(v) == b.token(v)
        assert a.token(v, "rptr") == b.token(v, "rptr")
    assert a.tokens(CLEAR) == [b.token(v) for v in CLEAR]


def test_token_differs_across_values_domains_and_keys() -> None:
    p, q = Pseudonymizer(KEY, "k1"), Pseudonymizer(OTHER_KEY, "k1")
    psn = {p.token(v, "psn") for v in CLEAR}
    rptr = {p.token(v, "rptr") for v in CLEAR}
    other = {q.token(v, "psn") for v in CLEAR}
    assert len(psn) == len(rptr) == len(other) == len(CLEAR)
    assert not psn & rptr
    assert not psn & other


def test_token_default_domain_is_psn() -> None:
    p = Pseudonymizer(KEY, "k1")
    assert p.token(CLEAR[0]) == p.token(CLEAR[0], "psn")


def test_token_carries_the_key_id() -> None:
    for kid in ("k1", "k2", "prod-2026_a"):
        tok = Pseudonymizer(KEY, kid).token(CLEAR[0])
        assert tok.startswith(kid + ".")
        assert re.fullmatch(r"[a-z2-7]+", tok[len(kid) + 1 :])  # lower-case base32 body
    # the same key under another id gives another token (tokens of different key ids never collide)
    assert Pseudonymizer(KEY, "k1").token(CLEAR[0]) != Pseudonymizer(KEY, "k2").token(CLEAR[0])


def test_token_never_contains_the_clear_value() -> None:
    p = Pseudonymizer(KEY, "k1")
    for v in CLEAR:
        for domain in ("psn", "rptr"):
            tok = p.token(v, domain)
            assert v not in tok
            assert v.lower() not in tok
            assert v[-6:] not in tok  # not even a tail of an ID number


@pytest.mark.parametrize("empty", ["", None])
def test_token_of_empty_input_is_empty(empty: str | None) -> None:
    assert Pseudonymizer(KEY, "k1").token(empty) == ""
    assert Pseudonymizer(KEY, "k1").token(empty, "rptr") == ""


def test_cache_eviction_keeps_tokens_identical() -> None:
    reference = Pseudonymizer(KEY, "k1", cache_size=1_000_000)
    tiny = Pseudonymizer(KEY, "k1", cache_size=2)
    values = [f"3100000792221310{i:04d}" for i in range(50)]
    expected = {(v, d): reference.token(v, d) for v in values for d in ("psn", "rptr")}
    for _ in range(3):  # repeated passes: every value is evicted and recomputed
        for v in values:
            for d in ("psn", "rptr"):
                assert tiny.token(v, d) == expected[(v, d)]


def test_short_key_is_refused_by_pseudonymizer() -> None:
    with pytest.raises(PrivacyError):
        Pseudonymizer(b"x" * 15, "k1")
    Pseudonymizer(b"x" * 16, "k1")


# --- load_key ------------------------------------------------------------------------------------

HEX_A = "aa" * 32
HEX_B = "bb" * 32
HEX_C = "cc" * 32


def _write(path: Path, text: str) -> Path:
    path.write_text(text + "\n", encoding="utf-8")
    return path


def test_explicit_key_wins(tmp_path: Path) -> None:
    key_file = _write(tmp_path / "key", HEX_B)
    _write(tmp_path / "pseudo.key", HEX_C)
    assert load_key(HEX_A, key_file, tmp_path, create=True) == bytes.fromhex(HEX_A)


def test_key_file_beats_generated_file(tmp_path: Path) -> None:
    key_file = _write(tmp_path / "key", HEX_B)
    _write(tmp_path / "pseudo.key", HEX_C)
    assert load_key(None, key_file, tmp_path, create=True) == bytes.fromhex(HEX_B)
    assert load_key("", key_file, tmp_path, create=False) == bytes.fromhex(HEX_B)


def test_existing_generated_file_is_used(tmp_path: Path) -> None:
    _write(tmp_path / "pseudo.key", HEX_C)
    assert load_key(None, None, tmp_path, create=False) == bytes.fromhex(HEX_C)
    assert load_key(None, None, tmp_path, create=True) == bytes.fromhex(HEX_C)
    assert (tmp_path / "pseudo.key").read_text(encoding="utf-8").strip() == HEX_C


def test_key_is_generated_once_with_mode_0600_and_reused(tmp_path: Path) -> None:
    data_dir = tmp_path / "not" / "yet" / "there"
    first = load_key(None, None, data_dir, create=True)
    path = data_dir / "pseudo.key"
    assert path.is_file()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert len(first) >= 32
    content = path.read_bytes()
    again = load_key(None, None, data_dir, create=True)
    assert again == first
    assert path.read_bytes() == content
    assert load_key(None, None, data_dir, create=False) == first
    # another data dir gets another key
    assert load_key(None, None, tmp_path / "other", create=True) != first


def test_missing_key_without_create_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(PrivacyError, match="YIBAO_PSEUDO_KEY_FILE"):
        load_key(None, None, tmp_path, create=False)
    assert not (tmp_path / "pseudo.key").exists()


@pytest.mark.parametrize("short", ["aa" * 15, "short", "0123456789abcde"])
def test_short_keys_are_refused(tmp_path: Path, short: str) -> None:
    with pytest.raises(PrivacyError):
        load_key(short, None, tmp_path, create=True)
    with pytest.raises(PrivacyError):
        load_key(None, _write(tmp_path / "key", short), tmp_path, create=True)
    with pytest.raises(PrivacyError):
        load_key(None, None, _write_dir(tmp_path / "dd", short), create=True)


def _write_dir(data_dir: Path, text: str) -> Path:
    data_dir.mkdir(exist_ok=True)
    _write(data_dir / "pseudo.key", text)
    return data_dir


def test_key_text_that_is_not_hex_is_used_as_utf8(tmp_path: Path) -> None:
    text = "a passphrase that is long enough"
    assert load_key(text, None, tmp_path, create=False) == text.encode("utf-8")
    assert load_key("aa" * 16, None, tmp_path, create=False) == b"\xaa" * 16


# --- Sealer --------------------------------------------------------------------------------------

PAYLOAD = "结算 psn_no=31000007922213101851 psn_cert_no=310115195106147592".encode()


def test_seal_round_trip() -> None:
    s = Sealer(KEY, "k1")
    for data in (PAYLOAD, b"", b"\x00" * 1000, bytes(range(256))):
        env = s.seal(data)
        assert s.open(env) == data
        assert Sealer(KEY, "k1").open(env) == data  # another instance with the same key


def test_sealed_payload_hides_the_clear_bytes() -> None:
    env = Sealer(KEY, "k1").seal(PAYLOAD)
    assert b"31000007922213101851" not in env
    assert b"310115195106147592" not in env
    assert env.startswith(Sealer.MAGIC)


def test_each_seal_uses_a_fresh_nonce() -> None:
    s = Sealer(KEY, "k1")
    envs = [s.seal(PAYLOAD) for _ in range(20)]
    assert len(set(envs)) == len(envs)
    n = len(b"k1")
    nonces = {e[5 + n : 17 + n] for e in envs}  # MAGIC | len | key id | 12-byte nonce | ct
    assert len(nonces) == len(envs)


def test_tampering_fails_with_privacy_error() -> None:
    s = Sealer(KEY, "k1")
    env = s.seal(PAYLOAD)
    for i in range(len(env)):
        bad = bytearray(env)
        bad[i] ^= 0x01
        with pytest.raises(PrivacyError):
            s.open(bytes(bad))
    with pytest.raises(PrivacyError):
        s.open(env + b"\x00")
    with pytest.raises(PrivacyError):
        s.open(env[:-1])
    with pytest.raises(PrivacyError):
        s.open(b"not sealed at all")


def test_truncated_envelope_fails_with_privacy_error() -> None:
    s = Sealer(KEY, "k1")
    env = s.seal(PAYLOAD)
    for n in range(len(env)):
        with pytest.raises(PrivacyError):
            s.open(env[:n])


def test_wrong_key_fails() -> None:
    env = Sealer(KEY, "k1").seal(PAYLOAD)
    with pytest.raises(PrivacyError):
        Sealer(OTHER_KEY, "k1").open(env)


def test_unknown_key_id_fails() -> None:
    env = Sealer(KEY, "k2").seal(PAYLOAD)
    with pytest.raises(PrivacyError, match="k2"):
        Sealer(KEY, "k1").open(env)


def test_old_key_still_opens_after_rotation() -> None:
    old = Sealer(KEY, "k1")
    env_old = old.seal(PAYLOAD)
    new = Sealer(OTHER_KEY, "k2", old_keys={"k1": KEY})
    assert new.open(env_old) == PAYLOAD
    env_new = new.seal(PAYLOAD)
    assert env_new[5:7] == b"k2"  # new payloads are sealed under the current key
    assert new.open(env_new) == PAYLOAD
    with pytest.raises(PrivacyError):
        old.open(env_new)
    # an old key registered under the wrong id does not open it
    with pytest.raises(PrivacyError):
        Sealer(OTHER_KEY, "k2", old_keys={"k1": OTHER_KEY}).open(env_old)


def test_digest_is_deterministic_and_keyed() -> None:
    a, b = Sealer(KEY, "k1"), Sealer(KEY, "k1")
    assert a.digest(PAYLOAD) == a.digest(PAYLOAD) == b.digest(PAYLOAD)
    assert a.digest(PAYLOAD) != a.digest(PAYLOAD + b"x")
    assert a.digest(PAYLOAD) != Sealer(OTHER_KEY, "k1").digest(PAYLOAD)
    assert a.digest(PAYLOAD) != hashlib.sha256(PAYLOAD).hexdigest()  # keyed, not a bare hash
    assert "31000007922213101851" not in a.digest(PAYLOAD)
    assert re.fullmatch(r"[0-9a-f]{64}", a.digest(b""))
    # after rotation the digest follows the current key
    rotated = Sealer(OTHER_KEY, "k2", old_keys={"k1": KEY})
    assert rotated.digest(PAYLOAD) == Sealer(OTHER_KEY, "k2").digest(PAYLOAD)
