"""Errors in OpenAI's JSON shape, ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

import json
from collections.abc import Mapping

from starlette.responses import Response

__all__ = ["Reject", "error_body", "error_response"]


class Reject(Exception):
    """Raised anywhere while answering a request: answer it with this status and error
    instead (``headers`` such as ``Connection: close`` go with it)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = (
            status, message, kind, code, param)
        self.headers = headers


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None,
               param: str | None = None) -> bytes:
    # ASCII escapes: a message that quotes the request (a model name holding a lone
    # surrogate) must still encode, and as valid JSON
    return json.dumps({"error": {"message": message, "type": kind, "param": param,
                                 "code": code}}).encode()


def error_response(status: int, message: str, kind: str = "invalid_request_error",
                   code: str | None = None, param: str | None = None,
                   headers: Mapping[str, str] | None = None) -> Response:
    return Response(error_body(message, kind, code, param), status_code=status,
                    headers=headers, media_type="application/json")
