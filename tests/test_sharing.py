"""Keeping DVC and Snakemake in agreement after `dvc commit` (the tiny study's pull and rerun checks, under the real
DVC and Snakemake, are in test_orchestration)."""

from __future__ import annotations

import os
import shutil

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
