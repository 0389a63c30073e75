"""The per-GPU on-disk kernel cache: layout, locks, atomic writes, integrity, export/import.

Layout (one shard per cache schema and device fingerprint, so a new GPU, torch, triton or CUDA
is a clean miss, never a stale load)::

    root/v{CACHE_SCHEMA}/{fingerprint_name}/
        {spec.dirname}/                 one entry = one directory, swapped in atomically
            kernel.py | kernel.cu       the verified source (absent in a negative entry)
            entry.safetensors           metadata (JSON strings) + the check set (tensors)
        .locks/{spec.dirname}.lock          write lock (store, quarantine, clear, CUDA build)
        .locks/{spec.dirname}.search.lock   held by the one process searching this key
        .quarantine/                    corrupt entries, moved aside with the reason logged
        .build/{spec.dirname}-{sha}/    the loader's CUDA builds (a verified copy + the .so)
        .tmp-{spec.dirname}-*           entries being written (only the lock holder touches these)

``root`` is ``settings().cache_dir`` (``R1ATTN_CACHE_DIR``), else
``platformdirs.user_cache_dir("torch_r1attn")``.

**Writes** build the whole entry in a temp directory next to it (files written, fsynced, the
directory fsynced), then rename the directory into place under the per-key ``filelock``. An
existing entry is replaced with ``renameat2(RENAME_EXCHANGE)``, so a reader sees the old entry
or the new one and never an empty or half-written one. A writer killed with SIGKILL leaves only
a ``.tmp-*`` directory, which the next holder of that key's lock deletes: the kernel releases
``flock`` locks of dead processes, so no lock is ever judged "stale" by age or PID.

**Reads** open the entry directory once (``O_NOFOLLOW``) and read both files relative to that
descriptor, so they come from one directory even if a writer swaps the entry meanwhile. Anything
wrong with an entry (truncated/corrupt safetensors, source or tensor hash mismatch, a symlink,
loose permissions, a foreign owner, metadata for another spec or fingerprint) makes it a logged
miss; it is re-read under the key's lock (to tell a racing writer from real damage) and then
moved into ``.quarantine``. A cache root, shard or lock directory that is writable by group or
others, owned by another user, or not a directory raises :class:`CacheError`: nothing is loaded
from a directory someone else could have written.

Lock files live under the shard, unless the root is on a network filesystem (NFS, Lustre, ...),
where ``flock`` may be emulated or absent: then they live under the local temp dir
(``/tmp/torch_r1attn-locks-{uid}``). Processes on other hosts then do not coordinate, which costs
a duplicate search at worst; atomic renames keep every entry whole either way.

**Metadata** (every value a JSON string, as safetensors requires): ``format``, ``cache_schema``,
``spec``, ``fingerprint``, ``negative``, ``language``, ``source_file``, ``source_sha256``,
``tensors_sha256``, ``created``, ``r1attn_version``, ``check`` plus whatever the caller passes
(``config``, ``measurements``, ``provenance``, ...). :attr:`CacheEntry.meta` is the decoded dict.

**Check set** (the entry's tensors): one or more cases named ``c{i}.q``, ``c{i}.k``, ``c{i}.v``,
``c{i}.ref`` (reference output), ``c{i}.scale`` (0-d float64), optional ``c{i}.baseline``
(PyTorch's same-dtype output, for the "2x PyTorch's own error" rule) and ``c{i}.vt.{name}``
(the kernel's ``**variant_tensors``). Build them with :func:`make_check_case`.
"""

from __future__ import annotations

import ctypes
import datetime
import errno
import hashlib
import inspect
import io
import json
import logging
import os
import re
import secrets
import shutil
import stat
import struct
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .spec import AttentionSpec, device_fingerprint, fingerprint_name

log = logging.getLogger(__name__)

CACHE_SCHEMA = 1
# What a stored measurement means. Bump when the verifier's timing changes what it measures:
# entries (kernels and negatives) decided under another protocol are misses and get searched
# again. 2 (0.1.2): the GPU is held while the host queues the timed reps, so small kernels are
# timed without the host's launch latency (protocol 1 timed it: 30-170 us kernels were off by
# up to 3x, and several small-shape verdicts were wrong both ways).
TIMING_PROTOCOL = 2
FORMAT = "torch_r1attn.cache_entry"
META_FILE = "entry.safetensors"
SOURCE_FILES = {"triton": "kernel.py", "cuda": "kernel.cu"}
LOCK_DIR, QUARANTINE_DIR, TMP_PREFIX, TRASH_PREFIX = ".locks", ".quarantine", ".tmp-", ".trash-"
_RESERVED_META = frozenset({
    "format", "cache_schema", "spec", "fingerprint", "negative", "language", "source_file",
    "source_sha256", "tensors_sha256", "created", "r1attn_version", "check", "timing_protocol",
})
# Bounds on what a read will pull into memory: a check set is a few small tensors, a kernel a
# few hundred lines. Anything larger is damage (or an attack), not an entry.
_MAX_META_BYTES = 1 << 30
_MAX_HEADER_BYTES = 16 << 20
_MAX_SOURCE_BYTES = 8 << 20
_NETWORK_FS = frozenset({
    "nfs", "nfs4", "cifs", "smb", "smbfs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs",
    "fuse.sshfs", "fuse.glusterfs", "fuse.s3fs", "9p", "afs", "ocfs2", "panfs", "pvfs2", "fuse.gcsfuse",
})

# Test hook: called as ``_WRITE_HOOK(stage)`` at each step of a write ("mkdir", "write:<file>"
# per chunk, "fsync", "rename"), so crash tests can kill a writer at a known point.
_WRITE_HOOK: Callable[[str], None] | None = None
_WRITE_CHUNK = 1 << 20


class CacheError(RuntimeError):
    """The cache as a whole is unusable (unsafe root, lock timeout, a refused lock path)."""


class _Corrupt(Exception):
    """An entry is damaged or unsafe; the message is the reason."""


class _Vanished(Exception):
    """An entry changed under a lock-free read (a writer swapped it); retry."""


@dataclass(frozen=True, eq=False)
class CacheEntry:
    """One verified entry. ``source_path``/``language`` are None for a negative entry."""

    path: Path
    spec: AttentionSpec
    meta: dict[str, Any]
    negative: bool
    source_path: Path | None
    language: str | None
    lock_path: Path | None = None  # the key's write lock (the loader builds CUDA under it)

    @property
    def source_sha256(self) -> str | None:
        return self.meta.get("source_sha256")


@dataclass
class Built:
    """What a ``get_or_build`` build function returns: a kernel, or a negative verdict."""

    source: str | None = None
    language: str = "triton"
    meta: dict[str, Any] = field(default_factory=dict)
    check_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    negative: bool = False


@dataclass
class CheckCase:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    ref: torch.Tensor
    scale: float
    baseline: torch.Tensor | None
    variant_tensors: dict[str, torch.Tensor]


# ------------------------------------------------------------------------------ check sets
def make_check_case(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant, scale: float, *,
                    index: int = 0, ref: torch.Tensor | None = None,
                    baseline: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Tensors of check case ``index`` for :meth:`KernelCache.store`, moved to the CPU.

    ``ref`` defaults to the float64 reference of ``variant``; ``baseline`` to the same math run
    in the inputs' dtype (flash-attention's "PyTorch's own low-precision result"), so a later
    ``r1attn cache verify`` can apply the 2x-baseline-error rule without the variant's Python code.
    """
    from .reference import eager_attention, reference_attention

    if ref is None:
        ref = reference_attention(q, k, v, variant, scale)
    if baseline is None:
        baseline = eager_attention(q, k, v, variant, scale, compute_dtype=q.dtype)
    p = f"c{index}."
    out = {p + "q": q, p + "k": k, p + "v": v, p + "ref": ref, p + "baseline": baseline.to(q.dtype),
           p + "scale": torch.tensor(float(scale), dtype=torch.float64)}
    out.update({f"{p}vt.{n}": t for n, t in variant.tensors().items()})
    # clone: one variant tensor (ALiBi slopes) may appear in several cases, and safetensors
    # refuses to save tensors that share memory
    return {n: t.detach().cpu().contiguous().clone() for n, t in out.items()}


def split_check_set(tensors: dict[str, torch.Tensor]) -> list[CheckCase]:
    """The cases of a check set, in index order. Raises ValueError naming what is malformed."""
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in tensors.items():
        m = re.fullmatch(r"c(\d+)\.(.+)", name)
        if m is None:
            raise ValueError(f"check tensor {name!r} is not named c{{i}}.<q|k|v|ref|baseline|scale|vt.NAME>")
        groups.setdefault(int(m.group(1)), {})[m.group(2)] = t
    cases = []
    for i in sorted(groups):
        g = groups[i]
        missing = [n for n in ("q", "k", "v", "ref", "scale") if n not in g]
        if missing:
            raise ValueError(f"check case c{i} lacks {', '.join(missing)}")
        unknown = [n for n in g if n not in ("q", "k", "v", "ref", "scale", "baseline") and not n.startswith("vt.")]
        if unknown:
            raise ValueError(f"check case c{i} has unknown tensors {unknown}")
        q, k, v, ref = g["q"], g["k"], g["v"], g["ref"]
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"check case c{i}: q, k, v must be 4-D (B, H, S, D)")
        want = q.shape[:-1] + (v.shape[-1],)
        if tuple(ref.shape) != tuple(want):
            raise ValueError(f"check case c{i}: ref shape {tuple(ref.shape)} != {tuple(want)}")
        if g["scale"].numel() != 1:
            raise ValueError(f"check case c{i}: scale must be a single number")
        cases.append(CheckCase(q, k, v, ref, float(g["scale"].reshape(())), g.get("baseline"),
                               {n[3:]: t for n, t in g.items() if n.startswith("vt.")}))
    return cases


# ------------------------------------------------------------------------------ file helpers
def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _private_problem(st: os.stat_result, what: str) -> str | None:
    uid = os.getuid()
    if st.st_uid != uid:
        return f"{what} is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & 0o022:
        return f"{what} is writable by group/others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(dir_fd: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
    try:
        view = memoryview(data)
        off = 0
        while off < len(view):
            if _WRITE_HOOK:
                _WRITE_HOOK(f"write:{name}")
            off += os.write(fd, view[off: off + _WRITE_CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_at(dir_fd: int, name: str, limit: int, what: str, required: bool = True) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        if required:
            raise _Vanished(f"{what} is missing") from None
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _Corrupt(f"{what} is a symlink") from None
        raise _Corrupt(f"{what} cannot be opened ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Corrupt(f"{what} is not a regular file")
        bad = _private_problem(st, what)
        if bad:
            raise _Corrupt(bad)
        if st.st_size > limit:
            raise _Corrupt(f"{what} is {st.st_size} bytes, over the {limit}-byte limit")
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _parse_meta_file(data: bytes) -> tuple[dict[str, str], bytes]:
    """``(raw metadata, data section)`` of a safetensors file; checks it is exactly complete."""
    if len(data) < 8:
        raise _Corrupt(f"{META_FILE} is truncated ({len(data)} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > _MAX_HEADER_BYTES or 8 + n > len(data):
        raise _Corrupt(f"{META_FILE} is truncated or corrupt (header length {n}, file {len(data)} bytes)")
    try:
        header = json.loads(data[8: 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Corrupt(f"{META_FILE} header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _Corrupt(f"{META_FILE} header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    try:
        end = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise _Corrupt(f"{META_FILE} header has malformed tensor entries") from None
    if 8 + n + end != len(data):
        raise _Corrupt(f"{META_FILE} is truncated or padded: header says {8 + n + end} bytes, file has {len(data)}")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _Corrupt(f"{META_FILE} metadata is not a str->str map")
    return meta, data[8 + n:]


def _decode_meta(raw: dict[str, str]) -> dict[str, Any]:
    try:
        return {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError as e:
        raise _Corrupt(f"metadata value is not JSON ({e})") from None


def _serialize(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    raw = {k: json.dumps(v, sort_keys=True) for k, v in meta.items()}
    # The data section does not depend on the metadata (offsets are relative to its start), so
    # its hash can be computed from a first serialization and embedded in the second.
    _, data = _parse_meta_file(save(tensors, metadata=raw))
    raw["tensors_sha256"] = json.dumps(_sha256(data))
    blob = save(tensors, metadata=raw)
    if _sha256(_parse_meta_file(blob)[1]) != json.loads(raw["tensors_sha256"]):
        raise CacheError("safetensors serialization is not deterministic; refusing to write an unverifiable entry")
    return blob


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2: Any = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``). False where unsupported."""
    global _renameat2
    if _renameat2 is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).renameat2
            fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2 = fn
        except (AttributeError, OSError):
            _renameat2 = False
    if _renameat2 is False:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # e.g. NFS, old kernels
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def _is_network_fs(path: Path) -> bool:
    try:
        real = os.path.realpath(path)
        best, fstype = "", ""
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
        return fstype in _NETWORK_FS
    except OSError:
        return False


_FILELOCK_KW: dict[str, Any] | None = None


def stale_reason(entry: "CacheEntry") -> str | None:
    """Why a well-formed entry is no longer a verdict (a miss for :meth:`KernelCache.lookup`), or
    None: timed under another :data:`TIMING_PROTOCOL`, or a negative decided by another
    torch_r1attn version (the search space may have grown)."""
    from . import __version__

    proto = entry.meta.get("timing_protocol", 1)
    if proto != TIMING_PROTOCOL:
        return f"was timed under timing protocol {proto} (this is {TIMING_PROTOCOL})"
    if entry.negative and entry.meta.get("r1attn_version") != __version__:
        return f"was decided by torch_r1attn {entry.meta.get('r1attn_version')} (this is {__version__})"
    return None


def _file_lock(path: Path, timeout: float):
    """A native ``flock`` lock (never filelock's soft/PID-file fallback: no stale heuristics)."""
    global _FILELOCK_KW
    import filelock

    if _FILELOCK_KW is None:
        params = inspect.signature(filelock.FileLock.__init__).parameters
        _FILELOCK_KW = {"mode": 0o600} if "mode" in params else {}
        if "fallback_to_soft" in params:  # filelock >= 4
            _FILELOCK_KW["fallback_to_soft"] = False
    return filelock.FileLock(str(path), timeout=timeout, **_FILELOCK_KW)


def _default_root() -> Path:
    from .config import settings

    if settings().cache_dir:
        return Path(settings().cache_dir).expanduser()
    try:
        import platformdirs
    except ImportError:  # the GPU test machine may lack it; XDG's default is what it would return
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "torch_r1attn"
    return Path(platformdirs.user_cache_dir("torch_r1attn"))


# ------------------------------------------------------------------------------ KernelCache
class KernelCache:
    """The kernel cache for one device fingerprint.

    ``root``: cache root (default: settings / platformdirs). ``fingerprint``: device fingerprint
    dict (default: :func:`~torch_r1attn.spec.device_fingerprint` of the current device).
    ``lock_timeout``: seconds a write waits for a key's lock before raising :class:`CacheError`.

    Every public method raises :class:`CacheError` when the root or shard is unsafe; entry-level
    damage is never raised, only logged and treated as a miss.
    """

    def __init__(self, root: str | Path | None = None, fingerprint: dict[str, str] | None = None,
                 lock_timeout: float = 60.0):
        self.root = Path(root).expanduser() if root is not None else _default_root()
        self.fingerprint = dict(fingerprint) if fingerprint is not None else dict(device_fingerprint())
        self.shard = self.root / f"v{CACHE_SCHEMA}" / fingerprint_name(self.fingerprint)
        self.lock_timeout = float(lock_timeout)
        self._lock_dir: Path | None = None
        self._memo: dict[str, tuple[CacheEntry, tuple[int, int, int]]] = {}
        self._mu = threading.Lock()
        self._layout_ok = False

    def __repr__(self) -> str:
        return f"KernelCache({str(self.shard)!r})"

    # ---------------------------------------------------------------- layout and safety
    def _check_dir(self, path: Path, what: str, create: bool) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if not create:
                raise CacheError(f"{what} {path} does not exist") from None
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                pass
            except OSError as e:
                raise CacheError(f"cannot create {what} {path}: {e.strerror}") from None
            st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise CacheError(f"{what} {path} is a symlink; refusing to use it")
        if not stat.S_ISDIR(st.st_mode):
            raise CacheError(f"{what} {path} is not a directory")
        bad = _private_problem(st, f"{what} {path}")
        if bad:
            raise CacheError(f"refusing to use the kernel cache: {bad}. Kernels found there are imported "
                             f"and run; make it private (chmod go-w) or point R1ATTN_CACHE_DIR elsewhere")

    def _check_root(self, create: bool = True) -> None:
        root = self.root
        if os.path.islink(root):
            # A symlinked root is fine if *this user* made the link (its target is checked next);
            # one planted by someone else in a shared directory is not.
            owner = os.lstat(root).st_uid
            if owner != os.getuid():
                raise CacheError(f"refusing to use the kernel cache: root {root} is a symlink owned by "
                                 f"uid {owner}, not by this user")
            root = Path(os.path.realpath(root))
        if create and not os.path.lexists(root):
            try:
                root.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CacheError(f"cannot create cache root {root}: {e.strerror}") from None
        self._check_dir(root, "cache root", create)

    def _ensure_layout(self, create: bool = True) -> None:
        """Check (and create) root, shard, lock and quarantine dirs. Raises CacheError."""
        self._check_root(create)
        self._check_dir(self.shard.parent, "cache schema dir", create)
        self._check_dir(self.shard, "cache shard", create)
        self._check_dir(self.shard / QUARANTINE_DIR, "quarantine dir", create)
        self._check_dir(self._locks(), "lock dir", create)

    def _locks(self) -> Path:
        if self._lock_dir is None:
            if _is_network_fs(self.root):
                import tempfile

                key = hashlib.sha256(str(self.shard.resolve()).encode()).hexdigest()[:16]
                base = Path(tempfile.gettempdir()) / f"torch_r1attn-locks-{os.getuid()}"
                self._check_dir(base, "local lock dir", True)
                self._lock_dir = base / key
                log.info("r1attn cache: %s is on a network filesystem; lock files go to local %s",
                         self.root, self._lock_dir)
            else:
                self._lock_dir = self.shard / LOCK_DIR
        return self._lock_dir

    def _lock(self, name: str, suffix: str, timeout: float):
        """The filelock for key ``name``. Raises CacheError if its path is not a plain file of ours
        (the planted thing is moved into quarantine first)."""
        p = self._locks() / f"{name}{suffix}"
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            pass
        else:
            bad = None
            if not stat.S_ISREG(st.st_mode):
                bad = "is a symlink" if stat.S_ISLNK(st.st_mode) else "is not a regular file"
            elif st.st_uid != os.getuid():
                bad = f"is owned by uid {st.st_uid}"
            if bad:
                dest = self._move_to_quarantine(p, f"lock{suffix}")
                log.warning("r1attn cache: lock path %s %s; refused, moved to %s", p, bad, dest)
                raise CacheError(f"lock path {p} {bad}; refused (moved to {dest})")
        return _file_lock(p, timeout)

    def _acquire(self, lock, what: str, timeout: float) -> None:
        import filelock

        try:
            lock.acquire(timeout=timeout)
        except filelock.Timeout:
            raise CacheError(f"timed out after {timeout:g} s waiting for the lock of {what} "
                             f"({lock.lock_file}); another process holds it") from None

    def _move_to_quarantine(self, path: Path, reason: str) -> Path:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", reason)[:40]
        dest = self.shard / QUARANTINE_DIR / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}.{secrets.token_hex(3)}.{slug}"
        os.rename(path, dest)
        return dest

    # ---------------------------------------------------------------- reading
    def _read(self, name: str, expect: AttentionSpec | None) -> CacheEntry | None:
        """Read entry ``name`` lock-free. None if absent; raises _Corrupt / _Vanished."""
        path = self.shard / name
        try:
            dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                kind = "a symlink" if os.path.islink(path) else "not a directory"
                raise _Corrupt(f"entry path is {kind}") from None
            raise _Corrupt(f"entry cannot be opened ({e.strerror})") from None
        try:
            bad = _private_problem(os.fstat(dfd), "entry directory")
            if bad:
                raise _Corrupt(bad)
            blob = _read_at(dfd, META_FILE, _MAX_META_BYTES, META_FILE)
            raw, data = _parse_meta_file(blob)
            meta = _decode_meta(raw)
            if meta.get("format") != FORMAT or meta.get("cache_schema") != CACHE_SCHEMA:
                raise _Corrupt(f"not a schema-{CACHE_SCHEMA} entry (format={meta.get('format')!r}, "
                               f"schema={meta.get('cache_schema')!r})")
            if meta.get("tensors_sha256") != _sha256(data):
                raise _Corrupt("check-set tensors do not match their hash")
            try:
                spec = AttentionSpec.from_dict(meta["spec"])
            except (KeyError, TypeError, ValueError) as e:
                raise _Corrupt(f"metadata spec is malformed ({type(e).__name__}: {e})") from None
            if spec.dirname != name or (expect is not None and spec.hash != expect.hash):
                raise _Corrupt(f"metadata describes {spec.dirname}, not this entry")
            if meta.get("fingerprint") != self.fingerprint:
                raise _Corrupt(f"metadata fingerprint {meta.get('fingerprint')} is not this shard's")
            negative = bool(meta.get("negative"))
            src_path = lang = None
            if not negative:
                lang = meta.get("language")
                fname = SOURCE_FILES.get(lang)
                if fname is None or meta.get("source_file") != fname:
                    raise _Corrupt(f"unknown kernel language {lang!r}")
                src = _read_at(dfd, fname, _MAX_SOURCE_BYTES, fname)
                if _sha256(src) != meta.get("source_sha256"):
                    raise _Corrupt(f"{fname} does not match its sha256 in the metadata")
                src_path = path / fname
        finally:
            os.close(dfd)
        return CacheEntry(path=path, spec=spec, meta=meta, negative=negative, source_path=src_path,
                          language=lang, lock_path=self._locks() / f"{name}.lock")

    def _read_checked(self, name: str, expect: AttentionSpec | None) -> CacheEntry | None:
        """Read, retrying a racing swap; damage is confirmed under the lock, then quarantined."""
        for _ in range(3):
            try:
                return self._read(name, expect)
            except _Vanished:
                continue
            except _Corrupt as e:
                return self._confirm_corrupt(name, expect, str(e))
        return self._confirm_corrupt(name, expect, "entry kept changing while being read")

    def _confirm_corrupt(self, name: str, expect: AttentionSpec | None, reason: str) -> CacheEntry | None:
        try:
            lock = self._lock(name, ".lock", timeout=min(self.lock_timeout, 10.0))
            self._acquire(lock, name, min(self.lock_timeout, 10.0))
        except CacheError as e:
            log.warning("r1attn cache: entry %s looks unusable (%s) but could not be locked (%s); "
                        "treated as a miss", name, reason, e)
            return None
        try:
            try:
                return self._read(name, expect)
            except (_Corrupt, _Vanished) as e:
                reason = str(e)
            dest = self._move_to_quarantine(self.shard / name, reason)
            log.warning("r1attn cache: entry %s is unusable (%s); treated as a miss, moved to %s",
                        name, reason, dest)
            with self._mu:
                self._memo.pop(name, None)
            return None
        finally:
            lock.release()

    @staticmethod
    def _sig(path: Path) -> tuple[int, int, int] | None:
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_ctime_ns)

    def lookup(self, spec: AttentionSpec) -> CacheEntry | None:
        """The entry for ``spec`` (positive or negative), or None on a miss.

        A damaged or unsafe entry is a miss (logged at WARNING, quarantined). A negative entry
        decided under another torch_r1attn version is a miss (the search space may have grown);
        so is any entry timed under another :data:`TIMING_PROTOCOL`.
        Repeat lookups of an unchanged entry are answered from memory (one ``lstat``).
        Raises CacheError when the cache root or shard is unsafe.
        """
        if not isinstance(spec, AttentionSpec):
            raise TypeError(f"lookup expects an AttentionSpec, got {type(spec).__name__}")
        name = spec.dirname
        path = self.shard / name
        memo = self._memo.get(name)
        if memo is not None and memo[1] == self._sig(path):
            return memo[0]
        self._ensure_layout()
        sig = self._sig(path)
        entry = self._read_checked(name, spec)
        if entry is None:
            return None
        why = stale_reason(entry)
        if why is not None:
            log.info("r1attn cache: entry %s %s; treated as a miss", name, why)
            return None
        if sig is not None and sig == self._sig(path):
            with self._mu:
                self._memo[name] = (entry, sig)
        return entry

    def read_entry(self, name: str) -> CacheEntry | None:
        """The entry in directory ``name`` of this shard (as :meth:`lookup`, by directory name)."""
        self._ensure_layout()
        return self._read_checked(name, None)

    def reports_dir(self, spec: AttentionSpec) -> Path:
        """Where the search report of ``spec`` goes: beside the entries, never inside one (an
        entry's files are exactly what was verified), in a dot-dir that entry listing skips."""
        self._ensure_layout()
        return self.shard / ".reports" / spec.dirname

    def entry_names(self) -> list[str]:
        """Directory names of every entry in this shard (not validated)."""
        self._ensure_layout()
        return sorted(n for n in os.listdir(self.shard) if not n.startswith("."))

    def entries(self) -> Iterator[CacheEntry]:
        """Every valid entry of this shard (damaged ones are quarantined and skipped)."""
        for name in self.entry_names():
            e = self._read_checked(name, None)
            if e is not None:
                yield e

    def load_check_set(self, entry: CacheEntry) -> dict[str, torch.Tensor]:
        """The entry's check tensors, re-verified against the metadata hash. Raises CacheError."""
        from safetensors.torch import load

        dfd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            blob = _read_at(dfd, META_FILE, _MAX_META_BYTES, META_FILE)
            raw, data = _parse_meta_file(blob)
        except (_Corrupt, _Vanished) as e:
            raise CacheError(f"{entry.path}: {e}") from None
        finally:
            os.close(dfd)
        if _sha256(data) != entry.meta.get("tensors_sha256") or raw.get("tensors_sha256") != json.dumps(entry.meta.get("tensors_sha256")):
            raise CacheError(f"{entry.path}: check set changed since the entry was read")
        return load(blob)

    # ---------------------------------------------------------------- writing
    def _entry_meta(self, spec: AttentionSpec, meta: dict[str, Any], negative: bool) -> dict[str, Any]:
        from . import __version__

        if not isinstance(meta, dict):
            raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
        clash = sorted(set(meta) & _RESERVED_META)
        if clash:
            raise ValueError(f"meta keys {clash} are reserved for the cache")
        for k, v in meta.items():
            if not isinstance(k, str):
                raise TypeError(f"meta keys must be str, got {k!r}")
            try:
                json.dumps(v)
            except (TypeError, ValueError) as e:
                raise TypeError(f"meta[{k!r}] is not JSON-serializable ({e})") from None
        return {
            **meta,
            "format": FORMAT, "cache_schema": CACHE_SCHEMA, "spec": spec.to_dict(),
            "fingerprint": self.fingerprint, "negative": negative,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "r1attn_version": __version__, "timing_protocol": TIMING_PROTOCOL,
        }

    def store(self, spec: AttentionSpec, source: str, language: str, meta: dict[str, Any],
              check_tensors: dict[str, torch.Tensor]) -> CacheEntry:
        """Store a verified kernel for ``spec`` (replacing any entry atomically) and return it.

        ``check_tensors`` follow the check-set naming (see the module docstring and
        :func:`make_check_case`); at least one case is required and its ``q`` must have the spec's
        dtype. Raises TypeError/ValueError on bad arguments, CacheError when the cache is unsafe or
        the key's lock is not acquired within ``lock_timeout``.
        """
        if not isinstance(spec, AttentionSpec):
            raise TypeError(f"store expects an AttentionSpec, got {type(spec).__name__}")
        if not isinstance(source, str) or not source.strip():
            raise ValueError("source must be a non-empty str")
        if language not in SOURCE_FILES:
            raise ValueError(f"language must be one of {sorted(SOURCE_FILES)}, got {language!r}")
        if not isinstance(check_tensors, dict) or not all(isinstance(t, torch.Tensor) for t in check_tensors.values()):
            raise TypeError("check_tensors must be a dict[str, torch.Tensor]")
        cases = split_check_set(check_tensors)
        if not cases:
            raise ValueError("check_tensors is empty: an entry must carry at least one check case")
        for i, c in enumerate(cases):
            if c.q.dtype != spec.torch_dtype:
                raise ValueError(f"check case c{i}: q is {c.q.dtype}, the spec's dtype is {spec.torch_dtype}")
        src = source.encode()
        fname = SOURCE_FILES[language]
        full = self._entry_meta(spec, meta, negative=False)
        full.update(language=language, source_file=fname, source_sha256=_sha256(src),
                    check={"cases": len(cases)})
        return self._install(spec, {fname: src, META_FILE: _serialize(full, check_tensors)})

    def store_negative(self, spec: AttentionSpec, meta: dict[str, Any]) -> CacheEntry:
        """Cache "nothing beat the baseline" for ``spec`` under the current versions. Same errors
        as :meth:`store`."""
        if not isinstance(spec, AttentionSpec):
            raise TypeError(f"store_negative expects an AttentionSpec, got {type(spec).__name__}")
        full = self._entry_meta(spec, meta, negative=True)
        full.update(language=None, source_file=None, source_sha256=None, check={"cases": 0})
        return self._install(spec, {META_FILE: _serialize(full, {})})

    def _install(self, spec: AttentionSpec, files: dict[str, bytes]) -> CacheEntry:
        self._ensure_layout()
        name = spec.dirname
        lock = self._lock(name, ".lock", self.lock_timeout)
        self._acquire(lock, name, self.lock_timeout)
        try:
            self._install_locked(name, files)
        finally:
            lock.release()
        entry = self._read_checked(name, spec)
        if entry is None:
            raise CacheError(f"entry {name} was written but does not read back")
        return entry

    def _install_locked(self, name: str, files: dict[str, bytes]) -> None:
        dest = self.shard / name
        # We hold the key's lock, so any temp dir of this key belongs to a writer that died.
        for n in os.listdir(self.shard):
            if n.startswith((f"{TMP_PREFIX}{name}-", f"{TRASH_PREFIX}{name}-")):
                shutil.rmtree(self.shard / n, ignore_errors=True)
                log.info("r1attn cache: removed %s left by a writer that died", n)
        tmp = self.shard / f"{TMP_PREFIX}{name}-{os.getpid()}-{secrets.token_hex(4)}"
        os.mkdir(tmp, 0o700)
        if _WRITE_HOOK:
            _WRITE_HOOK("mkdir")
        try:
            dfd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                # Source first, metadata last: an entry is only complete once both exist.
                for fname in sorted(files, key=lambda f: f == META_FILE):
                    _write_file(dfd, fname, files[fname])
                if _WRITE_HOOK:
                    _WRITE_HOOK("fsync")
                os.fsync(dfd)
            finally:
                os.close(dfd)
            if _WRITE_HOOK:
                _WRITE_HOOK("rename")
            if os.path.lexists(dest):
                if os.path.islink(dest) or not os.path.isdir(dest):
                    moved = self._move_to_quarantine(dest, "not a directory")
                    log.warning("r1attn cache: %s was not an entry directory; moved to %s", dest, moved)
                    os.rename(tmp, dest)
                elif _exchange(tmp, dest):
                    shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old entry
                else:
                    # No atomic exchange here (e.g. NFS): readers may see a miss for a moment,
                    # never a partial entry.
                    trash = self.shard / f"{TRASH_PREFIX}{name}-{secrets.token_hex(4)}"
                    os.rename(dest, trash)
                    os.rename(tmp, dest)
                    shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(tmp, dest)
            _fsync_dir(self.shard)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        with self._mu:
            self._memo.pop(name, None)

    # ---------------------------------------------------------------- coordination
    def try_search_lock(self, spec: AttentionSpec):
        """Take ``spec``'s search lock without waiting: the lock (call ``.release()``), or None
        when another process (or thread) is searching this key. Raises CacheError if unsafe."""
        self._ensure_layout()
        lock = self._lock(spec.dirname, ".search.lock", 0)
        try:
            self._acquire(lock, spec.dirname, 0)
        except CacheError:
            return None
        return lock

    def get_or_build(self, spec: AttentionSpec, build_fn: Callable[[], Built], *,
                     timeout: float = 3600.0) -> CacheEntry:
        """FlashInfer's template: try-load → lock → try-load again → build → store.

        Of many processes missing the same key, one runs ``build_fn`` (under the key's search
        lock); the rest wait on that lock and then read its result. Raises CacheError when the
        lock is not acquired within ``timeout``; what ``build_fn`` raises propagates.
        """
        entry = self.lookup(spec)
        if entry is not None:
            return entry
        self._ensure_layout()
        lock = self._lock(spec.dirname, ".search.lock", timeout)
        self._acquire(lock, f"search of {spec.dirname}", timeout)
        try:
            entry = self.lookup(spec)
            if entry is not None:
                return entry
            built = build_fn()
            if not isinstance(built, Built):
                raise TypeError(f"build_fn must return a cache.Built, got {type(built).__name__}")
            if built.negative:
                return self.store_negative(spec, built.meta)
            return self.store(spec, built.source, built.language, built.meta, built.check_tensors)
        finally:
            lock.release()

    # ---------------------------------------------------------------- removal
    def remove(self, name: str) -> bool:
        """Delete entry ``name`` (atomically for readers). True if it existed."""
        self._ensure_layout()
        lock = self._lock(name, ".lock", self.lock_timeout)
        self._acquire(lock, name, self.lock_timeout)
        try:
            path = self.shard / name
            if not os.path.lexists(path):
                return False
            trash = self.shard / f"{TRASH_PREFIX}{name}-{secrets.token_hex(4)}"
            os.rename(path, trash)  # readers see it gone at once, never half-deleted
            if os.path.isdir(trash) and not os.path.islink(trash):
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.unlink(trash)
            build = self.shard / ".build"
            if build.is_dir():  # the loader's CUDA builds of this entry
                for n in os.listdir(build):
                    if n.startswith(f"{name}-"):
                        shutil.rmtree(build / n, ignore_errors=True)
            return True
        finally:
            lock.release()
            with self._mu:
                self._memo.pop(name, None)

    def clear(self) -> int:
        """Delete every entry of this shard; returns how many."""
        n = sum(self.remove(name) for name in self.entry_names())
        self.invalidate()
        return n

    def invalidate(self) -> None:
        """Forget the in-memory layer (the disk is re-read on the next lookup)."""
        with self._mu:
            self._memo.clear()

    # ---------------------------------------------------------------- export / import
    def export(self, file: str | Path) -> int:
        """Write every valid entry of this shard into one tar file (``.tar.gz``/``.tgz``
        compressed). Returns the number of entries."""
        self._ensure_layout()
        file = Path(file)
        mode = "w:gz" if file.name.endswith((".tar.gz", ".tgz")) else "w"
        manifest: dict[str, Any] = {"format": "torch_r1attn.cache_export", "cache_schema": CACHE_SCHEMA,
                                    "fingerprint": self.fingerprint, "entries": {}}
        members: list[tuple[str, bytes]] = []
        for entry in self.entries():
            names = [META_FILE] + ([entry.source_path.name] if entry.source_path else [])
            dfd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
            try:
                blobs = {n: _read_at(dfd, n, _MAX_META_BYTES, n) for n in names}
            except (_Corrupt, _Vanished) as e:
                log.warning("r1attn cache: skipping %s in export (%s)", entry.path.name, e)
                continue
            finally:
                os.close(dfd)
            name = entry.path.name
            manifest["entries"][name] = {n: _sha256(b) for n, b in blobs.items()}
            members += [(f"entries/{name}/{n}", b) for n, b in blobs.items()]
        tmp = file.with_name(f".{file.name}.{secrets.token_hex(4)}.tmp")
        with tarfile.open(tmp, mode) as tar:
            for arcname, data in [("manifest.json", json.dumps(manifest, indent=1, sort_keys=True).encode())] + members:
                info = tarfile.TarInfo(arcname)
                info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, file)
        return len(manifest["entries"])

    def import_archive(self, file: str | Path) -> list[str]:
        """Import an :meth:`export` archive into the shard of the fingerprint it was made on.

        Everything is validated before anything is written: only regular files at
        ``manifest.json`` and ``entries/<dirname>/<kernel.py|kernel.cu|entry.safetensors>`` are
        accepted (no links, devices, absolute paths or ``..``), every file must match the
        manifest's sha256 and every entry must pass the same integrity checks as a lookup.
        Raises CacheError naming the first problem; returns the imported entry names.
        """
        file = Path(file)
        allowed = set(SOURCE_FILES.values()) | {META_FILE}
        blobs: dict[str, dict[str, bytes]] = {}
        manifest = None
        try:
            tar = tarfile.open(file, "r:*")
        except (OSError, tarfile.TarError) as e:
            raise CacheError(f"cannot open archive {file}: {e}") from None
        with tar:
            for m in tar.getmembers():
                if not m.isfile():
                    raise CacheError(f"archive member {m.name!r} is not a regular file (links and special "
                                     "files are refused)")
                if m.size > _MAX_META_BYTES:
                    raise CacheError(f"archive member {m.name!r} is too large ({m.size} bytes)")
                parts = m.name.split("/")
                data = tar.extractfile(m).read()
                if m.name == "manifest.json":
                    manifest = data
                elif (len(parts) == 3 and parts[0] == "entries" and parts[2] in allowed
                      and re.fullmatch(r"[A-Za-z0-9_.+@-]+", parts[1]) and not parts[1].startswith(".")):
                    if parts[2] in blobs.setdefault(parts[1], {}):
                        raise CacheError(f"archive has {m.name!r} twice")
                    blobs[parts[1]][parts[2]] = data
                else:
                    raise CacheError(f"archive member {m.name!r} is not part of a cache export (path refused)")
        if manifest is None:
            raise CacheError(f"{file} has no manifest.json; not a torch_r1attn cache export")
        try:
            man = json.loads(manifest)
            fp, listed = man["fingerprint"], man["entries"]
            if man.get("format") != "torch_r1attn.cache_export" or man.get("cache_schema") != CACHE_SCHEMA:
                raise ValueError("format/schema")
        except (ValueError, KeyError, TypeError):
            raise CacheError(f"{file}: manifest.json is not a schema-{CACHE_SCHEMA} cache export manifest") from None
        if set(listed) != set(blobs):
            raise CacheError(f"{file}: entries in the archive do not match its manifest")
        target = KernelCache(self.root, fingerprint=fp, lock_timeout=self.lock_timeout)
        specs = {}
        for name, files in blobs.items():
            if {n: _sha256(b) for n, b in files.items()} != listed[name]:
                raise CacheError(f"{file}: entry {name} does not match the manifest's hashes (tampered?)")
            try:
                raw, data = _parse_meta_file(files[META_FILE]) if META_FILE in files else (None, None)
                if raw is None:
                    raise _Corrupt(f"no {META_FILE}")
                meta = _decode_meta(raw)
                if meta.get("tensors_sha256") != _sha256(data):
                    raise _Corrupt("check-set tensors do not match their hash")
                spec = AttentionSpec.from_dict(meta["spec"])
                if spec.dirname != name or meta.get("fingerprint") != fp:
                    raise _Corrupt("metadata does not describe this entry/fingerprint")
                if not meta.get("negative"):
                    fname = meta.get("source_file")
                    if fname not in files or _sha256(files[fname]) != meta.get("source_sha256"):
                        raise _Corrupt("kernel source does not match its sha256 in the metadata")
                    if set(files) != {fname, META_FILE}:
                        raise _Corrupt("unexpected files")
                elif set(files) != {META_FILE}:
                    raise _Corrupt("negative entry carries a source")
            except (_Corrupt, KeyError, TypeError, ValueError) as e:
                raise CacheError(f"{file}: entry {name} refused: {e}") from None
            specs[name] = spec
        if fp != self.fingerprint:
            log.warning("r1attn cache: importing entries of fingerprint %s (this device is %s); they will "
                        "only be used on a matching device", fingerprint_name(fp), fingerprint_name(self.fingerprint))
        for name, files in blobs.items():
            target._install(specs[name], files)
        self.invalidate()
        return sorted(blobs)

    def fingerprint_dirs(self) -> list[Path]:
        """Every fingerprint shard under this root's schema dir."""
        base = self.root / f"v{CACHE_SCHEMA}"
        return sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink()) if base.is_dir() else []


_default: KernelCache | None = None
_default_mu = threading.Lock()


def default_cache() -> KernelCache:
    """The process-wide cache (root from settings, fingerprint of the current device)."""
    global _default
    if _default is None:
        with _default_mu:
            if _default is None:
                _default = KernelCache()
    return _default


def reset_default_cache() -> None:
    """Forget the process-wide cache (tests; after settings change). The loader's memo stays:
    it is keyed by entry path and source hash, so it cannot serve a stale kernel."""
    global _default
    with _default_mu:
        _default = None
