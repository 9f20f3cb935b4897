"""OpenAI-shaped errors, as vLLM (>= 0.10.1) writes them:
``{"error": {"message", "type", "param", "code"}}`` with ``code`` the HTTP status."""

from __future__ import annotations

import orjson

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestEntityTooLargeError",
    415: "UnsupportedMediaTypeError",
    500: "InternalServerError",
    502: "BadGatewayError",
    503: "ServiceUnavailableError",
    504: "GatewayTimeoutError",
}


class ProxyError(Exception):
    """A failure the client should see with this status and message."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.param)

    def sse_event(self) -> bytes:
        """The mid-stream form: one ``data: {"error": ...}`` event, then ``data: [DONE]``."""
        return b"data: " + self.body() + b"\n\ndata: [DONE]\n\n"


class UnreadableBody(ProxyError):
    """The request body cannot be read to its end: its framing or Content-Encoding is broken
    (``cause``: aiohttp's ``RequestPayloadError``). The connection cannot carry another
    request, so the answer closes it."""

    def __init__(self, cause: BaseException) -> None:
        detail = " ".join(str(cause).split()).removeprefix("400, message: ")
        super().__init__(400, f"cannot read the request body: {detail}")


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": _TYPES.get(status, "BadRequestError" if status < 500 else "ServerError"),
                "param": param,
                "code": status,
            }
        }
    )
