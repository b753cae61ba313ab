"""Run ``conv3dt upsample`` on Dask workers that dask-jobqueue starts as SLURM jobs.

Needs ``pip install 'conv3dt[dask]' dask-jobqueue`` on the login node and the
workers (a shared environment), and the scans, the spec and the output
directory on a file system every node sees under the same path.

    python examples/dask_jobqueue.py 'scans/*.nii.gz' --spec up.yaml --output-dir out/
    python examples/dask_jobqueue.py 'scans/*.nii.gz' --spec up.yaml --output-dir out/ --python-api

The first form starts the workers, writes the scheduler's address to a file and
runs the command line with ``--dask-scheduler-file`` (any number of
``conv3dt upsample`` runs can use the same workers that way, for instance from
another shell). The second calls the library directly. Either way a batch with
at least as many files as worker threads runs one file per task; fewer files
(one large volume, say) are split into tiles that are tasks, and an
interrupted run resumes with ``--skip-existing`` / ``resume=True``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

# This script is named like the package it uses: take its own directory off the
# import path, or `import dask_jobqueue` would import this file.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from dask.distributed import Client  # noqa: E402
from dask_jobqueue import SLURMCluster  # noqa: E402

from conv3dt.batch import expand_inputs, output_exists, plan_jobs  # noqa: E402
from conv3dt.distributed import upsample_batch  # noqa: E402
from conv3dt.spec import load_spec  # noqa: E402


def start_workers(jobs: int) -> tuple[SLURMCluster, Client]:
    """Submit ``jobs`` SLURM jobs of 4 single-threaded worker processes each."""
    cluster = SLURMCluster(
        cores=4,  # threads per job, shared by its processes
        processes=4,  # one thread per worker process: tasks never share a GIL
        memory="16GB",  # per job; each worker gets a quarter
        walltime="02:00:00",
        job_extra_directives=["--output=logs/dask-worker-%j.out"],
    )
    cluster.scale(jobs=jobs)
    client = Client(cluster)
    client.wait_for_workers(1, timeout=600)  # the rest join as SLURM starts their jobs
    return cluster, client


def run_command_line(client: Client, conv3dt_args: list[str]) -> int:
    """Run ``conv3dt upsample`` against the workers through a scheduler file."""
    scheduler_file = "conv3dt-scheduler.json"
    client.write_scheduler_file(scheduler_file)
    command = [
        "conv3dt", "upsample", *conv3dt_args,
        "--dask-scheduler-file", scheduler_file,
        "--threads", "1",  # one engine thread per single-threaded worker
        "--skip-existing",  # a second run resumes the first
        "--json",
    ]  # fmt: skip
    return subprocess.call(command)


def run_python_api(client: Client, inputs: list[str], spec_path: str, output_dir: str) -> int:
    """The same through the library: one call, results as the files finish."""
    jobs = plan_jobs(expand_inputs(inputs), output=None, output_dir=output_dir)
    os.makedirs(output_dir, exist_ok=True)
    todo = [job for job in jobs if not output_exists(job.output)]
    upsample_batch(
        client,
        load_spec(spec_path),
        todo,
        threads=1,
        resume=True,
        keep_going=True,
        on_result=lambda result: print(result.as_json(), flush=True),
        on_error=lambda job, error: print(f"{job.input}: {error}", file=sys.stderr),
    )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="volumes, directories or quoted globs")
    parser.add_argument("--spec", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--jobs", type=int, default=4, help="SLURM jobs to start (default 4)")
    parser.add_argument("--python-api", action="store_true", help="call the library directly")
    args = parser.parse_args()
    cluster, client = start_workers(args.jobs)
    try:
        if args.python_api:
            return run_python_api(client, args.inputs, args.spec, args.output_dir)
        return run_command_line(
            client, [*args.inputs, "--spec", args.spec, "--output-dir", args.output_dir]
        )
    finally:
        client.close()
        cluster.close()


if __name__ == "__main__":
    sys.exit(main())
