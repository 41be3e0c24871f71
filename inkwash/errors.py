"""User-facing errors. Owns nothing else; every layer may raise these."""


class UserError(Exception):
    """A mistake the user can fix (bad argument, missing file). The CLI prints it as one sentence, exit 2."""
