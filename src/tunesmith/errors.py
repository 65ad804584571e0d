"""Errors a user can act on. Each names what is wrong and where."""


class TunesmithError(Exception):
    """Base for every error tunesmith raises on purpose."""


class ConfigError(TunesmithError):
    """The run configuration is invalid (names the key path)."""


class DataError(TunesmithError):
    """The data is missing or malformed (names the file, row and field)."""


class TrainingError(TunesmithError):
    """Training could not go on (e.g. NaN loss); the last good checkpoint is kept."""
