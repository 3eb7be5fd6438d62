"""Mounts that tools leave under a directory of ours (dockerd's network namespace, debootstrap's /proc after a
failure): they must be gone before the directory is removed."""

from __future__ import annotations

import subprocess
from pathlib import Path


def unmount_under(directory: Path) -> None:
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(f"{directory}/")), key=len, reverse=True):
        subprocess.run(["umount", mount], capture_output=True)
