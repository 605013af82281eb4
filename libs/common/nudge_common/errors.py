"""The two ways processing a message can fail, kept apart on purpose.

* :class:`InvalidMessage`: this message is bad and always will be. It goes to the
  dead-letter topic with the reason and the partition moves on.
* :class:`RetryLater`: something we depend on is slow or down. Nothing is dead-lettered;
  the batch is retried with back-off until it succeeds or the service is stopped.
"""

from __future__ import annotations


class InvalidMessage(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryLater(Exception):
    pass


class DeadLetterLimitExceeded(Exception):
    """More dead letters than the configured rate: stop rather than drain the stream."""
