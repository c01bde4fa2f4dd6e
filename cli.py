"""What every command-line script here shares: flags whose --help shows their defaults and check their domains,
and bad input (or a failed write, out of memory, Ctrl-C, SIGTERM, a closed pipe) as one line on stderr and a
non-zero exit, never a traceback. Reading and writing files safely is files.py's."""
import argparse
import errno
import math
import os
import signal
import sys


class CLIError(Exception):
    """A problem with the user's input or files. Reported as one line, never as a traceback."""


class Terminated(BaseException):
    """SIGTERM, raised wherever the process is (as Ctrl-C raises KeyboardInterrupt), so that the same cleanup runs:
    temporary files are removed and nothing half-written is left."""


def raise_terminated(signum, frame):
    raise Terminated


# errno values of a path the user can fix: no permission, a file in the way of a directory (or the reverse), a
# read-only or full disk, a quota or file-size limit reached.
PATH_ERRORS = {errno.EACCES, errno.EPERM, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.ENOSPC,
               errno.EDQUOT, errno.EFBIG}


def run(main, memory_hint: str = "use smaller sizes"):
    """Call main() and turn what the user can fix into one 'error: ...' line and exit code 2: a CLIError, a path
    that cannot be written (or read), and running out of memory (memory_hint says which flags to lower).
    Ctrl-C is exit code 130 and SIGTERM 143, after the same cleanup; a closed pipe on stdout (| head) ends
    quietly."""
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        main()
        sys.stdout.flush()  # a full disk or a closed pipe behind stdout shows here, not as noise at exit
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except BrokenPipeError:
        silence_stdout()
        sys.exit(128 + signal.SIGPIPE)
    except Exception as err:
        message = user_error(err, memory_hint)
        if message is None:
            raise
        if isinstance(err, OSError) and err.filename is None:  # writing to stdout failed
            silence_stdout()
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        signal.signal(signal.SIGTERM, previous)


def silence_stdout() -> None:
    """Point stdout at /dev/null, so that what is still buffered for a closed pipe or a full disk goes nowhere
    instead of failing again as the interpreter exits."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def user_error(err: Exception, memory_hint: str) -> str | None:
    """The one-line message for an error the user can fix; None for a bug, which keeps its traceback."""
    if isinstance(err, CLIError):
        return str(err)
    if isinstance(err, OSError) and err.errno in PATH_ERRORS:
        in_the_way = " (a file is where a directory should be)" if err.errno in (errno.EEXIST, errno.ENOTDIR) else ""
        return f"{err.filename or 'standard output'}: {err.strerror}{in_the_way}"
    out_of_memory = (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
                     or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err)))
    if out_of_memory:
        return f"out of memory ({first_line(err, 200)}); {memory_hint}"
    return None


def first_line(err: BaseException, width: int) -> str:
    """The first line of err's message, cut at a word boundary to at most width characters ('...' marks a cut);
    its type's name when it has no message."""
    line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if len(line) <= width:
        return line
    return line[:width].rsplit(" ", 1)[0] + " ..."


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and each flag's default after its help (unless there is none to show: None,
    an off switch, or a help that names its default)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults in --help and a bad flag as one line ('error: ...', exit 2 through run()) instead
    of the usage block; the usage is in --help."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=HelpFormatter, **kwargs)

    def error(self, message):
        raise CLIError(f"{message} (see --help)")


def number(kind, minimum=None, above=None, maximum=None):
    """An argparse type: a finite int or float, at least minimum or more than above, and at most maximum (an
    int at most 2^63 - 1 in any case: torch takes no larger)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text!r}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be more than {above}, got {text!r}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {text!r}")
        if kind is int and maximum is None and value > MAX_INT:
            raise argparse.ArgumentTypeError(f"must be at most 2^63 - 1, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


MAX_INT = 2**63 - 1
positive_int = number(int, minimum=1)
finite_float = number(float)
positive_float = number(float, above=0)
non_negative_float = number(float, minimum=0)
MAX_SEED = 2**64 - 1  # the largest seed torch.manual_seed takes
seed_int = number(int, minimum=0, maximum=MAX_SEED)
