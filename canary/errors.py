"""The refusal every layer can raise: a request turned down, with its HTTP status."""


class Refusal(Exception):
    """A request the service turns down, with the HTTP status that says why (and headers to send with it)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
