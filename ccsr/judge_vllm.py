"""The judge on vLLM (GPU boxes; ``pip install ccsr[vllm]``): a ``roles.Judge``, as ``TransformersJudge`` is.

Each question is one request of one generated token with the top-20 log-probabilities. vLLM's automatic
prefix caching shares the KV blocks of the image prefix between the ten questions of an image (the image is
part of the block hash), which is what ``TransformersJudge`` does by hand.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from ccsr.judge import answer_token_ids, llava_prompt
from ccsr.roles import JudgeAnswer

if TYPE_CHECKING:
    from PIL import Image

    from ccsr.config import Config
    from ccsr.roles import JudgeRequest

logger = logging.getLogger(__name__)

TOP_LOGPROBS = 20  # yes and no spellings are near the top whenever the model answers at all


class VLLMJudge:
    """LLaVA-Next on a vLLM engine (a ``roles.Judge``): one request per question, its first token's
    log-probabilities read as ``TransformersJudge`` reads its logits."""

    model_keys = ("judge.model",)

    def __init__(self, cfg: Config):
        try:
            from vllm import LLM, SamplingParams
        except ImportError:
            raise ImportError(
                "judge.backend=vllm needs vLLM (a CUDA-only package): pip install 'ccsr[vllm]' on a GPU box"
            ) from None
        from transformers import AutoProcessor

        from ccsr.models import resolve_model

        path = resolve_model(cfg.judge.model, cfg.model_cache)
        self.mode = cfg.judge.mode
        self.llm = LLM(
            model=path,
            trust_remote_code=cfg.judge.trust_remote_code,
            enable_prefix_caching=True,
            limit_mm_per_prompt={"image": 1},
            dtype=cfg.dtype if cfg.dtype != "float32" else "auto",
            gpu_memory_utilization=cfg.judge.gpu_memory_utilization,
            seed=cfg.seed,
        )
        self.processor = AutoProcessor.from_pretrained(path, trust_remote_code=cfg.judge.trust_remote_code)
        self.yes_ids, self.no_ids = answer_token_ids(self.llm.get_tokenizer())
        if self.mode == "logits":
            self.params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=TOP_LOGPROBS)
        else:
            self.params = SamplingParams(max_tokens=cfg.judge.max_new_tokens, temperature=0.0)

    def build_prompt(self, question: str) -> str:
        return llava_prompt(self.processor, question)

    def answer(self, images: list[Image.Image], requests: list[JudgeRequest]) -> list[JudgeAnswer]:
        """``requests[i]`` is about ``images[i]``; each of its rendered questions is one vLLM request."""
        from ccsr.questions import parse_answer

        if len(images) != len(requests):
            raise ValueError(f"got {len(images)} images but {len(requests)} judge requests")
        prompts = [
            {"prompt": self.build_prompt(q), "multi_modal_data": {"image": image.convert("RGB")}}
            for image, request in zip(images, requests, strict=True)
            for q in request.questions
        ]
        # One call for everything: vLLM schedules and batches, and keeps the output order of the inputs.
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        results, k = [], 0
        for request in requests:
            answers: list[str] = []
            p_yes: list[float | None] = []
            for _ in request.questions:
                completion = outputs[k].outputs[0]
                k += 1
                if self.mode == "logits":
                    answer, p = self._decide(completion)
                else:
                    answer, p = parse_answer(completion.text), None
                answers.append(answer)
                p_yes.append(p)
            results.append(JudgeAnswer(answers=answers, p_yes=p_yes))
        return results

    def _decide(self, completion: Any) -> tuple[str, float | None]:
        """Answer and P(yes)/(P(yes)+P(no)) from the first token's top log-probabilities. The decision is the
        greedy token when it is a yes/no spelling, else the more likely spelling among the top ones."""
        top = completion.logprobs[0]  # token id -> Logprob(logprob, rank, decoded_token)
        yes = [top[t].logprob for t in self.yes_ids if t in top]
        no = [top[t].logprob for t in self.no_ids if t in top]
        p = None
        if yes or no:
            p_y = sum(math.exp(x) for x in yes)
            p_n = sum(math.exp(x) for x in no)
            p = p_y / (p_y + p_n)
        chosen = completion.token_ids[0]
        if chosen in self.yes_ids:
            return "yes", p
        if chosen in self.no_ids:
            return "no", p
        if not (yes or no):
            return "nan", None
        return ("yes" if max(yes, default=-math.inf) > max(no, default=-math.inf) else "no"), p

    def close(self) -> None:
        """Shut the engine down and drop it, the processor and the sampling parameters; safe to call again."""
        from ccsr.devices import free_memory, shutdown_vllm

        if hasattr(self, "llm"):
            shutdown_vllm(self.llm)
        for name in ("llm", "processor", "params"):
            if hasattr(self, name):
                delattr(self, name)
        free_memory()
