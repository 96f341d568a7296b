"""A small JSON-over-HTTP client with retries (stdlib urllib): what the API judge needs and no more.

- Retried: 429, 5xx, timeouts, connection errors and bodies that are not JSON; `Retry-After` (seconds
  or an HTTP date) is honoured, else exponential backoff with full jitter, capped; at most
  `max_attempts` tries. Other 4xx fail at once (a bad request or key does not get better).
- Sleeping and time go through a `Clock`, so tests replace them with a fake clock.
- Headers are passed per call and never logged: error messages carry the status and a short body
  excerpt only.
"""

from __future__ import annotations

import dataclasses
import email.utils
import json
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Mapping, Optional

RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class Clock:
    """Real time."""

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class HttpError(RuntimeError):
    """A request that failed for good (after retries, or at once for a non-retryable status)."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry."""

    max_attempts: int = 6
    base_delay_s: float = 1.0
    max_delay_s: float = 60.0
    max_retry_after_s: float = 300.0  # a server asking for longer is not waited for


def parse_retry_after(value: Optional[str], now: float) -> Optional[float]:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


def backoff_delay(attempt: int, policy: RetryPolicy, rng: random.Random) -> float:
    """Full-jitter exponential backoff for the given (1-based) failed attempt."""
    cap = min(policy.max_delay_s, policy.base_delay_s * (2 ** (attempt - 1)))
    return rng.uniform(0, cap)


def _post_once(url: str, body: bytes, headers: Mapping[str, str], timeout: float) -> tuple[int, dict, bytes]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers.items()) if e.headers else {}, e.read() or b""


class JsonClient:
    """POST JSON, get JSON back, with the retry policy above. Thread-safe."""

    def __init__(self, policy: RetryPolicy = RetryPolicy(), clock: Optional[Clock] = None, seed: int = 0):
        self.policy = policy
        self.clock = clock or Clock()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def _delay(self, attempt: int) -> float:
        with self._lock:
            return backoff_delay(attempt, self.policy, self._rng)

    def post(self, url: str, payload: Mapping, headers: Mapping[str, str], timeout: float) -> dict:
        """The parsed JSON answer; raises `HttpError` when retries are exhausted or the status is final."""
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        last = "no attempt"
        for attempt in range(1, self.policy.max_attempts + 1):
            wait = None
            try:
                status, response_headers, data = _post_once(url, body, headers, timeout)
            except (socket.timeout, TimeoutError) as e:
                last = f"timeout after {timeout}s ({e})"
            except urllib.error.URLError as e:
                last = f"connection error ({e.reason})"
            except (ConnectionError, OSError) as e:
                last = f"connection error ({e})"
            else:
                if status == 200:
                    try:
                        return json.loads(data.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        last = f"HTTP 200 with a body that is not JSON: {data[:120]!r}"
                elif status in RETRY_STATUSES or status >= 500:
                    last = f"HTTP {status}: {data[:200].decode('utf-8', 'replace')}"
                    lowered = {k.lower(): v for k, v in response_headers.items()}
                    wait = parse_retry_after(lowered.get("retry-after"), self.clock.time())
                    if wait is not None and wait > self.policy.max_retry_after_s:
                        raise HttpError(f"{url}: HTTP {status}, Retry-After {wait:.0f}s is longer than "
                                        f"{self.policy.max_retry_after_s:.0f}s", status)
                else:
                    raise HttpError(f"{url}: HTTP {status}: {data[:300].decode('utf-8', 'replace')}", status)
            if attempt < self.policy.max_attempts:
                self.clock.sleep(wait if wait is not None else self._delay(attempt))
        raise HttpError(f"{url}: gave up after {self.policy.max_attempts} attempts; last: {last}")
