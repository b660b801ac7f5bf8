"""Errors that the command line reports as one line, without a traceback."""


class FPTError(Exception):
    """A problem the user can fix (a bad path, a wrong option, missing weights); the message says how."""


class BackboneError(FPTError):
    """The backbone spec cannot be built or its weights cannot be loaded."""
