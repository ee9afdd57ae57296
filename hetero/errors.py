"""Errors a user can cause. The CLI prints their message as one line and exits with code 2."""


class HeteroError(Exception):
    """A problem with the user's input or environment, with a message written for them."""
