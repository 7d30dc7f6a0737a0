"""Errors of the app layer: messages meant for the user (shown in the UI, returned by the API)."""


class AppInputError(ValueError):
    """An input of a request cannot be used; the message names it and says why."""
