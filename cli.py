"""What every command-line script here shares: flags whose --help shows their defaults, bad input as one line on
stderr and a non-zero exit, and files written atomically."""
import argparse
import errno
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path


class CLIError(Exception):
    """A problem with the user's input or files. Reported as one line, never as a traceback."""


# errno values of a path the user can fix: no permission, a file in the way of a directory (or the reverse), a
# read-only or full disk.
PATH_ERRORS = {errno.EACCES, errno.EPERM, errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.EROFS, errno.ENOSPC}


def run(main, memory_hint: str = "use smaller sizes"):
    """Call main() and turn what the user can fix into one 'error: ...' line and exit code 2: a CLIError, a path
    that cannot be written (or read), and running out of memory (memory_hint says which flags to lower).
    Ctrl-C is exit code 130."""
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as err:
        message = user_error(err, memory_hint)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def user_error(err: Exception, memory_hint: str) -> str | None:
    """The one-line message for an error the user can fix; None for a bug, which keeps its traceback."""
    if isinstance(err, CLIError):
        return str(err)
    if isinstance(err, OSError) and err.errno in PATH_ERRORS:
        in_the_way = " (a file is where a directory should be)" if err.errno in (errno.EEXIST, errno.ENOTDIR) else ""
        return f"{err.filename}: {err.strerror}{in_the_way}"
    out_of_memory = (isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError"
                     or (isinstance(err, RuntimeError) and "can't allocate memory" in str(err)))
    if out_of_memory:
        return f"out of memory ({str(err).splitlines()[0][:120] or type(err).__name__}); {memory_hint}"
    return None


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
    """An argparse type: a finite int or float, at least minimum or more than above, and at most maximum."""
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
        return value

    parse.__name__ = kind.__name__
    return parse


positive_int = number(int, minimum=1)
finite_float = number(float)
positive_float = number(float, above=0)
non_negative_float = number(float, minimum=0)


def refuse_overwrite(directory, names, force: bool, what: str) -> None:
    """Refuse to write the files names into directory when it is a file, when one of them is a directory, and,
    unless force, when any of them exists already (force replaces those, and never anything else)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CLIError(f"{directory} exists and is not a directory")
    for name in names:
        if (directory / name).is_dir():
            raise CLIError(f"{directory / name} is a directory")
    existing = [name for name in names if (directory / name).exists()]
    if existing and not force:
        raise CLIError(f"{directory} already holds {what} ({', '.join(existing)}); pass --force to replace "
                       f"{'it' if len(existing) == 1 else 'them'}")


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside path to write to. On success it is flushed to disk and renamed to path, so
    path is never half written and a crash leaves any earlier file there intact; on failure it is removed."""
    with atomic_write_all([path]) as (tmp,):
        yield tmp


@contextmanager
def atomic_write_all(paths):
    """atomic_write for files that belong together: yield their temporary paths; on success each is flushed to
    disk and all are renamed into place in the order given. If that is interrupted, the ones already renamed are
    removed, so that no reader sees some new files beside some old ones (remove what they replace first, as the
    last one's absence tells a reader the set is incomplete)."""
    paths = [Path(path) for path in paths]
    temps = [path.with_name(f".{path.name}.tmp") for path in paths]
    renamed = []
    try:
        yield temps
        for tmp in temps:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
            renamed.append(path)
    except BaseException:
        for path in renamed:
            path.unlink()
        raise
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
