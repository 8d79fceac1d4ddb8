"""Connection-level guards of the reward server, below the app: a connection limit and a request deadline on
uvicorn's h11 protocol, and query strings kept out of the access log."""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import TYPE_CHECKING

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

if TYPE_CHECKING:
    from .server import ServerLimits


def guarded_protocol(limits: ServerLimits, token: str) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection limit and a request deadline (uvicorn has neither: a connection that
    sends nothing, or half a request, stays open forever, and enough of them lock every client out).

    Past `max_connections`, a new connection makes room by closing another, in the order of `_eviction_rank`: first
    the oldest that has never sent a byte, then the one idle longest between requests, then the one stalled longest
    in a request without the right token. A connection uploading an authenticated request, or whose whole request is
    with the app, is never closed for room: if only those remain, the new connection is the one closed."""
    expected = f"Bearer {token}".encode()

    class GuardedH11Protocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._opened_at = self._quiet_since = self.loop.time()
            self._spoken = False  # sent a byte yet
            if len(self.connections) > limits.max_connections:
                ranked = [
                    (rank, c)
                    for c in self.connections
                    if c is not self and not c.transport.is_closing() and (rank := c._eviction_rank()) is not None
                ]
                victim = min(ranked, key=lambda pair: pair[0])[1] if ranked else self
                victim.transport.close()
            self._arm()

        def data_received(self, data: bytes) -> None:
            self._spoken = True
            self._quiet_since = self.loop.time()
            super().data_received(data)

        def _eviction_rank(self) -> tuple[int, float] | None:
            """The lowest rank is closed first to make room; None: never closed for room."""
            if not self._spoken:
                return 0, self._opened_at  # never sent a byte: the oldest goes first
            if not self._waiting_for_request():
                return None  # its whole request is with the app
            if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
                return 1, self._quiet_since  # idle between requests
            if self._uploading_with_token():
                return None  # an authenticated upload: bounded by request_timeout_s, never closed for room
            return 2, self._quiet_since  # headers still arriving, or a body without the right token

        def _uploading_with_token(self) -> bool:
            if self.cycle is None or self.cycle.response_complete or self.conn.their_state is not h11.SEND_BODY:
                return False
            given = next((value for name, value in self.headers if name == b"authorization"), b"")
            return hmac.compare_digest(given, expected)

        def _waiting_for_request(self) -> bool:
            """No complete request of this connection is with the app: idle, or a request still arriving."""
            return self.cycle is None or self.cycle.response_complete or self.conn.their_state is not h11.DONE

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_later(limits.request_timeout_s, self._deadline_passed)

        def _deadline_passed(self) -> None:
            self._timer = None
            if not self.transport.is_closing() and self._waiting_for_request():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._quiet_since = self.loop.time()
                self._arm()

        def connection_lost(self, exc) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


class RedactQueryStrings(logging.Filter):
    """Keep query strings out of uvicorn's access log: a token sent as `?token=` would otherwise be logged in full."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], args[2].split("?", 1)[0] + "?<redacted>", *args[3:])
        return True
