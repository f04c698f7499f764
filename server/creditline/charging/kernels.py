"""Which rating kernels run: the compiled ones (native/kernels.pyx), or their pure-Python
twin (native/kernels_py.py) when told so.

The compiled module is chosen by default. CREDITLINE_PURE_RATING=1 forces the pure path
(for debugging, or to compare). A build that lost its compiled module must say so loudly
rather than run 30 times slower unnoticed: `require_kernels` refuses it unless
CREDITLINE_ALLOW_PURE_RATING=1 says the pure path is acceptable.

Both modules are loaded by name (importlib) and typed by the protocols below, so that the
type checker needs neither the compiled module nor the native/ directory.
"""

from __future__ import annotations

import importlib
import os
from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, cast

from creditline.charging.rating import PriceSchedule
from creditline.errors import KernelsUnavailableError

PURE_ENV = "CREDITLINE_PURE_RATING"
ALLOW_PURE_ENV = "CREDITLINE_ALLOW_PURE_RATING"
COMPILED_MODULE = "creditline.native.kernels"
PURE_MODULE = "creditline.native.kernels_py"
_TRUE = {"1", "true", "yes", "on"}


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


class KernelModule(Protocol):
    MAX_SAFE_INTEGER: int
    MAX_SEGMENTS: int
    REACH_UNBOUNDED: int
    NO_END: int

    @property
    def Schedule(self) -> KernelScheduleFactory: ...
    def cost_batch(self, schedules: list[KernelSchedule], schedule_index: array[int],
                   from_units: array[int], units: array[int]) -> array[int]: ...
    def affordable_batch(self, schedules: list[KernelSchedule], schedule_index: array[int],
                         from_units: array[int], amounts_micros: array[int],
                         wanted_units: array[int]) -> array[int]: ...


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


def _flag(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in _TRUE


def pure_kernels() -> Kernels:
    return Kernels("pure", cast(KernelModule, importlib.import_module(PURE_MODULE)), "")


def compiled_kernels() -> Kernels:
    """The compiled kernels; ImportError when the build did not produce them."""
    return Kernels("compiled", cast(KernelModule, importlib.import_module(COMPILED_MODULE)), "")


def select_kernels(environ: Mapping[str, str] | None = None) -> Kernels:
    """The compiled kernels unless CREDITLINE_PURE_RATING forces the pure path; the pure
    ones (with the reason in compiled_error) when the compiled module cannot be loaded."""
    env = os.environ if environ is None else environ
    if _flag(env, PURE_ENV):
        return pure_kernels()
    try:
        return compiled_kernels()
    except ImportError as error:
        fallback = pure_kernels()
        return Kernels(fallback.implementation, fallback.module, str(error))


def require_kernels(environ: Mapping[str, str] | None = None) -> Kernels:
    """select_kernels, refusing a silent fall-back: the pure path only when forced
    (CREDITLINE_PURE_RATING) or allowed (CREDITLINE_ALLOW_PURE_RATING)."""
    env = os.environ if environ is None else environ
    kernels = select_kernels(env)
    if kernels.compiled_error and not _flag(env, ALLOW_PURE_ENV):
        raise KernelsUnavailableError(
            f"the compiled rating kernels ({COMPILED_MODULE}) cannot be loaded: "
            f"{kernels.compiled_error}; rebuild the package (pip install .) or set "
            f"{ALLOW_PURE_ENV}=1 to run on the pure-Python kernels "
            "(tens of times slower: bench/rating_bench.py)")
    return kernels


def rating_implementation(environ: Mapping[str, str] | None = None) -> str:
    """"compiled" or "pure": what select_kernels picks, for the start-up log."""
    return select_kernels(environ).implementation
