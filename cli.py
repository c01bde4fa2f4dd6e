"""What every command-line script here shares: bad input is one line on stderr and a non-zero exit."""
import sys


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
