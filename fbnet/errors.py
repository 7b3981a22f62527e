"""The one base class of every failure fbnet expects: bad input, a missing or damaged file, a
setting that cannot work. Each message names the file (and line or key) at fault.

Both command-line tools and the HTTP server catch :class:`FbnetError` and nothing narrower: the
CLIs print its message as one line and exit with code 1, the server answers ``{"error": message}``
with the error's :attr:`~FbnetError.http_status`: 4xx for a bad request (400; 413 for an image
over the pixel limit), 503 for a full queue, 500 for the server's own bundle or gallery files
found damaged while answering. Any other exception is a bug, and keeps its traceback.
"""


class FbnetError(Exception):
    """An expected failure; ``str(error)`` is the one line shown to the user."""

    #: the HTTP status the server answers it with
    http_status = 400
