"""An operator's day: contracts, settings, monitors, and dead letters replayed after a fix."""

from __future__ import annotations

import json
import re

import pytest

from .conftest import ROOT, User, assert_clear_error, ok, produced, running_worker


def test_schemas_check_register_show(user: User) -> None:
    res = ok(user.run("yibao schemas check"))
    assert re.search(r"\d+ subjects registered, no drift", res.out), res
    registry = json.loads((ROOT / "schemas" / "registry.json").read_text())
    res = ok(user.run("yibao schemas register"))
    assert "registered" not in res.out.replace("unchanged", ""), res  # nothing changed, nothing registered
    assert res.out.count("unchanged") >= 3, res
    assert json.loads((ROOT / "schemas" / "registry.json").read_text()) == registry
    res = ok(user.run("yibao schemas show"))
    for subject in ("settlement", "procurement", "supervision"):
        assert subject in res.out, res
    shown = ok(user.run("yibao schemas show settlement")).json()
    by_id = ok(user.run(f"yibao schemas show --id {_latest_id(registry, 'settlement')}")).json()
    assert shown == by_id
    assert_clear_error(user.run("yibao schemas show --id 999999"), "999999")


def _latest_id(registry: object, subject: str) -> int:
    """The newest schema id of ``subject`` in the committed manifest, whatever its layout."""
    ids: list[int] = []

    def walk(x: object, inside: bool) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "id" and inside and isinstance(v, int):
                    ids.append(v)
                walk(v, inside or k == subject)
        elif isinstance(x, list):
            for v in x:
                walk(v, inside)

    walk(registry, False)
    assert ids, f"no id under {subject!r} in schemas/registry.json"
    return max(ids)


def test_config_show_names_every_setting_and_hides_secrets(user: User) -> None:
    res = ok(user.run("yibao config show",
                      env={"YIBAO_CH_PASSWORD": "s3cret-pw", "YIBAO_KAFKA_BOOTSTRAP": "kafka-1:9093"}))
    assert "s3cret-pw" not in res.out + res.err
    assert "kafka-1:9093" in res.out
    for var in ("YIBAO_KAFKA_BOOTSTRAP", "YIBAO_CH_BACKEND", "YIBAO_DEDUP_HORIZON_DAYS", "YIBAO_ALLOWED_LATENESS_DAYS"):
        assert var in res.out, f"{var} missing or cut in piped output\n{res}"
    assert_clear_error(user.run("yibao config show", env={"YIBAO_CH_PORT": "not-a-port"}), "YIBAO_CH_PORT")


def test_monitors_run_again_changes_nothing(landed: User) -> None:
    """The landed run already ran the monitors once; a rerun finds the same and emits nothing."""
    res = ok(landed.run("yibao monitors run --no-publish --json", timeout=300))
    out = res.json()
    assert out["findings"], out
    assert not any(out["emitted"].values()), f"a rerun emitted alerts again: {out['emitted']}"
    assert_clear_error(landed.run("yibao monitors run --as-of 2026 --no-publish"), "--as-of")


@pytest.mark.slow
def test_dead_letters_replayed_after_a_fix(operator: User) -> None:
    """A worker configured to refuse resident insurance (390) dead-letters those settlements; the
    operator fixes the setting and replays them; they land once, and a second replay lands nothing."""
    u = operator
    ok(u.run("yibao migrate", timeout=300))
    events = u.cwd / "events.jsonl"
    ok(u.run(f"yibao simulate --events 300 --days 3 --out {events}", timeout=300))
    residents = sum(1 for line in events.read_text().splitlines()
                    if json.loads(line).get("event_type") == "Settlement"
                    and json.loads(line).get("insutype") == "390")
    assert residents > 0
    with running_worker(u, u.cwd / "worker1.log", YIBAO_KNOWN_INSUTYPES='["310"]') as w:
        n = produced(ok(u.run(f"yibao replay {events}", timeout=300)))
        w.wait_accounted(n)
    refused = ok(u.run('yibao query --format json "SELECT count() AS n FROM dead_letters '
                       "WHERE reason_code = 'UNKNOWN_CODE_VALUE'\"")).json_lines()[0]["n"]
    assert int(refused) >= residents, refused
    res = ok(u.run("yibao dlq replay --reason UNKNOWN_CODE_VALUE --dry-run"))
    assert re.search(rf"would replay {refused}\b", res.out), res
    res = ok(u.run("yibao dlq replay --reason UNKNOWN_CODE_VALUE", timeout=120))
    assert re.search(rf"replayed {refused}\b", res.out), res
    with running_worker(u, u.cwd / "worker2.log") as w:
        w.wait_accounted(int(refused))
    rows = ok(u.run('yibao query --format json "SELECT count() AS n FROM settlements '
                    "WHERE insutype = '390' AND refd_setl_flag = 0\"")).json_lines()[0]["n"]
    assert int(rows) == residents
    res = ok(u.run("yibao dlq replay --reason UNKNOWN_CODE_VALUE", timeout=120))
    assert re.search(r"replayed 0\b", res.out) and re.search(rf"skipped {refused}\b", res.out), res
