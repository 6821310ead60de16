"""The one exception type every tool raises on rejected input or a failed call."""


class ToolError(ValueError):
    """A tool rejected its input or could not produce a result.

    The registry turns it into MOSS's `No result.` for the model and logs the message; library
    callers get the message, which says what was rejected and why.
    """


class CommandParseError(ToolError):
    """The `<|Commands|>` text is not a list of `Name("argument")` calls or `None`."""
