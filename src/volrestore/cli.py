"""Command-line interface: thin click commands over the Python API; user errors become one line and exit code 2."""

import os
import sys
import time

import click

from volrestore.provenance import __version__, command_line
from volrestore.errors import UserError, file_of, resource_advice


class _Group(click.Group):
    """A click group that turns UserError, bad options and failures of the machine (out of memory, disk full, no
    permission: see errors.resource_advice) from any command into one line and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(UserError.exit_code)
        except click.UsageError as exc:  # a bad option value: one line too, not click's usage block
            hint = f"see 'volrestore {exc.ctx.info_name} --help'" if exc.ctx else "see 'volrestore --help'"
            click.echo(f"error: {exc.format_message().rstrip('.')}; {hint}", err=True)
            ctx.exit(UserError.exit_code)
        except (OSError, MemoryError) as exc:
            advice = resource_advice(exc)
            if advice is None:
                raise
            where = file_of(exc)
            click.echo(f"error: {advice}" + (f" (at {where})" if where else ""), err=True)
            ctx.exit(UserError.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="volrestore")
def main():
    """Restore large 3D fluorescence volumes (OME-Zarr) with a conditional diffusion model on Dask."""


# --json summaries (restore, convert, degrade, train): stdout has exactly one JSON object, on one line; every human
# message (the dashboard link, "wrote ...", warnings) goes to stderr instead, and progress bars always do.
JSON_HELP = "Print one JSON summary object on stdout (counts, seconds, paths); messages go to stderr."


def show_progress() -> bool:
    """Whether to draw progress bars (always on stderr): VOLRESTORE_PROGRESS=1 or 0 forces them on or off, else
    they are drawn when stderr is a terminal."""
    forced = os.environ.get("VOLRESTORE_PROGRESS", "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return sys.stderr.isatty()


def _messages(as_json: bool):
    """The echo for human messages: stdout, or stderr when stdout carries a --json summary."""
    return (lambda message="": click.echo(message, err=True)) if as_json else click.echo


def _json_value(value):
    """JSON for what json cannot write itself: numpy scalars and arrays, paths, sets."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def _print_summary(command: str, started: float, fields: dict) -> None:
    """Print a command's --json summary: its name, `fields`, `seconds` (when the command gave none) and the
    command's wall time `total_seconds`, as one JSON object on one line of stdout."""
    import json

    wall = round(time.perf_counter() - started, 3)
    summary = {"command": command, **fields}
    summary.setdefault("seconds", wall)
    summary["total_seconds"] = wall
    click.echo(json.dumps(summary, default=_json_value))


# Commands are added below, one block per stage; keep each thin and call the Python API.


@main.group("cluster")
def cluster_group():
    """Inspect cluster configurations before using them with --cluster."""


@cluster_group.command("job-script")
@click.argument("config", type=click.Path(dir_okay=False))
def cluster_job_script(config):
    """Print the batch script dask-jobqueue would submit for CONFIG (a jobqueue YAML, or a packaged one by name such
    as slurm-gpu.yaml; see `volrestore cluster configs`), without submitting it."""
    from volrestore.cluster.jobqueue import job_script

    click.echo(job_script(config), nl=False)


@cluster_group.command("configs")
def cluster_configs():
    """List the cluster YAMLs shipped with volrestore (usable by name: --cluster slurm-gpu.yaml)."""
    from volrestore.cluster.jobqueue import find_config, packaged_configs

    for name in packaged_configs():
        click.echo(f"{name}\t{find_config(name)}")


# --- ngff / convert: OME-Zarr inspection and TIFF conversion -------------------------------------------------


@main.command("info")
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def info_cmd(path, as_json):
    """Show an OME-Zarr image: NGFF version, axes, pyramid levels, channels, provenance."""
    import json

    from volrestore.io.ngff import read_info

    info = read_info(path)
    if as_json:
        click.echo(json.dumps(info.to_dict(), indent=2))
    else:
        _print_info(info)


@main.command("convert")
@click.argument("src")
@click.argument("out")
@click.option("--voxel-size", nargs=3, type=float, default=None, metavar="Z Y X",
              help="Voxel size (overrides the TIFF metadata); in --unit, micrometer by default.")
@click.option("--unit", default=None, help="Length unit of the output (NGFF name, e.g. micrometer, nanometer).")
@click.option("--chunks", nargs=3, type=int, default=None, metavar="Z Y X", help="Chunk shape [64 256 256].")
@click.option("--shards", nargs=3, type=int, default=None, metavar="Z Y X",
              help="Shard shape (NGFF 0.5 only), a multiple of --chunks.")
@click.option("--ngff", "version", type=click.Choice(["0.5", "0.4"]), default="0.5", show_default=True,
              help="NGFF version: 0.5 (zarr v3) or 0.4 (zarr v2).")
@click.option("--levels", type=click.IntRange(min=1), default=None,
              help="Pyramid levels [until the smallest lateral side is below 64].")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def convert_cmd(src, out, voxel_size, unit, chunks, shards, version, levels, overwrite, as_json):
    """Convert a TIFF / OME-TIFF / ImageJ TIFF stack SRC into the OME-Zarr image OUT, streaming plane by plane."""
    from volrestore.io.tiff import convert

    started = time.perf_counter()
    info = convert(src, out, voxel_size=voxel_size, unit=unit, chunks=chunks, shards=shards, version=version,
                   n_levels=levels, overwrite=overwrite, progress=show_progress(), command=command_line())
    if as_json:
        level0 = info.levels[0]
        _print_summary("convert", started, {"input": src, "output": out, "shape": level0.shape,
                                            "dtype": level0.dtype, "levels": len(info.levels),
                                            "image": info.to_dict()})
    else:
        _print_info(info)


def _print_info(info):
    from rich.console import Console
    from rich.table import Table

    def fmt(values, sep=", "):
        return "—" if values is None else sep.join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)

    console = Console()
    complete = {True: "yes", False: "no (incomplete)", None: "unknown (not written by volrestore)"}[info.complete]
    console.print(f"[bold]{info.path}[/bold]  NGFF {info.version}  complete: {complete}")
    axes = Table("axis", "type", "unit", title="axes", title_justify="left")
    for a in info.axes:
        axes.add_row(a.name, a.type or "—", a.unit or "—")
    console.print(axes)
    levels = Table("level", "shape", "dtype", "chunks", "shards", "scale", "translation", title="levels",
                   title_justify="left")
    for i, lvl in enumerate(info.levels):
        levels.add_row(f"{i} ({lvl.path})", fmt(lvl.shape, "×"), lvl.dtype, fmt(lvl.chunks, "×"), fmt(lvl.shards, "×"),
                       fmt(lvl.scale), fmt(lvl.translation))
    console.print(levels)
    if info.channel_names:
        console.print("channels: " + ", ".join(info.channel_names))
    if info.provenance:
        console.print(f"written by volrestore {info.provenance.get('version')}: {info.provenance.get('command')}")


@main.command("restore")
@click.argument("src", metavar="IN")
@click.argument("out", metavar="OUT")
@click.option("--model", default="default", show_default=True,
              help="default (the shipped diffusion model) | CHECKPOINT.pt | gaussian[:sigma=1] | randcnn[:k=v] | "
                   "identity (copies IN); options as NAME:k=v,...")
@click.option("--level", default=0, show_default=True, help="Input pyramid level to restore (0 = full resolution).")
@click.option("--tile", nargs=3, type=int, default=None, metavar="Z Y X", help="Tile size (default: the model's).")
@click.option("--overlap", type=int, default=None, help="Overlap between neighbouring tiles, voxels per side.")
@click.option("--batch", default=4, show_default=True, help="Tiles per restorer call.")
@click.option("--seed", default=0, show_default=True, help="Seed of all noise (results never depend on workers).")
@click.option("--cluster", default="local", show_default=True, help="local | cuda | tcp://host:port | jobqueue YAML file")
@click.option("--workers", type=int, default=None, help="Local worker processes (default: one per core).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run into OUT, skipping finished blocks.")
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT (it stays as it was until the new one is "
                                                "complete).")
@click.option("--break-lock", is_flag=True, help="Take over OUT's lock when its owner is no longer running (stale).")
@click.option("--mask", default=None, metavar="MASK", help="Foreground mask image; blocks without foreground are 0.")
@click.option("--dtype", type=click.Choice(["float32", "input"]), default="float32", show_default=True,
              help="Output data type: float32, or the input's (rounded and clipped).")
@click.option("--nan", type=click.Choice(["error", "fill"]), default="error", show_default=True,
              help="NaN/Inf in the input: refuse, or use 0 there.")
@click.option("--chunks", nargs=3, type=int, default=None, metavar="Z Y X", help="Output chunks (default: input's).")
@click.option("--block", nargs=3, type=int, default=None, metavar="Z Y X",
              help="Write-block per task, a multiple of the output chunks (default: ~4 tile strides).")
@click.option("--samples", type=int, default=None, help="Model option: samples averaged per tile (diffusion).")
@click.option("--sampler", default=None, help="Model option: sampler (diffusion).")
@click.option("--steps", type=int, default=None, help="Model option: sampler steps (diffusion).")
@click.option("--std", is_flag=True, default=None,
              help="Model option: also write a per-voxel std: the estimated error of the mean (see --std-scale).")
@click.option("--std-scale", "std_scale", default=None, metavar="auto|off|FACTOR[,FLOOR]",
              help="Model option (with --std): auto (default) makes the std the estimated error of the mean, "
                   "sqrt((FACTOR x samples' spread)² + FLOOR²), both fitted on two sampled regions of this image "
                   "with SURE (Stein's unbiased risk estimate, no truth needed) and recorded; off: the samples' "
                   "raw spread; FACTOR[,FLOOR]: as given.")
@click.option("--normalise", type=click.Choice(["image", "model"]), default=None,
              help="Model option (diffusion): map this image's 0.1-99.9 percentiles onto the training data's "
                   "(image; the default model's default) or use the checkpoint's own intensity map (model).")
@click.option("--noise", type=click.Choice(["cells", "voxel"]), default=None,
              help="Model option (diffusion): the sampler's noise field, keyed by global voxel either way: cells "
                   "(numpy, the CPU's default) or voxel (Philox4x32 drawn on the network's device, the GPU's).")
@click.option("--tta", type=int, default=None,
              help="Model option (trained models): average the network over N of its flips and turns (1, 2, 4, 8; "
                   "16 with z flips for 2.5D/3D nets): N network evaluations per voxel for a more accurate mean.")
@click.option("--blend", default=None, metavar="auto|off|SHARE",
              help="Model option (one-pass regression models, e.g. the shipped default): auto (default) blends the "
                   "restoration with the input, four in-plane smoothings and four averages over neighbouring "
                   "planes of it, weights chosen on this image by SURE (Stein's unbiased risk estimate) on two "
                   "sampled 256² regions and recorded; off: the network's output; SHARE: f + SHARE (input - f).")
@click.option("--photons", type=float, default=None,
              help="Model option (models conditioned on the noise level, e.g. the shipped default): photons at the "
                   "image's bright intensity, if you know them; measured on the image otherwise.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def restore_command(src, out, tile, chunks, block, as_json, **kwargs):
    """Restore IN blockwise with a model on a Dask cluster and write the OME-Zarr OUT."""
    from volrestore.blockwise.restore import restore

    def spatial(values):  # nargs=3 options; the engine also takes 2 values for y x images
        return list(values) if values else None

    kwargs["std"] = kwargs["std"] or None  # an unset flag is not a model option (simple models reject it)
    started = time.perf_counter()
    summary = restore(src, out, tile=spatial(tile), chunks=spatial(chunks), block=spatial(block),
                      progress=show_progress(), command=command_line(), echo=_messages(as_json), **kwargs)
    if as_json:
        _print_summary("restore", started, {"input": src, "output": out, **summary})


def _print_json(data):
    import json

    click.echo(json.dumps(data, indent=2, default=float))


@main.command("evaluate")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--compare", is_flag=True, help="IMAGES are several methods; compare them against --reference.")
@click.option("--reference", type=click.Path(), default=None, help="Reference image for --compare.")
@click.option("--input", "raw", type=click.Path(), default=None,
              help="No reference: the degraded input that IMAGE was restored from (residual checks).")
@click.option("--mask", type=click.Path(), default=None, help="Evaluate only where this mask image is > 0.")
@click.option("--std", "std", type=click.Path(), default=None, help="Per-voxel std image: uncertainty calibration.")
@click.option("--level", type=click.IntRange(min=0), default=0, show_default=True, help="Pyramid level to evaluate.")
@click.option("--range", "mode", type=click.Choice(["percentile", "raw"]), default="percentile", show_default=True,
              help="Data range rule: reference 0.1–99.9 percentiles mapped to [0, 1], or its raw min–max.")
@click.option("--metric", type=click.Choice(["psnr", "ssim", "ms_ssim"]), default="psnr", show_default=True,
              help="Per-slice metric compared by --compare.")
@click.option("--per-slice", "per_slice", type=click.Path(), default=None, help="Write per-slice metrics as CSV.")
@click.option("--figure", type=click.Path(), default=None, help="Write a PNG (box/violin plot, or reliability plot).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--cluster", default="local", show_default=True,
              help="Where PRED REF and --compare metrics run: local | cuda | tcp://host:port | jobqueue YAML.")
@click.option("--workers", type=int, default=None, help="Local worker processes (default: one per core).")
def evaluate_cmd(images, compare, reference, raw, mask, std, level, mode, metric, per_slice, figure, as_json, cluster,
                 workers):
    """Measure restored IMAGES: `PRED REF`, `--compare A B ... --reference REF`, or `PRED --input RAW`."""
    from pathlib import Path

    from volrestore.evaluation import evaluate as ev
    from volrestore.evaluation import figures

    for path in (figure, per_slice):
        if path:
            figures.check_writable(path)
    # stdout carries the result (JSON or a table): the dashboard link goes to a terminal's stderr, else nowhere
    progress = sys.stderr.isatty()
    run = {"cluster": cluster, "workers": workers, "progress": progress,
           "echo": (lambda msg: click.echo(msg, err=True)) if progress else (lambda msg: None)}
    if compare:
        if reference is None:
            raise UserError("--compare needs --reference REF; give the ground-truth image")
        names = [Path(p).name.replace(".ome.zarr", "").replace(".zarr", "") for p in images]
        result = ev.compare(dict(zip(names, images)), reference, level=level, metric=metric, mode=mode, **run)
        if figure:
            figures.comparison_boxplot(result["samples"], metric, figure, result["moods_test"])
        if as_json:
            return _print_json(result)
        _print_comparison(result)
        return
    if raw is not None:
        if len(images) != 1:
            raise UserError("with --input give exactly one restored image")
        result = ev.no_reference(images[0], raw, level=level)
        return _print_json(result) if as_json else _print_mapping(result)
    if len(images) != 2:
        raise UserError("give PRED and REF (or --compare A B ... --reference REF, or PRED --input RAW)")
    result = ev.evaluate(images[0], images[1], mask=mask, level=level, mode=mode, std=std, per_slice_csv=per_slice,
                         **run)
    if figure:
        if std:
            predicted, observed = ev.reliability(images[0], std, images[1], level=level)
            figures.reliability_plot(predicted, observed, figure)
        else:
            samples = {"slices": [r["psnr"] for r in result["slices"]]}
            figures.comparison_boxplot(samples, "psnr", figure)
    result.pop("slices")
    return _print_json(result) if as_json else _print_mapping(result)


def _print_mapping(result):
    from rich.console import Console
    from rich.table import Table

    table = Table("quantity", "value")
    for key, value in result.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


def _print_comparison(result):
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table("method", "PSNR (dB)", "SSIM 3D", f"median per-slice {result['metric']}")
    for name, s in result["summary"].items():
        ssim3d = "—" if s.get("ssim_3d") is None else f"{s['ssim_3d']:.4f}"
        table.add_row(name, f"{s['psnr']:.2f}", ssim3d, f"{s.get('slice_' + result['metric'] + '_median', float('nan')):.4f}")
    console.print(table)
    tests = Table("A", "B", "median A", "median B", "Mood's p", title="Mood's median test")
    for r in result["moods_test"]:
        tests.add_row(r["a"], r["b"], f"{r['median_a']:.4f}", f"{r['median_b']:.4f}", f"{r['p_value']:.3g}")
    console.print(tests)


@main.command("figure")
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="PNG to write.")
@click.option("--view", type=click.Choice(["slices", "ortho", "mip"]), default="slices", show_default=True)
@click.option("--z", type=int, default=None, help="z plane for --view slices [centre].")
@click.option("--level", type=int, default=0, show_default=True)
@click.option("--zoom", nargs=4, type=int, default=None, metavar="Y0 Y1 X0 X1", help="Add a zoomed inset row.")
@click.option("--titles", default=None, help="Comma-separated panel titles [image names].")
def figure_cmd(images, out, view, z, level, zoom, titles):
    """Draw IMAGES side by side with the same contrast limits and a scale bar."""
    from volrestore.evaluation.figures import check_writable, panels

    check_writable(out)
    path = panels(list(images), out, level=level, view=view, z=z, zoom=zoom,
                  titles=titles.split(",") if titles else None)
    click.echo(f"wrote {path}")


@main.command("view")
@click.argument("path", type=click.Path())
@click.option("--serve", "force_serve", is_flag=True, help="Serve over HTTP even when napari is installed.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True,
              help="Port for the local HTTP server (0: any).")
def view_cmd(path, force_serve, port):
    """Open PATH in napari, or serve it on localhost with links for neuroglancer and vizarr."""
    from volrestore.io import ngff
    from volrestore.io.view import open_in_napari, serve

    ngff.read_info(path)
    if not force_serve and open_in_napari(path):
        return
    try:
        server, links = serve(path, port=port)
    except OSError as exc:
        raise UserError(f"cannot listen on port {port}: {exc.strerror}; choose another --port") from None
    click.echo(f"serving {links['url']} (Ctrl-C to stop)")
    click.echo(f"neuroglancer: {links['neuroglancer']}")
    click.echo(f"vizarr:       {links['vizarr']}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()



# --- benchmark: bare-model vs end-to-end throughput of a preset ---------------------------------------------


@main.command("benchmark")
@click.option("--preset", default="default", show_default=True,
              help="Network preset (random weights: speed only); default: the shipped default model's network.")
@click.option("--samples", "-K", type=click.IntRange(min=1), default=1, show_default=True, help="Samples per tile.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Sampler steps [the sampler's default].")
@click.option("--sampler", default=None, help="ancestral | ddim | dpmpp2m [restore's default for the preset]")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--size", nargs=3, type=int, default=None, metavar="Z Y X",
              help="Generated volume shape [cpu: 1 512 512 for 2D models, 64 64 64 for 3D; cuda: 16 1024 1024 or 256^3].")
@click.option("--tile", nargs=3, type=int, default=None, metavar="Z Y X",
              help="Tile size, Z 1 for a 2D model (default: the model's).")
@click.option("--overlap", type=int, default=None, help="Tile overlap per side (default: the model's).")
@click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True, help="Tiles per restorer call.")
@click.option("--compile", "compile_", is_flag=True, help="Run the network under torch.compile.")
@click.option("--cluster", default=None, help="Cluster of the end-to-end run [local with 1 worker on cpu; cuda].")
@click.option("--workers", type=int, default=None, help="Workers of that cluster.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (fields: volrestore.evaluation.benchmark.FIELDS).")
def benchmark_cmd(preset, samples, steps, sampler, device, size, tile, overlap, batch, compile_, cluster, workers,
                  as_json):
    """Measure bare-model and end-to-end restore voxels/s, FLOP/s, memory and hours per TB, in one run."""
    from volrestore.evaluation import benchmark

    result = benchmark.run(preset, samples=samples, steps=steps, sampler=sampler, device=device, size=size,
                           tile=list(tile) if tile else None, overlap=overlap, batch=batch, compile=compile_, cluster=cluster,
                           workers=workers)
    if as_json:
        _print_json(result)
    else:
        click.echo(benchmark.report(result))


# --- train / models: make models from the user's OME-Zarr data on the cluster, list them ------------------------


@main.command("train")
@click.option("--target", required=True, type=click.Path(), help="Clean / high-quality OME-Zarr image.")
@click.option("--input", "input_", type=click.Path(), default=None,
              help="Registered low-quality OME-Zarr image of the same grid (paired training).")
@click.option("--degrade", default=None, help="Or make inputs from --target: poisson:photons=P[,read=R][,blur=PSF]"
              "[,down=D][,seed=S].")
@click.option("--preset", default=None, help="Network preset name (paper-2d, unet3d, tiny-2d, tiny-3d) or YAML path "
              "[required unless --init].")
@click.option("--init", default=None, metavar="MODEL",
              help="Start from this trained model's weights and fine-tune it on this data: a shipped model (default, "
                   "default-diffusion) or a .pt file; its network, objective and condition are kept, the learning "
                   "rate is a quarter of its own unless --lr.")
@click.option("--out", required=True, type=click.Path(), help="Checkpoint file to write (e.g. model.pt).")
@click.option("--iterations", type=int, default=None, help="Total iterations [the preset's].")
@click.option("--patch", nargs=3, type=int, default=None, metavar="Z Y X",
              help="Patch size (Z 1 for a 2D preset), e.g. 1 64 64 or 16 64 64 [the preset's].")
@click.option("--batch", type=int, default=None, help="Patches per worker per iteration [the preset's].")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Share of the y axis (at its end) held out for validation, never trained on.")
@click.option("--objective", type=click.Choice(["v", "eps", "regression"]), default=None,
              help="Prediction target [the preset's].")
@click.option("--lr", type=float, default=None, help="Peak learning rate [the preset's].")
@click.option("--noise-balance", type=click.FloatRange(0, 2), default=0.0, show_default=True,
              help="Weight each patch's loss by (its input's error)^-B, so bright, nearly clean patches count as "
              "much as dim ones in a model trained over a range of noise levels; 0 = plain MSE.")
@click.option("--z-strides", default=None, metavar="S[,S...]",
              help="2.5D presets: take each patch's z neighbours one of these many slices apart (e.g. 1,2,4,8), so a "
              "model trained on finely sampled z also suits coarser stacks [1].")
@click.option("--condition", type=click.Choice(["none", "photons"]), default=None,
              help="photons: tell the model each patch's noise level (regression with --degrade); restore then "
              "measures it on the image or takes --photons. none: the model is blind to it [none; with --init, "
              "the model's].")
@click.option("--level", type=int, default=0, show_default=True, help="Pyramid level of the images to train on.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of weights, patches, noise and timesteps.")
@click.option("--checkpoint-every", type=int, default=None, help="Iterations between checkpoints and validation "
              "[1000].")
@click.option("--resume", is_flag=True, help="Continue OUT (or the interrupted run OUT.partial next to it).")
@click.option("--overwrite", is_flag=True, help="Start over even if OUT exists.")
@click.option("--cluster", default="local", show_default=True, help="local | cuda | tcp://host:port | jobqueue YAML")
@click.option("--workers", "--gpus", "workers", type=int, default=1, show_default=True,
              help="Workers (GPUs) to train on; N > 1 runs DistributedDataParallel, global batch N x --batch.")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def train_cmd(target, input_, degrade, preset, out, patch, z_strides, as_json, **kwargs):
    """Train a restoration model on OME-Zarr data as a task on the Dask cluster and write the checkpoint OUT."""
    from volrestore.model.trainjob import train_image

    if z_strides is not None:
        try:
            z_strides = [int(s) for s in z_strides.split(",")]
        except ValueError:
            raise UserError(f"--z-strides takes whole numbers separated by commas such as 1,2,4,8, got {z_strides}") from None

    started = time.perf_counter()
    summary = train_image(target, out, input=input_, degrade=degrade, preset=preset,
                          patch=list(patch) if patch else None, z_strides=z_strides, progress=show_progress(),
                          command=command_line(),
                          echo=_messages(as_json), **kwargs)
    if as_json:
        _print_summary("train", started, {"target": target, "input": input_, "degrade": degrade, "preset": preset,
                                          "output": out, **summary})


@main.command("distill")
@click.argument("input_", metavar="INPUT", type=click.Path())
@click.option("--out", required=True, type=click.Path(), help="Student checkpoint to write (e.g. student.pt).")
@click.option("--teacher", default="default", show_default=True, metavar="MODEL",
              help="Diffusion model whose DDPM-avg the student learns: default (= default-diffusion) or a .pt file.")
@click.option("--samples", "-K", type=click.IntRange(min=1), default=8, show_default=True,
              help="Samples the teacher averages per voxel (its targets).")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Teacher sampler steps [its default].")
@click.option("--sampler", default=None, help="Teacher sampler: ancestral | ddim | dpmpp2m [its default].")
@click.option("--targets", type=click.Path(), default=None,
              help="OME-Zarr for the teacher's restoration of INPUT, kept for reuse [OUT's name + .targets.ome.zarr].")
@click.option("--block", nargs=3, type=int, default=None, metavar="Z Y X",
              help="Write-blocks of the teacher's restore (smaller: more workers busy on a small image) [restore's].")
@click.option("--iterations", type=int, default=None, help="Student training iterations [the preset's].")
@click.option("--patch", nargs=3, type=int, default=None, metavar="Z Y X", help="Training patch [the preset's].")
@click.option("--batch", type=int, default=None, help="Patches per iteration [the preset's].")
@click.option("--lr", type=float, default=None, help="Peak learning rate [a quarter of the teacher's].")
@click.option("--val-fraction", type=float, default=0.1, show_default=True,
              help="Share of the y axis (at its end) held out for validation.")
@click.option("--level", type=int, default=0, show_default=True, help="Pyramid level of INPUT.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the teacher's noise and the training.")
@click.option("--resume", is_flag=True, help="Continue: reuse finished targets, resume the student's training.")
@click.option("--overwrite", is_flag=True, help="Start over: new targets and a new student.")
@click.option("--cluster", default="local", show_default=True, help="local | cuda | tcp://host:port | jobqueue YAML")
@click.option("--workers", type=int, default=None, help="Workers of the teacher's restore (default: one per core).")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def distill_cmd(input_, out, patch, block, as_json, **kwargs):
    """Distil a diffusion model's K-sample average (DDPM-avg) on the image INPUT into a student restoring in one
    network evaluation per voxel; no clean data needed. Restore with it: `volrestore restore IN OUT --model OUT.pt`."""
    from volrestore.model.distill import distill

    started = time.perf_counter()
    summary = distill(input_, out, patch=list(patch) if patch else None, block=list(block) if block else None,
                      progress=show_progress(),
                      command=command_line(), echo=_messages(as_json), **kwargs)
    if as_json:
        _print_summary("distill", started, {"input": input_, "output": out, **summary})


@main.command("models")
@click.argument("dirs", nargs=-1, type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON (full hashes and training data).")
def models_cmd(dirs, as_json):
    """List the shipped models and the checkpoints in DIRS (default: the current directory)."""
    from volrestore.model.catalog import list_models

    models = list_models(dirs)
    if as_json:
        return _print_json(models)
    _print_models(models)


def _print_models(models):
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "source", "preset", "objective", "parameters", "size", "iterations", "training data",
                  "hash", caption="--json for full paths, hashes and training data")
    for m in models:
        if "error" in m:
            table.add_row(m["path"], m["source"], f"[red]{m['error']}[/red]", *[""] * 6)
            continue
        table.add_row(m["name"], m["source"], m["preset"], m["objective"], f"{m['parameters']:,}",
                      f"{m['size_bytes'] / 1e6:.1f} MB", str(m["iteration"]), m["training_data"], m["hash"][:12])
    for column in table.columns[:-1]:
        column.overflow = "fold"
    table.columns[-1].no_wrap = True  # the short hash is what users compare
    Console(width=max(Console().width, 140)).print(table if models else "no models found")


# --- demo: the offline "run it" command (synthetic sample, shipped default model) ---------------------------


@main.command("demo")
@click.argument("outdir", default="volrestore-demo", type=click.Path(file_okay=False))
@click.option("--samples", "-K", type=click.IntRange(min=1), default=2, show_default=True,
              help="Samples averaged per tile (>= 2 also writes their std).")
@click.option("--steps", type=click.IntRange(min=1), default=8, show_default=True, help="Sampler steps.")
@click.option("--size", nargs=3, type=int, default=None, metavar="Z Y X", help="Sample volume shape [32 64 64].")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for the model [all cores].")
@click.option("--overwrite", is_flag=True, help="Replace the demo's files in OUTDIR.")
def demo_cmd(outdir, samples, steps, size, threads, overwrite):
    """Degrade a synthetic volume, restore it with the default model on a local Dask cluster, write OME-Zarr images
    and a PNG into OUTDIR, and print PSNR/SSIM before and after. Offline; a few minutes on a laptop CPU."""
    from volrestore import demo

    if size and (size[0] < 8 or min(size[1:]) < 32):  # smaller volumes have too little structure to measure
        raise UserError(f"--size must be at least 8 32 32 (Z Y X), e.g. 32 64 64; got {' '.join(map(str, size))}")
    shape = tuple(size) if size else demo.SHAPE
    demo.run(outdir, samples=samples, steps=steps, shape=shape, threads=threads, overwrite=overwrite, echo=click.echo)


@main.command("degrade")
@click.argument("src", type=click.Path())
@click.argument("out", type=click.Path())
@click.option("--spec", required=True, help="poisson:photons=P[,read=R][,blur=PSF.tif|.npy][,down=D][,seed=S]")
@click.option("--level", type=int, default=0, show_default=True, help="Pyramid level of SRC to degrade.")
@click.option("--dtype", type=click.Choice(["float32", "input"]), default="float32", show_default=True,
              help="Output data type: float32, or the input's (rounded and clipped).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--cluster", default="local", show_default=True, help="local | cuda | tcp://host:port | jobqueue YAML file")
@click.option("--workers", type=int, default=None, help="Local worker processes (default: one per core).")
@click.option("--json", "as_json", is_flag=True, help=JSON_HELP)
def degrade_cmd(src, out, spec, level, dtype, overwrite, cluster, workers, as_json):
    """Write a degraded copy of the clean image SRC (blur, binning, Poisson + read noise): evaluation pairs."""
    from volrestore.simulate.degrade import degrade_image

    started, echo = time.perf_counter(), _messages(as_json)
    result = degrade_image(src, out, spec, level=level, dtype=dtype, overwrite=overwrite, command=command_line(),
                           cluster=cluster, workers=workers, progress=show_progress(), echo=echo)
    echo(f"wrote {result['output']} ({result['blocks']} chunks; {spec} at reference intensity "
         f"{result['reference_intensity']:.4g})")
    if as_json:
        _print_summary("degrade", started, {"input": src, "spec": spec, **result})
