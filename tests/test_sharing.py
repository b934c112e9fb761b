"""Keeping DVC and Snakemake in agreement after `dvc commit` (the tiny study's pull and rerun checks, under the real
DVC and Snakemake, are in test_orchestration)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from detr_sparsity import sharing
from detr_sparsity.sharing import keeping_modification_times


def test_outputs_copied_back_or_rewritten_keep_the_modification_times_their_jobs_gave_them(tmp_path):
    upstream, downstream = tmp_path / "results/x/mgs/cache/block_inputs.bin", tmp_path / "results/x/mgs/local/gates"
    removed = tmp_path / "results/x/gone.json"
    for path in (upstream, downstream, removed):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"made by its job")
    # As the jobs left them: upstream first, then downstream, then their directories.
    given = {upstream: 1_000_000_000_000_000_000, downstream: 1_000_000_002_000_000_000}
    for path, mtime in given.items():
        os.utime(path, ns=(mtime, mtime))
    given[upstream.parent] = upstream.parent.stat().st_mtime_ns

    with keeping_modification_times([tmp_path / "results/x", tmp_path / "results/not-there"]):
        # What `dvc commit` does to an output it has not cached: moved into the cache, copied back (a new file, a
        # new time), here upstream after downstream.
        cache = tmp_path / "cache"
        cache.mkdir()
        for path in (downstream, upstream):
            shutil.move(path, cache / path.name)
            shutil.copyfile(cache / path.name, path)
        removed.unlink()
        assert upstream.stat().st_mtime_ns > downstream.stat().st_mtime_ns  # Snakemake would rerun downstream

    assert {path: path.stat().st_mtime_ns for path in given} == given
    assert upstream.read_bytes() == b"made by its job" and not removed.exists()


# Two stages, the second reading the first's output and a param; a third no other stage reads (as `paper`).
DVC_YAML = {"stages": {
    "make": {"cmd": "echo made > made.txt", "outs": ["made.txt"]},
    "use": {"cmd": "cat made.txt > used/out.txt", "deps": ["made.txt"], "params": ["size"], "outs": ["used"]},
    "leaf": {"cmd": "echo leaf > leaf.txt", "deps": ["made.txt"], "outs": ["leaf.txt"]},
}}


def dvc_project(root, with_leaf: bool = True):
    """A git + DVC project with the stages' outputs written by hand, as Snakemake's jobs leave them: nothing
    recorded in dvc.lock or DVC's cache yet."""
    root.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["dvc", "init", "-q"], cwd=root, check=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML))
    (root / "params.yaml").write_text("size: 3\n")
    (root / "made.txt").write_text("made\n")
    (root / "used").mkdir()
    (root / "used/out.txt").write_text("made\n")
    if with_leaf:
        (root / "leaf.txt").write_text("leaf\n")
    return root


@pytest.mark.parametrize("latex", [True, False])
def test_recorded_in_dvc_as_dvc_commit_records_it_without_the_run_cache(tmp_path, monkeypatch, latex):
    """`record_in_dvc` writes the dvc.lock that DVC's own `dvc commit --force` writes for the same stages, fills
    DVC's cache with the same objects, and saves no run cache. Without LaTeX (no `paper`) it records the
    dependencies of `figures` and `tables` only: here, of `use`."""
    monkeypatch.setattr(sharing, "dvc_leaves", lambda: None if latex else ["use"])
    by_dvc, by_us = dvc_project(tmp_path / "by_dvc", with_leaf=latex), dvc_project(tmp_path / "by_us", with_leaf=latex)
    subprocess.run(["dvc", "commit", "--force", "--quiet", *([] if latex else ["--with-deps", "use"])], cwd=by_dvc,
                   check=True)
    monkeypatch.chdir(by_us)
    assert sharing.record_in_dvc() == (3 if latex else 2)
    lock = lambda root: yaml.safe_load((root / "dvc.lock").read_text())  # a new lock's order is DVC's traversal's
    assert lock(by_us) == lock(by_dvc)
    assert set(lock(by_us)["stages"]) == ({"make", "use", "leaf"} if latex else {"make", "use"})
    objects = lambda root: sorted(p.relative_to(root / ".dvc/cache/files")
                                  for p in (root / ".dvc/cache/files").rglob("*") if p.is_file())
    assert objects(by_us) == objects(by_dvc) and objects(by_us)
    assert (by_dvc / ".dvc/cache/runs").is_dir() and not (by_us / ".dvc/cache/runs").exists()
    status = subprocess.run(["dvc", "status", "--json"], cwd=by_us, capture_output=True, text=True, check=True)
    if latex:
        assert (status.stdout.strip() or "{}") == "{}"  # every stage recorded
    else:
        assert "leaf" in status.stdout  # the stage standing for `paper`, not recorded without LaTeX


def test_recorded_in_dvc_with_each_path_built_once(tmp_path, monkeypatch):
    """A path several stages depend on (made.txt: `use` and `leaf`) is walked and hashed once, as a dependency, and
    an output once more (it goes to DVC's cache), where DVC alone builds it again for every stage; and DVC's own
    build is back in place afterwards."""
    import dvc.output

    original, builds = dvc.output.build, []

    def counted(odb, path, fs, name, **kwargs):
        builds.append((os.path.basename(path), kwargs.get("dry_run", False)))
        return original(odb, path, fs, name, **kwargs)

    monkeypatch.setattr(dvc.output, "build", counted)
    monkeypatch.setattr(sharing, "dvc_leaves", lambda: None)
    monkeypatch.chdir(dvc_project(tmp_path / "project"))
    assert sharing.record_in_dvc() == 3
    assert dvc.output.build is counted
    assert sorted(builds) == sorted({*builds}) and ("made.txt", True) in builds, builds
