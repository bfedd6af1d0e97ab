"""Crash-safe writes: a file or a whole directory is replaced all at once or not at all.

    atomic_write(path, lambda f: f.write(data))   # one file: temp name, fsync, rename
    replace_directory(directory, build)           # a directory: built beside it, then swapped in

Files: written to a temporary name in the same directory, flushed and fsynced, then renamed over
the target (rename within a directory is atomic on POSIX), and the directory is fsynced so the
rename itself is durable. A failure before the rename leaves the previous file byte-identical.

Directories: `build(tmp)` fills a fresh sibling directory (same parent, so the same file system);
every file in it is fsynced, and only then is it swapped with the existing directory by one
atomic `renameat2(RENAME_EXCHANGE)` (Linux >= 3.15); the old contents, now under the temporary
name, are removed afterwards. A reader sees the complete old directory or the complete new one,
never a mix, and a failure anywhere before the swap (bad input found late, a full disk, an
exception in `build`) removes the temporary directory and leaves the old one untouched. Without
RENAME_EXCHANGE (another OS or file system) the swap is two renames (old -> aside, new -> place,
then the old one removed); the only window is between those two renames, and the old directory is
put back if the second one fails. When a sibling cannot be used (the directory is a mount point,
holds the current working directory, or its parent is not writable) the new files are built in a
temporary folder inside the directory and renamed into place one by one, weights before
config.json (`order`), a per-file guarantee only.
"""
from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from typing import IO, Callable, Iterable

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def fsync_dir(path: str) -> None:
    """Makes the entries of directory `path` (renames, new files) durable."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # not supported here (e.g. Windows): nothing more to do
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _tmp_name(path: str) -> str:
    d, name = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{name}.tmp-{os.getpid()}-{os.urandom(4).hex()}")


def atomic_write(path: str, write: Callable[[IO], object], *, mode: str = "wb", encoding: str | None = None) -> None:
    """Writes `path` through write(file): temporary name in the same directory, flush, fsync,
    rename. On any error the temporary file is removed and `path` is left as it was."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, mode, encoding=encoding) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write(path, lambda f: f.write(text), mode="w", encoding="utf-8")


def fsync_tree(root: str) -> None:
    """fsync every file and directory under root (what a rename then publishes is on disk)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(dirpath)


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps the paths a and b (both must exist); False when the OS or file system
    cannot (the caller then falls back to two renames)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
        return False
    raise OSError(err, f"cannot swap {b} with its replacement {a}: {os.strerror(err)}")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_over(old: str, new: str, keep: Callable[[str], bool]) -> None:
    for name in os.listdir(old):
        if os.path.lexists(os.path.join(new, name)) or not keep(name):
            continue
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _sibling_usable(real: str) -> bool:
    parent = os.path.dirname(real)
    cwd = os.path.realpath(os.getcwd())
    if os.path.exists(real):
        if os.path.ismount(real) or cwd == real or cwd.startswith(real + os.sep):
            return False
    return os.access(parent, os.W_OK | os.X_OK)


def replace_directory(directory: str, build: Callable[[str], None], *, keep: Callable[[str], bool] | None = None,
                      order: Iterable[str] = ()) -> None:
    """Replaces `directory` (created if missing) by what build(tmp) writes into an empty
    temporary directory, all at once (see the module docstring). keep(name): entries of the
    existing directory that build did not write and that should be carried over (hard links or
    copies); by default nothing is carried over (the directory is replaced whole). order: names
    to move last, in that order, in the in-place fallback."""
    real = os.path.realpath(directory)
    if os.path.exists(real) and not os.path.isdir(real):
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    parent = os.path.dirname(real)
    os.makedirs(parent, exist_ok=True)
    if not _sibling_usable(real):
        _replace_in_place(real, build, keep, list(order))
        return
    base = os.path.basename(real)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    aside = None
    try:
        existed = os.path.isdir(real)
        os.chmod(tmp, os.stat(real).st_mode & 0o7777 if existed else 0o777 & ~_umask())
        build(tmp)
        if existed and keep is not None:
            _carry_over(real, tmp, keep)
        fsync_tree(tmp)
        if not existed:
            os.rename(tmp, real)  # fails (and cleans up) if someone created it meanwhile
            tmp = None
        elif _exchange(tmp, real):
            pass  # tmp now holds the old contents; removed below
        else:
            aside = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
            os.rename(real, os.path.join(aside, base))
            try:
                os.rename(tmp, real)
            except BaseException:
                try:
                    os.rename(os.path.join(aside, base), real)  # put the old one back
                except OSError:
                    aside = None  # could not: leave the old contents where they are
                raise
            tmp = None
        fsync_dir(parent)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _replace_in_place(real: str, build: Callable[[str], None], keep: Callable[[str], bool] | None,
                      order: list[str]) -> None:
    os.makedirs(real, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".replace.tmp-", dir=real)
    try:
        build(tmp)
        fsync_tree(tmp)
        names = sorted(os.listdir(tmp), key=lambda n: (order.index(n) if n in order else -1, n))
        for name in names:  # the new files first (the `order` names last) ...
            target = os.path.join(real, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(tmp, name), target)
        for name in os.listdir(real):  # ... then what the new version does not have
            p = os.path.join(real, name)
            if p == tmp or name in names or (keep is not None and keep(name)):
                continue
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.remove(p)
        fsync_dir(real)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
