"""`python -m flows.serve`: serve the `extract-clip` deployment from this process.

With a Prefect server running (`prefect server start --host 127.0.0.1`) and PREFECT_API_URL
pointing at it, this registers the deployment `extract-clip/<name>` and runs every flow run
triggered for it (`prefect deployment run 'extract-clip/local' --param root=... --watch`)
until stopped with Ctrl-C or SIGTERM. No work pool is needed. Each flow run is a child process
in this process's working directory: relative paths given as parameters (root, store) resolve
there.
"""

from __future__ import annotations

import argparse

from prefect.deployments.runner import EntrypointType

from flows.extract_clip import extract_clip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m flows.serve",
        description="Register the extract-clip deployment on the Prefect server at PREFECT_API_URL "
        "and run its flow runs from this process until stopped.",
    )
    parser.add_argument("--name", default="local", help="deployment name (default %(default)s)")
    parser.add_argument("--limit", type=int, default=None,
                        help="most flow runs at once (default: no limit)")
    args = parser.parse_args(argv)
    # The flow runs load the flow as the module flows.extract_clip (not as a file): Dask
    # workers then find its tasks by the same name, for `--param task_runner=dask`.
    extract_clip.serve(name=args.name, limit=args.limit,
                       entrypoint_type=EntrypointType.MODULE_PATH)


if __name__ == "__main__":
    main()
