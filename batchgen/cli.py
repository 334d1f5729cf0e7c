"""The `batchgen` command line: run a job in-process, or submit it to the queue and follow it there.

Light commands (submit, status, list, ...) never import torch; only `run` and `worker` load a model. User
errors end with one line on stderr and a non-zero exit code: 1 for an error or a failed job, 3 for a
cancelled job, 4 when `wait --timeout` runs out.
"""
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time

import click
from pydantic import ValidationError

import batchgen
from batchgen.jobs.errors import JobInputError, JobOutputError, one_line
from batchgen.jobs.output_dir import METADATA_DIR, OPENAI_OUTPUT_FILE, PARTS_DIR, STATS_FILE, list_parts, load_spec, \
    load_stats, read_shard_stats
from batchgen.jobs.paths import filesystem, is_uri, redact_url
from batchgen.jobs.spec import DEFAULT_SHARD_SIZE, JobSpec
from batchgen.jobs.stats import format_time, merge_stats, render_stats
from batchgen.sampling_params import MAX_LOGPROBS, StructuredOutput

EXIT_FAILED = 1
EXIT_CANCELLED = 3
EXIT_TIMEOUT = 4
_PROGRESS_WIDTH = 24


class _Main(click.Group):
    """Turns the errors a user can cause (a bad file, a bad option, no Redis) into one line and exit code 1;
    imports the commands that need torch only when they run."""

    lazy_commands = {"bench": ("batchgen.bench", "bench_command"), "extract": ("batchgen.extract", "extract_command")}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy_commands])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy_commands:
            module, attribute = self.lazy_commands[name]
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        import kombu.exceptions
        import redis

        try:
            return super().invoke(ctx)
        except (JobInputError, JobOutputError) as exc:
            raise click.ClickException(str(exc)) from None
        except ValidationError as exc:
            raise click.ClickException(one_line(exc)) from None
        except (redis.ConnectionError, redis.TimeoutError, kombu.exceptions.OperationalError) as exc:
            from batchgen.jobs.store import redis_url
            raise click.ClickException(f"cannot reach Redis at {redact_url(redis_url())}: "
                                       f"{redact_url(str(exc))}") from None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(batchgen.__version__, prog_name="batchgen")
@click.option("-v", "--verbose", is_flag=True, help="Log progress details on stderr.")
def main(verbose: bool) -> None:
    """Offline batch LLM generation: prompt files in, Parquet out.

    \b
    In-process:  batchgen run prompts.jsonl -o out/
    On a queue:  batchgen worker --model M --gpu 0        (one per GPU; Redis at $BATCHGEN_REDIS_URL)
                 batchgen worker --model M --gpu 0,1,2,3 --tensor-parallel-size 2   (one per GPU pair)
                 batchgen submit prompts.parquet --model M --output out/ --wait
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")


# ---------------------------------------------------------------------------------------------------------
# options shared by run and submit

def _job_options(command):
    options = [
        click.option("--model", default="default", show_default=True,
                     help="Model: 'default' (the embedded SmolLM2-135M-Instruct) or a Hugging Face model directory."),
        click.option("--input-format", type=click.Choice(["jsonl", "parquet", "openai"]),
                     help="Input format (default: detected)."),
        click.option("--prompt-column", default="prompt", show_default=True, help="Column holding prompt text."),
        click.option("--messages-column", default="messages", show_default=True,
                     help="Column holding chat messages [{role, content}]."),
        click.option("--id-column", default="id", show_default=True,
                     help="Column holding row ids (rows without one get their 0-based index)."),
        click.option("--template", help="Build prompts from columns, e.g. 'Summarize: {text}'."),
        click.option("--system-prompt", help="System message for every row (makes every row a chat)."),
        click.option("--chat", "as_chat", is_flag=True, help="Send prompt text through the chat template."),
        click.option("--keep-columns", help="Comma-separated input columns to carry into the output."),
        click.option("--shard-size", type=click.IntRange(1), default=DEFAULT_SHARD_SIZE, show_default=True,
                     help="Rows per shard (one task each)."),
        click.option("--max-tokens", type=click.IntRange(0),
                     help="Tokens to generate per row [default: the model's max_new_tokens, else 256]; 0 scores "
                          "the prompts (total_logprob, scored_tokens, perplexity columns) and generates nothing."),
        click.option("--temperature", type=click.FloatRange(0),
                     help="Sampling temperature; 0 is greedy [default: the model's]."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True),
                     help="Nucleus sampling mass [default: the model's]."),
        click.option("--top-k", type=click.IntRange(0), help="Sample among the k likeliest; 0 is off [default: the "
                     "model's]."),
        click.option("--min-p", type=click.FloatRange(0, 1), help="Minimum probability relative to the likeliest "
                     "token [default: the model's]."),
        click.option("--repetition-penalty", type=click.FloatRange(0, min_open=True),
                     help="Penalty on tokens already in the prompt or output [default: the model's]."),
        click.option("--generation-config", type=click.Choice(["model", "none"]), default="model", show_default=True,
                     help="model: the sampling in the model's generation_config.json is the default; none: neutral "
                          "defaults (temperature 1, top_p 1, no top-k, min-p or repetition penalty)."),
        click.option("--prompt-logprobs", type=click.IntRange(0, MAX_LOGPROBS),
                     help="Add a prompt_logprobs column: each prompt token's logprob and the top K alternatives."),
        click.option("--seed", type=int, help="Per-row sampling seed (reproducible outputs)."),
        click.option("--n", type=click.IntRange(1), help="Completions per row (text becomes a list)."),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
        click.option("--output-format", type=click.Choice(["parquet", "openai"]), default="parquet",
                     show_default=True,
                     help="openai: also write .batchgen/results.jsonl in the OpenAI Batch output shape."),
        click.option("--cache-salt", help="Share prefix-cache blocks only with jobs of the same salt: one per "
                                          "tenant keeps tenants' KV apart on a shared worker (kept in job.json)."),
        click.option("--schema", "schema_file", type=click.Path(exists=True, dir_okay=False),
                     help="JSON schema file: every output is JSON that fits it."),
        click.option("--json", "json_object", is_flag=True, help="Every output is a JSON object."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


tensor_parallel_option = click.option(
    "--tensor-parallel-size", type=click.IntRange(1), default=1, show_default=True,
    help="GPUs one model is split across (tensor parallel): for a model whose weights and KV cache don't fit "
         "one GPU.")


def engine_options(command):
    command = tensor_parallel_option(command)
    command = click.option("--engine-arg", "engine_args", multiple=True, callback=_parse_engine_args,
                           metavar="NAME=VALUE",
                           help="Any other engine setting (batchgen.config.EngineConfig), e.g. max_num_seqs=128 "
                                "or kv_cache_bytes=1000000000; repeatable.")(command)
    command = click.option("--allow-pickle-weights", is_flag=True,
                           help="Also load pickled weights (.bin, .pt) of a model without safetensors. Unpickling "
                                "a file can run code: only for models you trust.")(command)
    command = click.option("--device", default="auto", show_default=True,
                           help="cpu, cuda, cuda:N; auto picks the GPU when there is one.")(command)
    command = click.option("--quantization", type=click.Choice(["fp8"]),
                           help="Quantize a float checkpoint's weights to fp8 while it loads (fp8 checkpoints "
                                "are detected without it).")(command)
    command = click.option("--kv-cache-dtype", type=click.Choice(["auto", "fp8"]), default="auto",
                           show_default=True,
                           help="fp8: a float8_e4m3fn KV cache, twice the tokens of bf16 (the checkpoint's K/V "
                                "scales when it has them, else 1.0); auto: the compute dtype.")(command)
    return click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
                        show_default=True,
                        help="Weights and activations; auto: fp32 on CPU, bf16/fp16 on GPU.")(command)


def engine_settings(dtype: str, device: str, quantization: str | None, kv_cache_dtype: str,
                     tensor_parallel_size: int, engine_args: dict, allow_pickle_weights: bool) -> dict:
    """EngineConfig fields from the engine options."""
    return {"dtype": dtype, "device": device, **({"quantization": quantization} if quantization else {}),
            **({"kv_cache_dtype": kv_cache_dtype} if kv_cache_dtype != "auto" else {}),
            "tensor_parallel_size": tensor_parallel_size, **engine_args,
            **({"allow_pickle_weights": True} if allow_pickle_weights else {})}


def _parse_engine_args(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict:
    """NAME=VALUE pairs; a VALUE that reads as JSON (numbers, true, null) is taken as such."""
    parsed = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise click.BadParameter(f"{item!r} is not NAME=VALUE", ctx=ctx, param=param)
        try:
            parsed[name.strip()] = json.loads(value)
        except ValueError:
            parsed[name.strip()] = value
    return parsed


def _job_spec(file: str, output: str, options: dict) -> JobSpec:
    sampling = {name: options[name] for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p",
                                                 "repetition_penalty", "seed", "n", "prompt_logprobs")
                if options[name] is not None}
    if options["stop"]:
        sampling["stop"] = list(options["stop"])
    structured = None
    if options["schema_file"] and options["json_object"]:
        raise click.UsageError("give --schema or --json, not both")
    if options["schema_file"]:
        try:
            with open(options["schema_file"]) as source:
                structured = StructuredOutput(json_schema=json.load(source))
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"{options['schema_file']}: {exc}", param_hint="--schema") from None
    elif options["json_object"]:
        structured = StructuredOutput(json_object=True)
    keep = [c.strip() for c in (options["keep_columns"] or "").split(",") if c.strip()]
    try:
        return JobSpec(input=file, output=output, model=options["model"], input_format=options["input_format"],
                       output_format=options["output_format"], sampling=sampling, structured=structured,
                       prompt_column=options["prompt_column"], messages_column=options["messages_column"],
                       id_column=options["id_column"], template=options["template"],
                       system_prompt=options["system_prompt"], as_chat=options["as_chat"], keep_columns=keep,
                       shard_size=options["shard_size"], cache_salt=options["cache_salt"],
                       generation_config=options["generation_config"])
    except ValidationError as exc:
        if options["schema_file"] and exc.errors()[0]["loc"][:1] == ("structured",):   # name the file at fault
            raise click.ClickException(f"{options['schema_file']}: {one_line(exc)}") from None
        raise


def _validated(spec: JobSpec) -> JobSpec:
    """Survey the input (raises JobInputError for whole-file problems) and tell the user what was found."""
    from batchgen.jobs.readers import validate_input

    spec.input_summary = validate_input(spec)
    _report_input(spec)
    return spec


def _report_input(spec: JobSpec) -> None:
    from batchgen.jobs.readers import input_report

    for line in input_report(spec):
        click.echo(line, err=True)


# ---------------------------------------------------------------------------------------------------------
# in-process

@main.command()
@click.argument("file")
@click.option("-o", "--output", required=True, help="Output directory (replaced if it holds an earlier run).")
@_job_options
@engine_options
def run(file: str, output: str, dtype: str, device: str, quantization: str | None, kv_cache_dtype: str,
        tensor_parallel_size: int, engine_args: dict, allow_pickle_weights: bool, **options) -> None:
    """Run a job in this process (no Redis, no workers).

    The same readers, engine and writers as the queue.
    FILE is JSONL (prompt or messages per line), Parquet, or OpenAI batch lines; a local path or a pyarrow URI.
    """
    from batchgen.jobs.execute import Executor, run_job_locally
    from batchgen.jobs.output_dir import prepare_output, save_spec

    spec = _validated(_job_spec(file, output, options))

    def load():
        from batchgen import LLM
        return LLM(spec.model, generation_config=spec.generation_config,
                   **engine_settings(dtype, device, quantization, kv_cache_dtype, tensor_parallel_size, engine_args,
                                      allow_pickle_weights))

    with _load_model(spec.model, load) as llm:   # closing stops a tensor-parallel engine's other ranks
        if spec.generation_config == "model":
            spec.model_sampling = llm.engine.default_sampling
        prepare_output(spec, replace=True)
        save_spec(spec)
        progress = _Progress()
        record = run_job_locally(spec, Executor.for_llm(llm), progress.update)
        progress.close()
    if record.status != "completed":
        raise click.ClickException(f"job {record.job_id} {record.status}: {record.error}")
    click.echo(f"{record.rows_done:,} rows ({record.rows_failed:,} failed), "
               f"{record.completion_tokens:,} tokens generated")
    click.echo(f"output: {_join(spec.output_display, PARTS_DIR + '/')}")
    click.echo(f"stats:  {_join(spec.output_display, f'{METADATA_DIR}/{STATS_FILE}')}")
    if spec.output_format == "openai":
        click.echo(f"openai: {_join(spec.output_display, f'{METADATA_DIR}/{OPENAI_OUTPUT_FILE}')}")


@main.command()
@click.argument("file")
@click.option("-o", "--output", required=True, help="Output directory (or URI with --submit).")
@click.option("--model", default="default", show_default=True)
@click.option("--input-format", type=click.Choice(["jsonl", "parquet", "openai"]), help="Input format (default: detected).")
@click.option("--prompt-column", default="prompt", show_default=True)
@click.option("--messages-column", default="messages", show_default=True)
@click.option("--id-column", default="id", show_default=True)
@click.option("--template", help="Build the scored text from columns, e.g. 'Q: {question} A: {answer}'.")
@click.option("--chat", "as_chat", is_flag=True, help="Score prompt text inside the chat template.")
@click.option("--keep-columns", help="Comma-separated input columns to carry into the output.")
@click.option("--shard-size", type=click.IntRange(1), default=DEFAULT_SHARD_SIZE, show_default=True)
@click.option("--prompt-logprobs", type=click.IntRange(0, MAX_LOGPROBS),
              help="Also a prompt_logprobs column: each token's logprob and the top K alternatives.")
@click.option("--submit", "on_queue", is_flag=True, help="Queue the job for the workers instead of running it here.")
@click.option("--wait", "wait_for_it", is_flag=True, help="With --submit: follow the job until it ends.")
@engine_options
@click.pass_context
def score(ctx: click.Context, on_queue: bool, wait_for_it: bool, dtype: str, device: str, quantization: str | None,
          kv_cache_dtype: str, tensor_parallel_size: int, engine_args: dict, allow_pickle_weights: bool,
          **options) -> None:
    """Score every row's text: total_logprob, scored_tokens and perplexity columns; nothing is generated.

    The same job as `run` (or `submit`) with --max-tokens 0: prefill only."""
    if on_queue:
        ctx.invoke(submit, wait_for_it=wait_for_it, max_tokens=0, **options)
    else:
        ctx.invoke(run, dtype=dtype, device=device, quantization=quantization, kv_cache_dtype=kv_cache_dtype,
                   tensor_parallel_size=tensor_parallel_size, engine_args=engine_args,
                   allow_pickle_weights=allow_pickle_weights, max_tokens=0, **options)


# ---------------------------------------------------------------------------------------------------------
# the queue

@main.command()
@click.argument("file")
@click.option("-o", "--output", required=True, help="Output directory or URI (must not hold another job).")
@_job_options
@click.option("--wait", "wait_for_it", is_flag=True, help="Follow the job until it ends (as `batchgen wait`).")
def submit(file: str, output: str, wait_for_it: bool, **options) -> None:
    """Queue a job for the workers; prints its id.

    FILE is validated, the job registered, and one task per shard queued on the model's queue.
    Whole-file problems (unreadable, unknown format, no prompt column, bad template, every row invalid) are
    refused here and nothing is queued; a bad row becomes that row's error in the output.
    """
    from batchgen.workers.app import job_store, queue_name
    from batchgen.workers.submit import JobExistsError, submit_job

    spec = _job_spec(file, output, options)
    store = job_store()
    try:
        shards = submit_job(spec, store)
    except JobExistsError as exc:
        raise click.ClickException(str(exc)) from None
    _report_input(spec)
    click.echo(spec.job_id)
    click.echo(f"queued {shards:,} shard(s) on {queue_name(spec.model)}; output: {spec.output_display}", err=True)
    if not any(_serves(w.model, spec.model) for w in store.live_workers()):
        click.echo(f"note: no worker serves model {spec.model!r} yet; start one: "
                   f"batchgen worker --model {spec.model}", err=True)
    if wait_for_it:
        sys.exit(_follow(store, spec.job_id))


@main.command()
@click.argument("job_id")
@click.option("--shards", is_flag=True, help="List every started shard.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(job_id: str, shards: bool, as_json: bool) -> None:
    """Show where a job stands.

    Status, shards and rows done, tokens, and whether it is stalled (no live worker serves it, or a
    running shard's worker stopped sending heartbeats)."""
    from batchgen.workers.app import job_store

    store = job_store()
    record = _record(store, job_id)
    workers = store.live_workers()
    stall = _stall_note(store, record, workers)
    if as_json:
        click.echo(json.dumps({**record.model_dump(mode="json"), "stalled": stall}, indent=2))
        return
    serving = [w for w in workers if _serves(w.model, record.model)]
    lines = [
        ("job", record.job_id), ("status", record.status + (f"  ({stall})" if stall else "")),
        ("model", record.model), ("input", record.input), ("output", record.output),
        ("created", format_time(record.created_at)), ("started", format_time(record.started_at)),
        ("finished", format_time(record.finished_at)),
        ("shards", f"{record.shards_done:,}/{record.shards_total:,} done"),
        ("rows", f"{record.rows_done:,}/{record.rows_total:,} ({record.rows_failed:,} failed)"),
        ("tokens", f"{record.prompt_tokens:,} prompt, {record.completion_tokens:,} completion"),
        ("workers", "; ".join(_worker_line(w) for w in serving) or "-"),
    ]
    if record.error:
        lines.append(("error", record.error))
    click.echo(_aligned(lines))
    if shards:
        for shard in store.shard_records(job_id):
            click.echo(f"  shard {shard.shard_index:>5}  {shard.state:<8}  attempts {shard.attempts}  "
                       f"{shard.worker or '-'}")


@main.command()
@click.argument("job_id")
@click.option("--interval", type=click.FloatRange(0.05), default=1.0, show_default=True, help="Seconds between polls.")
@click.option("--timeout", type=click.FloatRange(0), help="Give up after this many seconds (exit code 4).")
def wait(job_id: str, interval: float, timeout: float | None) -> None:
    """Follow a job to its end with a progress bar.

    The bar shows rows/s, tokens/s and the ETA. Exit code 0 when the job completed, 1 when it failed, 3 when
    it was cancelled, 4 on --timeout."""
    from batchgen.workers.app import job_store

    sys.exit(_follow(job_store(), job_id, interval, timeout))


@main.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job; finished parts stay.

    Queued shards are dropped, running shards stop at their next engine step, parts already written stay."""
    from batchgen.workers.app import job_store

    store = job_store()
    if not store.cancel_job(job_id):
        record = _record(store, job_id)
        raise click.ClickException(f"job {job_id} already {record.status}")
    record = store.get_job(job_id)
    click.echo(f"cancelled {job_id}: {record.shards_done:,} of {record.shards_total:,} shards had finished; "
               f"their parts stay in {record.output}")


@main.command()
@click.argument("job")
def resume(job: str) -> None:
    """Queue a failed or cancelled job again.

    JOB is a job id, or the job's output directory: that also brings back a job Redis lost (restarted
    without persistence), from the job spec saved there. Shards already done are not redone."""
    from batchgen.workers.app import job_store
    from batchgen.workers.submit import resume_job

    saved_spec = load_spec(job) if is_uri(job) or os.path.isdir(job) else None
    job_id = saved_spec.job_id if saved_spec else job
    try:
        queued = resume_job(job_id, job_store(), saved_spec)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"resumed {job_id}: {queued:,} shard(s) queued")


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def list_jobs(as_json: bool) -> None:
    """List jobs, oldest first."""
    from batchgen.workers.app import job_store

    records = job_store().list_jobs()
    if as_json:
        click.echo(json.dumps([r.model_dump(mode="json") for r in records], indent=2))
        return
    rows = [("JOB", "STATUS", "MODEL", "SHARDS", "ROWS", "FAILED", "CREATED", "OUTPUT")]
    rows += [(r.job_id, r.status, r.model, f"{r.shards_done}/{r.shards_total}", f"{r.rows_done}/{r.rows_total}",
              str(r.rows_failed), format_time(r.created_at), r.output) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


@main.command()
@click.argument("job")
@click.option("--show", type=click.IntRange(0), default=0, help="Print the first N output rows.")
@click.option("--shards", is_flag=True, help="Add the per-shard table.")
def results(job: str, show: int, shards: bool) -> None:
    """Show a job's statistics and first rows.

    JOB is a job id or the job's output directory (which needs no Redis)."""
    output = _output_of(job)
    try:
        stats, partial = load_stats(output), False
    except JobOutputError:
        spec = load_spec(output)
        sampling, sources = spec.effective_sampling()
        stats = merge_stats(read_shard_stats(output), job_id=spec.job_id, model=spec.model, sampling=sampling,
                            sampling_sources=sources, row_sampling=spec.summary.row_sampling)
        partial = True
    click.echo(render_stats(stats, per_shard=shards))
    parts = list_parts(output)
    click.echo(f"{'output':<17}  {_join(redact_url(output), PARTS_DIR + '/')} ({len(parts)} part(s))")
    if partial:
        click.echo("(the job has not finished: figures cover the parts written so far)")
    for record in _first_rows(output, parts, show):
        click.echo("")
        click.echo(_row_text(record))


# ---------------------------------------------------------------------------------------------------------
# processes

@main.command()
@click.option("--model", default="default", show_default=True, help="The model this worker serves (its queue).")
@click.option("--gpu", help="GPU index, or a comma-separated list: one worker process per GPU, or per group of "
                            "--tensor-parallel-size GPUs.")
@click.option("--concurrency", type=click.IntRange(1), default=2, show_default=True,
              help="Shard tasks in flight per process (they share one engine).")
@engine_options
@click.option("--loglevel", default="INFO", show_default=True)
def worker(model: str, gpu: str | None, concurrency: int, dtype: str, device: str, quantization: str | None,
           kv_cache_dtype: str, tensor_parallel_size: int, engine_args: dict, allow_pickle_weights: bool,
           loglevel: str) -> None:
    """Serve one model's shards from the queue.

    The model is loaded once per process and reused for every shard; --gpu 0,1 starts one process per GPU,
    --gpu 0,1,2,3 --tensor-parallel-size 2 one per GPU pair (0,1 and 2,3)."""
    groups = gpu_groups([g.strip() for g in (gpu or "").split(",") if g.strip()], tensor_parallel_size)
    if len(groups) > 1:
        sys.exit(_worker_per_group(groups, [
            sys.executable, "-m", "batchgen.cli", "worker", "--model", model, "--concurrency", str(concurrency),
            "--dtype", dtype, "--device", device, "--tensor-parallel-size", str(tensor_parallel_size),
            "--loglevel", loglevel,
            *(f"--engine-arg={name}={json.dumps(value)}" for name, value in engine_args.items()),
            *(["--quantization", quantization] if quantization else []),
            *(["--kv-cache-dtype", kv_cache_dtype] if kv_cache_dtype != "auto" else []),
            *(["--allow-pickle-weights"] if allow_pickle_weights else [])]))
    if groups:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(groups[0])
    os.environ.update(BATCHGEN_MODEL=model, BATCHGEN_ENGINE_ARGS=json.dumps(
        engine_settings(dtype, device, quantization, kv_cache_dtype, tensor_parallel_size, engine_args,
                         allow_pickle_weights)))
    from batchgen.workers import tasks
    from batchgen.workers.app import app, queue_name

    _load_model(model, tasks.load_executor)   # before taking tasks: a bad model fails here, once
    app.worker_main(["worker", "--queues", queue_name(model), "--pool", "threads",
                     "--concurrency", str(concurrency), "--hostname", f"batchgen-{os.getpid()}@%h",
                     "--loglevel", loglevel, "--without-gossip", "--without-mingle"])


@main.command()
@click.option("--definitions", required=True, type=click.Path(exists=True, file_okay=False),
              help="Directory of scheduled job definitions (*.yaml, *.yml, *.json).")
@click.option("--schedule-file", help="Where beat records last run times [default: in the batchgen cache].")
@click.option("--loglevel", default="INFO", show_default=True)
def beat(definitions: str, schedule_file: str | None, loglevel: str) -> None:
    """Fire scheduled job definitions (Celery beat).

    Each firing submits a job for every input file the definition has not processed before."""
    from batchgen.default_model import cache_dir
    from batchgen.workers.app import app, key_prefix
    from batchgen.workers.schedules import beat_schedule, load_definitions

    try:
        found = load_definitions(definitions)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    if not found:
        raise click.ClickException(f"{definitions}: no definition files (*.yaml, *.yml, *.json)")
    for definition in found:
        click.echo(f"schedule {definition.name}: {definition.cron or f'every {definition.every_seconds:g} s'}, "
                   f"{definition.input} -> {definition.output}", err=True)
    app.conf.beat_schedule = beat_schedule(found)
    if schedule_file is None:
        schedule_file = str(cache_dir() / f"beat-{key_prefix()}.schedule")
    os.makedirs(os.path.dirname(os.path.abspath(schedule_file)), exist_ok=True)
    app.Beat(schedule=schedule_file, loglevel=loglevel).run()


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
def serve(host: str, port: int) -> None:
    """Serve OpenAI's Batch API, the jobs dashboard (/) and metrics (/metrics).

    \b
    Keys: BATCHGEN_API_KEYS=key1,key2 or BATCHGEN_API_KEYS_FILE (one tenant per key).
    Files and outputs: BATCHGEN_API_STORAGE (a directory or a pyarrow filesystem URI).
    Point an OpenAI client at it: OpenAI(base_url="http://HOST:PORT/v1", api_key=KEY)."""
    import uvicorn

    from batchgen.api.app import create_app
    from batchgen.api.settings import ApiSettings
    from batchgen.workers.app import job_store

    try:
        app = create_app(ApiSettings.from_env(), job_store())
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    uvicorn.run(app, host=host, port=port, log_level="warning")


def gpu_groups(gpus: list[str], tensor_parallel_size: int) -> list[list[str]]:
    """The GPUs of each worker process: consecutive runs of `tensor_parallel_size` from the --gpu list (GPUs
    listed next to each other are usually the ones NVLink joins)."""
    if len(gpus) % tensor_parallel_size:
        raise click.UsageError(f"--gpu lists {len(gpus)} GPU(s) ({','.join(gpus)}), not a multiple of "
                               f"--tensor-parallel-size {tensor_parallel_size}: each worker takes "
                               f"{tensor_parallel_size} GPUs")
    return [gpus[first:first + tensor_parallel_size] for first in range(0, len(gpus), tensor_parallel_size)]


def _worker_per_group(groups: list[list[str]], command: list[str]) -> int:
    """One child worker per GPU group, seeing only its group's GPUs (as cuda:0, cuda:1, ...); signals are passed
    on so a stop stops them all (each finishes its shards)."""
    children = [subprocess.Popen(command, env={**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(group)})
                for group in groups]

    def forward(signum, _frame):
        for child in children:
            child.send_signal(signum)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, forward)
    return max(child.wait() for child in children)


# ---------------------------------------------------------------------------------------------------------
# helpers

def _load_model(model: str, load):
    """`load()`, with a model that isn't there or can't be read reported as one line."""
    click.echo(f"loading model {model} ...", err=True)
    try:
        return load()
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot load model {model!r}: {exc}") from None


def _record(store, job_id: str):
    record = store.get_job(job_id)
    if record is None:
        raise click.ClickException(f"no job {job_id}")
    return record


def _follow(store, job_id: str, interval: float = 1.0, timeout: float | None = None) -> int:
    """Poll until the job ends, drawing the progress bar; the exit code for how it ended."""
    progress = _Progress()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        record = _record(store, job_id)
        progress.update(record)
        if record.finished:
            break
        if deadline is not None and time.monotonic() >= deadline:
            progress.close()
            click.echo(f"job {job_id} still {record.status} after {timeout:g} s", err=True)
            return EXIT_TIMEOUT
        time.sleep(interval)
    progress.close()
    if record.status == "completed":
        click.echo(f"job {job_id} completed: {record.rows_done:,} rows ({record.rows_failed:,} failed); "
                   f"output: {record.output}", err=True)
        return 0
    click.echo(f"job {job_id} {record.status}" + (f": {record.error}" if record.error else ""), err=True)
    return EXIT_CANCELLED if record.status == "cancelled" else EXIT_FAILED


class _Progress:
    """A progress bar on stderr: redrawn in place on a terminal, a new line per change otherwise."""

    def __init__(self):
        self.tty = sys.stderr.isatty()
        self.last = None

    def update(self, record) -> None:
        line = _progress_line(record)
        if line == self.last:
            return
        self.last = line
        if self.tty:
            click.echo("\r" + line.ljust(100), nl=False, err=True)
        else:
            click.echo(line, err=True)

    def close(self) -> None:
        if self.tty and self.last is not None:
            click.echo("", err=True)


def _progress_line(record) -> str:
    done, total = record.rows_done, record.rows_total
    filled = _PROGRESS_WIDTH * done // total if total else 0
    line = f"[{'#' * filled}{'.' * (_PROGRESS_WIDTH - filled)}] {done:,}/{total:,} rows"
    rates = record.rates()
    if rates is not None:
        line += f"  {rates.rows_per_s:,.1f} rows/s  {rates.tokens_per_s:,.1f} tok/s"
        if rates.eta_s is not None:
            line += f"  ETA {_duration(rates.eta_s)}"
    return f"{line}  {record.status}"


def _stall_note(store, record, workers) -> str | None:
    """Why an unfinished job isn't moving, if it can be told: no live worker serves its model, or a shard's
    worker stopped sending heartbeats (a live worker puts its shard back on the queue within a heartbeat TTL)."""
    if record.finished:
        return None
    if not any(_serves(w.model, record.model) for w in workers):
        return f"stalled: no live worker serves model {record.model!r}"
    lost = [shard for _, shard in store.lost_shards(record.job_id)]
    if lost:
        return (f"shard(s) {', '.join(str(s.shard_index) for s in lost[:5])} lost their worker "
                f"({lost[0].worker}); they will be run again")
    return None


def _serves(worker_model: str | None, model: str) -> bool:
    from batchgen.workers.app import queue_name

    return worker_model is not None and queue_name(worker_model) == queue_name(model)


def _worker_line(worker) -> str:
    doing = f" on {worker.job_id}/{worker.shard_index}" if worker.job_id else ""
    return f"{worker.worker_id} ({worker.gpu or '?'}){doing}"


def _output_of(job: str) -> str:
    """The output location of a job id, or the argument itself when it is a directory or URI."""
    if is_uri(job) or os.path.isdir(job):
        return job
    from batchgen.workers.app import job_store

    spec = job_store().get_spec(job)
    if spec is None:
        raise click.ClickException(f"no job or output directory {job}")
    return spec.output


def _first_rows(output: str, parts: list[tuple[int, str]], count: int):
    import pyarrow.parquet as pq

    fs, _ = filesystem(output)
    for _, path in parts:
        if count <= 0:
            return
        with fs.open_input_file(path) as source:
            for batch in pq.ParquetFile(source).iter_batches(batch_size=count):
                for record in batch.to_pylist()[:count]:
                    yield record
                    count -= 1
                if count <= 0:
                    return


def _row_text(record: dict) -> str:
    if record.get("error"):
        return f"[{record['id']}] error: {record['error']}"
    texts, reasons = record["text"], record["finish_reason"]
    head = f"[{record['id']}] {record['prompt_tokens']} prompt + {record['completion_tokens']} completion tokens"
    if not isinstance(texts, list):
        return f"{head}, {reasons}\n{_indent(texts)}"
    return head + "".join(f"\n  ({i}) {reason}\n{_indent(text, 4)}"
                          for i, (text, reason) in enumerate(zip(texts, reasons)))


def _indent(text: str, width: int = 2) -> str:
    return "\n".join(" " * width + line for line in (text or "").splitlines() or [""])


def _aligned(lines: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in lines)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in lines)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _join(location: str, name: str) -> str:
    return location.rstrip("/") + "/" + name


if __name__ == "__main__":
    main()
