"""vLLM prompter for GPU boxes (paper: Mistral-7B-Instruct, AWQ).

The quantization method is left to vLLM's auto-detection unless the config names one: vLLM reads AWQ
checkpoints itself and picks its faster Marlin kernels on recent GPUs when left to choose (naming
``awq`` explicitly selects the slower plain AWQ kernels).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ccsr.config import Config


class VLLMPrompter:
    """A vLLM engine (a ``roles.Prompter``): one chat request of ``num`` samples per call."""

    model_keys = ("prompter.model",)

    def __init__(self, cfg: Config):
        try:
            from vllm import LLM  # CUDA-only wheel: an optional extra, imported only here
        except ImportError:
            raise ImportError(
                "prompter.backend=vllm needs vLLM (a CUDA-only package): pip install 'ccsr[vllm]' on a GPU box"
            ) from None

        from ccsr.models import resolve_model

        self.cfg = cfg
        pc = cfg.prompter
        self.llm = LLM(
            model=resolve_model(pc.model, cfg.model_cache),
            quantization=pc.quantization,
            trust_remote_code=pc.trust_remote_code,
            gpu_memory_utilization=pc.gpu_memory_utilization,
            seed=cfg.seed,
        )

    def sample(self, messages: list[dict[str, str]], num: int, seed: int) -> list[str]:
        from vllm import SamplingParams

        pc = self.cfg.prompter
        params = SamplingParams(
            n=num, temperature=pc.temperature, top_p=pc.top_p, max_tokens=pc.max_new_tokens, seed=seed
        )
        outputs = self.llm.chat([messages], params, use_tqdm=False)
        return [choice.text for choice in outputs[0].outputs]

    def close(self) -> None:
        """Shut the engine down and drop it (the judge's engine is loaded next); safe to call again."""
        from ccsr.devices import free_memory, shutdown_vllm

        if hasattr(self, "llm"):
            shutdown_vllm(self.llm)
            del self.llm
        free_memory()
