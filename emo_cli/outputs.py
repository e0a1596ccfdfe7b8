"""Outputs emo publishes for the user.

They get the permissions of any file the user creates: 0666 (files) or 0777 (directories) less the
umask; temporary directories (mkdtemp) and safetensors' writer make their results private
(0700/0600), so outputs built that way are opened up before they are published under their final
name. They are written under staging names that carry the writer's pid, so what a killed run left
behind can be told from a running one's and removed."""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from emo_cli.errors import EmoError


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale(parent: Path, name: str) -> None:
    """Remove what killed emo runs left behind while writing `name` in `parent`: staging names
    `.{name}.{pid}.…` whose process no longer exists (a running one's are left alone)."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.(\d+)\.")
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return
    for p in entries:
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def staging_path(path: Path, tag: str = "tmp") -> Path:
    """The name `path` is written under until it is complete: hidden, beside it, with our pid."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{tag}")


def write_atomic(path: Path, write) -> None:
    """Call `write(staging)` and rename the result to `path` with the umask's permissions. A failure
    or interruption leaves `path` as it was and no staging file; killed runs' leftovers are removed
    first. An OSError becomes one line naming `path`."""
    path = Path(path)
    remove_stale(path.parent, path.name)
    tmp = staging_path(path)
    try:
        write(tmp)
        follow_umask(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise EmoError(f"cannot write {path} ({e.strerror or e})") from None
    finally:
        tmp.unlink(missing_ok=True)


def check_location(path: Path) -> None:
    """Before any work: the directory an output goes to exists and is writable."""
    parent = Path(path).absolute().parent
    if not parent.is_dir():
        raise EmoError(f"{parent}: no such directory (for {path})")
    probe = staging_path(parent / Path(path).name, "probe")  # permissions alone miss read-only mounts
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise EmoError(f"{parent}: cannot write there ({e.strerror or e}; for {path})") from None


@contextmanager
def staged_dir(out_dir: Path):
    """A private staging directory beside `out_dir` (named with our pid), published when the block
    completes: umask permissions, then it replaces any old `out_dir`. Removed if the block fails."""
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}.", dir=out_dir.absolute().parent))
    try:
        yield tmp
        follow_umask(tmp)  # mkdtemp and safetensors' writer made it private
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def is_emo_output(path: Path) -> bool:
    """A slim directory emo wrote (its pruning_metadata.json carries emo_version), or a GGUF file."""
    if path.is_dir():
        try:
            return "emo_version" in json.loads((path / "pruning_metadata.json").read_text())
        except (OSError, ValueError, TypeError):
            return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def check_outputs(out: Path, gguf_path: Path | None, force: bool) -> None:
    """Refuse before any work: existing outputs without --force, and, even with it, anything emo
    did not write (a user's folder or file under the same name is never deleted)."""
    for target in (out, gguf_path):
        if target is not None:
            check_location(target)
    for target in (out, gguf_path):
        if target is None or not (target.exists() or target.is_symlink()):
            continue
        if not force:
            raise EmoError(f"{target} exists (pass --force to overwrite, or -o another name)")
        if target.is_symlink() or not is_emo_output(target) or (target == out) != target.is_dir():
            raise EmoError(f"{target} exists and is not an emo output; refusing to replace it (choose another -o/--gguf)")
