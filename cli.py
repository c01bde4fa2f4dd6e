"""What every command-line script here shares: bad input is one line on stderr and a non-zero exit, and files
are written atomically."""
import os
import sys
from contextlib import contextmanager
from pathlib import Path


class CLIError(Exception):
    """A problem with the user's input or files. Reported as one line, never as a traceback."""


def run(main):
    """Call main(); turn CLIError into 'error: ...' with exit code 2, and Ctrl-C into exit code 130."""
    try:
        main()
    except CLIError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


@contextmanager
def atomic_write(path):
    """Yield a temporary path beside path to write to. On success it is flushed to disk and renamed to path, so
    path is never half written and a crash leaves any earlier file there intact; on failure it is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
