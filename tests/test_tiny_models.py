"""The embedded tiny models: deterministic builds that load through the real from_pretrained paths."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ccsr.models import resolve_model


def _safetensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(folder)): load_file(p) for p in sorted(folder.rglob("*.safetensors"))}


def assert_same_tensors(a: Path, b: Path) -> None:
    ta, tb = _safetensors(a), _safetensors(b)
    assert ta and ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].keys() == tb[name].keys()
        for key in ta[name]:
            assert torch.equal(ta[name][key], tb[name][key]), f"{name}:{key} differs between builds"


# --- tokenizer -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from ccsr.tiny.tokenizer import build_tokenizer

    return build_tokenizer()


def test_tokenizer_round_trips_newlines_and_unicode(tokenizer):
    text = "1. A giraffe at dusk, 85mm.\n2. An elephant!\n\n  Über 日本 f/1.8"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert (
        ids.count(tokenizer.convert_tokens_to_ids("<0x0A>")) == 3
    )  # newline is one byte token, as in Mistral
    assert tokenizer(text).input_ids[0] == tokenizer.bos_token_id


def test_answer_words_are_single_tokens(tokenizer):
    for word in ("Yes", "No", "yes", "no"):
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
        # The answer position after the prompt: "... [/INST] Yes" -> "▁Yes".
        ids = tokenizer(f"[INST] Is there a giraffe? [/INST] {word}", add_special_tokens=False).input_ids
        assert tokenizer.convert_ids_to_tokens(ids[-1]) == "▁" + word
        assert ids[-2] == tokenizer.convert_tokens_to_ids("[/INST]")


def test_chat_template_is_mistral_style(tokenizer):
    messages = [
        {"role": "system", "content": "You write prompts."},
        {"role": "user", "content": "Ten prompts about a zebra."},
        {"role": "assistant", "content": "1. A zebra."},
        {"role": "user", "content": "More."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (
        text
        == "<s>[INST] You write prompts.\n\nTen prompts about a zebra. [/INST] 1. A zebra.</s>[INST] More. [/INST]"
    )
    ids = tokenizer.apply_chat_template(messages[1:2], add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]
    assert ids.count(tokenizer.bos_token_id) == 1


def test_tokenizer_extra_special_and_determinism(tmp_path):
    from ccsr.tiny.tokenizer import build_tokenizer

    a = build_tokenizer(tmp_path / "a", extra_special=["<image>"])
    build_tokenizer(tmp_path / "b", extra_special=["<image>"])
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
    assert len(a("<image>\nWhat is this?", add_special_tokens=False).input_ids) > 1
    assert a("<image>", add_special_tokens=False).input_ids == [a.convert_tokens_to_ids("<image>")]
    assert 1000 <= len(a) <= 2000


# --- Mistral ---------------------------------------------------------------------------------------------


def test_mistral_loads_and_writes_numbered_lines(tiny_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model("ccsr-tiny/mistral", tiny_cache)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "MistralForCausalLM"
    assert tokenizer.padding_side == "left"
    chat = [{"role": "user", "content": "Write 5 prompts for a text-to-image model about a giraffe."}]
    inputs = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    torch.manual_seed(0)
    out = model.generate(
        **inputs,
        do_sample=True,
        temperature=0.7,
        top_p=0.95,
        max_new_tokens=80,
        pad_token_id=tokenizer.pad_token_id,
    )
    text = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    # A toy fit: the words are shaky, the shape (numbered lines) is what the prompt parser needs.
    assert text.startswith("1. "), text
    assert len(re.findall(r"^\d+\. \w+", text, flags=re.M)) >= 2, text


def test_mistral_build_is_deterministic(tmp_path, monkeypatch):
    import ccsr.tiny.llm as llm

    monkeypatch.setattr(llm, "TRAIN_STEPS", 2)  # the fit is deterministic step by step; 2 steps check that
    llm.build_mistral(tmp_path / "a", seed=0)
    llm.build_mistral(tmp_path / "b", seed=0)
    assert_same_tensors(tmp_path / "a", tmp_path / "b")
    llm.build_mistral(tmp_path / "c", seed=1)
    assert not torch.equal(
        load_file(tmp_path / "a" / "model.safetensors")["lm_head.weight"],
        load_file(tmp_path / "c" / "model.safetensors")["lm_head.weight"],
    )


# --- Stable Diffusion ------------------------------------------------------------------------------------


def test_stable_diffusion_makes_images_of_the_requested_size(tiny_cache):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(resolve_model("ccsr-tiny/stable-diffusion", tiny_cache))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "epsilon"
    assert pipe.vae_scale_factor == 8
    for size in (64, 128):
        images = pipe(["a giraffe"] * 2, height=size, width=size, num_inference_steps=2).images
        assert [im.size for im in images] == [(size, size)] * 2
    again = pipe(
        "a giraffe", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(3)
    )
    first = pipe(
        "a giraffe", height=64, width=64, num_inference_steps=2, generator=torch.Generator().manual_seed(3)
    )
    assert again.images[0].tobytes() == first.images[0].tobytes()


def test_stable_diffusion_build_is_deterministic(tmp_path):
    from diffusers import StableDiffusionPipeline

    from ccsr.tiny.sd import build_stable_diffusion

    build_stable_diffusion(tmp_path / "a", seed=0)
    build_stable_diffusion(tmp_path / "b", seed=0)
    assert_same_tensors(tmp_path / "a", tmp_path / "b")
    build_stable_diffusion(tmp_path / "v", seed=0, prediction_type="v_prediction")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "v")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.tokenizer.model_max_length == 77


# --- CLIP ------------------------------------------------------------------------------------------------


def test_clip_loads_and_embeds_to_512(tiny_cache):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    path = resolve_model("ccsr-tiny/clip", tiny_cache)
    model = CLIPModel.from_pretrained(path)
    processor = CLIPProcessor.from_pretrained(path)
    inputs = processor(
        text=["a giraffe", "an elephant"],
        images=[Image.new("RGB", (64, 48), "green")],
        return_tensors="pt",
        padding=True,
    )
    assert inputs["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image = model.get_image_features(pixel_values=inputs["pixel_values"])
    assert text.pooler_output.shape == (2, 512)
    assert image.pooler_output.shape == (1, 512)


def test_clip_build_is_deterministic(tmp_path):
    from ccsr.tiny.clip import build_clip

    build_clip(tmp_path / "a", seed=0)
    build_clip(tmp_path / "b", seed=0)
    assert_same_tensors(tmp_path / "a", tmp_path / "b")


# --- YOLO-World ------------------------------------------------------------------------------------------


def test_yolo_world_build_is_deterministic(tmp_path, monkeypatch):
    from ultralytics import YOLOWorld

    import ccsr.tiny.yolo as yolo

    # A smaller calibration set, same code path.
    monkeypatch.setattr(yolo, "CALIBRATION_IMAGES_PER_PROMPT", 1)
    monkeypatch.setattr(yolo, "CALIBRATION_SIZES", (64,))
    states = []
    for name in ("a", "b"):
        yolo.build_yolo_world(tmp_path / name, seed=0)
        model = YOLOWorld(str(tmp_path / name / yolo.MODEL_FILE)).model
        states.append((model.state_dict(), model.txt_feats))
    (sa, fa), (sb, fb) = states
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(fa, fb) and fa.shape == (1, 1, 512)
