"""Sampling defaults from the model's generation_config.json: unset SamplingParams fields take them, explicit
values win, generation_config="none" restores the neutral defaults, bad files are refused at load."""
import json
import shutil

import pytest

from batchgen import LLM, SamplingParams
from batchgen.generation_config import model_sampling_defaults

FILE_SAMPLING = {"temperature": 1.7, "top_p": 0.85, "top_k": 40}
PROMPTS = [[5, 17, 300, 42], [9, 8, 7], [1200, 33, 44, 55, 66, 77]]


@pytest.fixture(scope="module")
def sampling_model_dir(model_dir_with_sampling):
    """A tiny model whose generation_config.json sets temperature / top_p / top_k (without do_sample)."""
    return model_dir_with_sampling(**FILE_SAMPLING)


def tokens(llm: LLM, params) -> list[list[int]]:
    outputs = llm.generate(PROMPTS, params)
    assert all(o.error is None for o in outputs)
    return [o.outputs[0].token_ids for o in outputs]


def test_file_values_are_the_defaults_and_explicit_values_win(sampling_model_dir):
    with_file = LLM(str(sampling_model_dir))
    neutral = LLM(str(sampling_model_dir), generation_config="none")
    assert with_file.engine.default_sampling == FILE_SAMPLING
    assert neutral.engine.default_sampling == {}

    seeded = SamplingParams(max_tokens=12, seed=7)
    from_file = tokens(with_file, seeded)
    assert from_file == tokens(neutral, SamplingParams(max_tokens=12, seed=7, **FILE_SAMPLING))
    assert from_file != tokens(neutral, seeded)
    # an explicit value beats the file's, the others still come from it
    assert tokens(with_file, SamplingParams(max_tokens=12, seed=7, temperature=0.4)) == \
        tokens(neutral, SamplingParams(max_tokens=12, seed=7, **{**FILE_SAMPLING, "temperature": 0.4}))
    # explicitly neutral is explicit too
    assert tokens(with_file, SamplingParams(max_tokens=12, seed=7, temperature=1.0, top_p=1.0, top_k=0)) == \
        tokens(neutral, seeded)


@pytest.mark.parametrize("content, expected", [
    ({"do_sample": False, "temperature": 0.6, "top_p": 0.9}, {"temperature": 0.0, "top_p": 0.9}),
    ({"do_sample": True, "temperature": 0.6, "max_new_tokens": 100, "min_p": 0.05, "repetition_penalty": 1.1},
     {"temperature": 0.6, "max_tokens": 100, "min_p": 0.05, "repetition_penalty": 1.1}),
    ({"top_k": -1, "top_p": None, "bos_token_id": 1}, {"top_k": 0}),
    ({"eos_token_id": 2}, {}),
])
def test_generation_config_parsing(tmp_path, content, expected):
    (tmp_path / "generation_config.json").write_text(json.dumps(content))
    assert model_sampling_defaults(tmp_path) == expected


@pytest.mark.parametrize("content, field", [
    ({"temperature": -0.5}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"top_k": 2.5}, "top_k"),
    ({"temperature": "hot"}, "temperature"), ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"do_sample": "yes"}, "do_sample"),
])
def test_bad_generation_config_is_refused_at_load_naming_field_and_file(sampling_model_dir, tmp_path, content,
                                                                        field):
    model_dir = tmp_path / "model"
    shutil.copytree(sampling_model_dir, model_dir)
    (model_dir / "generation_config.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match=f"generation_config.json: field '{field}'"):
        LLM(str(model_dir))
    LLM(str(model_dir), generation_config="none")   # the switch also skips the file's sampling
