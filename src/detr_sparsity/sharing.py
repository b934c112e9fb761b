"""Keeping DVC and Snakemake in agreement: a study's artifacts taken from a DVC remote are seen by Snakemake, too, as
up to date, and `dvc commit` after a Snakemake run leaves Snakemake nothing to rerun.

`python -m detr_sparsity.sharing` (`make pull`), in the project root of a clone:
1. `dvc pull`: the outputs recorded in dvc.lock, from the default remote (or `--remote NAME`);
2. `dvc status` must report every stage Snakemake would run here as matching dvc.lock (its deps, params
   and outs); otherwise it stops, says what differs and marks nothing up to date;
3. `snakemake --touch --forceall --no-hooks`: sets the outputs' modification times in pipeline order and
   records each job's params, command and input checksums in `.snakemake/`, without running a job, opening
   MLflow or committing to DVC;
4. `snakemake -n` must then have nothing to do.

After a Snakemake run, its `onsuccess` records the outputs in dvc.lock and DVC's cache (`record_in_dvc`: what
`dvc commit --force` does, without DVC's run cache) inside `keeping_modification_times` (below).

Why step 3: DVC restores contents, not modification times, and a fresh clone has no `.snakemake/` records.
Snakemake 9 reruns a job whose input is newer than its oldest output unless the input's checksum matches
one it recorded (it never checksums a directory, and no `--rerun-triggers` setting turns this off), and it
compares params and code only against its records: after a plain pull it would rerun almost everything,
and without records a changed param would rerun nothing. After step 3 an edit to a param or to a stage's
source file reruns what it should. Logs are no outputs to Snakemake: missing ones rerun nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from detr_sparsity.reporting.paper import toolchain_missing

NOTHING_TO_DO = "Nothing to be done"


class NotConfirmed(RuntimeError):
    """DVC or Snakemake does not agree that the pulled artifacts are the pipeline's current outputs."""


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise NotConfirmed(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc


def locked_stages() -> list[str]:
    """The stages dvc.lock records: what the remote holds (without LaTeX, the pusher had no paper to push)."""
    return list(yaml.safe_load(Path("dvc.lock").read_text()).get("stages", {}))


def dvc_leaves() -> list[str] | None:
    """The stages Snakemake runs here, as the DVC stages whose dependencies they are: None for every stage, or without
    LaTeX `figures` and `tables` (every stage but `paper`, as the Snakefile does)."""
    return ["figures", "tables"] if toolchain_missing() else None


def dvc_targets() -> list[str]:
    """`dvc_leaves` as arguments of a DVC command."""
    leaves = dvc_leaves()
    return [] if leaves is None else ["--with-deps", *leaves]


def record_in_dvc() -> int:
    """Record the outputs of every stage Snakemake runs here in dvc.lock and DVC's cache, as `dvc commit --force`
    does, each stage once; return how many stages.

    Without DVC's run cache (the copy of each stage's lock entry that lets `dvc repro` restore a run it has seen):
    saving it hashes every dependency and output a second time, and `dvc commit` offers no switch for it. On the
    default study's outputs `dvc commit --force --with-deps figures tables` took 2 min 18 s, this 30 s, writing the
    same dvc.lock (README, "Tried on 2026-12-07, later"). `dvc repro` still saves the run cache of what it runs.
    Each path is built (walked and hashed) once (`_each_path_built_once`): 28.0 s before that on the same outputs,
    12.9 s after, the same dvc.lock (README, "Tried on 2026-12-07, at night").
    """
    from dvc.repo import Repo

    leaves = dvc_leaves()
    with Repo() as repo, repo.lock, _each_path_built_once():
        infos = {}  # each stage once: the leaves share their dependencies
        for leaf in [None] if leaves is None else leaves:
            for info in repo.stage.collect_granular(leaf, with_deps=leaf is not None):
                infos.setdefault(info.stage.addressing, info)
        by_file: dict = {}
        for info in infos.values():
            info.stage.save(run_cache=False)
            info.stage.commit(filter_info=info.filter_info)
            by_file.setdefault(info.stage.dvcfile.path, (info.stage.dvcfile, []))[1].append(info.stage)
        for dvcfile, stages in by_file.values():
            dvcfile.dump_stages(stages, update_pipeline=False)
    return len(infos)


@contextmanager
def _each_path_built_once() -> Iterator[None]:
    """DVC builds (walks and hashes) every dependency of every stage it saves, and most of the study's stages
    depend on the same directories: the data's 8,500 files were built again for each of some 60 stages. Nothing
    changes on disk while the outputs are recorded, so a path's first build stands for its later ones
    (`dvc.output.build`, what `Output._build` calls; keyed by object store, file system, path, hash and dry run)."""
    import dvc.output

    build, built = dvc.output.build, {}

    def once(odb, path, fs, name, **kwargs):
        key = (id(odb), fs.protocol, path, name, kwargs.get("dry_run", False))
        if key not in built:
            built[key] = build(odb, path, fs, name, **kwargs)
        return built[key]

    dvc.output.build = once
    try:
        yield
    finally:
        dvc.output.build = build


def _flatten(value) -> Iterator[list[str]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            for rest in _flatten(inner):
                yield [str(key), *rest]
    elif isinstance(value, list):
        for inner in value:
            yield from _flatten(inner)
    else:
        yield [str(value)]


def differences(status: dict) -> list[str]:
    """`dvc status --json` as one line per difference, e.g. `sibs@0.2: changed outs: results/... (deleted)`."""
    lines = []
    for stage, entries in status.items():
        for parts in _flatten(entries):
            what = f"{parts[0]}: {' '.join(parts[1:-1])} ({parts[-1]})" if len(parts) > 1 else parts[0]
            lines.append(f"{stage}: {what}")
    return lines


def confirm_with_dvc() -> None:
    """Raise unless DVC reports every stage Snakemake would run here as matching dvc.lock."""
    status = json.loads(_run(["dvc", "status", "--json", *dvc_targets()]).stdout)
    if not status:
        return
    lines = differences(status)
    report = [f"  {line}" for line in lines[:20]] + ([f"  ... and {len(lines) - 20} more"] if len(lines) > 20 else [])
    if any(line.endswith("(deleted)") for line in lines):
        report.append("A file still deleted after a pull is one the remote does not hold: never pushed, or an out "
                      "that dvc.yaml keeps out of DVC's cache (`cache: false`).")
    report.append("Where you changed these on purpose, run the pipeline (`snakemake --cores N`); otherwise check out "
                  "the commit whose dvc.lock describes what the remote holds and pull again.")
    raise NotConfirmed("DVC does not confirm that the workspace matches dvc.lock, so nothing was marked up to date "
                       "for Snakemake:\n" + "\n".join(report))


def record_in_snakemake() -> None:
    """Touch every output in pipeline order and record the jobs in .snakemake/, running none (and no hooks)."""
    _run(["snakemake", "--touch", "--forceall", "--no-hooks", "--cores", "1"])


def confirm_with_snakemake() -> None:
    proc = _run(["snakemake", "-n", "--cores", "1"])
    out = proc.stdout + proc.stderr
    if NOTHING_TO_DO not in out:
        raise NotConfirmed(f"after recording the pulled outputs, `snakemake -n` still plans jobs:\n{out}")


@contextmanager
def keeping_modification_times(roots: Iterable[Path]) -> Iterator[None]:
    """Give every file and directory under `roots` its modification time from before the block back after it.

    `dvc commit` moves each output it has not cached yet into its cache and copies it back, with a new modification
    time, in an order of its own. An upstream output copied back after a downstream one makes the next `snakemake`
    rerun everything below it, though nothing changed (seen on the default study: the 400 MB MGS block-input cache
    copied back last, and the next `make study` retrained every gate set). Contents are DVC's to check; the times
    stay the ones Snakemake's jobs gave them.
    """
    times = {path: path.stat().st_mtime_ns for root in map(Path, roots) if root.exists()
             for path in [root, *root.rglob("*")] if not path.is_symlink()}
    try:
        yield
    finally:
        for path, mtime in times.items():
            try:
                os.utime(path, ns=(path.stat().st_atime_ns, mtime))
            except FileNotFoundError:  # removed in the block: nothing to restore
                pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m detr_sparsity.sharing",
        description="Pull the study's artifacts from a DVC remote; once DVC confirms they match dvc.lock, "
                    "make Snakemake see them as up to date.")
    parser.add_argument("--remote", help="the DVC remote to pull from (default: the project's default remote)")
    parser.add_argument("--no-pull", action="store_true",
                        help="skip `dvc pull` (after `dvc checkout`, or a pull done by hand): only confirm and record")
    args = parser.parse_args(argv)
    try:
        if not args.no_pull:
            _run(["dvc", "pull", *(["--remote", args.remote] if args.remote else []), *locked_stages()])
        confirm_with_dvc()
        record_in_snakemake()
        confirm_with_snakemake()
    except NotConfirmed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("DVC confirms that every stage matches dvc.lock, and `snakemake -n` has nothing to do.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
