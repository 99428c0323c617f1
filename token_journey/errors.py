"""One exception type for bad input, so every stage can print it as one line.

A `TokenJourneyError` message names the bad value and the fix; stages catch it at the top
(see `token_journey.stage`) and exit with status 2 instead of showing a traceback.
"""


class TokenJourneyError(Exception):
    """Bad input or a broken artifact that the user can fix; the message is the whole story."""
