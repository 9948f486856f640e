"""Errors the pipeline raises for bad input; stage scripts turn them into one clear line and exit 1."""


class AeadError(Exception):
    """Base class: a problem with the user's input, params or data, explained in the message."""


class ParamsError(AeadError):
    """A params.yaml key is unknown, missing, of the wrong type or out of range."""


class DataError(AeadError):
    """A data file or folder is missing, unreadable or not what was expected."""


class CheckpointError(AeadError):
    """A checkpoint does not exist or does not match the model or data it is used with."""


class TrainingError(AeadError):
    """Training cannot go on (e.g. the loss became NaN or infinite)."""
