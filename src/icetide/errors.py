"""The one exception type the CLI turns into a one-line error message."""


class IcetideError(ValueError):
    """Bad input or an impossible request; the message names the problem in one line."""
