# The compiled OTLP span encoder (native/otlp_spans.pyx): what its twin,
# creditline/native/otlp_spans_py.py, defines.
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan

def encode_spans(spans: Sequence[ReadableSpan]) -> bytes: ...
