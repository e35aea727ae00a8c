"""The transformers prompter on the embedded tiny Mistral; the vLLM prompter on a GPU box only."""

import pytest

from ccsr.config_files import load_config


@pytest.fixture(scope="module")
def prompter(repo_root):
    from ccsr.prompter import TransformersPrompter

    cfg = load_config(repo_root / "configs" / "tiny.yaml", class_name="giraffe")
    return cfg, TransformersPrompter(cfg)


def test_tiny_prompter_is_reproducible_and_parsable(prompter):
    from ccsr.prompter import build_messages, parse_prompts

    cfg, p = prompter
    messages = build_messages(cfg, "giraffe", 10)
    assert "giraffe" in messages[0]["content"] and "{" not in messages[0]["content"]
    a = p.sample(messages, num=2, seed=5)
    b = p.sample(messages, num=2, seed=5)
    c = p.sample(messages, num=2, seed=6)
    assert a == b, "same seed, same completions"
    assert a != c
    assert sum(len(parse_prompts(t, "giraffe")) for t in a) >= 2


def test_collect_prompts_on_the_tiny_model(prompter):
    from ccsr.prompter import collect_prompts

    cfg, p = prompter
    batch = collect_prompts(p, cfg, "giraffe", 4, avoid=[], seed=1)
    assert len(batch.prompts) == 4
    assert all("giraffe" in x.lower() for x in batch.prompts)
    assert len(set(batch.prompts)) == 4


def test_close_drops_the_model_and_may_be_called_again(repo_root):
    from ccsr.prompter import TransformersPrompter

    p = TransformersPrompter(load_config(repo_root / "configs" / "tiny.yaml", class_name="giraffe"))
    p.close()
    assert not hasattr(p, "model") and not hasattr(p, "tokenizer")
    p.close()


@pytest.mark.gpu
def test_vllm_prompter_on_gpu(repo_root):
    pytest.importorskip("vllm")
    from ccsr.prompter import collect_prompts
    from ccsr.prompter_vllm import VLLMPrompter

    cfg = load_config(repo_root / "configs" / "paper.yaml", ["prompter.n_prompts=5"], class_name="giraffe")
    p = VLLMPrompter(cfg)
    batch = collect_prompts(p, cfg, "giraffe", 5, avoid=[], seed=0)
    assert len(batch.prompts) == 5
