"""Exceptions whose message is one sentence a person can act on (printed as is by the CLIs and the app)."""


class CorrvosError(Exception):
    """Base class: ``str(err)`` names the problem and what to do about it."""


class CheckpointError(CorrvosError):
    """A checkpoint file is missing, unreadable, corrupt or does not match any known architecture."""


class InputError(CorrvosError):
    """A user-provided video, frame folder or mask cannot be used (unreadable, empty, wrong size)."""


class DatasetError(CorrvosError):
    """A dataset folder lacks files the command needs."""
