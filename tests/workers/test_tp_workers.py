"""Tensor parallelism as users meet it: `batchgen worker --gpu ... --tensor-parallel-size N` starts one worker per
GPU group (the real parent command, with a stand-in child that records what it was started with), the GPU label
in shard stats names the whole group, the memory check before loading, and the compose file's TP service."""
import functools
import json
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from click.testing import CliRunner
from compose_spec import PyCompose

from batchgen.cli import gpu_groups, main
from batchgen.jobs import execute
from batchgen.jobs.output_dir import load_stats, read_shard_stats
from batchgen.jobs.stats import render_stats
from batchgen.models import loader
from batchgen.models.linear import Linear
from batchgen.preflight import check_weights_fit

from test_deployment import REPO, _compose, _interpolate
from test_execute import FakeEngine, FakeTokenizer, job, prompts  # noqa: F401  (job: a fixture)

MULTICAST_OFF_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@pytest.mark.parametrize("gpus, size, groups", [
    ("0,1,2,3", 2, [["0", "1"], ["2", "3"]]),
    ("0,1,2,3", 4, [["0", "1", "2", "3"]]),
    ("4,5,6", 1, [["4"], ["5"], ["6"]]),
    ("", 2, []),
])
def test_gpu_groups_are_consecutive_runs_of_the_tensor_parallel_size(gpus, size, groups):
    assert gpu_groups(gpus.split(",") if gpus else [], size) == groups


def test_a_gpu_list_that_does_not_split_into_groups_is_refused_before_anything_starts():
    result = CliRunner().invoke(main, ["worker", "--model", "m", "--gpu", "0,1,2", "--tensor-parallel-size", "2"])
    assert result.exit_code == 2
    assert "--gpu lists 3 GPU(s) (0,1,2), not a multiple of --tensor-parallel-size 2" in result.output


def test_worker_starts_one_child_per_gpu_group_seeing_only_its_group(tmp_path):
    """The real `batchgen worker` parent; its children (started as `sys.executable -m batchgen.cli worker ...`)
    are a script that records its arguments and CUDA_VISIBLE_DEVICES."""
    child = tmp_path / "child"
    child.write_text('#!/bin/sh\nprintf "%s\\n" "$CUDA_VISIBLE_DEVICES" "$@" > "$RECORDS/$$"\n')
    child.chmod(0o755)
    records = tmp_path / "records"
    records.mkdir()
    args = ["worker", "--model", "m", "--gpu", "0,1,2,3", "--tensor-parallel-size", "2", "--concurrency", "3",
            "--quantization", "fp8", "--engine-arg", "max_num_seqs=64"]
    parent = (f"import sys; sys.executable = {str(child)!r}; sys.argv = ['batchgen', *{args!r}]; "
              "from batchgen.cli import main; main()")
    subprocess.run([sys.executable, "-c", parent], check=True, timeout=60, env={**os.environ, "RECORDS": str(records)})

    started = {}
    for record in records.iterdir():
        visible, *argv = record.read_text().splitlines()
        started[visible] = argv
    assert sorted(started) == ["0,1", "2,3"]
    for argv in started.values():
        assert argv[:3] == ["-m", "batchgen.cli", "worker"] and "--gpu" not in argv
        # the child is a valid worker invocation carrying the parent's settings
        context = main.get_command(None, "worker").make_context("worker", argv[3:])
        assert context.params | {"gpu": "0,1,2,3"} == main.get_command(None, "worker").make_context(
            "worker", args[1:]).params


def test_stats_of_a_tensor_parallel_worker_name_every_gpu_of_its_group(job, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"Card {index}")   # no GPU here
    engine = SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.bfloat16, default_sampling={},
                             config=SimpleNamespace(tensor_parallel_size=2))
    executor = execute.Executor.for_llm(SimpleNamespace(engine=engine, tokenizer=FakeTokenizer()), FakeEngine())
    assert executor.gpu == "cuda:2,3 Card 0"

    spec = job(prompts(3))
    execute.run_job_locally(spec, executor)
    [shard] = read_shard_stats(spec.output)
    assert shard.gpu == "cuda:2,3 Card 0"
    assert re.search(r"workers\s+\S+ cuda:2,3 Card 0", render_stats(load_stats(spec.output)))


def test_single_gpu_label_is_unchanged(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,6")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index: f"Card {index}")
    assert execute.device_label(torch.device("cuda", 1)) == "cuda:6 Card 1"
    assert execute.device_label(torch.device("cpu")) == "cpu"


def test_run_with_two_ranks_writes_the_rows_of_one(tiny_model_dir, tmp_path):
    """`batchgen run --tensor-parallel-size 2` on the CPU (two gloo ranks): greedy rows equal one rank's, and
    the shard stats say which ran them."""
    lines = "".join(json.dumps({"id": f"r{i}", "prompt": f"count with me: {i}, {i + 1},"}) + "\n" for i in range(6))
    (tmp_path / "in.jsonl").write_text(lines)
    rows, labels = {}, {}
    for size in (1, 2):
        out = tmp_path / f"tp{size}"
        result = CliRunner().invoke(main, ["run", str(tmp_path / "in.jsonl"), "-o", str(out), "--model",
                                           str(tiny_model_dir("llama")), "--device", "cpu", "--temperature", "0",
                                           "--max-tokens", "8", "--tensor-parallel-size", str(size)])
        assert result.exit_code == 0, result.output
        rows[size] = pq.read_table(out / "parts").sort_by("id").select(["id", "text", "completion_tokens"])
        [labels[size]] = {shard.gpu for shard in read_shard_stats(str(out))}
    assert rows[2].to_pylist() == rows[1].to_pylist()
    assert labels == {1: "cpu", 2: "cpu x2"}


# ---------------------------------------------------------------------------------------------------------
# the memory check: load_model's own call, given the free memory; the bytes it counts are the loaded model's

def loaded_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("arch, dtype, quantization", [
    ("llama", "float32", None), ("qwen3", "bfloat16", None), ("llama", "bfloat16", "fp8"),
])
def test_weights_that_do_not_fit_fail_before_loading(tiny_model_dir, monkeypatch, arch, dtype, quantization):
    path = tiny_model_dir(arch)
    model, _ = loader.load_model(path, dtype, "cpu", quantization=quantization)
    needed = loaded_bytes(model)

    monkeypatch.setattr(loader, "check_weights_fit", functools.partial(check_weights_fit, free_bytes=needed))
    loader.load_model(path, dtype, "cpu", quantization=quantization)            # exactly enough
    monkeypatch.setattr(loader, "check_weights_fit", functools.partial(check_weights_fit, free_bytes=needed - 1))
    with pytest.raises(ValueError) as error:
        loader.load_model(path, dtype, "cpu", quantization=quantization)
    message = str(error.value)
    assert f"need {needed / 2**30:.1f} GiB per GPU at tensor-parallel size 1" in message
    assert f"cpu has {(needed - 1) / 2**30:.1f} GiB free" in message
    assert "--tensor-parallel-size 2" in message
    assert ("--quantization fp8" in message) == (quantization is None)


def test_the_memory_check_names_the_next_tensor_parallel_size():
    with torch.device("meta"):
        layer = Linear(1024, 1024, bias=False, parallel="column")
    layer.tp_size = 2        # as rank 0 of 2 builds it
    with pytest.raises(ValueError, match=r"need 0\.0 GiB per GPU at tensor-parallel size 2, but cuda:1 has 0\.0 GiB "
                                         r"free .*--tensor-parallel-size 4"):
        check_weights_fit(layer, torch.device("cuda", 1), torch.bfloat16, free_bytes=0)


def test_cpu_is_not_checked_without_a_free_memory_figure():
    with torch.device("meta"):
        model = torch.nn.Linear(1 << 20, 1 << 20)          # 4 TiB of fp32
    check_weights_fit(model, torch.device("cpu"), torch.float32)


# ---------------------------------------------------------------------------------------------------------
# docker-compose.yml: NVLink multicast off in GPU workers; the commented TP=2 service is valid once uncommented

def _tp_service_uncommented() -> dict:
    """The compose file with the commented worker-tp2 block turned on."""
    lines = (REPO / "docker-compose.yml").read_text().splitlines()
    start = lines.index("  # worker-tp2:")
    block = []
    for line in lines[start:]:
        if not line.startswith("  #"):
            break
        block.append("  " + line.removeprefix("  #").removeprefix(" "))
    text = "\n".join(lines[:start] + block + lines[start + len(block):])
    return yaml.safe_load(_interpolate(text))


def test_gpu_workers_keep_nvlink_multicast_off():
    workers = {name: s for name, s in _compose()["services"].items() if name.startswith("worker-")}
    for name, service in workers.items():
        assert MULTICAST_OFF_ENV.items() <= service["environment"].items(), name


def test_commented_tensor_parallel_service_is_a_valid_two_gpu_worker():
    compose = _tp_service_uncommented()
    PyCompose.from_yaml(json.dumps(compose))             # the Compose Specification
    service = compose["services"]["worker-tp2"]
    [device] = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 2
    others = [d for name, s in compose["services"].items() if name.startswith("worker-gpu")
              for d in s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]]
    assert not set(device["device_ids"]) & set(others)
    assert MULTICAST_OFF_ENV.items() <= service["environment"].items()
    args = service["command"]
    context = main.get_command(None, args[0]).make_context(args[0], args[1:])
    assert context.params["tensor_parallel_size"] == 2 and context.params["gpu"] is None
