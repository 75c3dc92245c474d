"""Inputs of a collection run: files, folders, tar shards and ``@LIST`` files, with one naming rule.

**The naming rule.** Every input gets an *output name*: its path relative to the common parent
of all inputs of the run, in POSIX form, suffix dropped. The common parent is computed over the
folders given (each folder counts as itself), and the parent folders of the files, shards and
list entries given. So ``clasp segment 2024-01/ 2024-02/`` names ``2024-01/x.jpg`` and
``2024-02/x.jpg`` ``2024-01/x`` and ``2024-02/x``; a single folder keeps the names relative to
it (``photos/a/b.jpg`` -> ``a/b``); a single file is its stem. A tar shard ``s/000.tar`` names its
samples ``<shard name>/<key>`` (``000/abc``), and its rows in Parquet carry the key
``<shard path>:<key>``. Two inputs that still map to one name (``x.jpg`` beside ``x.png``) are a
usage error reported before any work (:attr:`InputPlan.collisions`), never a silent overwrite.

**The output folder is never an input**: files and shards under ``out_dir`` are left out of the
scan (and counted in :attr:`InputPlan.excluded`).

**Untrusted names** (tar members, list entries): :func:`check_member_name` rejects absolute names,
``..`` components, NUL and control characters; such a sample is a per-input failure. Output paths
are checked with :func:`safe_output_path` (or :class:`OutputFolder`, the same check with the
folders' resolution cached, for a writer) before anything is written.

``@LIST`` files hold one path per line (blank lines and lines starting with ``#`` are ignored);
relative paths are relative to the list file's folder. Entries may be images or ``.tar`` shards.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

__all__ = [
    "SHARD_EXTENSIONS",
    "FileInput",
    "ShardInput",
    "InputPlan",
    "plan_inputs",
    "check_member_name",
    "safe_output_path",
    "OutputFolder",
    "member_key",
]

SHARD_EXTENSIONS: tuple[str, ...] = (".tar",)
"""Suffixes read as WebDataset-style tar shards."""


@dataclass(frozen=True)
class FileInput:
    """One image file: ``path`` as given (or found), ``name`` its output name."""

    path: str
    name: str


@dataclass(frozen=True)
class ShardInput:
    """One tar shard: ``path`` as given (or found), ``name`` the prefix of its samples' names."""

    path: str
    name: str


@dataclass
class InputPlan:
    """What a run will read.

    Attributes:
        files: image files, in input order (folders expanded in sorted order).
        shards: tar shards, in input order.
        missing: ``{"path", "error"}`` for inputs that cannot be read at all (missing paths,
            empty folders, unreadable or unsafe list entries): per-input failures.
        collisions: one line per output name claimed by several inputs (a usage error).
        excluded: number of files/shards left out because they lie under the output folder.
        root: the common parent of all inputs (names are relative to it).
    """

    files: list[FileInput] = field(default_factory=list)
    shards: list[ShardInput] = field(default_factory=list)
    missing: list[dict[str, str]] = field(default_factory=list)
    collisions: list[str] = field(default_factory=list)
    excluded: int = 0
    root: str | None = None


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def _has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None


def check_member_name(name: str) -> str | None:
    """Why an untrusted relative name (tar member, list entry) is unsafe, or ``None`` if safe.

    Unsafe: empty, absolute (``/x``, ``C:\\x``, ``\\\\host``), any ``..`` component, a NUL or any
    other control character.

    Example:
        >>> check_member_name("a/b.jpg") is None, check_member_name("../evil.jpg")
        (True, "unsafe name '../evil.jpg': contains '..'")
    """
    if not name:
        return "unsafe name '': empty"
    if "\x00" in name or _has_control(name):
        return f"unsafe name {name!r}: contains a NUL or control character"
    norm = name.replace("\\", "/")
    if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":"):
        return f"unsafe name {name!r}: absolute path"
    if ".." in norm.split("/"):  # a ".." component (PurePosixPath(norm).parts, without the object)
        return f"unsafe name {name!r}: contains '..'"
    return None


def member_key(name: str) -> tuple[str, str]:
    """WebDataset grouping of a tar member: ``(key, extension)``.

    The key is the member's path up to the first dot of its file name (``a/b.c.jpg`` ->
    ``("a/b", "c.jpg")``), as ``webdataset``'s ``base_plus_ext``.
    """
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{head}/{stem}" if head else stem
    return key, (ext if dot else "")


def safe_output_path(out_dir: str | os.PathLike[str], name: str, suffix: str) -> Path:
    """``out_dir / (name + suffix)``, checked to resolve inside ``out_dir``.

    Raises:
        ValueError: the name would escape ``out_dir`` (absolute, ``..``, symlinks out) or holds
            a NUL / control character.
    """
    reason = check_member_name(name)
    if reason is not None:
        raise ValueError(reason)
    base = Path(out_dir).resolve()
    target = (base / (name + suffix)).resolve()
    if target != base and base not in target.parents:
        raise ValueError(f"output path {target} escapes the output folder {base}")
    return base / (name + suffix)


class OutputFolder:
    """:func:`safe_output_path` for many names under one folder, as strings: the folder is resolved
    once and each sub-folder once (a writer checks every input; two ``Path.resolve`` calls per
    name cost 0.1 ms, a tenth of the label PNG's encoding).

    The check is the same: every name must pass :func:`check_member_name`; the first name in each
    sub-folder, and any target that is itself a symlink, get :func:`safe_output_path`'s full
    check; later names in a sub-folder already found inside need no resolving. A sub-folder is
    checked when first seen, so one replaced by a symlink later in a run is not noticed (the
    output folder is the run's own).

    Example:
        >>> import tempfile; d = tempfile.mkdtemp()
        >>> OutputFolder(d).path("a/b", ".png") == os.path.join(os.path.realpath(d), "a", "b.png")
        True
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        self.base = os.path.realpath(os.fspath(out_dir))
        self._inside: set[str] = {self.base}

    def path(self, name: str, suffix: str) -> str:
        """``out_dir/name+suffix`` (resolved folder, ``/``-separated name as given).

        Raises:
            ValueError: as :func:`safe_output_path`.
        """
        reason = check_member_name(name)
        if reason is not None:
            raise ValueError(reason)
        target = os.path.join(self.base, name + suffix)
        parent = os.path.dirname(target)
        if parent not in self._inside:  # a new sub-folder: the full check, once
            safe_output_path(self.base, name, suffix)
            self._inside.add(parent)
        elif os.path.islink(target):
            safe_output_path(self.base, name, suffix)
        return target


def _abs(path: str | os.PathLike[str]) -> str:
    return os.path.normpath(os.path.abspath(os.fspath(path)))


def _under(path: str, folder: str | None) -> bool:
    if folder is None:
        return False
    real = os.path.realpath(path)
    return real == folder or real.startswith(folder.rstrip(os.sep) + os.sep)


def _scan_folder(folder: str, exclude: str | None, extensions: Sequence[str]) -> tuple[list[str], int]:
    """Sorted image and shard files under ``folder`` (hidden entries skipped), minus ``exclude``.

    Paths start with ``folder`` as given (relative stays relative)."""
    found: list[tuple[str, str]] = []
    excluded = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            if _under(os.path.join(dirpath, d), exclude):
                excluded += sum(
                    1 for _, _, fs in os.walk(os.path.join(dirpath, d)) for f in fs if f.lower().endswith(extensions)
                )
                continue
            keep.append(d)
        dirnames[:] = keep
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(extensions):
                continue
            full = os.path.join(dirpath, name)
            if not os.path.isfile(full):
                continue
            if _under(full, exclude):
                excluded += 1
                continue
            found.append((Path(full).relative_to(folder).as_posix(), full))
    found.sort()
    return [p for _, p in found], excluded


def _read_list(path: str) -> tuple[list[str], list[dict[str, str]]]:
    """Entries of an ``@LIST`` file, resolved against its folder; unsafe lines as failures."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [], [{"path": "@" + path, "error": f"cannot read the list file: {exc}"}]
    base = os.path.dirname(_abs(path))
    entries, bad = [], []
    for line in text.splitlines():
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if "\x00" in entry or _has_control(entry):
            bad.append({"path": repr(entry), "error": "list entry contains a NUL or control character"})
            continue
        entries.append(entry if os.path.isabs(entry) else os.path.join(base, entry))
    return entries, bad


def plan_inputs(
    inputs: Iterable[str],
    out_dir: str | os.PathLike[str] | None = None,
    image_extensions: Sequence[str] | None = None,
) -> InputPlan:
    """Expand the inputs of a run and give each its output name (see the module docstring).

    Args:
        inputs: files, folders (searched recursively), ``.tar`` shards and ``@LIST`` files.
        out_dir: the run's output folder; nothing under it is read.
        image_extensions: suffixes picked up in folders (default
            :data:`clasp_torch.data.IMAGE_EXTENSIONS`); files given explicitly are always tried.

    Returns:
        An :class:`InputPlan`. Duplicate paths are kept once.
    """
    from .data import IMAGE_EXTENSIONS

    exts = tuple(image_extensions or IMAGE_EXTENSIONS) + SHARD_EXTENSIONS
    exclude = os.path.realpath(out_dir) if out_dir is not None else None
    plan = InputPlan()
    # (given path, absolute path, kind) in input order; anchors for the common parent
    items: list[tuple[str, str, str]] = []
    anchors: list[str] = []
    queue: list[tuple[str, bool]] = [(p, True) for p in inputs]
    for given, top in queue:
        if top and given.startswith("@"):
            entries, bad = _read_list(given[1:])
            plan.missing += bad
            queue += [(e, False) for e in entries]
            continue
        path = _abs(given)
        if os.path.isdir(path) and top:
            found, n_ex = _scan_folder(given, exclude, exts)
            plan.excluded += n_ex
            if not found and not n_ex:
                plan.missing.append({"path": given, "error": f"no image files ({', '.join(exts)}) in this folder"})
            anchors.append(path)
            items += [(f, _abs(f), _kind(f)) for f in found]
        elif os.path.isfile(path):
            if _under(path, exclude):
                plan.excluded += 1
                continue
            anchors.append(os.path.dirname(path))
            items.append((given, path, _kind(given)))
        elif os.path.isdir(path):
            plan.missing.append({"path": given, "error": "a folder named in a list file: list its files, "
                                                          "or give the folder on the command line"})
        else:
            plan.missing.append({"path": given, "error": "no such file or folder"})
    seen: set[str] = set()
    unique = [it for it in items if not (it[1] in seen or seen.add(it[1]))]
    if not unique:
        return plan
    root = os.path.commonpath(anchors)
    plan.root = root
    owners: dict[str, list[str]] = {}
    for given, path, kind in unique:
        rel = Path(os.path.relpath(path, root)).as_posix()
        name = str(PurePosixPath(rel).with_suffix("")) if "." in PurePosixPath(rel).name else rel
        owners.setdefault(name, []).append(given)
        if kind == "shard":
            plan.shards.append(ShardInput(given, name))
        else:
            plan.files.append(FileInput(given, name))
    plan.collisions = [
        f"{name}: {', '.join(paths)}" for name, paths in owners.items() if len(paths) > 1
    ]
    return plan


def _kind(path: str) -> str:
    return "shard" if path.lower().endswith(SHARD_EXTENSIONS) else "file"
