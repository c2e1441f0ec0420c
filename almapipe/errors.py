"""Errors that mean "the request is wrong", never retried by a worker."""


class ParameterError(ValueError):
    """A parameter value is invalid; the message names the parameter and the value."""
