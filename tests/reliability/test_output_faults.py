"""An output that can't be written, through a real worker: a directory that can't be created (root ignores
permission bits, so the parts directory's name is taken by a file) and a full disk (the worker runs with a file
size limit, RLIMIT_FSIZE, so its writes fail as on a full device). Either way the job fails with an error
naming the file, no part is left behind that could pass for a finished one, and once the output is fixed
`resume` completes the job."""
import base64
import os

import pytest
from click.testing import CliRunner

from batchgen.cli import main
from batchgen.jobs.output_dir import part_exists
from batchgen.workers.app import job_store
from harness import every_row_once, reference_texts, write_jsonl

pytestmark = pytest.mark.slow   # a real worker process

FILE_SIZE_LIMIT = 256 * 1024


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_unwritable_or_full_output_fails_the_job_and_leaves_no_part(model_alias, start_worker, reference_llm,
                                                                   tmp_path):
    model = model_alias("disk")
    options = ["--model", model, "--max-tokens", 4, "--temperature", 0]
    rows = [{"id": f"u{i}", "prompt": f"Describe field number {i}"} for i in range(6)]
    unwritable = cli("submit", write_jsonl(tmp_path / "rows.jsonl", rows), "-o", tmp_path / "blocked",
                     "--shard-size", 2, *options)
    assert unwritable.exit_code == 0, unwritable.output
    (tmp_path / "blocked" / "parts").write_text("a file where the parts directory goes")
    # one row carries 600 KB of incompressible text into its part: more than the worker may write to a file
    payload = base64.b64encode(os.urandom(450_000)).decode()
    big = [{"id": "b0", "prompt": "Say hi", "payload": payload}, {"id": "b1", "prompt": "Say bye", "payload": "x"}]
    full = cli("submit", write_jsonl(tmp_path / "big.jsonl", big), "-o", tmp_path / "full", "--keep-columns",
               "payload", *options)
    assert full.exit_code == 0, full.output
    unwritable_id, full_id = unwritable.stdout.strip(), full.stdout.strip()
    worker = start_worker(model, file_size_limit=FILE_SIZE_LIMIT).wait_ready()

    waited = cli("wait", unwritable_id, "--timeout", 60)
    part = tmp_path / "blocked" / "parts" / "shard-0000"
    assert waited.exit_code == 1 and f"cannot write {part}" in waited.output, waited.output
    waited = cli("wait", full_id, "--timeout", 60)
    assert waited.exit_code == 1, waited.output + worker.log_text()[-3000:]
    error = job_store().get_job(full_id).error
    assert f"cannot write {tmp_path / 'full' / 'parts' / 'shard-00000.parquet'}" in error and "File too large" in error
    assert os.listdir(tmp_path / "full" / "parts") == [] and not part_exists(str(tmp_path / "full"), 0)
    assert "File too large" in cli("status", full_id).output

    os.remove(tmp_path / "blocked" / "parts")
    resumed = cli("resume", unwritable_id)
    assert resumed.exit_code == 0 and "3 shard(s) queued" in resumed.output
    assert cli("wait", unwritable_id, "--timeout", 60).exit_code == 0
    table = every_row_once(str(tmp_path / "blocked"), [r["id"] for r in rows])
    assert [r["text"] for r in table] == reference_texts(reference_llm, [r["prompt"] for r in rows], max_tokens=4)
