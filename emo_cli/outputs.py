"""Files emo writes for the user get the permissions of any file the user creates: 0666 (files) or
0777 (directories) less the umask. Temporary directories (mkdtemp) and safetensors' writer make
their results private (0700/0600), so outputs built that way are opened up before they are
published under their final name."""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it (Linux shows it in /proc; elsewhere the
    set-and-restore dance, which is brief)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give `path` (and, for a directory, everything inside) the default permissions."""
    mask = current_umask()
    path = Path(path)
    targets = [path] + (sorted(path.rglob("*")) if path.is_dir() else [])
    for p in targets:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
