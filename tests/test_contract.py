"""charge.lua and admin.lua hold copies of what creditline.store.contract defines (KEYS and
ARGV by position, the block fields and the answer's, the request kinds and event actions, the
result codes, the numeric limits): these tests read the Lua sources and fail when a copy
differs."""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path

from creditline.api.messages import block_plan
from creditline.charging import rating
from creditline.charging.kernels import compiled_kernels, pure_kernels, select_kernels
from creditline.charging.rating import BandedRater, load_plan
from creditline.store.contract import (
    BLOCK_FIELDS,
    EVENT_TYPES,
    FIXED_SCHEDULE_NUMBER,
    GROUP_SEPARATOR,
    ID_CHARACTERS,
    MAX_SAFE_INTEGER,
    MAX_SEGMENTS,
    PLAN_RETRY_ANSWER,
    SCRIPT_RESULT_CODES,
    USAGE_RATES_FORMAT,
    AdminArgs,
    AdminKeys,
    ChargeArgs,
    ChargeKeys,
    EventAction,
    EventBlockAnswer,
    RateTableForm,
    RequestKind,
    SessionBlockAnswer,
    group_of,
    plan_to_retry,
)
from creditline.store.store import admin_script_source, charge_script_source, refused
from creditline.v1 import charging_pb2 as pb

from tests.messages import RG_FREE, RG_UNRATED, RG_VOICE, block

CHARGE_LUA = charge_script_source()
ADMIN_LUA = admin_script_source()


def _lua_constant(name: str) -> int:
    match = re.search(rf"^local {name} = (\d+)$", CHARGE_LUA, re.MULTILINE)
    assert match, f"charge.lua: no 'local {name} = <number>'"
    return int(match[1])


def test_the_fixed_schedule_number_is_the_contracts() -> None:
    assert f"local FIXED_SCHEDULE_NUMBER = '{FIXED_SCHEDULE_NUMBER}'" in CHARGE_LUA
    assert struct.calcsize(f"<{FIXED_SCHEDULE_NUMBER}") == 8  # (the script's #packed / 8)


def test_the_plan_retry_answer_is_the_contracts() -> None:
    assert f"local PLAN_RETRY_ANSWER = '{PLAN_RETRY_ANSWER}'" in CHARGE_LUA
    assert refused(PLAN_RETRY_ANSWER + "x")  # nothing written: a refusal's form
    assert plan_to_retry(PLAN_RETRY_ANSWER + "cheap") == "cheap"
    assert plan_to_retry("2001;100,2001,t,60,0,0,0") is None


def test_the_usage_rates_format_is_the_contracts() -> None:
    match = re.search(r"^local USAGE_RATES_FORMAT, USAGE_RATES_BYTES = '([^']+)', (\d+)$",
                      CHARGE_LUA, re.MULTILINE)
    assert match, "charge.lua: no USAGE_RATES_FORMAT"
    assert match[1] == USAGE_RATES_FORMAT and int(match[2]) == struct.calcsize(
        USAGE_RATES_FORMAT)


def test_the_numeric_limits_are_the_same_everywhere() -> None:
    assert _lua_constant("MAX_SAFE") == MAX_SAFE_INTEGER == 2**53 - 1
    assert _lua_constant("MAX_SEGMENTS") == MAX_SEGMENTS
    assert (rating.MAX_SAFE_INTEGER, rating.MAX_SEGMENTS) == (MAX_SAFE_INTEGER, MAX_SEGMENTS)
    for kernels in (compiled_kernels(), pure_kernels()):
        assert (kernels.module.MAX_SAFE_INTEGER, kernels.module.MAX_SEGMENTS) == (
            MAX_SAFE_INTEGER, MAX_SEGMENTS)


def test_the_result_codes_are_the_scripts_and_the_protocols() -> None:
    found: dict[str, int] = {}
    for names, values in re.findall(r"^local ([A-Z_, ]+) = ([\d, ]+)$", CHARGE_LUA,
                                    re.MULTILINE):
        pairs = zip(names.split(", "), values.split(", "), strict=True)
        found.update((name, int(value)) for name, value in pairs
                     if 2000 <= int(value) < 6000)
    assert found == SCRIPT_RESULT_CODES
    assert set(SCRIPT_RESULT_CODES.values()) <= set(pb.ResultCode.values())


def _keys_read(source: str) -> list[str]:
    # (a script's top-level locals, or a function's assignments: charge.lua's read_arguments,
    # which calls unpack by its local name, base_unpack)
    match = re.search(r"^(?:local |  )([\w,\s]+?) =\s+(?:base_)?unpack\(KEYS, 1, (\d+)\)", source,
                      re.MULTILINE)
    assert match, "no unpack(KEYS, ...)"
    names = [name.strip() for name in match[1].split(",")]
    assert int(match[2]) == len(names)
    return names


def _arguments_read(source: str) -> dict[int, str]:
    return {int(index): name for name, index in re.findall(
        r"^(?:local |  )(\w+) = (?:num\()?ARGV\[(\d+)\]\)?$", source, re.MULTILINE)}


def test_the_keys_are_read_in_the_contracts_order() -> None:
    assert _keys_read(CHARGE_LUA) == [f"{field}_key" for field in ChargeKeys._fields]
    assert _keys_read(ADMIN_LUA) == [f"{field}_key" for field in AdminKeys._fields]


def test_the_arguments_are_read_in_the_contracts_order() -> None:
    expected = dict(enumerate([*ChargeArgs._fields, "block_count"], start=1))
    assert _arguments_read(CHARGE_LUA) == expected
    # the blocks right after the block count
    assert _lua_constant("FIRST_BLOCK_ARGUMENT") == len(expected) + 1
    assert _arguments_read(ADMIN_LUA) == dict(enumerate(AdminArgs._fields, start=1))


def test_the_block_fields_are_read_in_the_contracts_order() -> None:
    table = re.search(r"local block = \{(.*?)\}", CHARGE_LUA, re.DOTALL)
    assert table, "charge.lua: no block table"
    offsets = {name: int(offset or 0) for name, offset in re.findall(
        r"(\w+) = (?:num\()?ARGV\[i(?: \+ (\d+))?\]", table[1])}
    assert sorted(offsets, key=offsets.__getitem__) == list(BLOCK_FIELDS)
    assert sorted(offsets.values()) == list(range(len(BLOCK_FIELDS)))
    assert f"i = i + {len(BLOCK_FIELDS)}" in CHARGE_LUA


def _documented_values(argument: int) -> set[str]:
    """The quoted values the script's header lists for ARGV[argument]."""
    match = re.search(rf"^  \[{argument}\] [^:]+:(.*?)^  \[", CHARGE_LUA, re.MULTILINE | re.DOTALL)
    assert match, f"charge.lua: ARGV[{argument}] is not documented"
    return set(re.findall(r'"([^"]+)"', match[1]))


def test_the_request_kinds_and_event_actions_are_the_scripts() -> None:
    kind = ChargeArgs._fields.index("kind") + 1
    action = ChargeArgs._fields.index("event_action") + 1
    assert _documented_values(kind) == {k.value for k in RequestKind}
    assert _documented_values(action) == {a.value for a in EventAction}
    # and the script tests each kind and action it handles apart by that value
    for value in ("I", "T", "E", "S"):
        assert f"kind == '{value}'" in CHARGE_LUA
    for value in ("DEBIT", "REFUND", "PRICE"):
        assert f"event_action == '{value}'" in CHARGE_LUA


def test_the_contract_is_what_the_store_sends() -> None:
    # a StrEnum goes to Redis as its value, as the script compares it
    assert str(RequestKind.INITIAL) == "I" and f"{EventAction.NONE}" == "-"


def test_the_server_writes_each_block_as_block_fields_names_it() -> None:
    plan = load_plan(Path(__file__).parent / "plan.toml")
    request = block(RG_VOICE, requested=60, used=5)
    args = block_plan(select_kernels(), plan, BandedRater()).script_blocks(
        [request, block(RG_FREE, used=7), block(RG_UNRATED)], 1_780_000_000_000,
        default_grant=True)
    assert args[0] == 3
    voice = dict(zip(BLOCK_FIELDS, args[1:1 + len(BLOCK_FIELDS)], strict=True))
    assert voice == {"rg": str(RG_VOICE), "bucket_rg": RG_VOICE,
                     "tariff": f"{plan.name}/{RG_VOICE}", "status": "ok", "requested": 60,
                     "used": 5, "unit": "t", "final_action": pb.TERMINATE}
    rest = args[1 + len(BLOCK_FIELDS):]
    table = len(rest) - 2 * len(BLOCK_FIELDS)  # the voice block's rate table comes next
    free = dict(zip(BLOCK_FIELDS, rest[table:table + len(BLOCK_FIELDS)], strict=True))
    unrated = dict(zip(BLOCK_FIELDS, rest[table + len(BLOCK_FIELDS):], strict=True))
    assert (free["status"], free["used"], free["unit"]) == ("free", 7, "t")
    assert (unrated["status"], unrated["unit"]) == ("none", "-")


def test_the_rate_table_forms_are_the_scripts() -> None:
    # the script tells the forms apart by the table's first argument, and documents both
    assert (f"if ARGV[i] == '{RateTableForm.FIXED}' then return read_fixed_schedule(block, "
            "i + 1) end") in CHARGE_LUA
    assert f"i = i + 1  -- '{RateTableForm.BANDED}': bands or tiers" in CHARGE_LUA
    for form in RateTableForm:
        assert f'      "{form}" (' in CHARGE_LUA, f"charge.lua's header: no form {form}"


def test_the_server_sends_a_fixed_tariff_its_schedule_built() -> None:
    plan, rater = load_plan(Path(__file__).parent / "plan.toml"), BandedRater()
    fixed = rater.rate_table(plan.tariff_for(RG_VOICE, None), 1_780_000_000_000, 0, "")
    schedule = fixed.schedule(0, 0, 0)
    form, packed = fixed.script_args
    assert form == RateTableForm.FIXED and isinstance(packed, bytes)
    numbers = struct.unpack(f"<{len(packed) // 8}{FIXED_SCHEDULE_NUMBER}", packed)
    assert numbers[0] == schedule.connect_fee_micros
    sent = numbers[1:]
    assert [tuple(sent[n:n + 3]) for n in range(0, len(sent), 3)] == [
        (seg.end_units or math.inf, seg.increment_units, seg.increment_price_micros)
        for seg in schedule.segments]
    assert schedule.segments[-1].end_units is None  # the one sent as infinity
    peak = plan.tariff_for(101, None)  # tests/plan.toml: a voice tariff with a peak band
    assert peak is not None and peak.bands
    banded = rater.rate_table(peak, 1_780_000_000_000, 0, "")
    assert banded.script_args[0] == RateTableForm.BANDED


def _written_fields(expression: str) -> list[str]:
    """The names a Lua concatenation "a .. ',' .. int(b) .. ',' .. block.c" writes."""
    parts = [part.strip() for part in expression.split(".. ',' ..")]
    return [re.sub(r"^(?:int\()?(?:block\.)?(\w+)\)?$", r"\1", part) for part in parts]


def test_the_answers_blocks_are_written_as_the_contract_reads_them() -> None:
    session = re.search(r"return code, ';' \.\. (.*?)\nend", CHARGE_LUA, re.DOTALL)
    event = re.search(r"return ';' \.\. (.*?)\n *end", CHARGE_LUA, re.DOTALL)
    assert session and event, "charge.lua: the answers' blocks are not where they were"
    assert _written_fields(" ".join(session[1].split())) == list(SessionBlockAnswer._fields)
    assert _written_fields(" ".join(event[1].split())) == list(EventBlockAnswer._fields)


def test_the_event_types_are_the_protocols() -> None:
    from creditline.v1 import notifications_pb2 as npb

    names = {name.lower() for name in npb.EventType.DESCRIPTOR.values_by_name
             if name != "EVENT_TYPE_UNSPECIFIED"}
    assert names == EVENT_TYPES
    # each notify(...) of the scripts names its type first (notify_of(account, ...): after
    # the account it is of)
    written = set(re.findall(r"notify(?:\(|_of\(\w+, )'([a-z_]+)",
                             charge_script_source() + ADMIN_LUA))
    assert written == EVENT_TYPES


def test_both_kernels_take_exactly_the_contracts_id_characters() -> None:
    # the compiled kernels test characters by ranges (inline, per request): held here to
    # the one definition, which the twin and the Admin service's bucket ids use
    for kernels in (compiled_kernels(), pure_kernels()):
        for code in range(1, 0x3000):
            char = chr(code)
            refused = kernels.module.check_ids("s", f"a{char}b", 100, 100)
            accepted = char in ID_CHARACTERS or char == GROUP_SEPARATOR
            assert (refused is None) == accepted, (kernels.implementation, char)


def test_both_kernels_take_a_member_id_with_one_separator_between_two_ids() -> None:
    cases = {"family": True, "family/alice": True, "f.1/a-b": True, "/alice": False,
             "family/": False, "/": False, "a/b/c": False, "family//alice": False,
             "fam ily/alice": False}
    for kernels in (compiled_kernels(), pure_kernels()):
        for account_id, valid in cases.items():
            refused = kernels.module.check_ids("s", account_id, 100, 100)
            assert (refused is None) == valid, (kernels.implementation, account_id, refused)
            assert group_of(account_id) == (account_id.split("/")[0] if "/" in account_id
                                            else None)
