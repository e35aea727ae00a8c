"""kohya export: key layout, alpha, and a round trip through diffusers' own kohya loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from ccsr.config import Config
from ccsr.lora import export_kohya
from ccsr.train import train_lora
from ccsr.training_data import TrainPair


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA with alpha != rank (8 vs 4), so a wrong alpha in the export would change the output."""
    from ccsr.tiny.sd import build_stable_diffusion

    root = tmp_path_factory.mktemp("export")
    build_stable_diffusion(root / "sd", seed=0)
    rng = np.random.default_rng(1)
    pairs = []
    for i in range(4):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
        pairs.append(TrainPair(prompt=f"a photo of a cat {i}", image_path=path))
    cfg = Config()
    cfg.device = "cpu"
    cfg.generator.model = str(root / "sd")
    cfg.trainer.resolution = 32
    cfg.trainer.batch_size = 2
    cfg.trainer.max_steps = 3
    cfg.trainer.learning_rate = 1e-2
    cfg.trainer.alpha = 8.0
    train_lora(cfg, pairs, root / "lora")
    return root / "sd", root / "lora"


def test_kohya_key_layout(trained, tmp_path):
    _, lora_dir = trained
    out = export_kohya(lora_dir, tmp_path / "lora_kohya.safetensors")
    with safe_open(str(out), framework="pt") as f:
        keys = set(f.keys())
        alpha = f.get_tensor("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha")
        metadata = f.metadata()
    name = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= keys
    assert all(k.startswith("lora_unet_") and k.count(".") in (1, 2) for k in keys)
    assert alpha.item() == 8.0
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8.0"
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write left nothing behind


def test_kohya_round_trip_matches_diffusers_output(trained, tmp_path):
    from diffusers import StableDiffusionPipeline

    sd, lora_dir = trained
    export_kohya(lora_dir, tmp_path / "lora_kohya.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(sd, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def draw():
        return pipe(
            "a photo of a cat",
            num_inference_steps=2,
            height=64,
            width=64,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images

    base = draw()
    pipe.load_lora_weights(lora_dir, adapter_name="diffusers")
    original = draw()
    pipe.unload_lora_weights()
    pipe.load_lora_weights(tmp_path, weight_name="lora_kohya.safetensors", adapter_name="kohya")
    exported = draw()
    assert np.abs(original - base).max() > 1e-4  # the LoRA matters, so the comparison below means something
    np.testing.assert_allclose(exported, original, atol=1e-6)


def test_export_rejects_a_folder_without_weights(tmp_path):
    with pytest.raises(ValueError, match="no pytorch_lora_weights.safetensors in this folder"):
        export_kohya(tmp_path, tmp_path / "out.safetensors")
