"""Helpers for tests that start real daemons (PostgreSQL, mlflow server, SLURM).

Where the programs are missing, the tests install them from Debian's packages
(scripts/install-system-packages.sh) when they can (root + apt-get), and skip
with the reason otherwise (``skip_or_fail``, from tests/requirements_switch.py):
CI sets MEDSEG_REQUIRE_ALL_TESTS=1, which turns such a skip into a failure, so
these tests cannot silently stop running there.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from requirements_switch import skip_or_fail

from medseg.tracking_server import POSTGRES_PROGRAMS, PostgresNotFound, find_postgres_bin_dir, free_port

__all__ = ["free_port", "require_programs", "skip_or_fail", "which"]

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-system-packages.sh"


@functools.cache
def _install_attempt() -> str | None:
    """Run the install script once per session (per pytest-xdist worker, one
    at a time: apt and dpkg refuse a second installer); None on success, else
    why not."""
    if shutil.which("apt-get") is None:
        return "apt-get not available"
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        return "not root (and no sudo) to install Debian packages"
    from filelock import FileLock

    with FileLock(os.path.join(tempfile.gettempdir(), "medseg-install-system-packages.lock"), timeout=1200):
        proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return f"{INSTALL_SCRIPT.name} failed: {(proc.stderr or proc.stdout)[-500:]}"
    return None


def which(program: str) -> str | None:
    """On PATH, in sbin, or (PostgreSQL's programs) where medseg looks for them."""
    found = shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")
    if found is None and program in POSTGRES_PROGRAMS:
        try:
            return str(find_postgres_bin_dir() / program)
        except PostgresNotFound:
            return None
    return found


def require_programs(*programs: str) -> dict[str, str]:
    """Paths of the programs, installing their Debian packages if needed; skips otherwise."""
    if any(which(p) is None for p in programs):
        why = _install_attempt()
        missing = [p for p in programs if which(p) is None]
        if missing:
            skip_or_fail(f"{', '.join(missing)} not found and could not be installed ({why or 'not in the packages'}); "
                         f"run scripts/install-system-packages.sh as root")
    return {p: which(p) for p in programs}
