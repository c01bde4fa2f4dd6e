"""Files the project reads from users and writes for them: values read back checked (the one JSON reader, regular
readable files, field types and ranges), files written atomically with any failure as one line, and output
directories that one process owns and that are never overwritten without --force."""
import dataclasses
import json
import math
import os
import typing
from contextlib import contextmanager
from pathlib import Path

from cli import CLIError, first_line

try:
    import fcntl
except ImportError:  # not POSIX: directories are not locked
    fcntl = None


# ---- values read from files ---------------------------------------------------------------------

def parse_json(text: str | bytes, where: str):
    """The value of the JSON document text; anything else (bad syntax, bytes that are not UTF-8, nesting deeper
    than Python's parser goes) is a CLIError naming where."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CLIError(f"{where}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except UnicodeDecodeError:
        raise CLIError(f"{where}: not UTF-8 text") from None
    except RecursionError:
        raise CLIError(f"{where}: JSON nested too deeply to read") from None


def regular_file(path, what: str = "file") -> Path:
    """path, if it names a regular file this process can read: not a directory, nor a named pipe or device
    (reading one could block forever or never end), nor a file it lacks permission for."""
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{what} {path} does not exist")
    if not path.is_file():
        raise CLIError(f"{what} {path} is not a regular file")
    try:
        open(path, "rb").close()
    except OSError as err:
        raise CLIError(f"cannot read {what} {path}: {err.strerror}") from None
    return path


def read_json(path, kind=dict):
    """The JSON value in the file at path, which must be of kind (a dict: an object); one line if it is not."""
    path = regular_file(path, "JSON file")
    try:
        data = parse_json(path.read_bytes(), str(path))
    except OSError as err:
        raise CLIError(f"{path}: {err.strerror}") from None
    if not isinstance(data, kind):
        raise CLIError(f"{path} does not hold a JSON {'object' if kind is dict else kind.__name__}")
    return data


def is_of(value, kind) -> bool:
    """isinstance for values read from files: a bool is no int, an int is a float, a float must be finite."""
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:  # within int64, as torch takes them
        return isinstance(value, int) and not isinstance(value, bool) and -2**63 <= value < 2**63
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, kind)


KIND_NAMES = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", dict: "an object",
              list: "a list", type(None): "None"}


def check_field_types(config) -> None:
    """Raise ValueError naming the first field of the dataclass instance config whose value is not of its
    annotated type (see is_of; "X | None" takes either)."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kinds = typing.get_args(f.type) or (f.type,)
        if not any(is_of(value, kind) for kind in kinds):
            expected = " or ".join(KIND_NAMES.get(kind, kind.__name__) for kind in kinds)
            raise ValueError(f"{f.name} must be {expected}, got {value!r}")


def require(value, kind, where: str, minimum=None):
    """value, if it is of kind (is_of) and at least minimum; otherwise a CLIError naming where it was read."""
    if value is None:
        raise CLIError(f"{where} is missing (or null)")
    if not is_of(value, kind):
        raise CLIError(f"{where} must be {KIND_NAMES.get(kind, kind.__name__)}, got {value!r}")
    if minimum is not None and value < minimum:
        raise CLIError(f"{where} must be at least {minimum}, got {value!r}")
    return value


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


# ---- files and directories written ---------------------------------------------------------------

@contextmanager
def owned_directory(path, what: str = "this directory"):
    """Create the directory path if needed, and own it while the body runs: an exclusive lock (flock) that a
    second process asking for it is refused, in one line, instead of both writing. A directory created here and
    still empty at the end (nothing was written) is removed."""
    path = Path(path)
    created = not path.exists()
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise CLIError(f"{path} is in use by another process writing {what}; wait for it to finish, or "
                               "choose another directory") from None
        yield path
    finally:
        os.close(fd)  # releases the lock
        if created and path.is_dir() and not any(path.iterdir()):
            path.rmdir()


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
            os.chmod(tmp, 0o666 & ~current_umask())  # readable as the user's other files are (some writers use 0600)
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
            renamed.append(path)
    except BaseException as err:
        for path in renamed:
            path.unlink()
        if is_write_failure(err):
            where = paths[0] if len(paths) == 1 else f"{paths[0].parent}/{{{', '.join(p.name for p in paths)}}}"
            raise CLIError(f"could not write {where}: {write_failure(err, paths[0].parent)}") from None
        raise
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_write_failure(err: BaseException) -> bool:
    """Whether err is a failure to write a file, however the writing library reports it: an OSError, torch.save's
    RuntimeError, safetensors' SafetensorError."""
    return isinstance(err, (OSError, RuntimeError)) or type(err).__name__ == "SafetensorError"


def write_failure(err: BaseException, directory: Path) -> str:
    """What went wrong, in a few words, and how full the disk is when that may be why."""
    reason = err.strerror if isinstance(err, OSError) and err.strerror else first_line(err, 160)
    try:
        free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    except OSError:
        return reason
    return reason if free > 1 << 30 else f"{reason} ({free / 2**20:,.1f} MiB free on that disk)"
