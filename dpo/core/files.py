"""Small file helpers: atomic writes, writes and locks that never follow a symbolic link, hashing, reading JSON, and
the errors the CLI reports (input errors name the file and line)."""

import errno
import fcntl
import hashlib
import json
import math
import os
import reprlib
import secrets
import shutil
import stat
import unicodedata
from contextlib import contextmanager
from pathlib import Path


class InputError(Exception):
    """Bad user input (a file, a line, a value). The CLI prints it and exits with status 2."""


class RunInUse(InputError):
    """A run folder another process holds the lock of (a `dpo train` running in it)."""


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient; the run stops, the last good checkpoint is kept. Exit status 3."""


def where(path, line=None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


# ------------------------------------------------------------------------------- full, read-only or forbidden disks

DISK_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}
LOW_SPACE = 64 << 20  # bytes: below this, a failed write is taken to be a full disk


def disk_error(error: OSError, path):
    """The InputError (one `error:` line naming path) of a write that failed because the disk is full, read-only
    or forbidden; None for any other OSError."""
    reason = DISK_ERRORS.get(getattr(error, "errno", None))
    return InputError(f"{path}: cannot write it: {reason}") if reason else None


@contextmanager
def writing(path):
    """Around writes to path: a full, read-only or forbidden disk is one InputError naming path."""
    try:
        yield
    except OSError as e:
        problem = disk_error(e, path)
        if problem is None:
            raise
        raise problem from None


def make_dirs(folder) -> None:
    with writing(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)


def nearest_existing(path) -> Path:
    path = Path(path)
    return next(p for p in (path, *path.parents) if p.exists())


def disk_problem(folder) -> str:
    """'' when files can be written under folder now, else why not: a read-only file system, no permission, or
    (almost) no space left. For writers whose errors carry no errno (torch.save raises RuntimeError)."""
    existing = nearest_existing(folder)
    try:
        info = os.statvfs(existing)
    except OSError:
        return ""
    if info.f_flag & os.ST_RDONLY:
        return DISK_ERRORS[errno.EROFS]
    if not os.access(existing, os.W_OK | os.X_OK):
        return DISK_ERRORS[errno.EACCES]
    return DISK_ERRORS[errno.ENOSPC] if info.f_bavail * info.f_frsize < LOW_SPACE else ""


def disk_failure(error: BaseException, path):
    """The InputError to report when writing path failed with error because of the disk, else None: an OSError of
    a full, read-only or forbidden disk, or any other error while the disk is read-only or (almost) full (for
    writers that raise without an errno: torch.save raises RuntimeError). An InputError is its own report."""
    if isinstance(error, InputError):
        return error
    problem = disk_error(error, path) if isinstance(error, OSError) else None
    if problem is None and isinstance(error, Exception):
        reason = disk_problem(path)
        if reason:
            first = (str(error).strip().splitlines() or [""])[0][:200]
            problem = InputError(f"{path}: cannot write it: {reason} ({type(error).__name__}: {first})")
    return problem


@contextmanager
def writing_folder(tmp, path):
    """Around writing the temporary folder tmp that becomes path when complete: on a failure tmp is removed, and a
    failure caused by the disk (`disk_failure`) is one InputError naming path."""
    try:
        yield
    except BaseException as e:
        problem = disk_failure(e, path)
        shutil.rmtree(tmp, ignore_errors=True)
        if problem is None:
            raise
        raise problem from None


def check_writable(folder, what: str = "") -> None:
    """Before any work: folder is, or can become, a folder this process can write into (a read-only file system or
    a folder without write permission is found now, not after the work)."""
    existing = nearest_existing(folder)
    if not existing.is_dir():
        raise InputError(f"{existing}: not a folder, so {what or 'the output folder'} {folder} cannot be made")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{existing}: not writable (a read-only file system, or no permission), so "
                         f"{what or 'the output folder'} {folder} cannot be written")


def atomic_write_bytes(path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync it, then rename: readers never see a partial file.

    The file gets the mode a plain open() gives (0666 minus the umask), not mkstemp's 0600. A full, read-only or
    forbidden disk is one InputError naming path (and no temporary file is left)."""
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
                break
            except FileExistsError:
                continue
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def finite(obj):
    """obj with every non-finite float (NaN, Infinity, -Infinity) inside it, at any depth, replaced by None.

    A result file holds null, not a refusal, where a number has no finite value: the precision of an audit that
    flags no pair, the slope of a detector that scores every clean pair above 0. Refusing would lose the rest of the
    file. Python's json writes NaN and Infinity, which are not JSON (RFC 8259): strict parsers reject the file."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_text(obj, indent=None, ensure_ascii=False) -> str:
    """Strict JSON of obj (`finite`: a non-finite number becomes null; allow_nan=False: nothing else slips through).
    What every result file this project writes is made of."""
    return json.dumps(finite(obj), indent=indent, ensure_ascii=ensure_ascii, allow_nan=False)


def atomic_write_json(path, obj, indent=None) -> None:
    """obj as strict JSON (`json_text`: non-finite numbers become null), a temporary file renamed into place."""
    atomic_write_text(path, json_text(obj, indent) + "\n")


OPEN_FLAGS = {"w": os.O_WRONLY | os.O_CREAT | os.O_TRUNC, "a": os.O_WRONLY | os.O_CREAT | os.O_APPEND,
              "a+": os.O_RDWR | os.O_CREAT | os.O_APPEND}


def open_nofollow(path, mode: str = "w", encoding: str = "utf-8", errors: str = "strict"):
    """open(path, mode) for a file written in place ("w", "a", "a+", or "wb", "ab"), refusing to follow a symbolic
    link at path (O_NOFOLLOW: a link planted there is an InputError naming it, and its target is never created,
    truncated or written) or to write anything but a regular file (a FIFO, a device). New files get the umask's
    mode, as with open(). Only the last part of the path is checked: a linked parent folder is followed. A full,
    read-only or forbidden disk is one InputError naming path."""
    path = Path(path)
    flags = OPEN_FLAGS[mode.replace("b", "")] | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP and path.is_symlink():
            raise InputError(f"{path} is a symbolic link: refusing to write through it (remove the link)") from None
        if e.errno == errno.ENXIO:  # a FIFO nobody reads
            raise InputError(f"{path}: not a regular file, refusing to write to it") from None
        problem = disk_error(e, path)
        if problem is None:
            raise
        raise problem from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"{path}: not a regular file, refusing to write to it")
    os.set_blocking(fd, True)
    return os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding, "errors": errors}))


class LockBusy(Exception):
    """lock_file(wait=False): another process holds the lock; the message is what the holder wrote into the file."""


def lock_held(path) -> bool:
    """Whether some process holds the lock_file lock on path (an absent file or a link: no), without creating or
    changing anything."""
    path = Path(path)
    if path.is_symlink() or not path.is_file():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
    return False


def lock_file(path, wait: bool = True, note: str = ""):
    """An exclusive flock on path (created, never through a symbolic link: see open_nofollow), held until the
    returned file is closed (use it in a `with`). wait=False raises LockBusy at once when another process holds
    it. note: written into the file once locked (who holds it), for the LockBusy of the next one."""
    f = open_nofollow(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        f.seek(0)
        held = f.read(200).strip()
        f.close()
        raise LockBusy(held) from None
    except BaseException:
        f.close()
        raise
    if note:
        try:
            with writing(path):
                f.seek(0)
                f.truncate()
                f.write(note)
                f.flush()
        except BaseException:
            f.close()
            raise
    return f


def umask() -> int:
    """This process's umask, read without changing it where Linux reports it (/proc/self/status)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder) -> None:
    """Give every file under folder the mode a plain open() gives (0666 minus the umask; folders 0777 minus it).
    For folders written by libraries that create files 0600 (safetensors writes a temporary file and renames it),
    so that weights are as readable as every other output."""
    mask = umask()
    for root, _, names in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in names:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def pyplot():
    """matplotlib's pyplot, drawing off screen (the Agg backend), or None when matplotlib (the `plots` extra) is not
    installed: every plot is optional."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def write_png(plt, fig, path, dpi: int = 80, layout: bool = True, trim: bool = True) -> str:
    """fig as a PNG at path (atomically: never through a symlink), then closed; returns the file's name. layout:
    tight_layout first; trim: cut the image to its content."""
    import io

    buf = io.BytesIO()
    if layout:
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi, **({"bbox_inches": "tight"} if trim else {}))
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path).name


def shown_path(path) -> str:
    """A path as a record shows it: relative inside the working folder, ~/... inside the home folder, else as it is
    (records committed with a study name no machine's folders)."""
    text = str(path)
    for root, shown in ((Path.cwd(), ""), (Path.home(), "~/")):
        prefix = str(root).rstrip("/") + "/"
        if text.startswith(prefix) and prefix != "/":
            return shown + text[len(prefix):]
    return text


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def unicode_problem(text: str) -> str:
    """'' when text encodes as UTF-8, else what is wrong (JSON's \\uXXXX escapes can make lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode text (a lone surrogate \\u{ord(text[e.start]):04x} at character {e.start})"
    return ""


def control_character(text: str, allowed: str = "") -> str:
    """'' when text has no control character, else the first one, as repr: C0 and C1 controls (newline, carriage
    return, escape, NUL, ...), DEL, and Unicode's line and paragraph separators; characters in allowed are fine."""
    for c in text:
        if c not in allowed and unicodedata.category(c) in ("Cc", "Zl", "Zp"):
            return repr(c)
    return ""


def brief(value) -> str:
    """repr(value) for an error message about a value read from a file: containers cut after 4 levels and 20
    elements, strings and numbers after 200 characters (a value nested 50,000 deep, or 4000 digits long, is one
    short line, never a RecursionError)."""
    shown = reprlib.Repr()
    shown.maxlevel, shown.maxstring, shown.maxlong, shown.maxother = 4, 200, 200, 200
    shown.maxlist = shown.maxtuple = shown.maxdict = shown.maxset = 20
    return shown.repr(value)


def decode_utf8(blob: bytes, path, line=None) -> str:
    """blob as text; bytes that are not UTF-8 raise InputError naming the file, the line and the byte offset."""
    try:
        return blob.decode("utf-8")
    except UnicodeDecodeError as e:
        if line is None:  # a whole file: count the lines before the bad byte
            line, offset = blob.count(b"\n", 0, e.start) + 1, f"byte {e.start} of the file"
        else:
            offset = f"byte {e.start} of the line"
        raise InputError(f"{where(path, line)}: not UTF-8 text ({offset}: {blob[e.start:e.end]!r})") from None


MAX_READ_BYTES = 1 << 30  # the largest file read whole into memory: 1 GiB (its rows take several times that)


def size_text(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def check_readable(path, expected: str) -> int:
    """The size of path, a regular file no larger than MAX_READ_BYTES; else InputError naming it: a missing file, a
    folder, a special file (a FIFO would block the read, /dev/zero never ends) or a file too large to read whole
    (a 3 GB JSON Lines file would end in a MemoryError minutes later). Only the size is looked at (a sparse file
    costs nothing to refuse)."""
    try:
        info = os.stat(path)
    except OSError:
        raise InputError(f"{path}: no such file (expected {expected})") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputError(f"{path}: a folder, not a file (expected {expected})")
    if not stat.S_ISREG(info.st_mode):
        raise InputError(f"{path}: not a regular file (a FIFO, a device or a socket; expected {expected})")
    if info.st_size > MAX_READ_BYTES:
        raise InputError(f"{path}: {size_text(info.st_size)}, more than the {size_text(MAX_READ_BYTES)} a file may "
                         f"have to be read into memory (expected {expected}): use a smaller file, e.g. the rows "
                         "you need")
    return info.st_size


def check_readable_together(spec, paths: list, expected: str) -> None:
    """Before reading any: every file regular and small enough to read whole (`check_readable`), and so are they
    all together (the files of one source, read into one list of rows)."""
    total = sum(check_readable(p, expected) for p in paths)
    if total > MAX_READ_BYTES:
        raise InputError(f"{spec}: its {len(paths)} files hold {size_text(total)}, more than the "
                         f"{size_text(MAX_READ_BYTES)} read into memory at once (expected {expected}): use fewer rows")


def read_bytes(path, expected: str) -> bytes:
    """The bytes of a regular file of at most MAX_READ_BYTES (`check_readable`); an unreadable one is InputError."""
    check_readable(path, expected)
    try:
        with open(path, "rb") as f:
            return f.read(MAX_READ_BYTES + 1)
    except OSError as e:
        raise InputError(f"{path}: cannot read it ({e.strerror}; expected {expected})") from None


def read_text(path, expected: str) -> str:
    """A regular file's text (`read_bytes`), which must be UTF-8 (else InputError naming the line and byte)."""
    return decode_utf8(read_bytes(path, expected), path)


def parse_json(text: str, path, expected: str, line=None):
    """text as JSON; InputError naming path (and line) otherwise: malformed JSON, and the input the parser itself
    refuses with another exception: an integer of more than 4300 digits (ValueError), arrays or objects nested
    thousands deep (RecursionError). The one place JSON read from a file is parsed."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        at = where(path, line if line is not None else e.lineno)
        raise InputError(f"{at}: malformed JSON ({e.msg}); expected {expected}") from None
    except RecursionError:
        raise InputError(f"{where(path, line)}: unreadable JSON (nested too deeply); expected {expected}") from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion: ..."
        raise InputError(f"{where(path, line)}: unreadable JSON ({str(e).split(':')[0]}); expected {expected}") \
            from None


def read_json(path, expected: str):
    """Load a whole JSON file; a missing, special, too large, empty, non-UTF-8 or malformed file (or one nested too
    deeply, or holding a huge integer) raises InputError naming it."""
    path = Path(path)
    text = read_text(path, expected)
    if not text.strip():
        raise InputError(f"{path}: the file is empty (expected {expected})")
    return parse_json(text, path, expected)
