# Types of the compiled module (native/kernels.pyx): the same surface as kernels_py.py.
from array import array
from collections.abc import Callable, Sequence
from typing import Any

MAX_SAFE_INTEGER: int
MAX_SEGMENTS: int
REACH_UNBOUNDED: int
NO_END: int

class Schedule:
    def __init__(self, connect_fee_micros: int, ends: Sequence[int],
                 increments: Sequence[int], prices: Sequence[int]) -> None: ...
    @property
    def segment_count(self) -> int: ...
    def cost_to(self, units: int) -> int: ...
    def cost(self, from_units: int, units: int) -> int: ...
    def max_units_within(self, budget_micros: int) -> int: ...
    def affordable(self, from_units: int, amount_micros: int, wanted_units: int) -> int: ...

def cost_batch(schedules: list[Schedule], schedule_index: array[int],
               from_units: array[int], units: array[int]) -> array[int]: ...
def affordable_batch(schedules: list[Schedule], schedule_index: array[int],
                     from_units: array[int], amounts_micros: array[int],
                     wanted_units: array[int]) -> array[int]: ...

# the request path
SUCCESS: int
INVALID_AVP_VALUE: int
MISSING_AVP: int
UNABLE_TO_COMPLY: int
FAILURE_HANDLING_RETRY_AND_TERMINATE: int
REFUND: int
EVENT_ACTION_MAX: int
RequestRules = tuple[int, int, int, int, int, frozenset[int]]
Refused = tuple[int, str] | None
FinalUnitOf = Callable[[int, int | None], tuple[str, Sequence[str]]]

def check_session_id(session_id: str, field: str, max_bytes: int) -> Refused: ...
def check_ids(session_id: str, account_id: str, max_session_id_bytes: int,
              max_account_id_bytes: int) -> Refused: ...
def check_event_time(event_time_unix_ms: int, now_ms: int, max_event_age_s: int,
                     max_event_ahead_s: int) -> Refused: ...
def check_blocks(blocks: Sequence[Any], rules: RequestRules, need_units: bool) -> Refused: ...
def validate_credit_control(request: Any, initial: bool, rules: RequestRules,
                            now_ms: int) -> Refused: ...
def validate_event(request: Any, rules: RequestRules, now_ms: int) -> Refused: ...
def encode_credit_control(answer: str, session_id: str, request_number: int,
                          plan_times: tuple[int, int, int],
                          final_unit_of: FinalUnitOf) -> bytes: ...
def encode_event(answer: str, session_id: str, request_number: int) -> bytes: ...
def encode_credit_control_refusal(session_id: str, request_number: int, code: int,
                                  message: str) -> bytes: ...
def encode_event_refusal(session_id: str, request_number: int, code: int,
                         message: str) -> bytes: ...
def encode_stream_answer(correlation_id: int, field_number: int, answer: bytes) -> bytes: ...

# the script's block arguments
FREE: int
FIXED: int
RATED: int
ACTIVE_ALWAYS_MS: int
RateArgs = Callable[[Any, int, int, str], Sequence[int | str | bytes]]
BillingPeriod = Callable[[int], str]

class BlockPlan:
    def __init__(self, plan_name: str, rate_args: RateArgs,
                 billing_period: BillingPeriod) -> None: ...
    def add_version(self, rating_group: int, service_id: int, active_from_ms: int, how: int,
                    unit_code: str, final_action: int, default_grant_units: int,
                    tiered: bool, table_args: Sequence[int | str | bytes] | None,
                    tariff: Any) -> None: ...
    def script_blocks(self, blocks: Sequence[Any], event_time_ms: int,
                      default_grant: bool) -> list[int | str | bytes]: ...
