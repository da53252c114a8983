"""The errors Lamina raises on purpose, shared by every layer.

Each error carries what the API needs to answer with an OpenAI-shaped body (`status_code`, `error_type`,
`code`, `param`) and a message that quotes the bad value and says how to fix it, so the CLI can print it as
one line and the API can return it unchanged. Anything else that escapes is a bug, not a user error.
"""

from __future__ import annotations


class LaminaError(Exception):
    """Base class. `status_code`/`error_type`/`code` follow OpenAI's error object."""

    status_code: int = 500
    error_type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, object]:
        """The OpenAI error envelope: `{"error": {"message", "type", "param", "code"}}`."""
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}


class InvalidRequestError(LaminaError, ValueError):
    """The caller asked for something invalid (bad argument, empty prompt, out-of-range value)."""

    status_code = 400
    error_type = "invalid_request_error"


class ConfigError(InvalidRequestError):
    """A model or run configuration that is inconsistent (shapes that do not divide, unknown keys)."""

    code = "invalid_config"


class ContextLengthError(InvalidRequestError):
    """Prompt plus requested tokens do not fit the model's context window."""

    code = "context_length_exceeded"


class UnknownModelError(LaminaError, LookupError):
    """A model id that is neither registered nor a path to a model."""

    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class ModelFormatError(LaminaError):
    """A model file or folder that is corrupt, truncated or of an unsupported kind."""

    status_code = 500
    error_type = "server_error"
    code = "model_format_error"


class DeviceError(LaminaError):
    """A device or dtype that this machine does not have."""

    status_code = 500
    error_type = "server_error"
    code = "device_unavailable"
