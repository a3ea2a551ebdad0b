"""Start a dask-jobqueue SLURM cluster for boldflow and keep it up (boldflow[slurm]).

    python deploy/slurm/start_cluster.py --jobs 8

Prints the scheduler address (for ``boldflow run job.yaml --scheduler ...``) and the
dashboard link; Ctrl-C stops the cluster and cancels the jobs. For one run, a job file
with ``cluster: {kind: slurm, options: {...}}`` (see ``job.yaml``) starts and stops its
own cluster instead.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    from dask_jobqueue import SLURMCluster

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=4, help="SLURM jobs (each runs several workers)")
    ap.add_argument("--adapt-max", type=int, default=None, help="adaptive scaling up to N jobs")
    args = ap.parse_args()
    cluster = SLURMCluster()  # settings from jobqueue.yaml
    if args.adapt_max:
        cluster.adapt(minimum_jobs=1, maximum_jobs=args.adapt_max)
    else:
        cluster.scale(jobs=args.jobs)
    print(f"scheduler: {cluster.scheduler_address}")
    print(f"dashboard: {cluster.dashboard_link}")
    print(cluster.job_script())
    try:
        while True:
            time.sleep(60)
    except KeyboardInterrupt:
        cluster.close()


if __name__ == "__main__":
    main()
