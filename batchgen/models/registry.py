"""Hugging Face `architectures` names -> the batchgen model class that runs them."""
from torch import nn

from batchgen.models.llama import LlamaForCausalLM

MODEL_CLASSES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
    "Gemma3ForCausalLM": LlamaForCausalLM,
    "Gemma3ForConditionalGeneration": LlamaForCausalLM,   # the text model; the vision tower is not loaded
    "Phi3ForCausalLM": LlamaForCausalLM,
}


def model_class(architecture: str) -> type[nn.Module]:
    if architecture not in MODEL_CLASSES:
        raise ValueError(f"architecture '{architecture}' is not supported; batchgen runs "
                         f"{', '.join(MODEL_CLASSES)}")
    return MODEL_CLASSES[architecture]
