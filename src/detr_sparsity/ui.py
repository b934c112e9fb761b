"""`make ui`: the MLflow UI, opened on the study's run table.

MLflow 3's UI starts in its GenAI view, where an experiment shows an empty traces page; the run table belongs to
its "machine learning" view, which only the URL (`workflowType=machine_learning`) or the browser's remembered
choice selects (the experiment tag `mlflow.experimentKind` does not). So this starts `mlflow ui` on the
project's store (MLFLOW_TRACKING_URI, default sqlite:///mlflow.db) on 127.0.0.1, waits until it answers, and
prints the URL of the study experiment's run table (`<tracking.experiment_prefix>-<study>` from params.yaml).
With a tracking server (MLFLOW_TRACKING_URI=http://...) there is nothing to start: it prints that server's URL.

    python -m detr_sparsity.ui                 # start the UI, print the run table's URL; Ctrl-C stops it
    python -m detr_sparsity.ui --print-url     # only the URL (of a UI already running on --host/--port)
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from detr_sparsity.config import ConfigError, load_config
from detr_sparsity.tracking import tracking_uri

RUN_TABLE = "#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def run_table_url(base_url: str, experiment_id: str) -> str:
    """The run table of one experiment in the MLflow UI at `base_url` (its classic, not its GenAI, view)."""
    return f"{base_url.rstrip('/')}/{RUN_TABLE.format(experiment_id=experiment_id)}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///` store URI, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def study_experiment_id(uri: str, experiment: str) -> str:
    """The id of `experiment` in the store at `uri`; a clear error where the store or the experiment is missing."""
    database = sqlite_file(uri)
    if database is not None and not database.is_file():
        # Asking MLflow would create an empty store: say what to do instead.
        raise LookupError(f"no MLflow store at {database.resolve()} ({uri}): run the pipeline first "
                          f"(snakemake --cores N), or set MLFLOW_TRACKING_URI to the store to open")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = sorted(e.name for e in client.search_experiments())
        raise LookupError(f"the store {uri} has no experiment {experiment!r} (it has: {', '.join(names) or 'none'}); "
                          f"run the study's pipeline first, or check params.yaml's study and tracking.experiment_prefix")
    return found.experiment_id


def wait_until_up(base_url: str, server: subprocess.Popen, timeout: float) -> None:
    """Return once the UI at `base_url` answers; raise if the server exits or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with code {server.returncode} before answering at {base_url} "
                               f"(is the port taken? try --port)")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"mlflow ui did not answer at {base_url} within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m detr_sparsity.ui", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default="params.yaml", help="the study's params.yaml (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address the UI listens on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5000, help="port of the UI (default: %(default)s)")
    parser.add_argument("--print-url", action="store_true", help="print the run table's URL; start nothing")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the UI to answer "
                        "(default: %(default)s; it starts in seconds, but minutes on a busy machine)")
    args = parser.parse_args(argv)

    uri = tracking_uri()
    try:
        experiment = load_config(args.params).experiment
        experiment_id = study_experiment_id(uri, experiment)
    except (ConfigError, LookupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if uri.startswith(("http://", "https://")):
        print(f"experiment {experiment!r} on the tracking server: {run_table_url(uri, experiment_id)}")
        return 0
    base_url = f"http://{args.host}:{args.port}"
    url = run_table_url(base_url, experiment_id)
    if args.print_url:
        print(url)
        return 0
    print(f"starting mlflow ui on {uri} at {base_url} ...", flush=True)
    # One worker: one person browsing needs no more, and each worker takes seconds of CPU to start.
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                               "--host", args.host, "--port", str(args.port), "--workers", "1"])
    # A `kill` stops the UI too, as Ctrl-C does: the server is stopped in `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        wait_until_up(base_url, server, args.timeout)
        print(f"\nMLflow UI on {uri}, experiment {experiment!r}: open\n\n    {url}\n\n(Ctrl-C stops it)", flush=True)
        return server.wait()
    except (RuntimeError, TimeoutError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()


if __name__ == "__main__":
    sys.exit(main())
