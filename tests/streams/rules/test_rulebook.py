"""The rule base as data: the rules file and knowledge CSVs fail loudly and precisely; RuleBook updates."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tomllib
from pathlib import Path

import pytest

from streams.rules import (
    KINDS,
    RULES_FILE,
    KnowledgeError,
    RuleBook,
    RuleError,
    check_rule,
    load_knowledge,
    load_rules_file,
)
from streams.rules.knowledge import DATA
from streams.rules.model import Rule

SEED = RULES_FILE.read_text(encoding="utf-8")
ROOT = Path(__file__).resolve().parents[3]


def line_of(text: str, needle: str, after: int = 0) -> int:
    """1-based line of the first line at or after line ``after`` containing ``needle``."""
    for i, ln in enumerate(text.splitlines(), 1):
        if i >= after and needle in ln:
            return i
    raise AssertionError(f"{needle!r} not found")


def rule_start(text: str, rule_id: str) -> int:
    """The line of the ``[[rule]]`` header of ``rule_id``."""
    id_line = line_of(text, f'id = "{rule_id}"')
    return max(i for i, ln in enumerate(text.splitlines(), 1) if i < id_line and ln.startswith("[[rule]]"))


def load_edited(tmp_path: Path, old: str, new: str) -> tuple[Path, str, RuleError]:
    assert SEED.count(old) >= 1, old
    text = SEED.replace(old, new, 1)
    path = tmp_path / "rules.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RuleError) as info:
        load_rules_file(path, check_rule)
    return path, text, info.value


# --- the seed file ---------------------------------------------------------------------------------

def test_seed_rules_load_and_pass_their_kind_checks() -> None:
    rules = load_rules_file(RULES_FILE, check_rule)
    assert len(rules) == 25  # 17 settlement-stream rules, 4 procurement-stream rules, 4 ClickHouse monitors
    assert len({r.id for r in rules}) == 25
    assert all(r.enabled and r.version == 1 and r.kind in KINDS for r in rules)
    assert {r.id for r in rules if r.kind in ("drg_upcoding", "high_cost")} == {"YB-HOSP-UPCODE", "YB-HOSP-HIGHCOST"}


def test_rule_round_trips_through_its_topic_representation() -> None:
    for rule in load_rules_file(RULES_FILE, check_rule):
        assert Rule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule


# --- a malformed rules file: <file>:<line>: <rule>: <field> -----------------------------------------

def test_missing_field_names_the_field_at_the_rules_line(tmp_path: Path) -> None:
    path, text, err = load_edited(tmp_path, 'kind = "distinct_institutions"\n', "")
    assert str(err) == f"{path}:{rule_start(text, 'YB-PSN-SHOP-1D')}: YB-PSN-SHOP-1D: missing field 'kind'"


def test_unknown_kind(tmp_path: Path) -> None:
    path, text, err = load_edited(tmp_path, 'kind = "distinct_institutions"\n', 'kind = "nope"\n')
    start = rule_start(text, "YB-PSN-SHOP-1D")
    lines = (start, line_of(text, 'kind = "nope"'))
    assert any(str(err).startswith(f"{path}:{n}: YB-PSN-SHOP-1D: unknown kind 'nope'") for n in lines), str(err)
    assert "distinct_institutions_class" in str(err)  # the known kinds are listed


@pytest.mark.parametrize("value", ['"3"', "true", "3.0"])
def test_wrong_parameter_type(tmp_path: Path, value: str) -> None:
    path, text, err = load_edited(tmp_path, "params = { min_institutions = 3 }",
                                  f"params = {{ min_institutions = {value} }}")
    start = rule_start(text, "YB-PSN-SHOP-1D")
    lines = (start, line_of(text, f"min_institutions = {value}"))
    assert any(str(err) == f"{path}:{n}: YB-PSN-SHOP-1D: parameter min_institutions must be int" for n in lines)


def test_wrong_parameter_type_in_a_params_table_points_at_its_line(tmp_path: Path) -> None:
    text = (
        '[[rule]]\nid = "T-1"\nname_zh = "测试"\nname_en = "test"\nversion = 1\nkind = "distinct_institutions"\n'
        'result_type = "SUSPICIOUS"\nseverity = "LOW"\nscope = "day"\nstage = "after"\nscenarios = ["outpatient"]\n'
        '\n[rule.params]\nmin_institutions = "many"\n'
    )
    path = tmp_path / "rules.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RuleError, match=rf"^{path}:14: T-1: parameter min_institutions must be int$"):
        load_rules_file(path, check_rule)


def test_missing_parameter(tmp_path: Path) -> None:
    path, text, err = load_edited(tmp_path, "params = { min_institutions = 3 }", "params = {}")
    line = line_of(text, "params = {}", after=rule_start(text, "YB-PSN-SHOP-1D"))  # the inline params table
    assert str(err) == f"{path}:{line}: YB-PSN-SHOP-1D: missing parameter 'min_institutions'"


def test_bad_restriction_value(tmp_path: Path) -> None:
    path, text, err = load_edited(tmp_path, 'params = { restriction = "sex" }', 'params = { restriction = "weight" }')
    line = line_of(text, 'params = { restriction = "weight" }')
    assert str(err).startswith(f"{path}:{line}:")
    assert "YB-LINE-SEX: parameter restriction must be sex, age, level or setting" in str(err)


def test_duplicate_id_points_at_the_second_definition(tmp_path: Path) -> None:
    path, text, err = load_edited(tmp_path, 'id = "YB-LINE-AGE"', 'id = "YB-LINE-SEX"')
    second = line_of(text, "[[rule]]", after=line_of(text, 'id = "YB-LINE-SEX"') + 1)
    assert str(err) == f"{path}:{second}: YB-LINE-SEX: defined twice"


@pytest.mark.parametrize(("old", "new"), [
    ('scenarios = ["outpatient", "pharmacy"]\nparams = { min_institutions = 3 }',
     'scenarios = ["moon"]\nparams = { min_institutions = 3 }'),
    ('scenarios = ["outpatient", "pharmacy"]\nparams = { min_institutions = 3 }',
     'scenarios = []\nparams = { min_institutions = 3 }'),
])
def test_bad_scenarios(tmp_path: Path, old: str, new: str) -> None:
    path, text, err = load_edited(tmp_path, old, new)
    line = line_of(text, new.splitlines()[0])
    assert str(err).startswith(f"{path}:{line}: YB-PSN-SHOP-1D: scenarios ")


def test_bad_enum_names_the_file_line_and_rule(tmp_path: Path) -> None:
    path, text, err = load_edited(tmp_path, 'severity = "HIGH"', 'severity = "EXTREME"')
    line = line_of(text, 'severity = "EXTREME"')
    assert str(err).startswith(f"{path}:{line}: YB-LINE-SEX: severity")
    assert "EXTREME" in str(err)


@pytest.mark.parametrize(("field", "old", "new"), [
    ("result_type", 'result_type = "DEFINITE"', 'result_type = "MAYBE"'),
    ("severity", 'severity = "HIGH"', 'severity = "EXTREME"'),
    ("scope", 'scope = "line"', 'scope = "week"'),
    ("stage", 'stage = "in-process"', 'stage = "during"'),
    ("version", "version = 1", 'version = "one"'),
])
def test_bad_value_names_the_field_at_its_line(tmp_path: Path, field: str, old: str, new: str) -> None:
    path, text, err = load_edited(tmp_path, old, new)
    assert str(err).startswith(f"{path}:{line_of(text, new)}: YB-LINE-SEX: {field}")


BROKEN = 'name_en "Doctor shopping: three'  # no '='


def test_bad_toml_uses_the_file_colon_line_form(tmp_path: Path) -> None:
    path, text, err = load_edited(tmp_path, 'name_en = "Doctor shopping: three', BROKEN)
    assert str(err).startswith(f"{path}:{line_of(text, BROKEN)}: ")


def test_no_rules_and_unreadable_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(RuleError, match=rf"^{empty}: no \[\[rule\]\] tables$"):
        load_rules_file(empty)
    with pytest.raises(RuleError, match=rf"^{tmp_path / 'missing.toml'}: cannot read"):
        load_rules_file(tmp_path / "missing.toml")


# --- RuleBook.apply: the rules topic --------------------------------------------------------------

def book() -> RuleBook:
    return RuleBook(load_rules_file(RULES_FILE, check_rule), check_rule)


def record(rule_id: str = "YB-PSN-SHOP-1D", **changes: object) -> bytes:
    rules = {r.id: r for r in load_rules_file(RULES_FILE, check_rule)}
    d = rules[rule_id].to_dict()
    d.update(changes)
    return json.dumps(d).encode()


def test_apply_replaces_the_rule_as_a_new_snapshot() -> None:
    b = book()
    before = b.current
    rule = b.apply(record(version=2, params={"min_institutions": 4}), b"YB-PSN-SHOP-1D")
    assert rule is not None and rule.version == 2
    assert b.current.by_id("YB-PSN-SHOP-1D") == rule
    assert before.by_id("YB-PSN-SHOP-1D").version == 1  # type: ignore[union-attr]  # old snapshot untouched
    assert [r.id for r in b.current.rules] == sorted(r.id for r in b.current.rules)
    assert (len(b.current.rules), b.applied) == (25, 1)


def test_apply_adds_a_new_rule_and_disables_one() -> None:
    b = book()
    assert b.apply(record(id="YB-PSN-SHOP-1D-STRICT", params={"min_institutions": 2}),
                   b"YB-PSN-SHOP-1D-STRICT") is not None
    assert b.apply(record(version=2, enabled=False), b"YB-PSN-SHOP-1D") is not None
    assert [r.id for r in b.current.enabled("distinct_institutions")] == ["YB-PSN-SHOP-1D-STRICT"]


@pytest.mark.parametrize(("payload", "key"), [
    (b"{not json", b"YB-PSN-SHOP-1D"),
    (record(), b"YB-PSN-SHOP-7D"),  # key and id differ
    (record(kind="nope"), b"YB-PSN-SHOP-1D"),
    (record(params={"min_institutions": "3"}), b"YB-PSN-SHOP-1D"),
    (record(severity="EXTREME"), b"YB-PSN-SHOP-1D"),
    (record(version=0), b"YB-PSN-SHOP-1D"),
    (record(), b"\xff"),
    (None, b"YB-PSN-SHOP-1D"),  # a tombstone
    (record(), None),
])
def test_apply_ignores_an_invalid_record(payload: bytes | None, key: bytes | None) -> None:
    b = book()
    before = b.current
    assert b.apply(payload, key) is None
    assert b.current is before and b.applied == 0


@pytest.mark.parametrize("payload", [
    b"[]", b"null", b'"YB-PSN-SHOP-1D"', record(version=None), record(scenarios=5), record(params=5),
])
def test_apply_ignores_a_record_of_the_wrong_json_shape(payload: bytes) -> None:
    b = book()
    assert b.apply(payload, b"YB-PSN-SHOP-1D") is None
    assert b.applied == 0


@pytest.mark.parametrize(("old", "new"), [
    ('version = 1\nkind = "over_price"', 'version = [1]\nkind = "over_price"'),
    ('scenarios = ["outpatient", "inpatient", "pharmacy"]\nparams = { tolerance_pm = 50 }',
     'scenarios = 3\nparams = { tolerance_pm = 50 }'),
])
def test_wrong_toml_type_is_a_rule_error(tmp_path: Path, old: str, new: str) -> None:
    path, text, err = load_edited(tmp_path, old, new)
    field = new.split(" =")[0]
    assert str(err).startswith(f"{path}:{line_of(text, new.splitlines()[0])}: YB-LINE-PRICE: {field}")


# --- knowledge CSVs: <file>:<line>: <field>: <what> --------------------------------------------------

def knowledge_with(tmp_path: Path, name: str, old: str, new: str) -> tuple[Path, int]:
    d = tmp_path / "knowledge"
    shutil.copytree(DATA / "knowledge", d)
    path = d / name
    text = path.read_text(encoding="utf-8")
    assert old in text, old
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    return path, line_of(text, old)


def test_seed_knowledge_loads() -> None:
    k = load_knowledge()
    assert k.repeat_intervals == {"002503010030000": 15, "002503010040000": 7}
    assert k.price_caps["001102000010000"] == {1: 8_000_000, 2: 9_000_000, 3: 10_000_000, 9: 10_000_000}
    assert k.restrictions["002505000320000"].sex == "MALE"
    assert k.drugs["XA10BAE014A010010300321"].days_per_unit == 0.5


@pytest.mark.parametrize(("name", "old", "new", "field", "what"), [
    ("item_restrictions.csv", "002505000320000,前列腺特异性抗原测定,M,", "002505000320000,前列腺特异性抗原测定,X,",
     "sex", "'X': expected M or F"),
    ("item_restrictions.csv", "左氧氟沙星片(0.5g×6片),,18,", "左氧氟沙星片(0.5g×6片),,eighteen,",
     "min_age", "'eighteen'"),
    ("price_caps.csv", "001102000010000,普通门诊诊查费,8.0000000", "001102000010000,普通门诊诊查费,abc",
     "cap_level1", "'abc'"),
    ("price_caps.csv", "001102000010000,普通门诊诊查费,8.0000000", "001102000010000,普通门诊诊查费,-8",
     "cap_level1", "'-8': must be positive"),
    ("drug_classes.csv", "amlodipine,C08CA,1/1", "amlodipine,C08CA,1/0", "days_per_unit", "'1/0'"),
    ("drug_classes.csv", "amlodipine,C08CA,1/1,,Y", "amlodipine,C08CA,1/1,maybe,Y", "as_needed",
     "'maybe': expected Y or N"),
    ("item_categories.csv", "XC08CAA133A001010100101,", "XC08CAA133,", "hilist_code",
     "'XC08CAA133': not a national list code"),
    ("duplicate_pairs.csv", ",visit,血清生化全套已含肌酐", ",week,血清生化全套已含肌酐", "scope",
     "'week': expected visit, day or 6h"),
    ("frequency_limits.csv", "001201000010000,Ⅰ级护理,1,日", "001201000010000,Ⅰ级护理,0,日", "max_per_day",
     "'0': must be a positive integer"),
    ("repeat_intervals.csv", "002503010030000,糖化血红蛋白测定,15", "002503010030000,糖化血红蛋白测定,",
     "min_interval_days", "empty"),
])
def test_malformed_knowledge_names_file_line_and_field(tmp_path: Path, name: str, old: str, new: str, field: str,
                                                       what: str) -> None:
    path, line = knowledge_with(tmp_path, name, old, new)
    with pytest.raises(KnowledgeError) as info:
        load_knowledge(path.parent)
    assert str(info.value).startswith(f"{path}:{line}: {field}: {what}")


def test_knowledge_missing_column_or_file(tmp_path: Path) -> None:
    path, _ = knowledge_with(tmp_path, "frequency_limits.csv", "hilist_code,name,max_per_day,unit",
                             "hilist_code,name,max,unit")
    with pytest.raises(KnowledgeError, match=rf"^{path}:1: header lacks column\(s\) max_per_day$"):
        load_knowledge(path.parent)
    (path.parent / "price_caps.csv").unlink()
    path.write_text("hilist_code,name,max_per_day\n", encoding="utf-8")
    with pytest.raises(KnowledgeError, match=r"price_caps\.csv: cannot read"):
        load_knowledge(path.parent)


# --- packaging: an installed worker needs the same data -------------------------------------------

def test_package_data_covers_every_rule_data_file() -> None:
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = conf["tool"]["setuptools"]["package-data"]["streams"]
    shipped = {os.path.normpath(f) for p in patterns for f in glob.glob(str(ROOT / "streams" / p), recursive=True)
               if os.path.isfile(f)}
    needed = {os.path.normpath(f) for f in (ROOT / "streams" / "rules" / "data").rglob("*") if f.is_file()}
    assert needed - shipped == set()
