"""`batchgen extract` as a user runs it: in-process and on the queue, over 50+ documents with the default model;
every output row's JSON must validate against the schema (jsonschema), not just claim to."""
import json
import random
import sys
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from batchgen.cli import main
sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from test_structured_generation import NESTED, orders, reviews  # noqa: E402  (shared document generators)

pytestmark = pytest.mark.slow   # the default model, on the queue with real workers

SAMPLE_SCHEMA = Path(__file__).parents[2] / "samples" / "extraction" / "schema.json"


def write_docs(path: Path, texts: list[str]) -> Path:
    rng = random.Random(0)
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": t, "source": rng.choice("ab")}) + "\n"
                            for i, t in enumerate(texts)))
    return path


def check_rows(output: Path, schema: dict, count: int) -> None:
    rows = pq.read_table(str(output)).to_pylist()
    assert [r["id"] for r in rows] == [f"d{i}" for i in range(count)]
    for row in rows:
        assert row["error"] is None and row["json_valid"], row
        jsonschema.validate(json.loads(row["json"]), schema)
        assert json.loads(row["json"]) == json.loads(row["text"])


def test_extract_in_process_over_56_documents(tmp_path):
    docs = write_docs(tmp_path / "docs.jsonl", reviews(56, seed=11))
    result = CliRunner().invoke(main, ["extract", str(docs), "--schema", str(SAMPLE_SCHEMA), "--instruction",
                                       "Extract the product, the sentiment and the star rating.",
                                       "-o", str(tmp_path / "out"), "--keep-columns", "source", "--max-tokens", "96"])
    assert result.exit_code == 0, result.output
    check_rows(tmp_path / "out", json.loads(SAMPLE_SCHEMA.read_text()), 56)


def test_extract_on_the_queue_with_a_nested_schema(workers, tmp_path):
    docs = write_docs(tmp_path / "orders.jsonl", orders(50, seed=4))
    schema_file = tmp_path / "order.json"
    schema_file.write_text(json.dumps(NESTED))
    result = CliRunner().invoke(main, ["extract", str(docs), "--schema", str(schema_file), "--instruction",
                                       "Extract the customer, the ordered items and the priority.",
                                       "-o", str(tmp_path / "out"), "--max-tokens", "160", "--shard-size", "25",
                                       "--submit", "--wait"])
    assert result.exit_code == 0, result.output
    check_rows(tmp_path / "out", NESTED, 50)
