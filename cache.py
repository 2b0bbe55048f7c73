"""The decode-once cache: every photo/mask pair of a split decoded once, at one size, into one
memory-mapped file, and read from there in every later epoch and run.

Holds the file format, its validity check (a manifest naming every source file's size and
mtime and the settings), locking between processes and the build. It does not know how a
photo is read: the dataset passes its decoder (``datautils.load_pair``) in, so cached and
uncached loading give identical pixels.

Where it is safe (the locks below are ``flock`` locks):

* Linux and macOS, cache folder on a local file system (ext4, XFS, btrfs, APFS, tmpfs):
  supported, any number of processes at once. A flock lock belongs to the open file, so it
  holds until the descriptor that took it is closed, whatever else the process opens or closes.
* NFS: one process building or reading a cache folder at a time is fine; processes sharing
  one at once (on one machine or several) are not guaranteed to be kept apart. Linux NFS clients
  emulate flock with POSIX record locks, and a POSIX lock is dropped when its process closes
  *any* descriptor of the file: the builder closes its own per-image memory maps (when it
  decodes without worker processes) and its fsync handle, and a reader's memory map closes the
  duplicate descriptor it holds when it is released. A builder elsewhere may then delete a build
  still in use, whose readers fail ("Stale file handle"). Untested on NFS (the tests only
  emulate its refusal of LOCK_EX on a read-only descriptor). There, give each machine or
  concurrent job its own cache folder on a local disk (--cache-dir, DRONE_CACHE_DIR).
* Windows: not supported. There is no flock (nothing is locked), and the builder renames its
  data file while it holds it open, which Windows refuses; so every build fails and the datasets
  load without a cache, after a warning naming the error. Untested there (the test without
  fcntl runs on Linux, whose renames succeed). Use WSL2, with the cache on its own file system.
"""
from __future__ import annotations

import json
import mmap
import os
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from basics import atomic_write

try:
    import fcntl
except ImportError:  # Windows: no flock, nothing is locked (and the builder's renames of its open
    fcntl = None     # file fail there: the cache is not supported on Windows, see above)

__all__ = ["CACHE_FORMAT_VERSION", "default_cache_dir", "open_locked", "map_readonly", "pread", "file_bytes",
           "DecodeCache"]

CACHE_FORMAT_VERSION = 3  # 2: masks turned with their photo's EXIF orientation; 3: palette masks by colour


def default_cache_dir() -> Path:
    """$DRONE_CACHE_DIR, else $XDG_CACHE_HOME/drone-seg, else ~/.cache/drone-seg."""
    if os.environ.get("DRONE_CACHE_DIR"):
        return Path(os.environ["DRONE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "drone-seg"


def _file_sig(p: Path) -> list:
    st = p.stat()
    return [str(p), st.st_size, st.st_mtime_ns]


def _flock(fd: int, op_name: str) -> bool:
    """flock(fd, LOCK_<op_name>); False where it is refused (or, for a non-blocking lock, held
    elsewhere). Without fcntl (Windows) nothing is locked and shared locks report success."""
    if fcntl is None:
        return op_name == "SH"
    op = {"SH": fcntl.LOCK_SH, "EX_NB": fcntl.LOCK_EX | fcntl.LOCK_NB}[op_name]
    try:
        fcntl.flock(fd, op)
        return True
    except OSError:
        return False


def open_locked(path: Path) -> int:
    """Open a cache data file read-only and take a shared lock on it: while any process holds
    one, no builder deletes the file (see :meth:`DecodeCache.remove_stale`). A file system
    without locks still reads."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    _flock(fd, "SH")
    return fd


def _names(fd: int, path: Path) -> bool:
    """True when ``path`` still names the file open as ``fd`` (a builder may have removed it
    between our open and our lock)."""
    try:
        st, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (st.st_ino, st.st_dev) == (held.st_ino, held.st_dev)


def map_readonly(fd: int) -> mmap.mmap:
    """The whole file open as ``fd``, memory-mapped read-only: mapped from the descriptor, never
    by path, so it is the very file whose lock is held."""
    return mmap.mmap(fd, 0, access=mmap.ACCESS_READ)


def pread(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` of ``fd`` (os.pread, or seek and read where it is missing: Windows)."""
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, n)


class DecodeCache:
    """One memory-mapped file of uint8 photos then masks, with a JSON manifest beside it.

    The data file is written under a temporary name and renamed; the manifest, written the same
    way, comes last and names the data file, so a build killed at any point leaves nothing
    that loads as valid. Readers hold a shared lock on the data file they opened, and a
    builder removes an older build only when it can take an exclusive lock on it. No file a
    builder may remove is ever visible unlocked to others (a new build is created under a hidden
    name, locked, then renamed), and a reader checks after locking that the path still names the
    file it holds, so concurrent processes never pull a file from under each other.
    """

    def __init__(self, folder: Path, key: str, settings: dict, pairs: list[tuple[Path, Path]],
                 size: tuple[int, int], mask_size: tuple[int, int] | None = None):
        self.folder, self.key, self.settings, self.pairs, self.size = folder, key, settings, pairs, size
        self.mask_size = tuple(mask_size or size)
        self.manifest_path = folder / f"{key}.json"

    def expected_manifest(self) -> dict:
        return {"format_version": CACHE_FORMAT_VERSION, "settings": self.settings,
                "files": [_file_sig(a) + _file_sig(b) for a, b in self.pairs]}

    def load(self) -> tuple[Path, int] | None:
        """(data file, locked descriptor) of a valid cache, or None when missing, incomplete or stale."""
        exp = self.expected_manifest()
        for _ in range(3):  # another process may replace the build between our two reads
            try:
                man = json.loads(self.manifest_path.read_text())
            except (OSError, ValueError):
                return None
            if any(man.get(k) != v for k, v in exp.items()):
                return None
            data = self.folder / man.get("data_file", "")
            try:
                fd = open_locked(data)
            except OSError:
                continue
            if not _names(fd, data):  # removed between our open and our lock: read the manifest again
                os.close(fd)
                continue
            if os.fstat(fd).st_size == file_bytes(len(self.pairs), self.size, self.mask_size):
                return data, fd
            os.close(fd)
            return None
        return None

    def build(self, decode: Callable, colors, decoder: str, num_workers: int = 0, desc: str = "cache"
              ) -> tuple[Path, int]:
        """Decode every pair with ``decode(photo, mask, size, colors, decoder, mask_size) -> (img,
        mask)`` (a module-level function, so worker processes can run it) into a new data file;
        returns (data file, locked descriptor)."""
        n, (w, h) = len(self.pairs), self.size
        nbytes = file_bytes(n, self.size, self.mask_size)
        self.folder.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.folder).free
        if free < nbytes + (16 << 20):
            raise OSError(28, f"needs {nbytes / 2**20:.0f} MB, {free / 2**20:.0f} MB free", str(self.folder))
        build_id = f"{os.getpid()}-{os.urandom(4).hex()}"
        final = self.folder / f"{self.key}-{build_id}.bin"
        part = final.with_suffix(".bin.partial")
        hidden = self.folder / f".{self.key}-{build_id}.new"  # a name remove_stale never matches
        fd = None
        try:
            fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0))
            _flock(fd, "SH")  # locked before it is visible as a build; the lock follows the renames
            os.replace(hidden, part)
            os.ftruncate(fd, nbytes)
            jobs = [(decode, str(a), str(b), self.size, self.mask_size, colors, decoder, str(part), i, n)
                    for i, (a, b) in enumerate(self.pairs)]
            bar = tqdm(total=n, desc=f"decoding {desc} once into the cache", unit="img", leave=False)
            if num_workers and num_workers > 1 and n > 1:
                import multiprocessing as mp
                ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
                with ctx.Pool(min(num_workers, n)) as pool:
                    for _ in pool.imap_unordered(_cache_one, jobs, chunksize=1):
                        bar.update()
            else:
                for job in jobs:
                    _cache_one(job)
                    bar.update()
            bar.close()
            with open(part, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(part, final)  # not basics.atomic_write: workers fill the file, and its lock moves with it
            man = self.expected_manifest()
            man.update(data_file=final.name, shape=[n, h, w], build_id=build_id)
            with atomic_write(self.manifest_path) as tmp:
                tmp.write_text(json.dumps(man))
        except BaseException:
            if fd is not None:
                os.close(fd)
            for p in (hidden, part, final):
                p.unlink(missing_ok=True)
            raise
        self.remove_stale(keep=final)
        return final, fd

    def remove_stale(self, keep: Path) -> None:
        """Delete earlier builds of this key that no process has open (no lock held on them)."""
        for old in self.folder.glob(f"{self.key}-*.bin*"):  # killed builds leave .partial files
            if old == keep:
                continue
            try:  # opened for writing: on NFS, flock is a POSIX lock and LOCK_EX needs a writable descriptor
                fd = os.open(old, os.O_RDWR)
            except OSError:
                continue
            try:
                if fcntl is None:  # Windows refuses to delete a file another process holds open
                    os.close(fd)
                    fd = None
                    old.unlink()
                elif _flock(fd, "EX_NB"):  # else in use by a reader, or locks unsupported: leave it
                    old.unlink(missing_ok=True)
            except OSError:
                pass
            finally:
                if fd is not None:
                    os.close(fd)


def file_bytes(n: int, size: tuple[int, int], mask_size: tuple[int, int]) -> int:
    """Size of a data file: n photos H×W×3 at ``size`` (W, H), then n masks at ``mask_size``."""
    return n * (size[0] * size[1] * 3 + mask_size[0] * mask_size[1])


def _cache_one(job) -> None:
    decode, photo, mask, size, mask_size, colors, decoder, data, i, n = job
    img, msk = decode(photo, mask, size, colors, decoder, mask_size)
    (w, h), (mw, mh) = size, mask_size
    imgs = np.memmap(data, np.uint8, "r+", 0, (n, h, w, 3))
    msks = np.memmap(data, np.uint8, "r+", n * h * w * 3, (n, mh, mw))
    imgs[i], msks[i] = img, msk
    imgs.flush(), msks.flush()
    del imgs, msks
