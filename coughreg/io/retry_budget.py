"""S3 outages: a request that fails for a reason that passes (no connection, a dropped one, a timeout, a 5xx,
throttling) is tried again until the store has been failing for longer than a time budget.

The budget (``S3Options.retry_budget_seconds``, from ``ingest.retry_budget_seconds``: 120 s by default) counts
the time since the last success of the requests sharing an ``Outage`` (the parts of one download, the pages of
one listing), so a long transfer survives several short outages and fails only on one that outlasts the budget;
the message then names the URI. botocore's own retries (``S3Options.max_attempts``) happen inside each try.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from coughreg.runtime.errors import StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")
PASSING_CODES = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                 "Throttling", "ThrottlingException", "RequestLimitExceeded"}
MAX_PAUSE = 4.0  # seconds between tries, at most


class BudgetSpent(StorageError):
    """The store failed for longer than the retry budget: the message names the URI."""


class ShortRead(Exception):
    """A response body that ended before the bytes it announced (a connection dropped mid-transfer)."""


def passing(exc: BaseException) -> bool:
    """Whether ``exc`` says the store could not be reached or answered for now (worth another try)."""
    from botocore.exceptions import ClientError, HTTPClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError

    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return str(error.get("Code", "")) in PASSING_CODES or (isinstance(status, int) and status >= 500)
    return isinstance(exc, (BotoConnectionError, HTTPClientError, IncompleteReadError, ShortRead, ConnectionError, TimeoutError))


def _brief(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


class Outage:
    """How long the requests of one transfer have failed since the last success, against the budget.

    Args:
        uri: what the requests are for (named when the budget runs out).
        budget: seconds of failures in a row that are waited out; 0: the first failure is final.
    """

    def __init__(self, uri: str, budget: float) -> None:
        self.uri = uri
        self.budget = max(0.0, float(budget))
        self._since: float | None = None
        self._lock = threading.Lock()

    def succeeded(self) -> None:
        with self._lock:
            self._since = None

    def failed(self, exc: BaseException, attempt: int) -> None:
        """Pause before try ``attempt + 1``; raise once the failures have lasted longer than the budget.

        Raises:
            BudgetSpent: naming the URI, how long the store failed and why.
        """
        now = time.monotonic()
        with self._lock:
            if self._since is None:
                self._since = now
            elapsed = now - self._since
        if elapsed >= self.budget:
            raise BudgetSpent(
                f"{self.uri}: S3 failed for {elapsed:.0f} s in a row, longer than the retry budget of {self.budget:g} s "
                f"(ingest.retry_budget_seconds): {_brief(exc)}; run again when the store answers"
            ) from None
        pause = min(MAX_PAUSE, 0.25 * 2**attempt, self.budget - elapsed + 0.05)
        log.warning("%s: S3 failed (%s); trying again in %.1f s (%.0f of %g s of the retry budget used)",
                    self.uri, _brief(exc), pause, elapsed, self.budget)
        time.sleep(pause)

    def call(self, request: Callable[[], T]) -> T:
        """``request()``, tried again while its failures pass and the budget lasts; other errors are raised as they are."""
        attempt = 0
        while True:
            try:
                result = request()
            except Exception as exc:
                if not passing(exc):
                    raise
                self.failed(exc, attempt)
                attempt += 1
            else:
                self.succeeded()
                return result
