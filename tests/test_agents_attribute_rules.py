"""Attribute rules: fixed and time attributes, rule grammar, and time-window policies."""

from __future__ import annotations

import operator
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ciphertwin.agents.attribute_rules import (
    AttributeRules,
    Comparison,
    check_attribute,
    time_attributes,
    time_window_attributes,
    time_window_policy,
)
from ciphertwin.agents.sources import Reading
from ciphertwin.errors import ValidationError

# 2026-11-22T13:45:00Z
T = datetime(2026, 11, 22, 13, 45, tzinfo=UTC).timestamp()


def at(hour: int) -> float:
    return datetime(2026, 11, 22, hour, 30, tzinfo=UTC).timestamp()


def test_fixed_and_time_attributes_are_always_present() -> None:
    rules = AttributeRules.from_config([], twin="boiler-1", device="pi.kitchen")
    attrs = rules.attributes_for(Reading("temperature", {"celsius": 20.0}, T))
    assert attrs == {
        "twin:boiler-1", "device:pi.kitchen", "type:temperature",
        "year:2026", "month:2026-11", "day:2026-11-22", "hour:2026-11-22T13",
    }
    assert all(check_attribute(a) == a for a in attrs)


def test_time_attributes_are_utc_and_zero_padded() -> None:
    t = datetime(2027, 1, 5, 23, 59, 59, tzinfo=timezone(timedelta(hours=-2))).timestamp()
    assert time_attributes(t) == {"year:2027", "month:2027-01", "day:2027-01-06",
                                  "hour:2027-01-06T01"}


def test_rules_by_type_content_and_time() -> None:
    rules = AttributeRules.from_config(
        [
            {"when_type": "location", "add": ["sensitivity:high"]},
            {"when_type": ["temperature", "humidity"], "add": ["class:climate"]},
            {"when": "celsius > 30", "add": ["alert:heat"]},
            {"when": 'room == "kitchen"', "add": ["room:kitchen"]},
            {"when": "door == true", "add": ["door:open"]},
            {"when_hour_between": [22, 6], "add": ["period:night"]},
            {"when_hour_between": [9, 17], "add": ["period:office"]},
            {"when_type": "temperature", "when": "celsius <= -10", "when_hour_between": [0, 12],
             "add": ["alert:frost", "notify:owner"]},
        ],
        twin="t", device="d",
    )

    def extra(rtype: str, values: dict, t: float) -> set[str]:
        attrs = rules.attributes_for(Reading(rtype, values, t))
        return {a for a in attrs if a.split(":")[0] not in
                {"twin", "device", "type", "year", "month", "day", "hour"}}

    assert extra("location", {"lat": 1.0, "lon": 2.0}, at(12)) == {"sensitivity:high",
                                                                   "period:office"}
    assert extra("temperature", {"celsius": 31}, at(23)) == {"class:climate", "alert:heat",
                                                             "period:night"}
    assert extra("temperature", {"celsius": 30.0}, at(6)) == {"class:climate"}  # 6 excluded
    assert extra("temperature", {"celsius": -12.5}, at(5)) == {
        "class:climate", "period:night", "alert:frost", "notify:owner"}
    assert extra("temperature", {"celsius": -12.5}, at(13)) == {"class:climate", "period:office"}
    assert extra("humidity", {"room": "kitchen"}, at(0)) == {"class:climate", "room:kitchen",
                                                             "period:night"}
    # Kinds must match: a string or boolean never satisfies a numeric comparison, and 1 != true.
    assert extra("door", {"celsius": "35", "door": 1}, at(8)) == set()
    assert extra("door", {"celsius": True, "door": True}, at(8)) == {"door:open"}


@pytest.mark.parametrize(
    "rule",
    [
        "not a table",
        {"add": ["a:b"]},  # no condition
        {"when_type": "location"},  # no add
        {"when_type": "location", "add": []},
        {"when_type": "location", "add": "a:b"},
        {"when_type": "location", "add": ["Upper:b"]},
        {"when_type": "location", "add": ["nocolon"]},
        {"when_type": "location", "add": ["a:b c"]},
        {"when_type": "location", "add": ["a:" + "b" * 63]},  # > 64 chars
        {"when_type": "Location", "add": ["a:b"]},
        {"when_type": [], "add": ["a:b"]},
        {"when_typ": "location", "add": ["a:b"]},  # typo'd key
        {"when": "celsius >> 30", "add": ["a:b"]},
        {"when": "celsius > thirty", "add": ["a:b"]},
        {"when": "__import__('os').system('id')", "add": ["a:b"]},
        {"when": "celsius > 30 and celsius < 40", "add": ["a:b"]},
        {"when": "door > true", "add": ["a:b"]},
        {"when": "x > 1e999", "add": ["a:b"]},
        {"when": 30, "add": ["a:b"]},
        {"when_hour_between": [22], "add": ["a:b"]},
        {"when_hour_between": [22, 24], "add": ["a:b"]},
        {"when_hour_between": [5, 5], "add": ["a:b"]},
        {"when_hour_between": [True, 5], "add": ["a:b"]},
    ],
)
def test_bad_rules_are_refused_with_their_position(rule: object) -> None:
    with pytest.raises(ValidationError, match="rule #2"):
        AttributeRules.from_config([{"when_type": "x", "add": ["ok:1"]}, rule], "t", "d")


def test_bad_rule_list_and_ids_are_refused() -> None:
    with pytest.raises(ValidationError):
        AttributeRules.from_config({"when_type": "x"}, "t", "d")
    with pytest.raises(ValidationError):
        AttributeRules.from_config([], "twin with spaces", "d")
    with pytest.raises(ValidationError):
        AttributeRules.from_config([], "t", "d" * 80)


# --------------------------------------------------------------------------- grammar properties

OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
       "==": operator.eq, "!=": operator.ne}
keys = st.from_regex(r"[a-z][a-z0-9_]{0,31}", fullmatch=True)
spaces = st.sampled_from(["", " ", "  ", "\t"])


@settings(max_examples=200, deadline=None)
@given(key=keys, op=st.sampled_from(list(OPS)), lit=st.integers(-10**6, 10**6) | st.floats(
    -1e6, 1e6, allow_nan=False), value=st.floats(-1e6, 1e6, allow_nan=False) | st.integers(
    -10**6, 10**6), ws=st.tuples(spaces, spaces, spaces, spaces))
def test_numeric_comparisons_match_python(key, op, lit, value, ws) -> None:
    text = f"{ws[0]}{key}{ws[1]}{op}{ws[2]}{lit!r}{ws[3]}"
    cond = Comparison.parse(text)
    assert cond.holds({key: value}) == OPS[op](value, float(lit))
    assert cond.holds({key + "x": value}) is False  # missing key never matches


@settings(max_examples=100, deadline=None)
@given(key=keys, op=st.sampled_from(list(OPS)),
       lit=st.text(st.characters(exclude_characters='"\\'), max_size=20),
       value=st.text(max_size=20))
def test_string_comparisons_match_python(key, op, lit, value) -> None:
    cond = Comparison.parse(f'{key} {op} "{lit}"')
    assert cond.holds({key: value}) == OPS[op](value, lit)
    assert cond.holds({key: 1}) is False


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_arbitrary_condition_text_only_ever_raises_validation_error(text: str) -> None:
    try:
        Comparison.parse(text)
    except ValidationError:
        pass


# --------------------------------------------------------------------------- time windows


def _covered(terms: list[str], hour_start: datetime) -> bool:
    return bool(time_attributes(hour_start.timestamp()) & set(terms))


@settings(max_examples=60, deadline=None)
@given(start_h=st.integers(0, 24 * 365 * 3), hours=st.integers(1, 24 * 400))
def test_time_window_covers_exactly_its_hours(start_h: int, hours: int) -> None:
    start = datetime(2025, 1, 1, tzinfo=UTC) + timedelta(hours=start_h)
    end = start + timedelta(hours=hours)
    terms = time_window_attributes(start, end)
    assert len(terms) == len(set(terms))
    h = start
    while h < end:  # every hour inside is granted ...
        assert _covered(terms, h), h
        h += timedelta(hours=1)
    for k in range(1, 50):  # ... and none next to it
        assert not _covered(terms, start - timedelta(hours=k))
        assert not _covered(terms, end + timedelta(hours=k - 1))
    # Coarsest units: at most 23 hours, 30 days and 11 months on each side of the big units.
    kinds = [t.split(":")[0] for t in terms]
    assert kinds.count("hour") <= 46 and kinds.count("day") <= 60 and kinds.count("month") <= 22


def test_time_window_uses_the_coarsest_units() -> None:
    d = lambda *a: datetime(*a, tzinfo=UTC)  # noqa: E731
    assert time_window_policy(d(2026, 11, 22), d(2026, 11, 23)) == "(day:2026-11-22)"
    assert time_window_policy(d(2026, 11, 21, 22), d(2026, 11, 23, 2)) == (
        "(hour:2026-11-21T22 OR hour:2026-11-21T23 OR day:2026-11-22 OR "
        "hour:2026-11-23T00 OR hour:2026-11-23T01)"
    )
    assert time_window_attributes(d(2025, 12, 31, 23), d(2028, 3, 2, 1)) == [
        "hour:2025-12-31T23", "year:2026", "year:2027", "month:2028-01", "month:2028-02",
        "day:2028-03-01", "hour:2028-03-02T00",
    ]
    assert time_window_attributes(d(9999, 12, 31, 22), d(9999, 12, 31, 23)) == [
        "hour:9999-12-31T22"]
    # Other time zones are converted: 01:00+02:00 is 23:00Z the day before.
    cest = timezone(timedelta(hours=2))
    assert time_window_attributes(datetime(2026, 6, 2, 1, tzinfo=cest),
                                  datetime(2026, 6, 2, 2, tzinfo=cest)) == ["hour:2026-06-01T23"]


@pytest.mark.parametrize(
    ("start", "end"),
    [
        (datetime(2026, 1, 1), datetime(2026, 1, 2)),  # naive
        (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC)),  # empty
        (datetime(2026, 1, 2, tzinfo=UTC), datetime(2026, 1, 1, tzinfo=UTC)),  # reversed
        (datetime(2026, 1, 1, 0, 30, tzinfo=UTC), datetime(2026, 1, 2, tzinfo=UTC)),  # not aligned
        (datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 2, 0, 0, 1, tzinfo=UTC)),
        ("2026-01-01", datetime(2026, 1, 2, tzinfo=UTC)),
    ],
)
def test_bad_time_windows_are_refused(start: object, end: object) -> None:
    with pytest.raises(ValidationError):
        time_window_policy(start, end)  # type: ignore[arg-type]
