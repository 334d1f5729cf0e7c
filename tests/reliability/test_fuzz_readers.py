"""Fuzzing whole input files, where tests/jobs/test_row_spec.py fuzzes single rows: random JSONL bytes and
random Parquet tables through the submit-time survey and the shard reader. Either the file is refused with a
JobInputError naming it, or it reads as exactly the rows the survey counted, in order, with any shard plan;
each row is a request or an error naming the file. Nothing else may escape."""
import json
import string

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batchgen.jobs.errors import JobInputError
from batchgen.jobs.readers import read_rows, validate_input
from batchgen.jobs.rows import PromptRow
from batchgen.jobs.spec import JobSpec
from batchgen.sampling_params import SamplingParams

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
FIELDS = ["id", "prompt", "messages", "max_tokens", "temperature", "top_p", "n", "text", "response_format"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=12))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(["role", "content", "type"]), inner, max_size=3)),
    max_leaves=6)
objects = st.dictionaries(st.sampled_from(FIELDS) | st.text(string.ascii_lowercase, max_size=4), values, max_size=5)
good_object = st.builds(lambda i, text: {"id": f"g{i}", "prompt": text or "x"}, st.integers(0, 5), st.text(max_size=8))
lines = st.one_of(
    objects.map(lambda o: json.dumps(o).encode()),
    good_object.map(lambda o: json.dumps(o).encode()),
    st.binary(max_size=40),
    st.just(b""), st.just(b"   "), st.just(b"\xef\xbb\xbf{}"),
    st.integers(1025, 3000).map(lambda n: b'{"prompt": "' + b"z" * n + b'"}'),     # over max_line_bytes
)
endings = st.sampled_from([b"\n", b"\r\n", b"\n\n"])
jsonl_files = st.lists(st.tuples(lines, endings), max_size=12).map(lambda ls: b"".join(l + e for l, e in ls))


def check_reads(spec: JobSpec, shard_size: int) -> None:
    """Either refused as a whole, naming the file, or read as exactly the rows the survey counted."""
    try:
        summary = validate_input(spec)
    except JobInputError as exc:
        assert spec.input in str(exc)
        return
    spec.input_summary = summary
    shards = [spec.shard_rows(i) for i in range(spec.num_shards)]
    rows = [row for start, end in shards for row in read_rows(spec, start, end)]
    assert [row.index for row in rows] == list(range(summary.num_rows))
    assert rows == list(read_rows(spec, 0, summary.num_rows))
    errors = sum(row.error is not None for row in rows)
    # a row may be both invalid and a duplicate id (a row without an id takes its index as id, which a later
    # row may have): the bad rows are at most the two counts together, and never more than the rows
    assert summary.num_invalid_rows <= errors <= min(summary.num_invalid_rows + len(summary.duplicate_rows), len(rows))
    assert set(summary.duplicate_rows) <= {row.index for row in rows if row.error is not None}
    for row in rows:
        assert isinstance(row, PromptRow) and isinstance(row.id, str)
        if row.error is not None:
            assert row.error.startswith(f"{spec.input}: ") and "internal error" not in row.error, row.error
        else:
            assert isinstance(row.params, SamplingParams) and (row.prompt is None) != (row.messages is None)


@FUZZ
@given(content=jsonl_files, shard_size=st.integers(1, 5))
def test_fuzz_jsonl_files(tmp_path, content, shard_size):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(content)
    spec = JobSpec(input=str(path), output=str(tmp_path / "out"), input_format="jsonl", shard_size=shard_size,
                   max_line_bytes=1024)
    check_reads(spec, shard_size)


ARROW_TYPES = [pa.string(), pa.int64(), pa.float64(), pa.bool_(), pa.binary(), pa.list_(pa.string()),
               pa.struct([("role", pa.string()), ("content", pa.string())]),
               pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))]


@st.composite
def parquet_tables(draw) -> pa.Table:
    num_rows = draw(st.integers(1, 6))
    names = draw(st.lists(st.sampled_from(FIELDS[:1] + FIELDS[2:] + ["extra"]), max_size=4, unique=True))
    columns = {}
    if draw(st.integers(0, 2)):                                 # mostly a text prompt column, sometimes none
        columns["prompt"] = pa.array(draw(st.lists(st.none() | st.text(max_size=8), min_size=num_rows,
                                                   max_size=num_rows)), type=pa.string())
    for name in names:
        arrow_type = draw(st.sampled_from(ARROW_TYPES))
        python = {pa.string(): st.text(max_size=8), pa.int64(): st.integers(-2 ** 63, 2 ** 63 - 1),
                  pa.float64(): st.floats(), pa.bool_(): st.booleans(), pa.binary(): st.binary(max_size=8)}
        if arrow_type in python:
            element = python[arrow_type]
        elif arrow_type == pa.list_(pa.string()):
            element = st.lists(st.text(max_size=4), max_size=2)
        else:
            message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "robot"]),
                                             "content": st.text(max_size=6)})
            element = message if pa.types.is_struct(arrow_type) else st.lists(message, max_size=2)
        columns[name] = pa.array(draw(st.lists(st.none() | element, min_size=num_rows, max_size=num_rows)),
                                 type=arrow_type)
    return pa.table(columns)


@FUZZ
@given(table=parquet_tables(), shard_size=st.integers(1, 4), row_group_size=st.integers(1, 4),
       cut=st.one_of(st.none(), st.none(), st.floats(0.05, 0.95)))
# rows 3 and 4 repeat row 0's id (its index, it has none); row 3 is also invalid (no prompt)
@example(table=pa.table({"prompt": [None, None, None, None, "0"],
                         "id": pa.array([None, None, None, 0, 0], pa.int64())}),
         shard_size=1, row_group_size=1, cut=None)
def test_fuzz_parquet_files(tmp_path, table, shard_size, row_group_size, cut):
    path = tmp_path / "fuzz.parquet"
    pq.write_table(table, path, row_group_size=row_group_size)
    if cut is not None:                                         # a file cut short by a crashed copy
        path.write_bytes(path.read_bytes()[: int(path.stat().st_size * cut)])
    spec = JobSpec(input=str(path), output=str(tmp_path / "out"), shard_size=shard_size)
    check_reads(spec, shard_size)
