"""A finished job's output directory is one Parquet dataset to the readers people use (pandas, pyarrow and
HF datasets read the directory; polars and DuckDB the glob out/**/*.parquet): batchgen's metadata sits in
.batchgen/, which they all skip. Outputs written
the old way (job.json and stats.json beside parts/) are still read, replaced and refused as before."""
import collections
import os
import shutil

import duckdb
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchgen.jobs.errors import JobOutputError
from batchgen.jobs.output_dir import (list_parts, load_spec, load_stats, prepare_output, read_shard_stats, save_spec,
                                     save_stats, write_openai_output)
from batchgen.jobs.stats import merge_stats


@pytest.fixture
def finished(make_job, run_job):
    """A completed 3-shard job with output_format openai, so every metadata file is there."""
    rows = [{"id": f"r{i}", "prompt": f"say {i}", "keep": i} for i in range(7)]
    spec = make_job(rows, shard_size=3, output_format="openai", keep_columns=["keep"])
    save_spec(spec)
    run_job(spec)
    save_stats(spec.output, merge_stats(read_shard_stats(spec.output), job_id=spec.job_id, model=spec.model))
    write_openai_output(spec)
    assert sorted(os.listdir(spec.output)) == [".batchgen", "parts"]
    assert sorted(os.listdir(os.path.join(spec.output, ".batchgen"))) == ["job.json", "results.jsonl", "stats.json"]
    return spec


def reference_rows(output: str) -> list[dict]:
    """The parts read one by one, in shard order: what every reader must return."""
    return [row for _, path in list_parts(output) for row in pq.read_table(path).to_pylist()]


def test_dataframe_readers_read_the_directory_as_it_is(finished, tmp_path, monkeypatch):
    out = finished.output
    expected = reference_rows(out)
    ids = [f"r{i}" for i in range(7)]
    assert [row["id"] for row in expected] == ids
    columns = ["id", "keep", "text", "finish_reason", "prompt_tokens", "completion_tokens", "error", "endpoint"]

    def records(frame_rows: list[dict]) -> list[tuple]:
        return [tuple(row[c] for c in columns) for row in frame_rows]

    # ordered readers: the rows of the parts, in input order
    assert records(pq.read_table(out).to_pylist()) == records(expected)
    frame = pd.read_parquet(out)                    # missing values as NaN: back through Arrow to compare
    assert records(pa.Table.from_pandas(frame, preserve_index=False).to_pylist()) == records(expected)
    # polars reads no directory that holds any other file, hidden or not: it takes the glob it suggests itself
    assert records(pl.read_parquet(f"{out}/**/*.parquet").to_dicts()) == records(expected)

    # DuckDB's glob and HF datasets promise no order: every row exactly once
    found = duckdb.sql(f"SELECT * FROM '{out}/**/*.parquet'").fetch_arrow_table().to_pylist()
    assert collections.Counter(records(found)) == collections.Counter(records(expected))

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    loaded = datasets.load_dataset("parquet", data_dir=out, split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert collections.Counter(records(loaded.to_list())) == collections.Counter(records(expected))


def old_layout(spec) -> None:
    """Move the metadata where outputs written before .batchgen/ kept it."""
    meta = os.path.join(spec.output, ".batchgen")
    for name in ("job.json", "stats.json", "results.jsonl"):
        shutil.move(os.path.join(meta, name), os.path.join(spec.output, name))
    os.rmdir(meta)


def test_outputs_written_the_old_way_are_still_read(finished):
    spec, stats = load_spec(finished.output), load_stats(finished.output)
    old_layout(finished)
    assert load_spec(finished.output) == spec == finished
    assert load_stats(finished.output) == stats
    other = finished.model_copy(update={"job_id": "another-job"})
    with pytest.raises(JobOutputError, match="already holds a job's output"):
        prepare_output(other)
    prepare_output(other, replace=True)
    assert os.listdir(finished.output) == []
    with pytest.raises(JobOutputError, match="no job.json"):
        load_spec(finished.output)


def test_new_metadata_wins_over_old(finished):
    """A job resumed from an old-layout directory writes its stats into .batchgen/: that is what is read."""
    old_layout(finished)
    stale = load_stats(finished.output).model_copy(update={"rows_total": 1})
    with open(os.path.join(finished.output, "stats.json"), "w") as f:
        f.write(stale.model_dump_json())
    fresh = merge_stats(read_shard_stats(finished.output), job_id=finished.job_id, model=finished.model)
    save_stats(finished.output, fresh)
    assert load_stats(finished.output) == fresh and fresh.rows_total == 7
    assert pa.Table.from_pylist(reference_rows(finished.output)).num_rows == 7
