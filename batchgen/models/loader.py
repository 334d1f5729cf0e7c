"""Find a model directory and build a batchgen model from it."""
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from torch import nn

from batchgen.default_model import ensure_default_model
from batchgen.models.checkpoint import CheckpointTensor
from batchgen.models.config import DTYPES, ModelConfig
from batchgen.models.layers import RMSNorm, VocabParallelEmbedding
from batchgen.models.linear import Linear
from batchgen.models.quant import QuantConfig, Unquantized, quant_config
from batchgen.models.registry import model_class
from batchgen.preflight import check_weights_fit

LOAD_FORMATS = ("safetensors", "dummy")
# what a hub download fetches: weights, configs, tokenizer, chat template; never pickled weights
_HUB_PATTERNS = ["*.safetensors", "*.json", "*.jinja", "tokenizer*", "merges.txt", "vocab.*"]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_NOT_WEIGHTS = {"training_args.bin"}  # pickles some checkpoints ship beside the weights
_DUMMY_SEED = 0
_DUMMY_STD = 0.02  # small enough that activations of a deep random model stay finite in bf16


def resolve_model_path(name: str) -> Path:
    """'default' -> the embedded SmolLM2 model (converted once); an existing directory -> itself; anything else
    is taken as a Hugging Face hub id and downloaded (safetensors, configs and tokenizer files only)."""
    if name == "default":
        return ensure_default_model()
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        return Path(snapshot_download(repo_id=name, allow_patterns=_HUB_PATTERNS))
    except Exception as error:  # offline, unknown repo, invalid id: all end the same way for the caller
        raise FileNotFoundError(
            f"model '{name}' is not 'default', not an existing directory, and could not be fetched from the "
            f"Hugging Face hub ({type(error).__name__}: {error})") from error


def load_model(path: str | Path, dtype: torch.dtype | str, device: torch.device | str,
               load_format: str = "safetensors", allow_pickle_weights: bool = False,
               quantization: str | None = None) -> tuple[nn.Module, ModelConfig]:
    """Build the model a Hugging Face directory describes, computing in `dtype` on `device`, in eval mode.

    load_format "safetensors" streams the checkpoint tensor by tensor (single file or sharded with
    model.safetensors.index.json). Pickled weights (.bin/.pt) load only with allow_pickle_weights, through
    torch.load(weights_only=True). "dummy" needs only config.json and fills the weights with seeded noise:
    for benchmarking a real architecture without its checkpoint.

    Linear layers store their weights as the checkpoint's quantization_config says (fp8 checkpoints), or
    quantized to fp8 as each tensor loads with quantization="fp8"; the model is never held in `dtype` whole.

    Under tensor parallelism (`batchgen.distributed.init_tensor_parallel` called first) the model is this
    rank's shard: every layer reads its rank's slice of each safetensors tensor from the file, the whole tensor
    only where it keeps it whole (pickled checkpoints load whole, one file at a time); dummy weights are drawn
    whole with the same seed as on one GPU, then sliced, so ranks together hold exactly the single-GPU model.
    """
    path = Path(path)
    dtype = _model_dtype(dtype)
    device = torch.device(device)
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format '{load_format}' is not one of {', '.join(LOAD_FORMATS)}")
    config = ModelConfig.from_dir(path)
    quant = quant_config(path, json.loads((path / "config.json").read_text()), quantization)
    model_cls = model_class(config.architecture)
    # find the weights before building the model, so a bad directory fails fast
    weight_files = [] if load_format == "dummy" else _weight_files(path, allow_pickle_weights)

    with torch.device("meta"):
        model = model_cls(config)  # structure only: no memory, no random init that the weights overwrite
        _set_weight_formats(model, quant, dtype)
    check_weights_fit(model, device, dtype)   # a model too big fails here, not with an out-of-memory crash later
    _materialize_parameters(model, dtype, device)
    model.to(device)  # buffers (the fp32 rotary table) follow the parameters
    if load_format == "dummy":
        _fill_dummy_weights(model, device, dtype, quant)
    else:
        model.load_weights((name, tensor) for name, tensor in _checkpoint_tensors(weight_files)
                           if quant is None or not quant.drops(name))
    return model.eval().requires_grad_(False), config


def _model_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return dtype


def _set_weight_formats(model: nn.Module, quant: QuantConfig | None, dtype: torch.dtype) -> None:
    """Give every Linear layer its weight format, chosen by the checkpoint module names it holds."""
    for module_name, module in model.named_modules():
        if isinstance(module, Linear):
            if quant is None:
                module.set_format(Unquantized(dtype))
                continue
            parent = module_name.rpartition(".")[0]
            names = [module_name] if None in module.part_rows else \
                [f"{parent}.{part}".lstrip(".") for part in module.part_rows]
            try:
                module.set_format(quant.format_for(names, dtype))
            except ValueError as error:
                raise ValueError(f"{module_name}: {error}") from error


def _materialize_parameters(model: nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """Give every parameter uninitialised storage of its final dtype and device: a Linear's in the dtypes its
    weight format chose, every other one in `dtype`. Nothing stays uninitialised: the dummy fill writes
    everything, and load_weights refuses a checkpoint that misses any tensor."""
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            setattr(module, name, nn.Parameter(
                torch.empty(param.shape, dtype=param.dtype if isinstance(module, Linear) else dtype, device=device),
                requires_grad=False))


def _weight_files(path: Path, allow_pickle_weights: bool) -> list[Path]:
    safetensors_files = _indexed_files(path, "model.safetensors.index.json") or sorted(path.glob("*.safetensors"))
    if safetensors_files:
        return safetensors_files
    pickle_files = _indexed_files(path, "pytorch_model.bin.index.json") or sorted(
        file for file in path.iterdir() if file.suffix in _PICKLE_SUFFIXES and file.name not in _NOT_WEIGHTS)
    if pickle_files and not allow_pickle_weights:
        raise ValueError(
            f"{path} has only pickled weights ({', '.join(file.name for file in pickle_files)}); batchgen loads "
            "safetensors by default because unpickling a file can run arbitrary code. Convert them to "
            "safetensors, or pass allow_pickle_weights=True to load them with torch.load(weights_only=True).")
    if pickle_files:
        return pickle_files
    raise FileNotFoundError(f"{path} has no weight files: looked for model.safetensors.index.json, *.safetensors, "
                            f"and (with allow_pickle_weights) {', '.join('*' + s for s in _PICKLE_SUFFIXES)}")


def _indexed_files(path: Path, index_name: str) -> list[Path]:
    """The shard files a sharded checkpoint's index names, or [] when there is no index."""
    index = path / index_name
    if not index.is_file():
        return []
    files = [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    absent = [file.name for file in files if not file.is_file()]
    if absent:
        raise FileNotFoundError(f"{index} names shard files that are missing: {', '.join(absent)}")
    return files


def _checkpoint_tensors(files: list[Path]) -> Iterator[tuple[str, CheckpointTensor | torch.Tensor]]:
    """(name, tensor) pairs: safetensors tensors not read yet (each layer reads the slice it holds, while its
    file is open), pickled ones whole."""
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as checkpoint:
                for name in checkpoint.keys():
                    yield name, CheckpointTensor(checkpoint, name)
        else:
            yield from torch.load(file, map_location="cpu", weights_only=True).items()


@torch.no_grad()
def _fill_dummy_weights(model: nn.Module, device: torch.device, dtype: torch.dtype, quant: QuantConfig | None) -> None:
    """Seeded noise; Linear weights and the embedding are drawn per checkpoint tensor in `dtype`, whole, and
    loaded through their layers, so under tensor parallelism each rank holds its shard of the single-GPU
    model's weights (online fp8 quantizes them as it would a checkpoint's)."""
    if quant is not None and quant.weight_scale != "online":
        raise ValueError(f"dummy weights for a {quant.method} checkpoint config are not supported: remove its "
                         "quantization_config and pass quantization='fp8'")
    generator = torch.Generator(device=device).manual_seed(_DUMMY_SEED)

    def noise(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device).normal_(0.0, _DUMMY_STD, generator=generator)

    for module in model.modules():
        if isinstance(module, Linear):
            for name, part in sorted(module.checkpoint_tensors(), key=str):
                for expert in range(module.num_experts or 1):
                    module.load(name, part, noise(*module.checkpoint_shape(name, part)),
                                None if module.num_experts is None else expert)
            continue
        if isinstance(module, VocabParallelEmbedding):
            module.load(noise(module.vocab_size, module.weight.shape[1]))
            continue
        for param in module.parameters(recurse=False):
            if isinstance(module, RMSNorm):
                param.fill_(0.0 if module.unit_offset else 1.0)   # a scale of one either way
            else:
                param.normal_(0.0, _DUMMY_STD, generator=generator)
