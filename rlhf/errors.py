"""One exception type for problems the user can fix; the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input (config key, file, row, host...). The message says what and how to fix it."""
