"""A restore run's outputs under the output lock: taken fresh, resumed, or overwritten (staged, swapped in at the end)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from volrestore.blockwise.blocks import PROGRESS_DIR, iter_blocks, n_blocks
from volrestore.blockwise.spill import SPILL_DIR
from volrestore.blockwise.lock import OutputLock, refuse_if_locked
from volrestore.config import RESULT_FIELDS, RestoreConfig
from volrestore.errors import UserError
from volrestore.io import ngff
from volrestore.io.storage import fingerprint, fingerprint_change

STAGING_TAG = ".volrestore-new-"
ASIDE_TAG = ".volrestore-old-"


def std_path(output) -> str:
    """Where the per-voxel std goes: a sibling image, out.ome.zarr -> out.std.ome.zarr."""
    p = Path(output)
    for suffix in (".ome.zarr", ".zarr"):
        if p.name.endswith(suffix):
            return str(p.with_name(p.name[: -len(suffix)] + ".std" + suffix))
    return str(p.with_name(p.name + ".std"))


def input_fingerprints(config: RestoreConfig) -> dict:
    """Fingerprints of the run's input level and mask (io.storage.fingerprint), recorded in provenance."""
    info = ngff.read_info(config.input)
    prints = {"input": fingerprint(config.input, info.levels[config.level].path)}
    if config.mask is not None:
        prints["mask"] = fingerprint(config.mask, ngff.read_info(config.mask).levels[0].path)
    return prints


class RunOutputs:
    """The outputs of one restore run, held under an exclusive OutputLock on the primary output from before anything
    is created until `complete` is set.

    - fresh: the primary folder is made atomically with the lock inside (a second fresh run fails there);
    - resume: the existing output is locked, then its recorded parameters and input fingerprints are compared;
    - overwrite: the old output is locked (refused while another run holds it) and the new outputs are written to
      hidden staging folders beside it, which replace the old ones only once complete; an interrupted overwrite
      leaves the old output as it was.
    `state` is None (fresh or overwrite), "partial" or "complete" (resume); `targets` are the paths to write now.
    """

    def __init__(self, config: RestoreConfig, out_paths: list[str], parameters: dict, inputs: dict,
                 break_lock: bool = False):
        self.config, self.final, self.parameters, self.inputs = config, list(out_paths), parameters, inputs
        self.break_lock = break_lock
        self.targets, self.staged, self.state = list(out_paths), False, None
        self.made: set[str] = set()  # folders this run made for its images (create them with into_folder)
        self.lock: OutputLock | None = None

    def __enter__(self) -> RunOutputs:
        config, out = self.config, Path(self.config.output)
        if config.resume and config.overwrite:
            raise UserError("--resume and --overwrite contradict each other; give one of them")
        inputs = [config.input] + ([config.mask] if config.mask is not None else [])
        exists = [Path(p).exists() or Path(p).is_symlink() for p in self.final]
        if config.resume and exists[0]:
            self.lock = OutputLock(out, self.break_lock).acquire(create=False)
            self._under_lock(self._resume_state)
        elif config.overwrite and any(exists):
            for path in self.final:
                ngff.check_output_path(path, inputs=inputs, overwrite=True)
            self.lock = OutputLock(out, self.break_lock).acquire(create=not exists[0])
            self._under_lock(self._stage)
        else:
            if exists[0]:
                refuse_if_locked(out)  # a run is writing it: say so, not only that it exists
            for path in self.final:
                ngff.check_output_path(path, inputs=inputs, overwrite=False)
            self.lock = OutputLock(out, self.break_lock).acquire(create=True)
            self.made.add(self.final[0])
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._abandon()
        if self.lock is not None:
            self.lock.release()
        if exc_type is not None and not self.staged and self.final[0] in self.made:
            _remove_if_empty(self.final[0])  # a fresh run that failed before creating anything leaves no folder

    @property
    def progress(self) -> str:
        """The progress-marker folder of the primary target."""
        return os.path.join(self.targets[0], PROGRESS_DIR)

    def verify_done(self, plan) -> None:
        """UserError unless every planned block has its progress record (checked before `complete` is set)."""
        missing = sum(1 for _ in iter_blocks(plan, skip_done=True))
        if missing:
            raise UserError(f"{missing} of {n_blocks(plan)} blocks of {self.config.output} are not recorded done "
                            "(was its progress folder changed by another process?); rerun with --resume")

    def complete(self, summary: dict) -> None:
        """Mark the targets complete (std first, primary last), swap staged outputs in, drop the progress records and spill files."""
        for path in self.targets[1:] + self.targets[:1]:
            ngff.set_complete(path, True, extra={"summary": summary})
        if self.staged:
            self._swap_in()
        for folder in (PROGRESS_DIR, SPILL_DIR):
            shutil.rmtree(os.path.join(self.final[0], folder), ignore_errors=True)

    def _under_lock(self, step) -> None:
        try:
            step()
        except BaseException:
            self.lock.release()
            raise

    def _resume_state(self) -> None:
        """Compare the output's provenance with this run's; "complete" or "partial", else UserError with the reason."""
        output = self.config.output
        prov = ngff.read_info(output).provenance or {}
        prev = prov.get("parameters")
        if not isinstance(prev, dict):
            raise UserError(f"{output} was not written by volrestore restore; cannot resume it, choose another output")
        for key in RESULT_FIELDS:
            if prev.get(key) != self.parameters.get(key):
                raise UserError(f"cannot resume {output}: parameter {key} was {prev.get(key)!r}, now "
                                f"{self.parameters.get(key)!r}; rerun with the same value or use --overwrite")
        recorded = prov.get("inputs")
        if not isinstance(recorded, dict):
            raise UserError(f"cannot resume {output}: it records no input fingerprint (older volrestore), so an "
                            "input change could not be seen; use --overwrite")
        for role, now in self.inputs.items():
            change = fingerprint_change(recorded.get(role) or {}, now)
            if change:
                path = self.config.input if role == "input" else self.config.mask
                raise UserError(f"cannot resume {output}: the {role} {path} is not the one it was started from "
                                f"({change}); use --overwrite to restore it again")
        for path in self.final[1:]:
            if not Path(path).exists():
                raise UserError(f"cannot resume {output}: its sibling {path} is missing; use --overwrite")
        self.state = "complete" if ngff.read_info(output).complete else "partial"

    def _remove_leftovers(self) -> None:
        """Staging folders of killed overwrites of these outputs (ours excepted): removed under the lock, at the
        start and again at the end (tasks of a killed client may still have been writing into one)."""
        for path in self.final:
            p = Path(path)
            for old in p.parent.glob(f".{p.name}{STAGING_TAG}*"):
                if str(old) not in self.targets:
                    shutil.rmtree(old, ignore_errors=True)

    def _stage(self) -> None:
        """Overwrite: new outputs go to hidden folders beside the old ones."""
        self._remove_leftovers()
        self.targets = [str(Path(p).with_name(f".{Path(p).name}{STAGING_TAG}{self.lock.run[:12]}"))
                        for p in self.final]
        for path in self.targets:
            os.mkdir(path)
            self.made.add(path)
        self.staged = True

    def _swap_in(self) -> None:
        """Replace each old output by its complete staged one (std first), and drop an old std sibling that this
        run does not write (it belonged to another model's result)."""
        pairs = list(zip(self.final, self.targets))
        extra_std = std_path(self.final[0])
        if len(self.final) == 1 and _is_std_output(extra_std):
            pairs.insert(0, (extra_std, None))
        asides = []
        for final, staged in pairs[1:] + pairs[:1]:
            if Path(final).exists() or Path(final).is_symlink():
                aside = Path(final).with_name(f".{Path(final).name}{ASIDE_TAG}{self.lock.run[:12]}")
                os.rename(final, aside)
                asides.append(aside)
            if staged is not None:
                os.rename(staged, final)
        self.lock.release()  # its file went aside with the old primary
        for aside in asides:
            shutil.rmtree(aside, ignore_errors=True)
        self._remove_leftovers()

    def _abandon(self) -> None:
        """After a failure: staged folders go (the old output stays as it was); a fresh partial output stays for
        --resume."""
        if self.staged:
            for path in self.targets:
                shutil.rmtree(path, ignore_errors=True)


def _is_std_output(path) -> bool:
    try:
        prov = ngff.read_info(path).provenance or {}
    except UserError:
        return False
    return (prov.get("parameters") or {}).get("output") == "std"


def _remove_if_empty(path) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass
