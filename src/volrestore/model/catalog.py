"""`volrestore models`: the shipped models and local checkpoints, with preset, size, iterations and training data."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from volrestore.errors import UserError
from volrestore.model.checkpoint import load_checkpoint


def shipped_dir() -> Path:
    """The folder of models shipped inside the package."""
    return Path(str(resources.files("volrestore").joinpath("models")))


def list_models(dirs=()) -> list[dict]:
    """Describe the shipped models (volrestore/models/*.pt), then the *.pt files in each of `dirs` (folders or
    files; default the current directory). A file that is not a valid checkpoint is listed with its `error`."""
    seen, found = set(), []
    local = [Path(d) for d in dirs] or [Path.cwd()]
    for d in local:
        if not d.exists():
            raise UserError(f"{d} does not exist: give folders or .pt files to look in")
    sources = [("shipped", shipped_dir())] + [("local", d) for d in local]
    for source, where in sources:
        files = [where] if where.is_file() else sorted(where.glob("*.pt")) if where.is_dir() else []
        for path in files:
            if path.resolve() not in seen:  # e.g. run inside the package's models folder
                seen.add(path.resolve())
                found.append(describe(path, source))
    return found


def describe(path, source: str = "local") -> dict:
    """One row of `volrestore models`: the checkpoint's preset, size, iterations, training data and hash (or its error)."""
    path = Path(path)
    entry = {"name": path.stem, "source": source, "path": str(path), "size_bytes": path.stat().st_size}
    try:
        ck = load_checkpoint(path)
    except UserError as exc:
        return {**entry, "error": str(exc)}
    last = (ck.get("history") or [{}])[-1]
    provenance = ck.get("provenance") or {}
    return {**entry, "preset": ck["preset"].get("name", "?"), "spatial_dims": ck["preset"]["spatial_dims"],
            "objective": ck["objective"],
            "parameters": sum(v.numel() for v in ck["model"].values() if v.is_floating_point()),
            "iteration": ck["iteration"], "val_psnr": last.get("val_psnr"),
            "training_data": training_data(provenance), "provenance": provenance, "hash": ck["hash"]}


def training_data(provenance: dict) -> str:
    """One line: 'TARGET (shape) + degrade SPEC' or 'INPUT -> TARGET (shape)', then ', fine-tuned from MODEL (hash)'
    for a `train --init` run; a checkpoint written by other code (e.g. a training script) may carry its own
    description, which is shown as it is."""
    data = provenance.get("data")
    if not isinstance(data, dict) or "target" not in data:
        return str(provenance.get("description") or provenance.get("data") or "not recorded")
    target = data["target"]
    shape = "x".join(map(str, target.get("shape", [])))
    name = Path(target["path"]).name
    level = f", level {target['level']}" if target.get("level") else ""
    init = provenance.get("init")
    start = f", fine-tuned from {Path(init['model']).name} ({init['hash'][:12]})" if isinstance(init, dict) else ""
    if data.get("input"):
        return f"{Path(data['input']['path']).name} -> {name} ({shape}{level}){start}"
    return f"{name} ({shape}{level}) + degrade {data.get('degrade')}{start}"
