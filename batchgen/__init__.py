"""batchgen: offline batch LLM generation.

`LLM` is imported on first use so that light commands (submit, status) never load torch.
"""
from batchgen.outputs import CompletionOutput, RequestOutput
from batchgen.sampling_params import SamplingParams, StructuredOutput

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "StructuredOutput", "RequestOutput", "CompletionOutput", "__version__"]


def __getattr__(name: str):
    if name == "LLM":
        from batchgen.llm import LLM
        return LLM
    raise AttributeError(f"module 'batchgen' has no attribute {name!r}")
