"""Distillation of DDPM-avg into a one-evaluation student: the teacher's K-sample average as the student's target."""

from pathlib import Path

from volrestore.errors import UserError

DEFAULT_SAMPLES = 8  # the K of DDPM-avg the student stands in for


def targets_path(out) -> Path:
    """Where the teacher's restoration of the training input lies by default: next to the student, kept so that a
    second distillation (more iterations, another seed) does not pay the teacher's K × steps evaluations again."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".pt") + ".targets.ome.zarr")


def distill(input, out, *, teacher="default", samples=DEFAULT_SAMPLES, steps=None, sampler=None, targets=None,
            block=None, iterations=None, patch=None, batch=None, lr=None, val_fraction=0.1, level=0, seed=0,
            resume=False, overwrite=False, cluster="local", workers=None, echo=print, progress=True,
            command=None) -> dict:
    """Train a regression student of the diffusion model `teacher` on the (noisy) OME-Zarr `input`, and write it to
    `out`; returns the training summary with the targets' path.

    1. The teacher restores `input` with `samples` (K) samples averaged (DDPM-avg, its own sampler and steps unless
       given) into `targets` (default: targets_path(out)), in write-blocks of `block` (restore's --block: smaller
       ones spread a small image over more workers); a finished one is reused, an interrupted one resumed, one made
       with other settings refused (restore's own checks).
    2. A regression net of the teacher's preset, started from the teacher's weights (nets.student_weights), learns
       input -> targets on pairs of patches (train's paired mode, its last `val_fraction` of y held out).
    Why this gives DDPM-avg in one evaluation: the K-average is the teacher's posterior mean plus sample noise of
    variance posterior/K, independent of everything the student sees; the MSE-optimal student therefore predicts the
    teacher's posterior mean, i.e. DDPM-avg at K -> infinity, so it may score above the K-average it learned from.
    No clean data is needed: the teacher brings what it learned from clean pairs.
    """
    from volrestore.blockwise.restore import restore
    from volrestore.model.checkpoint import check_teacher, load_checkpoint
    from volrestore.model.diffusion_restorer import model_path, shipped_name
    from volrestore.model.trainjob import partial_path, train_image

    if not isinstance(samples, int) or samples < 1:
        raise UserError(f"--samples must be a whole number >= 1, got {samples!r}")
    out = Path(out)
    for existing, what in ((out, "exists"), (partial_path(out), "holds an interrupted distillation")):
        if existing.exists() and not (resume or overwrite):  # checked before the teacher's long restore
            raise UserError(f"{existing} {what}: add --resume to continue it or --overwrite to distil again")
    name = shipped_name(teacher, {"samples": samples})  # "default" means the shipped diffusion model here
    ck = load_checkpoint(model_path(name))  # model_path: UserError "not found" when there is no such model
    check_teacher(ck, teacher)
    targets = Path(targets) if targets else targets_path(out)
    echo(f"teacher {name}: DDPM-avg of {samples} samples -> {targets}")
    again = targets.exists()  # finished: reused; interrupted: resumed; --overwrite: made anew
    restored = restore(input, targets, model=name, level=level, seed=seed, block=block, cluster=cluster,
                       workers=workers, resume=again and not overwrite, overwrite=again and overwrite,
                       echo=echo, progress=progress, command=command, samples=samples, steps=steps, sampler=sampler)
    summary = train_image(targets, out, input=input, iterations=iterations, patch=patch, batch=batch, lr=lr,
                          val_fraction=val_fraction, level=level, seed=seed, init=name, student=True, resume=resume,
                          overwrite=overwrite, cluster=cluster, workers=1, echo=echo, progress=progress,
                          command=command,
                          provenance={"distilled": {"teacher": name, "teacher_hash": ck["hash"], "samples": samples,
                                                    "steps": steps, "sampler": sampler,
                                                    "targets": str(targets.resolve())}})
    return {**summary, "targets": str(targets), "teacher_blocks": restored.get("restored", 0)}
