"""The bad-input battery: every command given a bad input, option or output answers with exactly one line starting
"error:" and exit code 2 (no traceback), leaves the input files' bytes unchanged and marks no output complete.

Inputs are made once per module (tiny images, damaged copies, links, a read-only folder); each case runs the CLI in
this process (click's CliRunner) unless it needs a real process (block failures on Dask workers print there)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr
from _io_helpers import cli, tree_hash

from volrestore.io import images

TESTS = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------ the inputs


def _copy(d: Path, src: str, dst: str) -> Path:
    shutil.copytree(d / src, d / dst)
    return d / dst


def _cut_in_half(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_multiscales(d: Path, name: str, edit) -> None:
    group = zarr.open_group(str(d / name), mode="r+")
    ome = group.attrs["ome"]
    edit(ome["multiscales"][0])
    group.attrs["ome"] = ome


def _damaged_metadata(d: Path) -> None:
    """Copies of img.ome.zarr (and v4) with metadata cut in half, of the wrong rank, or otherwise invalid."""
    _cut_in_half(_copy(d, "img.ome.zarr", "level-cut.ome.zarr") / "0" / "zarr.json")
    (_copy(d, "img.ome.zarr", "level-empty.ome.zarr") / "0" / "zarr.json").write_text("")
    _cut_in_half(_copy(d, "img.ome.zarr", "group-cut.ome.zarr") / "zarr.json")
    _cut_in_half(_copy(d, "v4.ome.zarr", "v4-cut.ome.zarr") / "0" / ".zarray")
    for name, key, value in (("level-rank", "shape", [8, 64]), ("level-dtype", "data_type", "foo"),
                             ("level-negative", "shape", [-8, 64, 64]), ("zero-size", "shape", [0, 64, 64])):
        _edit_json(_copy(d, "img.ome.zarr", f"{name}.ome.zarr") / "0" / "zarr.json",
                   lambda meta, key=key, value=value: meta.__setitem__(key, value))
    edits = {
        "scale-rank": lambda ms: ms["datasets"][0]["coordinateTransformations"][0].update(scale=[1, 1]),
        "translation-rank": lambda ms: ms["datasets"][0]["coordinateTransformations"][1].update(translation=[0]),
        "global-rank": lambda ms: ms.update(coordinateTransformations=[{"type": "scale", "scale": [1, 1]}]),
        "scale-text": lambda ms: ms["datasets"][0]["coordinateTransformations"][0].update(scale=["a", 1, 1]),
        "scale-zero": lambda ms: ms["datasets"][0]["coordinateTransformations"][0].update(scale=[0, 1, 1]),
        "datasets-dict": lambda ms: ms.update(datasets={"path": "0"}),
        "datasets-none": lambda ms: ms.pop("datasets"),
        "level-missing": lambda ms: ms["datasets"][0].update(path="missing"),
        "axes-swapped": lambda ms: ms.update(axes=[ms["axes"][0], ms["axes"][2], ms["axes"][1]]),
    }
    for name, edit in edits.items():
        _copy(d, "img.ome.zarr", f"{name}.ome.zarr")
        _edit_multiscales(d, f"{name}.ome.zarr", edit)
    group = zarr.open_group(str(_copy(d, "img.ome.zarr", "version.ome.zarr")), mode="r+")
    group.attrs["ome"] = {**group.attrs["ome"], "version": "0.3"}
    shutil.rmtree(_copy(d, "lv.ome.zarr", "level1-rank.ome.zarr") / "1")
    zarr.create_array(str(d / "level1-rank.ome.zarr" / "1"), shape=(32, 32), dtype="uint16")


def _read_only_folder(path: Path) -> bool:
    """Make `path` a folder nobody may write (chmod; for root, which ignores modes, also chattr +i); whether it
    worked."""
    path.mkdir()
    path.chmod(0o555)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    try:
        (path / "probe").mkdir()
    except OSError:
        return True
    (path / "probe").rmdir()
    return False


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The module's input folder: good images, damaged copies, a TIFF, links, a read-only folder, junk files."""
    d = tmp_path_factory.mktemp("bad-inputs")
    data = (np.arange(8 * 64 * 64).reshape(8, 64, 64) % 997).astype("uint16")
    images.write_image(d / "img.ome.zarr", data, chunks=(4, 32, 32))
    images.write_image(d / "other.ome.zarr", data, chunks=(4, 32, 32))
    images.write_image(d / "lv.ome.zarr", np.tile(data, (2, 1, 1)), chunks=(4, 32, 32), n_levels=2)
    images.write_image(d / "v4.ome.zarr", data, chunks=(4, 32, 32), version="0.4")
    tifffile.imwrite(d / "stack.tif", data)
    _damaged_metadata(d)
    chunk = next(p for p in sorted(_copy(d, "img.ome.zarr", "chunk-bad.ome.zarr").rglob("*"))
                 if p.is_file() and p.parent.name.isdigit() and p.name.isdigit())
    chunk.write_bytes(b"not a zstd frame")
    complex_img = zarr.open_group(str(_copy(d, "img.ome.zarr", "complex.ome.zarr")), mode="r+")
    del complex_img["0"]
    complex_img.create_array("0", shape=(8, 64, 64), dtype="complex64", chunks=(4, 32, 32), dimension_names="zyx")
    zarr.create_array(str(d / "plain.zarr"), shape=(4, 4), dtype="uint8")
    zarr.open_group(str(d / "group.zarr"), mode="w").attrs["something"] = 1
    (d / "folder").mkdir()
    (d / "folder" / "keep.txt").write_text("keep me")
    (d / "link-to-folder").symlink_to(d / "folder")
    (d / "link-to-image.ome.zarr").symlink_to(d / "other.ome.zarr")
    (d / "notes.txt").write_text("not an image\n")
    (d / "broken.pt").write_bytes(bytes(range(256)) * 4)
    (d / "list.yaml").write_text("- a\n- b\n")
    read_only = _read_only_folder(d / "read-only")
    yield d, read_only
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(d / "read-only")], capture_output=True)
    (d / "read-only").chmod(0o755)


def complete_outputs(root: Path) -> list[str]:
    """The images under root whose volrestore provenance says complete."""
    found = []
    for meta in list(root.rglob("zarr.json")) + list(root.rglob(".zattrs")):
        try:
            attrs = json.loads(meta.read_text())
        except ValueError:
            continue
        attrs = attrs.get("attributes", attrs) if meta.name == "zarr.json" else attrs
        if isinstance(attrs, dict) and (attrs.get("volrestore") or {}).get("complete") is True:
            found.append(str(meta.parent))
    return found


# ------------------------------------------------------------------------------------------------ the cases


@dataclass(frozen=True)
class Case:
    """One bad invocation: arguments ({d}: the inputs, {out}: a fresh folder for outputs) and the text its error
    line must contain (any of several, separated by |)."""

    args: str
    expect: str
    process: bool = False  # run as a real process (restorer failures on Dask workers print there)
    read_only: bool = False  # needs the read-only folder


OUT = "{out}/out.ome.zarr"
IMG, LV, TIF = "{d}/img.ome.zarr", "{d}/lv.ome.zarr", "{d}/stack.tif"
RESTORE = f"restore {IMG} {OUT} --model identity --workers 1"
NOT_WRITABLE = "not writable|permission denied|cannot create output"

CASES = {
    # info: what is not an image, metadata cut in half or of the wrong rank, unsupported layouts
    "info-missing": Case("info {d}/nope.ome.zarr", "does not exist"),
    "info-tiff": Case(f"info {TIF}", "not an OME-Zarr directory"),
    "info-plain-array": Case("info {d}/plain.zarr", "plain Zarr array"),
    "info-folder": Case("info {d}/folder", "not an OME-Zarr image"),
    "info-no-multiscales": Case("info {d}/group.zarr", "without OME-Zarr multiscales"),
    "info-group-json-cut": Case("info {d}/group-cut.ome.zarr", "not valid JSON"),
    "info-level-json-cut": Case("info {d}/level-cut.ome.zarr", "cannot be read"),
    "info-level-json-empty": Case("info {d}/level-empty.ome.zarr", "cannot be read"),
    "info-v04-zarray-cut": Case("info {d}/v4-cut.ome.zarr", "cannot be read"),
    "info-level-shape-rank": Case("info {d}/level-rank.ome.zarr", "cannot be read"),
    "info-level-dtype": Case("info {d}/level-dtype.ome.zarr", "cannot be read"),
    "info-level-negative": Case("info {d}/level-negative.ome.zarr", "cannot be read"),
    "info-level1-rank": Case("info {d}/level1-rank.ome.zarr", "not a 3-D array"),
    "info-scale-rank": Case("info {d}/scale-rank.ome.zarr", "malformed multiscales"),
    "info-translation-rank": Case("info {d}/translation-rank.ome.zarr", "malformed multiscales"),
    "info-global-rank": Case("info {d}/global-rank.ome.zarr", "malformed multiscales"),
    "info-scale-text": Case("info {d}/scale-text.ome.zarr", "malformed multiscales"),
    "info-scale-zero": Case("info {d}/scale-zero.ome.zarr", "non-positive scale"),
    "info-datasets-dict": Case("info {d}/datasets-dict.ome.zarr", "malformed multiscales"),
    "info-datasets-none": Case("info {d}/datasets-none.ome.zarr", "malformed multiscales"),
    "info-level-missing": Case("info {d}/level-missing.ome.zarr", "is missing"),
    "info-axes-swapped": Case("info {d}/axes-swapped.ome.zarr", "not supported"),
    "info-version": Case("info {d}/version.ome.zarr", "not supported"),
    "info-zero-size": Case("info {d}/zero-size.ome.zarr", "axis of size 0"),
    "info-complex": Case("info {d}/complex.ome.zarr", "complex"),
    # convert
    "convert-not-tiff": Case(f"convert {{d}}/notes.txt {OUT}", "cannot read"),
    "convert-missing": Case(f"convert {{d}}/nope.tif {OUT}", "does not exist"),
    "convert-folder": Case(f"convert {IMG} {OUT}", "is a directory"),
    "convert-exists": Case(f"convert {TIF} {{d}}/other.ome.zarr", "--overwrite"),
    "convert-symlink": Case(f"convert {TIF} {{d}}/link-to-image.ome.zarr --overwrite", "symlink"),
    "convert-read-only": Case(f"convert {TIF} {{d}}/read-only/out.ome.zarr", NOT_WRITABLE, read_only=True),
    "convert-inside-input": Case(f"convert {TIF} {TIF}/out.ome.zarr", "inside or equal"),
    "convert-chunks": Case(f"convert {TIF} {OUT} --chunks 0 8 8", "positive"),
    "convert-shards-v04": Case(f"convert {TIF} {OUT} --ngff 0.4 --shards 4 32 32", "sharding needs NGFF 0.5"),
    "convert-unit": Case(f"convert {TIF} {OUT} --unit parsecs", "not an NGFF length unit"),
    "convert-levels": Case(f"convert {TIF} {OUT} --levels 0", "--levels"),
    "convert-voxel-size": Case(f"convert {TIF} {OUT} --voxel-size 1 0 1", "positive"),
    # restore
    "restore-zero-size": Case(f"restore {{d}}/zero-size.ome.zarr {OUT} --model identity", "axis of size 0"),
    "restore-level-json-cut": Case(f"restore {{d}}/level-cut.ome.zarr {OUT} --model identity", "cannot be read"),
    "restore-scale-rank": Case(f"restore {{d}}/scale-rank.ome.zarr {OUT} --model identity", "malformed"),
    "restore-complex": Case(f"restore {{d}}/complex.ome.zarr {OUT} --model identity", "complex"),
    "restore-tiff": Case(f"restore {TIF} {OUT} --model identity", "is a file"),
    "restore-symlink-overwrite": Case(f"restore {IMG} {{d}}/link-to-image.ome.zarr --model identity --overwrite",
                                      "OUT is a symlink"),
    "restore-symlink-folder": Case(f"restore {IMG} {{d}}/link-to-folder --model identity --overwrite", "symlink"),
    "restore-read-only": Case(f"restore {IMG} {{d}}/read-only/out.ome.zarr --model identity --workers 1",
                              NOT_WRITABLE, read_only=True),
    "restore-exists": Case(f"restore {IMG} {{d}}/other.ome.zarr --model identity", "already exists"),
    "restore-equal": Case(f"restore {IMG} {IMG} --model identity --overwrite", "inside or equal"),
    "restore-inside": Case(f"restore {IMG} {IMG}/sub.ome.zarr --model identity", "inside or equal"),
    "restore-not-zarr-out": Case(f"restore {IMG} {{d}}/notes.txt --model identity --overwrite", "not a Zarr store"),
    "restore-level-negative": Case(f"{RESTORE} --level -1", "--level"),
    "restore-level-high": Case(f"{RESTORE} --level 3", "level(s)"),
    "restore-batch": Case(f"{RESTORE} --batch 0", "--batch"),
    "restore-tile": Case(f"{RESTORE} --tile 0 8 8", "tile"),
    "restore-overlap": Case(f"{RESTORE} --overlap -2", "--overlap"),
    "restore-chunks": Case(f"{RESTORE} --chunks 0 8 8", "--chunks"),
    "restore-block": Case(f"{RESTORE} --block 3 8 8", "--block"),
    "restore-workers": Case(f"restore {IMG} {OUT} --model identity --workers 0", "--workers"),
    "restore-model-unknown": Case(f"restore {IMG} {OUT} --model nosuch", "unknown model"),
    "restore-model-option": Case(f"restore {IMG} {OUT} --model gaussian:sigma=-1", "sigma"),
    "restore-model-bad-key": Case(f"restore {IMG} {OUT} --model gaussian:bogus=1", "does not take option"),
    "restore-model-syntax": Case(f"restore {IMG} {OUT} --model gaussian:sigma", "key=value"),
    "restore-model-flag": Case(f"restore {IMG} {OUT} --model identity --steps 3", "does not take option"),
    "restore-checkpoint-missing": Case(f"restore {IMG} {OUT} --model {{d}}/nope.pt", "not found"),
    "restore-checkpoint-broken": Case(f"restore {IMG} {OUT} --model {{d}}/broken.pt", "corrupt"),
    "restore-mask-missing": Case(f"restore {IMG} {OUT} --model identity --mask {{d}}/nope.ome.zarr",
                                 "does not exist"),
    "restore-mask-region": Case(f"restore {IMG} {OUT} --model identity --mask {LV}", "mask"),
    "restore-cluster-missing": Case(f"restore {IMG} {OUT} --model identity --cluster {{d}}/nope.yaml",
                                    "does not exist"),
    "restore-cluster-unknown": Case(f"restore {IMG} {OUT} --model identity --cluster {{d}}/notes.txt",
                                    "unknown --cluster"),
    "restore-damaged-chunk": Case(f"restore {{d}}/chunk-bad.ome.zarr {OUT} --model identity --workers 1",
                                  "damaged"),
    "restore-block-out-of-memory": Case(f"restore {IMG} {OUT} --model test-failing:fail=memory --workers 1",
                                        "after 3 tries: MemoryError", process=True),
    "restore-block-disk-full": Case(f"restore {IMG} {OUT} --model test-failing:fail=disk-full --workers 1",
                                    "No space left on device; file test-out.ome.zarr/0/c/0/0/0; the disk is full",
                                    process=True),
    # evaluate
    "evaluate-level-negative": Case(f"evaluate {IMG} {IMG} --level -1", "--level"),
    "evaluate-level-high": Case(f"evaluate {IMG} {IMG} --level 5", "level(s)"),
    "evaluate-shapes": Case(f"evaluate {IMG} {LV}", "differ in shape"),
    "evaluate-one-image": Case(f"evaluate {IMG}", "give PRED and REF"),
    "evaluate-missing": Case(f"evaluate {IMG} {{d}}/nope.ome.zarr", "does not exist"),
    "evaluate-compare-no-reference": Case(f"evaluate --compare {IMG} {IMG}", "--reference"),
    "evaluate-input-two-images": Case(f"evaluate {IMG} {IMG} --input {IMG}", "exactly one"),
    "evaluate-mask-shape": Case(f"evaluate {IMG} {IMG} --mask {LV}", "mask"),
    "evaluate-figure-folder": Case(f"evaluate {IMG} {IMG} --figure {{out}}/nodir/x.png", "cannot write"),
    "evaluate-per-slice-file": Case(f"evaluate {IMG} {IMG} --per-slice {{d}}/notes.txt/x.csv", "cannot write"),
    "evaluate-zero-size": Case(f"evaluate {{d}}/zero-size.ome.zarr {IMG}", "axis of size 0"),
    "evaluate-level-json-cut": Case(f"evaluate {{d}}/level-cut.ome.zarr {IMG}", "cannot be read"),
    # figure
    "figure-level-negative": Case(f"figure {IMG} --out {{out}}/f.png --level -1", "level(s)"),
    "figure-z": Case(f"figure {IMG} --out {{out}}/f.png --z 99", "outside"),
    "figure-shapes": Case(f"figure {IMG} {LV} --out {{out}}/f.png", "same region"),
    "figure-missing": Case("figure {d}/nope.ome.zarr --out {out}/f.png", "does not exist"),
    "figure-out-folder": Case(f"figure {IMG} --out {{d}}/notes.txt/f.png", "cannot write"),
    "figure-read-only": Case(f"figure {IMG} --out {{d}}/read-only/f.png", NOT_WRITABLE + "|cannot write",
                             read_only=True),
    "figure-view": Case(f"figure {IMG} --out {{out}}/f.png --view bogus", "--view"),
    # view
    "view-missing": Case("view {d}/nope.ome.zarr --serve", "does not exist"),
    "view-level-json-cut": Case("view {d}/level-cut.ome.zarr --serve", "cannot be read"),
    "view-port": Case(f"view {IMG} --serve --port -5", "--port"),
    "view-tiff": Case(f"view {TIF} --serve", "is a file"),
    # benchmark
    "benchmark-preset": Case("benchmark --preset nosuch", "unknown preset"),
    "benchmark-size": Case("benchmark --size 0 8 8", "--size"),
    "benchmark-sampler": Case("benchmark --sampler nosuch", "unknown sampler"),
    "benchmark-samples": Case("benchmark --samples 0", "--samples"),
    # train
    "train-target-missing": Case("train --target {d}/nope.ome.zarr --preset tiny-2d --out {out}/m.pt "
                                 "--degrade poisson:photons=5", "does not exist"),
    "train-preset": Case(f"train --target {LV} --preset nosuch --out {{out}}/m.pt --degrade poisson:photons=5",
                         "unknown preset"),
    "train-no-inputs": Case(f"train --target {LV} --preset tiny-2d --out {{out}}/m.pt", "either --input"),
    "train-level": Case(f"train --target {LV} --preset tiny-2d --out {{out}}/m.pt --degrade poisson:photons=5 "
                        "--level -1", "level(s)"),
    "train-iterations": Case(f"train --target {LV} --preset tiny-2d --out {{out}}/m.pt "
                             "--degrade poisson:photons=5 --iterations 0", "--iterations"),
    "train-val-fraction": Case(f"train --target {LV} --preset tiny-2d --out {{out}}/m.pt "
                               "--degrade poisson:photons=5 --val-fraction 1.5", "--val-fraction"),
    "train-lr": Case(f"train --target {LV} --preset tiny-2d --out {{out}}/m.pt --degrade poisson:photons=5 "
                     "--lr -1", "--lr"),
    "train-patch": Case(f"train --target {LV} --preset tiny-2d --out {{out}}/m.pt --degrade poisson:photons=5 "
                        "--patch 0 8 8", "--patch"),
    "train-degrade": Case(f"train --target {LV} --preset tiny-2d --out {{out}}/m.pt --degrade bogus",
                          "cannot parse degradation"),
    "train-zero-size": Case("train --target {d}/zero-size.ome.zarr --preset tiny-2d --out {out}/m.pt "
                            "--degrade poisson:photons=5", "axis of size 0"),
    # distill: checked before the teacher's restore writes its targets
    "distill-teacher-regression": Case(f"distill {IMG} --out {{out}}/s.pt --teacher default-regression",
                                       "already one evaluation"),
    "distill-teacher-missing": Case(f"distill {IMG} --out {{out}}/s.pt --teacher {{d}}/nope.pt", "not found"),
    "distill-input-missing": Case("distill {d}/nope.ome.zarr --out {out}/s.pt", "does not exist"),
    "distill-out-exists": Case(f"distill {IMG} --out {{d}}/notes.txt", "--resume"),
    "distill-samples": Case(f"distill {IMG} --out {{out}}/s.pt --samples 0", "--samples"),
    # models, demo
    "models-missing": Case("models {d}/nope", "does not exist"),
    "demo-file": Case("demo {d}/notes.txt", "is a file"),
    "demo-size": Case("demo {out}/demo --size 0 8 8", "--size"),
    "demo-samples": Case("demo {out}/demo --samples 0", "--samples"),
    # degrade
    "degrade-spec": Case(f"degrade {IMG} {OUT} --spec bogus", "cannot parse degradation"),
    "degrade-photons": Case(f"degrade {IMG} {OUT} --spec poisson:photons=-1", "cannot parse degradation"),
    "degrade-psf-missing": Case(f"degrade {IMG} {OUT} --spec poisson:photons=5,blur={{d}}/nope.tif", "not found"),
    "degrade-psf-not-an-image": Case(f"degrade {IMG} {OUT} --spec poisson:photons=5,blur={{d}}/notes.txt",
                                     "cannot read the PSF"),
    "degrade-level": Case(f"degrade {IMG} {OUT} --spec poisson:photons=5 --level -1", "level(s)"),
    "degrade-zero-size": Case(f"degrade {{d}}/zero-size.ome.zarr {OUT} --spec poisson:photons=5", "axis of size 0"),
    "degrade-level-json-cut": Case(f"degrade {{d}}/level-cut.ome.zarr {OUT} --spec poisson:photons=5",
                                   "cannot be read"),
    "degrade-symlink": Case(f"degrade {IMG} {{d}}/link-to-image.ome.zarr --spec poisson:photons=5 --overwrite",
                            "OUT is a symlink"),
    "degrade-read-only": Case(f"degrade {IMG} {{d}}/read-only/out.ome.zarr --spec poisson:photons=5 --workers 1",
                              NOT_WRITABLE, read_only=True),
    "degrade-equal": Case(f"degrade {IMG} {IMG} --spec poisson:photons=5 --overwrite", "inside or equal"),
    "degrade-exists": Case(f"degrade {IMG} {{d}}/other.ome.zarr --spec poisson:photons=5", "already exists"),
    # cluster job-script
    "job-script-missing": Case("cluster job-script {d}/nope.yaml", "does not exist"),
    "job-script-not-mapping": Case("cluster job-script {d}/list.yaml", "mapping"),
    "job-script-folder": Case("cluster job-script {d}/folder", "is a directory"),
}


def run(case: Case, d: Path, out: Path):
    """(exit code, stdout, stderr) of the case's command."""
    args = case.args.format(d=d, out=out).split()
    if not case.process:
        result = cli(*args)
        return result.exit_code, result.stdout, result.stderr
    code = (f"import sys; sys.path.insert(0, {str(TESTS)!r}); import testing_restorers; "
            "from volrestore.cli import main; sys.argv[0] = 'volrestore'; main()")
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "VOLRESTORE_LOG_DIR": str(out)})
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_one_error_line_and_changes_nothing(name, inputs, tmp_path):
    d, read_only = inputs
    case = CASES[name]
    if case.read_only and not read_only:
        pytest.skip("cannot make a read-only folder here (root without chattr)")
    before = tree_hash(d)
    code, stdout, stderr = run(case, d, tmp_path)
    lines = stderr.strip().splitlines()
    assert code == 2, (code, stdout, stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stdout + stderr
    assert any(text in lines[0] for text in case.expect.split("|")), lines[0]
    assert tree_hash(d) == before, "the inputs changed"  # (so did no complete input image)
    assert complete_outputs(tmp_path) == [], "an output was marked complete"
    if case.process:  # a block failure: the line names the log, which holds every try's worker traceback
        log = Path(lines[0].split("tracebacks in ")[1])
        assert log.parent == tmp_path and "Compute Failed" not in stderr
        assert log.read_text().count("Traceback (most recent call last)") == 3


def test_the_battery_covers_every_command_with_60_cases():
    from volrestore.cli import main

    commands = set(main.commands)
    covered = {case.args.split()[0] for case in CASES.values()}
    assert commands <= covered, commands - covered
    assert len(CASES) >= 60
