"""Errors a user can fix: a wrong config value, missing data, an unusable checkpoint or workdir.

Their messages say what is wrong and what to do. The command-line tools print them without a
Python traceback (``--traceback`` shows it) and exit with status 2; any other exception is a bug
and keeps its traceback.
"""


class UserError(Exception):
    """An expected error whose message is all the user needs."""


class ConfigError(UserError, ValueError):
    """A config value that cannot work (checked before data loading and compilation)."""
