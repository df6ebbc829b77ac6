"""fedrec's one-line errors inside Flower's runtimes.

Flower logs an exception that ends a ServerApp, or that a ClientApp raises, with its whole
traceback (on the simulation engine a Ray traceback of several kilobytes), and reports its
text at the end. A :class:`~fedrec.errors.FedrecError` is bad input, already named in its
one-line message, so:

* :class:`OneLineFedrecErrors` (a filter on Flower's ``flwr`` logger, added by the ServerApp
  and the ClientApp: :func:`install_one_line_errors`) logs such a record as one line,
  ``ServerApp raised an exception: fedrec: error: ...``; the run still ends
  ``finished:failed`` and its status details hold the message (``fedrec launch`` prints it);
* :func:`fedrec_errors_mod` (a ClientApp mod) answers a message whose handler raised a
  FedrecError with an error reply whose reason is that one line,
  logged once, and leaves the node's state as it was before the message. Other exceptions
  go through untouched (Flower logs and reports them as ever). In the in-process runner
  (:mod:`fedrec.federated.runner`, inside :func:`raising_fedrec_errors`) the error is
  raised as it is instead, so ``fedrec simulate`` prints the node's own message.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from logging import ERROR

from flwr.app import Context, Error, Message

from fedrec.errors import FedrecError

__all__ = ["OneLineFedrecErrors", "install_one_line_errors", "fedrec_errors_mod", "error_reason",
           "raising_fedrec_errors"]

_local = threading.local()


@contextlib.contextmanager
def raising_fedrec_errors():
    """Within this block (this thread), :func:`fedrec_errors_mod` lets a FedrecError
    propagate instead of replying with an error (the in-process runner: no transport)."""
    before = getattr(_local, "raising", False)
    _local.raising = True
    try:
        yield
    finally:
        _local.raising = before


class OneLineFedrecErrors(logging.Filter):
    """Log a record that carries a FedrecError as one line, without its traceback (see the
    module docstring); every other record passes unchanged."""

    fedrec = True  # marks the filter, so that a re-imported module does not add a second one

    def filter(self, record: logging.LogRecord) -> bool:
        """Drop the traceback of a FedrecError's record and append its message (keeps every record)."""
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, FedrecError):
            record.msg, record.args = f"{record.getMessage()}: fedrec: error: {exc}", None
            record.exc_info = None
            record.exc_text = None
        return True


def install_one_line_errors(logger: logging.Logger | None = None) -> None:
    """Add :class:`OneLineFedrecErrors` to ``logger`` (default: Flower's ``flwr``), once."""
    logger = logger or logging.getLogger("flwr")
    if not any(getattr(f, "fedrec", False) for f in logger.filters):
        logger.addFilter(OneLineFedrecErrors())


def error_reason(reason: str) -> str:
    """The message inside a failed reply's reason, without Flower's wrapping
    (``<class 'X'>:<'...'>``, ``Exception ClientAppException occurred. Message: ``), so a
    node's error reads as one line in the server's."""
    text = " ".join(str(reason).split())
    if text.startswith("<class '") and ":<'" in text and text.endswith("'>"):
        text = text[text.index(":<'") + 3:-2]
    marker = "occurred. Message: "
    if marker in text:
        text = text[text.index(marker) + len(marker):]
    return text.strip()


def fedrec_errors_mod(msg: Message, context: Context, call_next) -> Message:
    """A ClientApp mod: a FedrecError raised by the handler becomes an error reply with a
    one-line reason (the error's message), logged once; the node's ``context.state`` is
    what it was before the message (as when Flower handles a raised exception)."""
    from flwr.common.constant import ErrorCode
    from flwr.common.logger import log

    before = dict(context.state.items())
    try:
        return call_next(msg, context)
    except FedrecError as exc:
        if getattr(_local, "raising", False):
            raise
        for key in [k for k in context.state.keys() if k not in before]:
            del context.state[key]
        for key, value in before.items():
            context.state[key] = value
        log(ERROR, "fedrec: error: %s (%s message, node %s)", exc, msg.metadata.message_type, context.node_id)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(exc)), reply_to=msg)
