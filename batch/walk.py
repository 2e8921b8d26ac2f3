"""Local globs that always end: ``**`` spans folders, symlinked folders are followed, but a
real folder is never walked twice and each real file is listed once (a symlink loop cannot
hang planning)."""

from __future__ import annotations

import fnmatch
import glob
import logging
import os
import stat
from pathlib import Path

logger = logging.getLogger(__name__)


def walk_glob(pattern: Path) -> list[Path]:
    """Files matching ``pattern`` (``**`` spans folders), sorted, as reached through the
    folders (symlinks not resolved). Symlinked folders are followed, but a folder already
    walked (a symlink loop, or a second link to it) is not walked again, and each real file
    is listed once: the walk always ends."""
    parts = pattern.parts
    fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    if fixed == len(parts):
        return [root] if root.is_file() else []
    walk = _GlobWalk()
    walk.expand(root, list(parts[fixed:]))
    return sorted(walk.files)


class _GlobWalk:
    """One glob's walk: the real folders and files seen so far."""

    def __init__(self) -> None:
        self.files: list[Path] = []
        self._real_files: set[tuple[int, int]] = set()
        self._real_dirs: set[tuple[int, int]] = set()

    def expand(self, folder: Path, parts: list[str]) -> None:
        head, rest = parts[0], parts[1:]
        if head == "**":
            if not self._enter(folder):
                return
            if rest:
                self._match(folder, rest)
            else:  # a trailing ** matches every file below
                for child in self._entries(folder):
                    if not child.name.startswith("."):
                        self._add_file(child)
            # Real folders before symlinked ones: a file reachable both ways is listed
            # under its real folder.
            for child in sorted(self._entries(folder), key=lambda c: (c.is_symlink(), c.name)):
                if not child.name.startswith(".") and _is_dir(child):
                    self.expand(child, parts)
        else:
            self._match(folder, parts)

    def _match(self, folder: Path, parts: list[str]) -> None:
        head, rest = parts[0], parts[1:]
        if head == "**":
            self.expand(folder, parts)
            return
        if glob.has_magic(head):
            hidden_ok = head.startswith(".")
            children = [
                c for c in self._entries(folder)
                if fnmatch.fnmatchcase(c.name, head) and (hidden_ok or not c.name.startswith("."))
            ]  # fmt: skip
        else:
            children = [folder / head]
        for child in children:
            if rest:
                if _is_dir(child):
                    self.expand(child, rest)
            else:
                self._add_file(child)

    def _enter(self, folder: Path) -> bool:
        """True the first time a real folder is reached; a repeat is logged, not walked."""
        try:
            info = folder.stat()
        except FileNotFoundError:
            return False
        except OSError as exc:
            logger.warning("glob: skipped %s: %s", folder, exc.strerror or exc)
            return False
        key = (info.st_dev, info.st_ino)
        if key in self._real_dirs:
            logger.warning(
                "glob: not walking %s again: it is a folder already walked (a symlink loop "
                "or a second link to it)",
                folder,
            )
            return False
        self._real_dirs.add(key)
        return True

    def _entries(self, folder: Path) -> list[Path]:
        try:
            with os.scandir(folder) as entries:
                return [folder / entry.name for entry in entries]
        except (FileNotFoundError, NotADirectoryError):
            return []
        except OSError as exc:
            logger.warning("glob: cannot list %s: %s", folder, exc.strerror or exc)
            return []

    def _add_file(self, path: Path) -> None:
        try:
            info = path.stat()
        except OSError:
            # A matching link whose target is missing (or loops) is listed all the same:
            # `locate` makes it a failed item naming the link, as a listed path would be.
            self._add_link(path)
            return
        if not stat.S_ISREG(info.st_mode):
            return
        key = (info.st_dev, info.st_ino)
        if key in self._real_files:
            logger.info("glob: %s is a file already matched through another path", path)
            return
        self._real_files.add(key)
        self.files.append(path)

    def _add_link(self, path: Path) -> None:
        try:
            info = path.lstat()
        except OSError:  # gone since the folder was listed
            return
        key = (info.st_dev, info.st_ino)
        if stat.S_ISLNK(info.st_mode) and key not in self._real_files:
            self._real_files.add(key)
            self.files.append(path)


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a symlink loop, a name too long
        return False
