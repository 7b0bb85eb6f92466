"""The one exception hierarchy of embedq, with the exit codes scripts can rely on.

Every message says what was wrong, where, and what to do about it.
"""

from __future__ import annotations


class EmbedqError(Exception):
    """Base of every error embedq raises on purpose; `exit_code` is what the CLI exits with."""

    exit_code = 1


class UsageError(EmbedqError):
    """A flag, a configuration value or a combination of them is invalid."""

    exit_code = 2


class SourceError(EmbedqError):
    """The source cannot be read, or holds something that cannot be embedded as asked."""

    exit_code = 3


class ModelError(EmbedqError):
    """The model directory is missing, incomplete or not a model embedq can run."""

    exit_code = 4


class RedisUnavailable(EmbedqError):
    """Redis does not answer, refuses the credentials, or is not a version embedq supports."""

    exit_code = 5


class OutputError(EmbedqError):
    """The output location cannot be written durably (missing, read-only, full)."""

    exit_code = 6


class JobMismatch(EmbedqError):
    """The job in Redis was made with other settings (model, source, batching) than asked for now."""

    exit_code = 7


class VerificationFailed(EmbedqError):
    """`embedq verify` found a missing, duplicated or invalid embedding."""

    exit_code = 8


class ProtocolError(EmbedqError):
    """A message read from Redis does not match the schema or its limits; it is dead-lettered.

    `code` is a stable, machine-readable reason (one of `embedq.protocol.REASON_CODES`): scripts and
    tests match on it, never on the wording, which may quote a library's own message.
    """

    exit_code = 9

    def __init__(self, message: str, *, code: str) -> None:
        super().__init__(message)
        self.code = code


class EngineError(EmbedqError):
    """An inference backend is unavailable or failed to build, load or run."""

    exit_code = 10


class Interrupted(EmbedqError):
    """The run was stopped by a signal; what was in flight was committed or left to be reclaimed."""

    exit_code = 130
