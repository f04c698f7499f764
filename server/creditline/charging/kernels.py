"""Which rating kernels run: the compiled ones (native/kernels.pyx), or their pure-Python
twin (native/kernels_py.py) when told so.

The compiled module is chosen by default. CREDITLINE_PURE_RATING=1 forces the pure path
(for debugging, or to compare). A build that lost its compiled module must say so loudly
rather than run 30 times slower unnoticed: `require_kernels` refuses it unless
CREDITLINE_ALLOW_PURE_RATING=1 says the pure path is acceptable.

The other compiled modules (the Diameter codec, the OTLP span encoder) are chosen by the
same variables through `select_compiled`, so that one build, one switch and one error
message cover every compiled module and its twin.

Both modules are imported by their names; `KernelModule` below is what the charging path
uses of them, and mypy checks both against it where they are imported (the compiled one
through its stub, native/kernels.pyi). The request path's messages are protobuf messages,
typed Any here: only api speaks protobuf (tests/test_static.py).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from creditline.errors import KernelsUnavailableError

if TYPE_CHECKING:  # rating.py prices with these kernels
    from creditline.charging.rating import PriceSchedule

PURE_ENV = "CREDITLINE_PURE_RATING"
ALLOW_PURE_ENV = "CREDITLINE_ALLOW_PURE_RATING"
COMPILED_MODULE = "creditline.native.kernels"
RATING_KERNELS = f"the compiled rating kernels ({COMPILED_MODULE})"
_TRUE = {"1", "true", "yes", "on"}

T = TypeVar("T")


class KernelSchedule(Protocol):
    """A price schedule held by the kernels (see native/kernels_py.py for semantics)."""

    @property
    def segment_count(self) -> int: ...
    def cost_to(self, units: int) -> int: ...
    def cost(self, from_units: int, units: int) -> int: ...
    def max_units_within(self, budget_micros: int) -> int: ...
    def affordable(self, from_units: int, amount_micros: int, wanted_units: int) -> int: ...


class KernelScheduleFactory(Protocol):
    def __call__(self, connect_fee_micros: int, ends: Sequence[int],
                 increments: Sequence[int], prices: Sequence[int]) -> KernelSchedule: ...


# (max_session_id_bytes, max_account_id_bytes, max_event_age_s, max_event_ahead_s,
# max_rating_groups_per_request, the known reporting reasons)
RequestRules = tuple[int, int, int, int, int, frozenset[int]]
Refused = tuple[int, str] | None  # (result code, message naming the field)
# (rating group, service id) -> the tariff's (redirect address, restriction filter ids)
FinalUnitOf = Callable[[int, int | None], tuple[str, Sequence[str]]]


# (tariff, event time ms, look-back s, billing period) -> the tariff's rate table arguments
RateArgs = Callable[[Any, int, int, str], Sequence[int | str | bytes]]
BillingPeriod = Callable[[int], str]  # event time ms -> the billing period's name


class KernelBlockPlan(Protocol):
    """A plan as the kernels read it per request (see native/kernels_py.py BlockPlan)."""

    def add_version(self, rating_group: int, service_id: int, active_from_ms: int, how: int,
                    unit_code: str, final_action: int, default_grant_units: int,
                    tiered: bool, table_args: Sequence[int | str | bytes] | None,
                    tariff: Any) -> None: ...
    def script_blocks(self, blocks: Sequence[Any], event_time_ms: int,
                      default_grant: bool) -> list[int | str | bytes]: ...


class KernelBlockPlanFactory(Protocol):
    def __call__(self, plan_name: str, rate_args: RateArgs,
                 billing_period: BillingPeriod) -> KernelBlockPlan: ...


class KernelModule(Protocol):
    MAX_SAFE_INTEGER: int
    MAX_SEGMENTS: int
    REACH_UNBOUNDED: int
    NO_END: int
    # how a tariff version's block is sent (BlockPlan.add_version's `how`)
    FREE: int
    FIXED: int
    RATED: int
    ACTIVE_ALWAYS_MS: int

    @property
    def Schedule(self) -> KernelScheduleFactory: ...
    @property
    def BlockPlan(self) -> KernelBlockPlanFactory: ...
    # schedules: this module's own Schedule objects (Kernels.schedule), which no type states
    def cost_batch(self, schedules: list[Any], schedule_index: array[int],
                   from_units: array[int], units: array[int]) -> array[int]: ...
    def affordable_batch(self, schedules: list[Any], schedule_index: array[int],
                         from_units: array[int], amounts_micros: array[int],
                         wanted_units: array[int]) -> array[int]: ...
    # the request path (see native/kernels_py.py)
    def check_ids(self, session_id: str, account_id: str, max_session_id_bytes: int,
                  max_account_id_bytes: int) -> Refused: ...
    def validate_credit_control(self, request: Any, initial: bool, rules: RequestRules,
                                now_ms: int) -> Refused: ...
    def validate_event(self, request: Any, rules: RequestRules, now_ms: int) -> Refused: ...
    def encode_credit_control(self, answer: str, session_id: str, request_number: int,
                              plan_times: tuple[int, int, int],
                              final_unit_of: FinalUnitOf) -> bytes: ...
    def encode_event(self, answer: str, session_id: str, request_number: int) -> bytes: ...
    def encode_credit_control_refusal(self, session_id: str, request_number: int, code: int,
                                      message: str) -> bytes: ...
    def encode_event_refusal(self, session_id: str, request_number: int, code: int,
                             message: str) -> bytes: ...
    def encode_stream_answer(self, correlation_id: int, field_number: int,
                             answer: bytes) -> bytes: ...


@dataclass(frozen=True, slots=True)
class Kernels:
    implementation: str     # "compiled" or "pure"
    module: KernelModule
    compiled_error: str     # why the compiled module did not load ("" when it did)

    def schedule(self, schedule: PriceSchedule) -> KernelSchedule:
        """The kernels' form of a PriceSchedule (same prices, same grants)."""
        return self.module.Schedule(
            schedule.connect_fee_micros,
            [self.module.NO_END if s.end_units is None else s.end_units
             for s in schedule.segments],
            [s.increment_units for s in schedule.segments],
            [s.increment_price_micros for s in schedule.segments],
        )


def _flag(environ: Mapping[str, str] | None, name: str) -> bool:
    """Whether the variable is set true in environ (os.environ unless given): the one
    reading of PURE_ENV and ALLOW_PURE_ENV for every compiled module."""
    env = os.environ if environ is None else environ
    return env.get(name, "").strip().lower() in _TRUE


def _unavailable(what: str, error: object) -> KernelsUnavailableError:
    """The refusal of a build without a compiled module: which module (what), why, and the
    two ways out, so that an operator need not read this file to fix it."""
    return KernelsUnavailableError(
        f"{what} did not load: {error}; reinstall (pip install .), or set "
        f"{ALLOW_PURE_ENV}=1 to run the pure twin (slower: bench/ measures by how much)")


def select_compiled(load_compiled: Callable[[], T], twin: T, what: str,
                    environ: Mapping[str, str] | None = None) -> T:
    """The compiled module (what load_compiled imports) or its pure twin: the twin when
    CREDITLINE_PURE_RATING forces it, or when the import fails and
    CREDITLINE_ALLOW_PURE_RATING allows it; else KernelsUnavailableError naming `what`
    (a human name that includes the module's, e.g. RATING_KERNELS). environ: os.environ
    unless given."""
    if _flag(environ, PURE_ENV):
        return twin
    try:
        return load_compiled()
    except ImportError as error:
        if _flag(environ, ALLOW_PURE_ENV):
            return twin
        raise _unavailable(what, error) from error


def pure_kernels() -> Kernels:
    from creditline.native import kernels_py

    module: KernelModule = kernels_py  # checked by mypy against the protocol
    return Kernels("pure", module, "")


def compiled_kernels() -> Kernels:
    """The compiled kernels; ImportError when the build did not produce them."""
    from creditline.native import kernels

    module: KernelModule = kernels  # checked against the protocol through kernels.pyi
    return Kernels("compiled", module, "")


def select_kernels(environ: Mapping[str, str] | None = None,
                   load_compiled: Callable[[], Kernels] = compiled_kernels) -> Kernels:
    """The compiled kernels unless CREDITLINE_PURE_RATING forces the pure path; the pure
    ones (with the reason in compiled_error) when the compiled module cannot be loaded
    (load_compiled: how, for a test of a build without them)."""
    # Not select_compiled: rating.py prices with whichever kernels load, and the reason
    # the compiled ones did not is kept for the start-up log; require_kernels refuses.
    if _flag(environ, PURE_ENV):
        return pure_kernels()
    try:
        return load_compiled()
    except ImportError as error:
        fallback = pure_kernels()
        return Kernels(fallback.implementation, fallback.module, str(error))


def require_kernels(environ: Mapping[str, str] | None = None,
                    load_compiled: Callable[[], Kernels] = compiled_kernels) -> Kernels:
    """select_kernels, refusing a silent fall-back: the pure path only when forced
    (CREDITLINE_PURE_RATING) or allowed (CREDITLINE_ALLOW_PURE_RATING)."""
    kernels = select_kernels(environ, load_compiled)
    if kernels.compiled_error and not _flag(environ, ALLOW_PURE_ENV):
        raise _unavailable(RATING_KERNELS, kernels.compiled_error)
    return kernels


def rating_implementation(environ: Mapping[str, str] | None = None,
                          load_compiled: Callable[[], Kernels] = compiled_kernels) -> str:
    """"compiled" or "pure": what select_kernels picks, for the start-up log."""
    return select_kernels(environ, load_compiled).implementation
