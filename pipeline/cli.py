"""The ``boldflow`` command line: parse, call the public API, report. No logic here."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

__all__ = ["main"]


def _options_kv(values: tuple[str, ...]) -> dict:
    """``key=value`` pairs (``client_kwargs.endpoint_url=...`` nests) -> fsspec options."""
    out: dict = {}
    for item in values:
        if "=" not in item:
            raise click.BadParameter(f"expected key=value, got {item!r}")
        key, value = item.split("=", 1)
        parsed: object = value
        if value.lower() in ("true", "false"):
            parsed = value.lower() == "true"
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = parsed
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """boldflow: out-of-core, Dask-distributed fMRI processing over Zarr."""
    ctx.obj = {"debug": debug}
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        # distributed logs every worker start/stop at INFO; the dashboard shows it better.
        # Import it first: it configures its loggers on import.
        import distributed  # noqa: F401

        for name in ("distributed", "tornado"):
            logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger("bokeh").setLevel(logging.ERROR)


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("boldflow-demo"), show_default=True,
              help="Folder for the simulated dataset and the store.")
@click.option("--subjects", default=16, show_default=True, help="Simulated subjects.")
@click.option("--volumes", default=150, show_default=True, help="Volumes per run.")
@click.option("--seed", default=0, show_default=True)
@click.option("--workers", default=None, type=int, help="Local Dask workers (default: cores).")
@click.option("--scheduler", default=None, help="Use an existing scheduler instead.")
def demo(out: Path, subjects: int, volumes: int, seed: int, workers: int | None,
         scheduler: str | None) -> None:
    """Simulate a small study, ingest it on a Dask cluster and summarise the store."""
    from .demo import run_demo

    run_demo(out, n_subjects=subjects, n_volumes=volumes, seed=seed, n_workers=workers,
             address=scheduler, echo=click.echo)


@cli.command()
@click.argument("source")
@click.argument("store")
@click.option("--workers", default=None, type=int, help="Local Dask workers (default: cores).")
@click.option("--memory-limit", default=None, help="Per-worker memory limit, e.g. 4GiB.")
@click.option("--scheduler", default=None, help="Address of an existing Dask scheduler.")
@click.option("--subject", "subjects", multiple=True, help="Only these subjects (repeatable).")
@click.option("--task", "tasks", multiple=True, help="Only these tasks (repeatable).")
@click.option("--space", "spaces", multiple=True, help="Only these spaces (repeatable).")
@click.option("--chunk-size", default="32MiB", show_default=True, help="Target chunk size.")
@click.option("--batch-size", default="128MiB", show_default=True,
              help="Volumes held in memory per run while ingesting.")
@click.option("--shard-size", default=None, help="Enable sharding (object stores), e.g. 256MiB.")
@click.option("--series-size", default="128MiB", show_default=True,
              help="Largest chunk block over all volumes as float64 (the jobs' block_bytes): "
                   "long runs get smaller chunks so stages never split one.")
@click.option("--codec", type=click.Choice(["lz4", "zstd", "lz4hc", "blosclz", "zlib"]),
              default="lz4", show_default=True,
              help="Blosc compressor (bit shuffle, level 1); zstd: 7-10 % smaller stores, "
                   "~3x slower to write.")
@click.option("--overwrite", is_flag=True, help="Rewrite runs that are already complete.")
@click.option("-o", "--storage-option", "store_opts", multiple=True,
              help="fsspec option of the store, key=value (repeatable).")
@click.option("-s", "--source-option", "source_opts", multiple=True,
              help="fsspec option of the source, key=value (repeatable).")
def ingest(source: str, store: str, workers, memory_limit, scheduler, subjects, tasks, spaces,
           chunk_size, batch_size, shard_size, series_size, codec, overwrite, store_opts,
           source_opts) -> None:
    """Ingest SOURCE (fMRIPrep derivatives folder/URL, or a run manifest .yaml) into STORE."""
    import storage

    from .cluster import cluster_client
    from .progress import StageProgress, is_live

    progress = StageProgress("ingest", 0, echo=click.echo, live=is_live(click.echo),
                             labels={"complete": "ingested"})
    actions = {"ingested": "complete", "skipped": "skipped"}

    def on_run(row: dict, total: int) -> None:
        progress.total = total
        progress.update(actions.get(row["action"], "failed"), row["run_id"],
                        nbytes=row.get("source_bytes"))

    with cluster_client(scheduler, n_workers=workers, memory_limit=memory_limit,
                        echo=click.echo) as client:
        try:
            frame = storage.ingest(
                source, store, client=client, storage_options=_options_kv(store_opts),
                source_options=_options_kv(source_opts), subjects=list(subjects) or None,
                tasks=list(tasks) or None, spaces=list(spaces) or None,
                chunk_bytes=chunk_size, batch_bytes=batch_size, shard_bytes=shard_size,
                series_bytes=series_size, cname=codec, overwrite=overwrite, progress=on_run)
        finally:
            if progress.done:
                progress.close()
    counts = frame["action"].value_counts().to_dict()
    click.echo(f"{len(frame)} run(s): " + ", ".join(f"{v} {k}" for k, v in sorted(
        counts.items())) + f" -> {storage.StoreRef.coerce(store)}")
    failed = frame[frame["status"] == "failed"]
    if len(failed):
        for err in failed["error"]:
            click.echo(f"error: {err}", err=True)
        raise SystemExit(1)


@cli.command()
@click.argument("job_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--scheduler", default=None, help="Address of an existing Dask scheduler "
              "(replaces the job's cluster section).")
@click.option("--dry-run", is_flag=True, help="Validate the job file and print it; run nothing.")
def run(job_file: Path, scheduler: str | None, dry_run: bool) -> None:
    """Run the job described in JOB_FILE (YAML): ingest, clean, parcellate, connectivity.

    The job's ``cluster`` section says where (a LocalCluster by default; an existing
    scheduler, SLURM/PBS, Kubernetes or a Dask Gateway); progress is shown per stage.
    """
    import yaml

    from .config import ClusterConfig, load_config
    from .jobs import Pipeline

    cfg = load_config(job_file)
    if scheduler:
        cfg = cfg.model_copy(update={"cluster": ClusterConfig(kind="address",
                                                              address=scheduler)})
    if dry_run:
        click.echo(yaml.safe_dump(cfg.model_dump(mode="json", exclude={"storage_options"}),
                                  sort_keys=False))
        return
    result = Pipeline(cfg).submit(echo=click.echo).result()
    for kind, cmp in result.comparisons.items():
        n_sig = int(cmp.edges["significant"].sum())
        click.echo(f"{kind}: {n_sig} edge(s) differ between {cmp.groups[1]} and "
                   f"{cmp.groups[0]} (FDR q < {cmp.alpha})")
    failed = result.failures
    for _, row in failed.iterrows():
        click.echo(f"error: {row['run_id']} [{row['stage']}]: {row['error']}", err=True)
    if len(failed):
        raise SystemExit(1)


@cli.command()
@click.argument("store")
@click.option("-o", "--storage-option", "store_opts", multiple=True,
              help="fsspec option of the store, key=value (repeatable).")
def inspect(store: str, store_opts) -> None:
    """Print the catalog of STORE and the layout of its runs."""
    from .summary import describe_store

    click.echo(describe_store(store, storage_options=_options_kv(store_opts)))


@cli.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--subjects", default=8, show_default=True)
@click.option("--shape", default="20,24,20", show_default=True, help="Grid as nx,ny,nz.")
@click.option("--volumes", default=150, show_default=True)
@click.option("--tr", default=2.0, show_default=True, help="Repetition time (s).")
@click.option("--dtype", type=click.Choice(["float32", "int16"]), default="float32",
              show_default=True)
@click.option("--seed", default=0, show_default=True)
def simulate(out: Path, subjects: int, shape: str, volumes: int, tr: float, dtype: str,
             seed: int) -> None:
    """Write a simulated fMRIPrep-style dataset with known ground truth to OUT."""
    from .simulate import simulate_dataset

    grid = tuple(int(s) for s in shape.split(","))
    sim = simulate_dataset(out, n_subjects=subjects, shape=grid, n_volumes=volumes, t_r=tr,
                           dtype=dtype, seed=seed)
    click.echo(f"simulated {subjects} subject(s) in {sim.root}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``boldflow`` script."""
    import storage

    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, prog_name="boldflow", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        raise SystemExit(130) from None
    except click.ClickException as e:
        e.show()
        raise SystemExit(e.exit_code) from None
    except storage.BoldflowError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
