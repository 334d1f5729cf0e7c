"""Jobs with the model's sampling defaults (run/submit/OpenAI lines), recorded in the job so a resumed job
samples the same way, and scoring jobs (prompt-only) against Hugging Face transformers' perplexity."""
import json
import math
import re
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from batchgen import LLM
from batchgen.cli import main
from batchgen.jobs.execute import Executor, run_job_locally
from batchgen.jobs.output_dir import load_spec, load_stats

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
FILE_SAMPLING = {"temperature": 1.7, "top_p": 0.85, "top_k": 40}


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def read_output(output: Path):
    return pq.read_table(output / "parts")


def texts(output: Path) -> list[str]:
    return read_output(output).column("text").to_pylist()


@pytest.fixture(scope="module")
def sampling_model_dir(model_dir_with_sampling):
    """A tiny model whose generation_config.json sets temperature / top_p / top_k (without do_sample)."""
    return model_dir_with_sampling(**FILE_SAMPLING)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("job-prompts") / "prompts.jsonl"
    rows = [{"id": f"r{i}", "prompt": f"Tell me about item {i} and"} for i in range(4)]
    rows.append({"id": "cold", "prompt": "A row of its own", "temperature": 0.0})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_run_takes_the_model_sampling_and_records_where_each_value_came_from(sampling_model_dir, prompts_file,
                                                                            tmp_path):
    common = [prompts_file, "--model", sampling_model_dir, "--max-tokens", 8, "--seed", 3]
    cli("run", *common, "-o", tmp_path / "model")
    cli("run", *common, "-o", tmp_path / "explicit", "--generation-config", "none", "--temperature", 1.7,
        "--top-p", 0.85, "--top-k", 40)
    cli("run", *common, "-o", tmp_path / "neutral", "--generation-config", "none")
    assert texts(tmp_path / "model") == texts(tmp_path / "explicit")
    assert texts(tmp_path / "model")[:4] != texts(tmp_path / "neutral")[:4]
    assert texts(tmp_path / "model")[4] == texts(tmp_path / "neutral")[4]      # the row's temperature 0 wins

    stats = load_stats(str(tmp_path / "model"))
    assert stats.sampling == {"max_tokens": 8, "seed": 3, "temperature": 1.7, "top_p": 0.85, "top_k": 40,
                              "min_p": 0.0, "repetition_penalty": 1.0}
    assert stats.sampling_sources == {"max_tokens": "job", "seed": "job", "temperature": "model", "top_p": "model",
                                      "top_k": "model", "min_p": "default", "repetition_penalty": "default"}
    assert stats.row_sampling == {"temperature": 1}
    assert load_stats(str(tmp_path / "neutral")).sampling_sources["temperature"] == "default"
    shown = cli("results", tmp_path / "model").output
    assert "temperature=1.7 (model)" in shown and "set by rows: temperature (1)" in shown


def test_openai_lines_without_sampling_fields_take_the_model_defaults(sampling_model_dir, tmp_path):
    lines = tmp_path / "batch.jsonl"
    bodies = [{"prompt": "Once upon a time", "max_tokens": 8, "seed": 5},
              {"prompt": "Once upon a time", "max_tokens": 8, "seed": 5, **FILE_SAMPLING}]
    lines.write_text("".join(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                                         "body": body}) + "\n" for i, body in enumerate(bodies)))
    cli("run", lines, "--model", sampling_model_dir, "-o", tmp_path / "with-model")
    cli("run", lines, "--model", sampling_model_dir, "-o", tmp_path / "neutral", "--generation-config", "none")
    with_model, neutral = texts(tmp_path / "with-model"), texts(tmp_path / "neutral")
    assert with_model[0] == with_model[1] == neutral[1]
    assert neutral[0] != neutral[1]


def test_a_resumed_job_samples_as_recorded_even_if_the_model_file_changed(sampling_model_dir, prompts_file,
                                                                         tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(sampling_model_dir, model_dir)
    out = tmp_path / "out"
    cli("submit", prompts_file, "--model", model_dir, "-o", out, "--max-tokens", 8, "--seed", 3)
    spec = load_spec(str(out))
    assert spec.model_sampling == FILE_SAMPLING          # recorded at submit, from the model's directory
    first = run_job_locally(spec, Executor.for_llm(LLM(str(model_dir))))
    assert first.status == "completed"
    before = texts(out)

    (model_dir / "generation_config.json").write_text(json.dumps({"temperature": 0.3}))
    shutil.rmtree(out / "parts")
    changed = LLM(str(model_dir))
    assert changed.engine.default_sampling == {"temperature": 0.3}
    assert run_job_locally(load_spec(str(out)), Executor.for_llm(changed)).status == "completed"
    assert texts(out) == before
    # a job whose submitter could not read the model takes the worker's model's values
    unrecorded = load_spec(str(out)).model_copy(update={"model_sampling": None})
    shutil.rmtree(out / "parts")
    run_job_locally(unrecorded, Executor.for_llm(changed))
    assert texts(out)[:4] != before[:4]


def scoring_rows(count: int) -> list[str]:
    """Short snippets of the sample files' text: chat questions, article sentences, reviews."""
    pieces = []
    for line in (SAMPLES / "chat.jsonl").read_text().splitlines():
        pieces += [m["content"] for m in json.loads(line)["messages"]]
    pieces += pq.read_table(SAMPLES / "articles.parquet").column("text").to_pylist()
    for path in (SAMPLES / "extraction" / "incoming").glob("*.jsonl"):
        pieces += [json.loads(line)["review"] for line in path.read_text().splitlines() if line.strip()]
    words = " ".join(pieces).split()
    rows = []
    for i in range(count):
        start, length = (7 * i) % (len(words) - 8), 2 + i % 6
        rows.append(" ".join(words[start:start + length]))
    return rows


def hf_perplexities(model_dir: Path, texts_: list[str], batch_size: int = 250) -> list[float]:
    """exp(-mean log p(token | the tokens before it)) from HF's fp32 forward pass, right-padded batches."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    encoded = [tokenizer(text)["input_ids"] for text in texts_]
    perplexities = []
    for first in range(0, len(encoded), batch_size):
        batch = encoded[first:first + batch_size]
        width = max(len(ids) for ids in batch)
        ids = torch.tensor([ids + [0] * (width - len(ids)) for ids in batch])
        mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in batch])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids, attention_mask=mask).logits.float(), dim=-1)
        for row, tokens in enumerate(batch):
            scored = logprobs[row, torch.arange(len(tokens) - 1), torch.tensor(tokens[1:], dtype=torch.long)]
            perplexities.append(math.exp(-scored.sum().item() / (len(tokens) - 1)))
    return perplexities


@pytest.mark.slow   # 1,000 rows through the engine and HF
def test_scoring_job_over_1000_sample_rows_matches_hf_perplexity(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("llama")
    rows = scoring_rows(1000)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"id": i, "prompt": text}) + "\n" for i, text in enumerate(rows)))
    cli("score", data, "--model", model_dir, "-o", tmp_path / "scored", "--shard-size", 500)
    table = read_output(tmp_path / "scored")
    assert "prompt_logprobs" not in table.column_names          # asked for with --prompt-logprobs only
    assert table.column("completion_tokens").to_pylist() == [0] * 1000
    assert table.column("scored_tokens").to_pylist() == [n - 1 for n in table.column("prompt_tokens").to_pylist()]
    got = torch.tensor(table.column("perplexity").to_pylist(), dtype=torch.float64)
    expected = torch.tensor(hf_perplexities(model_dir, rows), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=0)
    totals = torch.tensor(table.column("total_logprob").to_pylist(), dtype=torch.float64)
    torch.testing.assert_close(torch.exp(-totals / torch.tensor(table.column("scored_tokens").to_pylist())), got)


def test_prompt_logprobs_column_and_bad_values(tiny_model_dir, prompts_file, tmp_path):
    model_dir = tiny_model_dir("llama")
    cli("run", prompts_file, "--model", model_dir, "-o", tmp_path / "out", "--max-tokens", 2,
        "--prompt-logprobs", 2)
    table = read_output(tmp_path / "out")
    first = table.column("prompt_logprobs").to_pylist()[0]
    assert first[0] is None and len(first) == table.column("prompt_tokens").to_pylist()[0]
    assert all(len(entry["top"]) == 2 for entry in first[1:])
    assert table.column("completion_tokens").to_pylist() == [2] * 5
    for value, message in (("-1", "--prompt-logprobs"), ("21", "--prompt-logprobs")):
        result = CliRunner().invoke(main, ["submit", str(prompts_file), "-o", str(tmp_path / "bad"),
                                           "--prompt-logprobs", value])
        assert result.exit_code != 0 and re.search(message, result.output)
    bad_row = tmp_path / "bad_row.jsonl"
    bad_row.write_text(json.dumps({"id": "x", "prompt": "hi", "prompt_logprobs": 50}) + "\n"
                       + json.dumps({"id": "y", "prompt": "hi", "max_tokens": 0}) + "\n"
                       + json.dumps({"id": "z", "prompt": "hi"}) + "\n")
    cli("run", bad_row, "--model", model_dir, "-o", tmp_path / "rows", "--max-tokens", 2)
    errors = read_output(tmp_path / "rows").column("error").to_pylist()
    assert "field 'prompt_logprobs'" in errors[0] and "less than or equal to 20" in errors[0]
    assert "field 'max_tokens'" in errors[1] and "scoring" in errors[1]
    assert errors[2] is None


# The sample chat job on the embedded model at its card's sampling (temperature 0.2, top_p 0.9) and seed 0: a
# change of defaults (or of sampling) shows here. The README quotes these outputs.
PINNED_CHAT_OUTPUTS = {
    "capital-france": "The capital of France is Paris.",
    "three-colors": "The primary colors are: Red, Blue, and Yellow.",
    "haiku-sea": "The waves of the sea, a silent beauty,\nA",
    "python-reverse": "You can reverse a list in Python using slicing with a negative",
    "water-boils": "Water boils at a temperature of approximately 100\u00b0",
    "pirate-greeting": "A pleasure to meet you. I'm Captain Blackbeard",
    "sky-blue": "The sky is blue because of a process called Rayleigh Sc",
    "translate-thanks": "In Spanish, \"thank you\" is \"reciendo",
}


@pytest.mark.slow   # the 135M default model
def test_sample_chat_job_at_the_default_model_sampling_is_pinned(default_model_dir, tmp_path):
    cli("run", SAMPLES / "chat.jsonl", "-o", tmp_path / "chat", "--seed", 0, "--max-tokens", 12)
    table = read_output(tmp_path / "chat")
    assert dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist())) == PINNED_CHAT_OUTPUTS
    stats = load_stats(str(tmp_path / "chat"))
    assert (stats.sampling["temperature"], stats.sampling["top_p"]) == (0.2, 0.9)
    assert stats.sampling_sources["temperature"] == stats.sampling_sources["top_p"] == "model"


def test_an_earlier_conversion_of_the_default_model_gets_the_recommended_sampling(default_model_dir, tmp_path,
                                                                                monkeypatch):
    from batchgen.default_model import DEFAULT_MODEL_NAME, RECOMMENDED_SAMPLING, converted_default_model

    old = tmp_path / "models" / DEFAULT_MODEL_NAME
    old.mkdir(parents=True)
    shutil.copy(default_model_dir / "config.json", old)
    (old / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    monkeypatch.setenv("BATCHGEN_CACHE", str(tmp_path))
    assert converted_default_model() == old
    assert json.loads((old / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2,
                                                                       **RECOMMENDED_SAMPLING}


def test_submit_refuses_a_model_with_bad_sampling_values(model_dir_with_sampling, prompts_file, tmp_path):
    model_dir = model_dir_with_sampling(top_p=1.5)
    result = CliRunner().invoke(main, ["submit", str(prompts_file), "--model", str(model_dir), "-o",
                                       str(tmp_path / "out")])
    assert result.exit_code == 1
    assert f"{model_dir / 'generation_config.json'}: field 'top_p'" in result.output
    assert not (tmp_path / "out").exists()
