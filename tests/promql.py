"""The metric and label names a PromQL expression uses, for holding deploy/'s rules and
dashboard to tests/metric_names.py. Not a PromQL parser (promtool is the real one, and the
tests run it on the same expressions): enough of the grammar to tell a metric from a
function, a keyword, a label or a duration."""

from __future__ import annotations

import re

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_RANGE = re.compile(r"\[[^\]]*\]")
# by (...), without (...), on (...), ignoring (...), group_left/right (...): label lists
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHERS = re.compile(r"\{([^}]*)\}")
_IDENTIFIER = re.compile(r"(?<![\w.:])[A-Za-z_:][\w:]*")
_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "by", "without", "on",
                       "ignoring", "group_left", "group_right", "inf", "nan", "Inf", "NaN"})
# Grafana's variables that stand for a duration, replaced before promtool sees a panel's query
GRAFANA_DURATIONS = {"$__rate_interval": "1m", "${__rate_interval}": "1m",
                     "$__interval": "1m", "${__interval}": "1m", "$__range": "1h"}


def for_promtool(expr: str) -> str:
    """A Grafana query as Prometheus would receive it (its duration variables filled in)."""
    for variable, value in GRAFANA_DURATIONS.items():
        expr = expr.replace(variable, value)
    return expr


def label_names(expr: str) -> set[str]:
    expr = _RANGE.sub("", for_promtool(expr))
    names: set[str] = set()
    for _keyword, labels in _LABEL_LIST.findall(_STRING.sub('""', expr)):
        names.update(label.strip() for label in labels.split(",") if label.strip())
    for matchers in _MATCHERS.findall(_STRING.sub('""', expr)):
        names.update(m.group(0) for m in re.finditer(r"[A-Za-z_]\w*(?=\s*(=~|!~|!=|=))",
                                                     matchers))
    return names


def metric_names(expr: str) -> set[str]:
    """Every metric (series) name in the expression: identifiers that are not functions
    (followed by "("), keywords, label names or inside strings and durations."""
    expr = _STRING.sub('""', _RANGE.sub("", for_promtool(expr)))
    expr = _LABEL_LIST.sub(" ", expr)
    expr = _MATCHERS.sub(" ", expr)
    names = set()
    for match in _IDENTIFIER.finditer(expr):
        name = match.group(0)
        if name in _KEYWORDS or expr[match.end():].lstrip().startswith("("):
            continue
        names.add(name)
    return names
