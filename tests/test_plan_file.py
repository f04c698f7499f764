"""Plan files: a bad file is refused with file, field and reason."""

from __future__ import annotations

from pathlib import Path

import pytest
from creditline.charging.rating import load_plan
from creditline.errors import PlanError
from creditline.settings import DEFAULT_PLAN_PATH

GOOD_TARIFF = """
[[tariff]]
rating_group = 10
unit = "volume"
next_increment_price_micros = 1000
"""


@pytest.mark.parametrize(("text", "field", "reason"), [
    ("[[tariff]]\nrating_group = 1\nunit = 'volume'\nnext_increment_price_micros = 'x'\n",
     "tariff[0].next_increment_price_micros", "whole number"),
    ("[[tariff]]\nrating_group = 1\nunit = 'litres'\nnext_increment_price_micros = 1\n",
     "tariff[0].unit", "not one of"),
    ("[[tariff]]\nrating_group = 1\nunit = 'time'\n", "tariff[0].next_increment_price_micros",
     "required"),
    ("[[tariff]]\nrating_group = 1\nunit = 'time'\nnext_increment_units = 0\n"
     "next_increment_price_micros = 1\n", "tariff[0].next_increment_units", "at least 1"),
    ("[[tariff]]\nrating_group = 1\nunit = 'time'\nnext_increment_price_micros = -1\n",
     "tariff[0].next_increment_price_micros", "between"),
    ("[[tariff]]\nrating_group = 1\nunit = 'time'\nfree = true\nfinal_unit_action = 'redirect'\n",
     "tariff[0].redirect_address", "required"),
    ("[[tariff]]\nrating_group = 1\nunit = 'time'\nfree = true\ncolour = 'red'\n",
     "tariff[0].colour", "unknown field"),
    (GOOD_TARIFF + GOOD_TARIFF, "tariff[1]", "defined twice"),
    ("[plan]\nquota_threshold_percent = 101\n" + GOOD_TARIFF, "plan.quota_threshold_percent",
     "0..100"),
    ("[plan]\nbilling_day = 29\n" + GOOD_TARIFF, "plan.billing_day", "between 1 and 28"),
    ("[plan]\nbilling_day = 0\n" + GOOD_TARIFF, "plan.billing_day", "between 1 and 28"),
    ("[plan]\nbiling_day = 3\n" + GOOD_TARIFF, "plan.biling_day", "unknown field"),
    ("", "tariff", "at least one"),
    ("[[tariff]\n", "", "not valid TOML"),
])
def test_bad_plan_is_refused_with_file_field_and_reason(
        tmp_path: Path, text: str, field: str, reason: str) -> None:
    assert_plan_refused(tmp_path / "plan.toml", text, field, reason)


def assert_plan_refused(path: Path, text: str, field: str, reason: str) -> None:
    """The plan file is refused with a message naming the file, the field and the reason."""
    path.write_text(text)
    with pytest.raises(PlanError) as refused:
        load_plan(path)
    message = str(refused.value)
    assert message.startswith(str(path)), message
    assert field in message and reason in message, message


def test_missing_plan_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="cannot read"):
        load_plan(tmp_path / "absent.toml")


def test_shipped_default_plan_loads() -> None:
    plan = load_plan(DEFAULT_PLAN_PATH)
    assert plan.tariff_for(100, None) is not None
    assert plan.tariff_for(900, None) is not None and plan.tariff_for(900, None).free  # type: ignore[union-attr]
