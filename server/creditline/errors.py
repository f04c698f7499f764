"""Creditline's exceptions, in one tree, so that a caller can catch by kind:

    CreditlineError
    +-- ConfigError (also a ValueError: `creditline serve` says it in one line, exit 2)
    |   +-- SettingsError            a setting's value, or settings that do not fit together
    |   +-- PlanError                a plan file that cannot be used
    |   +-- KernelsUnavailableError  no compiled kernels, and the pure path not allowed
    |   +-- TelemetryError           an OTEL_* variable the server does not understand
    |   +-- RedisSetupError          a Redis that cannot be used (address, AUTH, TLS, version)
    +-- StoreError
    |   +-- StoreDataError (also a ValueError)  data this version cannot use
    |   +-- ScriptError              Redis refused a command or a script (its error reply)
    |   +-- StoreUnavailableError    Redis failed or did not answer: nothing, or all, applied
    +-- MalformedEntryError (also a ValueError)  a stream entry the scripts did not write
    +-- CallRefusedError (creditline.api.security)  a call the caller may not make

The messages are the ones each raised before this tree; the ValueError bases keep the
callers that caught ValueError working. Connection failures stay OSError (ConnectionError,
TimeoutError): they are the network's, not Creditline's.
"""

from __future__ import annotations


class CreditlineError(Exception):
    """Every error Creditline raises of its own."""


class ConfigError(CreditlineError, ValueError):
    """The server cannot start as configured; the message names what to change."""


class SettingsError(ConfigError):
    """A setting's value (the message starts with `setting <name>:`)."""


class PlanError(ConfigError):
    """A plan file that cannot be used; the message names file, field and reason."""


class KernelsUnavailableError(ConfigError):
    """The compiled kernels are missing and the pure path was not allowed."""


class TelemetryError(ConfigError):
    """An OTEL_* variable holds a value the server does not understand."""


class RedisSetupError(ConfigError):
    """The Redis configured cannot be used: unreachable, refused AUTH or TLS, too old."""


class StoreError(CreditlineError):
    """Redis, or what it holds, did not allow what was asked."""


class StoreDataError(StoreError, ValueError):
    """Redis holds data this version cannot use (other key names, another partition
    count): said at start, before anything is written."""


class ScriptError(StoreError):
    """Redis answered a command or a script with an error reply (its text is Redis's)."""


class StoreUnavailableError(StoreError):
    """Redis failed or did not answer within the deadline: nothing was applied, or the
    whole request was (a script is atomic); the client retransmits."""


class MalformedEntryError(CreditlineError, ValueError):
    """A stream entry that is not one the scripts write (written by hand, say)."""
