"""`batchgen extract`: the bulk JSON-extraction job in one command.

Each document becomes a chat: the system message carries the instruction and the schema, the user message the
document's text; the output is constrained to the schema, so every row's `json` column holds a value that fits
it (or the row says why not, e.g. cut off by max_tokens). It is `batchgen run` (in-process) or, with
`--submit`, `batchgen submit` (the queue) with those settings filled in.
"""
import json

import click

from batchgen.cli import run, submit, tensor_parallel_option


def system_prompt(instruction: str, schema: dict) -> str:
    return (f"{instruction.strip()}\nAnswer with a single JSON value that matches this JSON schema:\n"
            f"{json.dumps(schema, separators=(',', ':'))}")


@click.command("extract")
@click.argument("docs")
@click.option("--schema", "schema_file", required=True, type=click.Path(exists=True, dir_okay=False),
              help="JSON schema file every output must fit.")
@click.option("--instruction", required=True, help="What to extract, e.g. 'Extract the product and rating.'")
@click.option("--text-column", default="text", show_default=True, help="Column holding each document's text.")
@click.option("-o", "--output", required=True, help="Output directory (or URI with --submit).")
@click.option("--model", default="default", show_default=True)
@click.option("--id-column", default="id", show_default=True)
@click.option("--keep-columns", help="Comma-separated input columns to carry into the output.")
@click.option("--max-tokens", type=click.IntRange(1), default=512, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True)
@click.option("--shard-size", type=click.IntRange(1), default=2000, show_default=True)
@click.option("--submit", "on_queue", is_flag=True, help="Queue the job for the workers instead of running it here.")
@click.option("--wait", "wait_for_it", is_flag=True, help="With --submit: follow the job until it ends.")
@click.option("--dtype", default="auto", show_default=True, help="In-process only (workers load their own model).")
@click.option("--device", default="auto", show_default=True, help="In-process only.")
@tensor_parallel_option
@click.pass_context
def extract_command(ctx: click.Context, docs: str, schema_file: str, instruction: str, text_column: str,
                    output: str, model: str, id_column: str, keep_columns: str | None, max_tokens: int,
                    temperature: float, shard_size: int, on_queue: bool, wait_for_it: bool, dtype: str,
                    device: str, tensor_parallel_size: int) -> None:
    """Extract JSON that fits --schema from every document in DOCS (JSONL or Parquet)."""
    try:
        with open(schema_file) as source:
            schema = json.load(source)
    except ValueError as exc:
        raise click.BadParameter(f"{schema_file}: {exc}", param_hint="--schema") from None
    options = dict(file=docs, output=output, model=model, schema_file=schema_file, id_column=id_column,
                   keep_columns=keep_columns, max_tokens=max_tokens, temperature=temperature,
                   shard_size=shard_size, template="{" + text_column + "}",
                   system_prompt=system_prompt(instruction, schema))
    if on_queue:
        ctx.invoke(submit, wait_for_it=wait_for_it, **options)
    else:
        ctx.invoke(run, dtype=dtype, device=device, tensor_parallel_size=tensor_parallel_size, engine_args={},
                   **options)
