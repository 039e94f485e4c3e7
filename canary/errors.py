"""The refusal every layer can raise: a request turned down, with its HTTP status."""


class Refusal(Exception):
    """A request the service turns down, with the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
