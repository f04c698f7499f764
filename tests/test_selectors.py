"""The three choices of a compiled module or its pure twin (the rating kernels, the Diameter
codec, the OTLP span encoder) follow one rule, charging/kernels.py's select_compiled: the
compiled module by default; CREDITLINE_PURE_RATING forces the twin; a build that cannot
load the compiled module runs the twin only when CREDITLINE_ALLOW_PURE_RATING allows it,
and is refused otherwise with an error naming the module, the import error and both ways
out. A build without the module is simulated by a load function that raises ImportError."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any, NoReturn

import pytest
from creditline.charging import kernels
from creditline.charging.kernels import ALLOW_PURE_ENV, PURE_ENV
from creditline.diameter import codec
from creditline.errors import KernelsUnavailableError
from creditline.native import (
    diameter_codec,
    diameter_codec_py,
    kernels_py,
    otlp_spans,
    otlp_spans_py,
)
from creditline.native import kernels as compiled_kernels
from creditline.observability import otlp_traces

# Why the broken builds' imports fail. Not "No module named ...": that text names the
# module itself, and would hide an error message that does not.
BROKEN = "undefined symbol: __pyx_module_is_main"

# (environ, how to load the compiled module) -> the module chosen
Choose = Callable[[Mapping[str, str], Callable[[], Any]], object]


def broken_build() -> NoReturn:
    """What loading the compiled module does in a build that cannot load it."""
    raise ImportError(BROKEN)


@dataclass(frozen=True)
class Selector:
    choose: Choose
    load_compiled: Callable[[], Any]  # the real import
    compiled: ModuleType
    twin: ModuleType


SELECTORS = {
    "rating kernels": Selector(
        lambda environ, load: kernels.require_kernels(environ, load).module,
        kernels.compiled_kernels, compiled_kernels, kernels_py),
    "Diameter codec": Selector(codec.select_codec, codec.compiled_codec, diameter_codec,
                               diameter_codec_py),
    "OTLP span encoder": Selector(otlp_traces.select_span_encoder,
                                  otlp_traces.compiled_span_encoder, otlp_spans,
                                  otlp_spans_py),
}
each_selector = pytest.mark.parametrize("selector", SELECTORS.values(), ids=SELECTORS.keys())


@each_selector
def test_each_selector_picks_the_compiled_module_by_default(selector: Selector) -> None:
    assert selector.choose({}, selector.load_compiled) is selector.compiled
    assert selector.choose({ALLOW_PURE_ENV: "1"}, selector.load_compiled) is selector.compiled


@each_selector
@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_each_selector_gives_the_twin_when_forced(selector: Selector, value: str) -> None:
    assert selector.choose({PURE_ENV: value}, selector.load_compiled) is selector.twin
    assert selector.choose({PURE_ENV: value}, broken_build) is selector.twin


@each_selector
@pytest.mark.parametrize("environ", [{}, {ALLOW_PURE_ENV: "0"}, {PURE_ENV: "0"}])
def test_each_selector_refuses_a_build_without_the_module(selector: Selector,
                                                          environ: dict[str, str]) -> None:
    with pytest.raises(KernelsUnavailableError) as refused:
        selector.choose(environ, broken_build)
    message = str(refused.value)
    for named in (selector.compiled.__name__, BROKEN, "reinstall (pip install .)",
                  f"set {ALLOW_PURE_ENV}=1 to run the pure twin"):
        assert named in message


@each_selector
def test_each_selector_gives_the_twin_to_a_build_without_the_module_when_allowed(
        selector: Selector) -> None:
    assert selector.choose({ALLOW_PURE_ENV: "1"}, broken_build) is selector.twin


def test_the_selector_reads_the_process_environment_unless_given_one(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PURE_ENV, raising=False)
    monkeypatch.setenv(ALLOW_PURE_ENV, "1")
    assert kernels.select_compiled(broken_build, "twin", "the module (m)") == "twin"
    monkeypatch.delenv(ALLOW_PURE_ENV)
    with pytest.raises(KernelsUnavailableError, match=r"the module \(m\)"):
        kernels.select_compiled(broken_build, "twin", "the module (m)")
    monkeypatch.setenv(PURE_ENV, "1")
    assert kernels.select_compiled(broken_build, "twin", "the module (m)", os.environ) == "twin"
