"""One exception type for every user-facing problem: it names the item and the fix."""


class TextkeepError(Exception):
    """A problem the user can fix. The message says what is wrong, with which item, and how to fix it."""
