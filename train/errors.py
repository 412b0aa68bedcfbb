"""User errors: a wrong config value, an unknown dataset, an unusable workdir.

`python -m train` prints a `UserError` as one line and exits with status 2, without a
traceback. Anything else is a bug and keeps its traceback."""


class UserError(Exception):
  """A problem the user can fix; the message names the bad value and what is accepted."""
