"""The sampling a model ships in its generation_config.json, as SamplingParams defaults.

Model authors tune temperature / top-p / top-k there (Llama-3.1-Instruct: 0.6 / 0.9); vLLM and transformers
apply them unless the caller says otherwise, and so does batchgen. Like vLLM, the values apply whether or not
the file also says `do_sample: true`; `do_sample: false` means greedy. Bad values are refused at load, naming
the field and the file.
"""
import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from batchgen.sampling_params import SamplingParams

# generation_config.json name -> SamplingParams field
GENERATION_CONFIG_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                            "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
# what each of those fields is when nobody sets it
NEUTRAL_SAMPLING = {field: SamplingParams.model_fields[field].default for field in GENERATION_CONFIG_FIELDS.values()}


def model_sampling_defaults(model_dir: str | Path) -> dict[str, Any]:
    """SamplingParams fields from the directory's generation_config.json ({} without one). Raises ValueError
    naming the file and field for a value SamplingParams would refuse."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object")
    defaults = {field: config[name] for name, field in GENERATION_CONFIG_FIELDS.items() if config.get(name) is not None}
    do_sample = config.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise ValueError(f"{path}: field 'do_sample' must be true or false, got {do_sample!r}")
    if do_sample is False:
        defaults["temperature"] = 0.0
    if defaults.get("top_k") == -1:   # vLLM's spelling of "off"
        defaults["top_k"] = 0
    for name, field in GENERATION_CONFIG_FIELDS.items():
        if field in defaults:
            try:
                SamplingParams.model_validate({field: defaults[field]}, strict=True)
            except ValidationError as exc:
                message = exc.errors()[0]["msg"].removeprefix("Value error, ")
                raise ValueError(f"{path}: field '{name}': {message} (got {defaults[field]!r})") from None
    return defaults


def local_model_sampling(model: str) -> dict[str, Any] | None:
    """`model_sampling_defaults` of a model named as `batchgen.models.loader.resolve_model_path` takes it, when
    its files can be read here without converting or downloading anything (the converted default model, a
    directory, a hub model in the local cache); None when they can't."""
    from batchgen.default_model import converted_default_model

    if model == "default":
        model_dir = converted_default_model()
        return None if model_dir is None else model_sampling_defaults(model_dir)
    if Path(model).expanduser().is_dir():
        return model_sampling_defaults(Path(model).expanduser())
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(model, "generation_config.json")
    except ValueError:   # not a valid hub id: the worker says so when it loads the model
        return None
    return model_sampling_defaults(Path(cached).parent) if isinstance(cached, str) else None


def with_defaults(params: SamplingParams, defaults: dict[str, Any]) -> SamplingParams:
    """`params` with every field in `defaults` that the caller did not set explicitly taken from there."""
    missing = {field: value for field, value in defaults.items() if field not in params.model_fields_set}
    if not missing:
        return params
    explicit = {field: getattr(params, field) for field in params.model_fields_set}
    return SamplingParams(**missing, **explicit)
