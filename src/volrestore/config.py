"""One validated object per run: RestoreConfig (with its ModelRef) and ClusterConfig; saved in provenance, compared
by --resume. A bad value becomes a one-line UserError naming the command-line option."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from volrestore.errors import UserError

# Config field -> the command-line option users know it by (error messages speak in options, not fields).
OPTION_NAMES = {"batch": "--batch", "seed": "--seed", "dtype": "--dtype", "nan": "--nan", "level": "--level",
                "tile": "--tile", "overlap": "--overlap", "chunks": "--chunks", "block": "--block",
                "workers": "--workers", "spec": "--cluster", "threads_per_worker": "--threads",
                "iterations": "--iterations", "lr": "--lr", "checkpoint_every": "--checkpoint-every",
                "objective": "--objective", "preset": "--preset", "val_fraction": "--val-fraction"}


class _Frozen(BaseModel):
    # strict: 4.0 or True are not a tile size or a batch, as a typo in a script should not pass silently.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    def __init__(self, **fields):
        """Validate `fields`; a bad one is a one-line UserError naming its command-line option (however the config
        is made: `validated`, or directly as trainjob makes TrainConfig)."""
        try:
            super().__init__(**fields)
        except ValidationError as exc:
            raise UserError(describe_validation_error(exc, fields)) from None

    @classmethod
    def validated(cls, **fields):
        """The config for `fields`, or a one-line UserError for the first bad one."""
        return cls(**fields)


def describe_validation_error(exc: ValidationError, fields: dict) -> str:
    """'--batch must be ... got 0; fix that option' from pydantic's first error."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    name = OPTION_NAMES.get(loc[0], loc[0]) if loc else "a value"
    given = fields.get(loc[0]) if loc else None
    message = err["msg"][0].lower() + err["msg"][1:]
    return f"{name}: {message}, got {given!r}; fix that option"


def parse_model_text(text: str) -> tuple[str, dict]:
    """'gaussian:sigma=2,dims=2' -> ('gaussian', {'sigma': 2, 'dims': 2}); values become int/float/bool when they
    look so."""
    name, _, rest = str(text).partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise UserError(f"model option {item!r} in {text!r} must look like key=value, e.g. gaussian:sigma=1.5")
        options[key.strip()] = _literal(value.strip())
    return name.strip(), options


def _literal(text: str):
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


class ModelRef(_Frozen):
    """A model by name (identity, gaussian, randcnn, default, or a checkpoint path) and the options it was given."""

    name: str = "identity"
    options: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, **given) -> "ModelRef":
        """`--model NAME[:k=v,...]` plus options given as separate flags (None = not given); an option given both
        ways is refused."""
        name, inline = parse_model_text(text)
        given = {k: v for k, v in given.items() if v is not None}
        clash = sorted(set(inline) & set(given))
        if clash:
            raise UserError(f"model option {clash[0]} is given twice (in --model and as --{clash[0]}); give it once")
        return cls(name=name, options={**inline, **given})

    def with_options(self, **options) -> "ModelRef":
        return ModelRef(name=self.name, options={**self.options, **options})


Shape = list[int]


class RestoreConfig(_Frozen):
    """Everything that defines one `restore` run. `tile`, `chunks` and `block` are spatial sizes (z, y, x present);
    None means the model's or the input's default, which the plan resolves (see blockwise.plan)."""

    input: str
    output: str
    model: ModelRef = Field(default_factory=ModelRef)
    level: int = Field(0, ge=0)
    tile: Shape | None = None
    overlap: int | None = Field(None, ge=0)
    batch: int = Field(4, ge=1)
    seed: int = 0
    mask: str | None = None
    dtype: Literal["float32", "input"] = "float32"
    nan: Literal["error", "fill"] = "error"
    chunks: Shape | None = None
    block: Shape | None = None
    resume: bool = False
    overwrite: bool = False


# Fields of the resolved RestoreConfig that decide the output's values and layout: --resume demands equal ones.
RESULT_FIELDS = ("input", "level", "model", "tile", "overlap", "seed", "dtype", "nan", "mask", "chunks", "block")


def resolved_path(path: str | None) -> str | None:
    """The absolute form of a path (None stays None), as provenance records inputs."""
    return None if path is None else str(Path(path).resolve())


class ClusterConfig(_Frozen):
    """Where tasks run: local (worker processes on this machine), cuda (one pinned worker per GPU), tcp://host:port
    (a running scheduler) or a dask-jobqueue YAML file."""

    spec: str = "local"
    workers: int | None = Field(None, ge=1)
    threads_per_worker: int = Field(1, ge=1)


class TrainConfig(_Frozen):
    """The training recipe. None means the preset's `train:` section (then the value noted); `resolve_config` in
    volrestore.model.train fills every one in before a run, and the checkpoint records the result."""

    preset: str | dict = "tiny-2d"
    objective: str | None = None  # the preset's
    iterations: int | None = Field(None, ge=1)  # the preset's, else 1000
    lr: float | None = Field(None, gt=0)  # the preset's, else 2e-4
    weight_decay: float = 0.01  # torch's AdamW default, as the paper used AdamW without stating it
    warmup: int = Field(100, ge=1)  # linear LR warm-up iterations, then cosine decay to 0
    ema_decay: float | None = None  # the preset's, else 0.999
    checkpoint_every: int = Field(1000, ge=1)
    seed: int = 0
    schedule: str | None = None  # the preset's: "edm" (log-normal sigma) or "cosine" (the paper's, uniform t)
    T: int = 200
    s: float = 0.008
    # Each sample's loss divided by (its input's MSE to the target)^noise_balance, normalised over the batch, so the
    # dimmest patches (the largest errors) do not dominate a blind model's gradient. 0 = plain MSE; 1 measured no
    # better on RBC at 3-30 photons (benchmarks/README.md), hence off by default.
    noise_balance: float = Field(0.0, ge=0, le=2)
    # "photons": a regression net told each patch's noise level (photons at the reference intensity; the batches give
    # it), restoring with the level measured on the image or given by the user; "none": blind to it.
    condition: Literal["none", "photons"] = "none"
    # `train --init`: the content hash of the model whose EMA weights the run starts from (fine-tuning; the network,
    # objective, schedule and condition are that model's); None: fresh weights from the seed.
    init: str | None = None


class TrainData(_Frozen):
    """What a model is trained on (recorded as the checkpoint's provenance "data"; --resume demands the same)."""

    target: dict  # description of the clean image: path, level, axes, shape, voxel size, unit
    input: dict | None = None  # the registered low-quality image (paired training), described the same way
    degrade: str | None = None  # or inputs made from the target by this degradation
    photon_reference: float | None = None  # derived from the target: not compared by --resume
    patch: list[int]
    batch: int = Field(ge=1)  # the global batch (all DDP ranks together)
    val_fraction: float = Field(ge=0, lt=1)
    seed: int = 0
    z_context: int = 0
    z_strides: list[int] = [1]  # 2.5D: a training patch's z neighbours this many slices apart (one drawn per patch)
