"""The one error type of the service's commands: a message for a person, printed without a traceback."""


class AnnotateError(Exception):
    """Bad input or a state that forbids the command; the message names the thing."""
