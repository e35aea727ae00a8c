import pytest

from ccsr.config import Config, ConfigError
from ccsr.config_files import load_config, parse_override


def test_tiny_and_paper_configs_load(repo_root):
    tiny = load_config(repo_root / "configs" / "tiny.yaml")
    paper = load_config(repo_root / "configs" / "paper.yaml")
    assert tiny.generator.num_candidates == 10
    assert paper.prompter.n_prompts == 100
    assert paper.filter.detection_threshold == 0.6
    assert paper.trainer.learning_rate == 1e-4 and paper.trainer.batch_size == 18
    assert paper.trainer.epochs == 100 and paper.trainer.mixed_precision == "fp16"
    assert paper.trainer.random_flip and paper.trainer.resolution == 512


def test_overrides_apply_with_yaml_types(repo_root):
    cfg = load_config(
        repo_root / "configs" / "tiny.yaml",
        ["seed=7", "filter.detection_threshold=0.5", "evaluator.scales=[0, 1]", "trainer.random_flip=false"],
    )
    assert cfg.seed == 7
    assert cfg.filter.detection_threshold == 0.5
    assert cfg.evaluator.scales == [0.0, 1.0]
    assert cfg.trainer.random_flip is False


def test_scientific_floats_without_a_dot(repo_root, tmp_path):
    # PyYAML (YAML 1.1) reads 1e-4 as a string; a float field takes it, a string elsewhere stays an error.
    cfg = load_config(
        repo_root / "configs" / "tiny.yaml", ["trainer.learning_rate=1e-4", "filter.detection_threshold=6E-1"]
    )
    assert cfg.trainer.learning_rate == 1e-4 and cfg.filter.detection_threshold == 0.6
    path = tmp_path / "lr.yaml"
    path.write_text("trainer:\n  learning_rate: 3e-4\n")
    assert load_config(path).trainer.learning_rate == 3e-4
    with pytest.raises(ConfigError, match="trainer.learning_rate"):
        load_config(repo_root / "configs" / "tiny.yaml", ["trainer.learning_rate=1e-4x"])
    with pytest.raises(ConfigError, match="trainer.rank"):
        load_config(repo_root / "configs" / "tiny.yaml", ["trainer.rank=1e3"])


def test_unknown_key_is_named_with_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("generator:\n  num_candidatez: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "generator.num_candidatez" in str(err.value)
    assert str(path) in str(err.value)


def test_wrong_type_is_named(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  rank: four\n")
    with pytest.raises(ConfigError, match="trainer.rank"):
        load_config(path)


def test_unknown_override_key_is_named(repo_root):
    with pytest.raises(ConfigError, match="judge.nope"):
        load_config(repo_root / "configs" / "tiny.yaml", ["judge.nope=1"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("filter.detection_threshold=1.5", "filter.detection_threshold"),
        ("filter.top_k=0", "filter.top_k"),
        ("filter.tie_break=coin", "filter.tie_break"),
        ("evaluator.unit_size=0", "evaluator.unit_size"),
        ("generator.num_candidates=0", "generator.num_candidates"),
        ("prompter.n_prompts=-3", "prompter.n_prompts"),
        ("evaluator.scales=[0, 2]", "evaluator.scales"),
        ("judge.mode=shout", "judge.mode"),
        ("iterations=true", "iterations"),
    ],
)
def test_out_of_range_values_are_rejected(repo_root, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(repo_root / "configs" / "tiny.yaml", [override])


def test_malformed_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("seed: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_override_syntax():
    assert parse_override("a.b=3") == ("a.b", 3)
    with pytest.raises(ConfigError):
        parse_override("novalue")


def test_defaults_roundtrip(tmp_path):
    from ccsr.config_files import save_config

    cfg = Config(class_name="zebra crossing")
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


def test_each_section_validates_itself_when_built_and_on_demand():
    from ccsr.config import EvaluatorConfig, GeneratorConfig, TrainerConfig

    with pytest.raises(ConfigError, match=r"'generator\.steps' must be > 0, got 0"):
        GeneratorConfig(steps=0)
    with pytest.raises(ConfigError, match=r"'trainer\.max_steps' must be > 0 \(or null for none\)"):
        TrainerConfig(max_steps=0)
    with pytest.raises(ConfigError, match=r"'evaluator\.seeds' must be >= 0"):
        EvaluatorConfig(seeds=[0, -1])
    cfg = Config()
    cfg.trainer.prior_weight = -1.0  # changed in place, as tests and notebooks do: validate() sees it
    with pytest.raises(ConfigError, match=r"'trainer\.prior_weight' must be >= 0"):
        cfg.validate()
    cfg = Config()
    cfg.gate.metric, cfg.evaluator.judge_and_detect = "detection_rate", False
    with pytest.raises(ConfigError, match=r"'gate\.metric' detection_rate is computed only with"):
        cfg.validate()


def test_trainer_prior_checks_apply_only_with_a_prior_term(repo_root):
    tiny = repo_root / "configs" / "tiny.yaml"
    assert load_config(tiny, ["trainer.prior_images=0", "trainer.prior_prompts=[]"]).trainer.prior_weight == 0
    with pytest.raises(ConfigError, match=r"needs trainer.prior_images >= 1 and trainer.prior_prompts"):
        load_config(tiny, ["trainer.prior_weight=0.5", "trainer.prior_images=0"])
    with pytest.raises(ConfigError, match=r"needs trainer.prior_images >= 1 and trainer.prior_prompts"):
        load_config(tiny, ["trainer.prior_weight=0.5", "trainer.prior_prompts=[]"])
    for template in ("a {0}", "a {class_name", "a {class_name.x}"):
        with pytest.raises(ConfigError, match=r"'trainer\.prior_prompts': a template may only use"):
            load_config(tiny, ["trainer.prior_weight=0.5", f"trainer.prior_prompts=['{template}']"])
    ok = load_config(tiny, ["trainer.prior_weight=0.5", "trainer.prior_prompts=['a {class_name}, {{x}}']"])
    assert ok.trainer.prior_prompts == ["a {class_name}, {{x}}"]


def test_every_model_key_is_a_section_field_with_a_known_kind():
    from ccsr.config import Config, model_keys
    from ccsr.roles import MODEL_KEYS

    keys = model_keys()
    assert keys == (
        "prompter.model",
        "generator.model",
        "judge.model",
        "detector.model",
        "detector.text_model",
        "evaluator.model",
    )
    assert tuple(MODEL_KEYS) == keys
    for key in keys:  # each names a string field of its section, and says what it must point at
        section, name = key.split(".")
        assert isinstance(getattr(getattr(Config(), section), name), str) and MODEL_KEYS[key].what
    # detector.model: a .pt file, checked apart; every other key names a folder holding a file
    assert [k for k in keys if MODEL_KEYS[k].required is None] == ["detector.model"]


def test_backend_classes_declare_the_models_they_load():
    from ccsr.backends import BACKENDS, backend_class, loaded_model_keys
    from ccsr.config import model_keys

    for role, table in BACKENDS.items():
        for name in table:
            keys = loaded_model_keys(role, backend_class(role, name))
            assert keys and set(keys) <= set(model_keys()) and all(k.startswith(f"{role}.") for k in keys)
    assert loaded_model_keys("detector", backend_class("detector", "yolo_world")) == (
        "detector.model",
        "detector.text_model",
    )
    assert loaded_model_keys("judge", object) == ("judge.model",)  # a class that says nothing: its section's


def test_vllm_memory_share_and_device_index(repo_root):
    """judge.gpu_memory_utilization in (0, 1] like the prompter's; vLLM takes no device index, so cuda:N with
    N > 0 is refused for a vllm backend, naming CUDA_VISIBLE_DEVICES, and left alone for the others."""
    tiny = repo_root / "configs" / "tiny.yaml"
    assert load_config(tiny).judge.gpu_memory_utilization == 0.85
    assert load_config(tiny, ["judge.gpu_memory_utilization=1"]).judge.gpu_memory_utilization == 1.0
    for bad in ("0", "1.2"):
        with pytest.raises(ConfigError, match=r"'judge\.gpu_memory_utilization' must be within \(0, 1\]"):
            load_config(tiny, [f"judge.gpu_memory_utilization={bad}"])
    for role in ("prompter", "judge"):
        with pytest.raises(
            ConfigError, match=rf"cuda:2 cannot reach {role}\.backend vllm.*CUDA_VISIBLE_DEVICES=2"
        ):
            load_config(tiny, [f"{role}.backend=vllm", "device=cuda:2"])
        assert load_config(tiny, [f"{role}.backend=vllm", "device=cuda:0"]).device == "cuda:0"
    assert load_config(tiny, ["device=cuda:2"]).device == "cuda:2"  # transformers takes the index


def test_the_filter_rules_load_from_their_old_keys_with_one_warning(repo_root, tmp_path, caplog, monkeypatch):
    """judge.top_k, judge.min_score, judge.tie_break and detector.threshold were the filter's keys before it
    had a section: a file or an override naming them still loads, with one warning naming old and new."""
    import logging

    from ccsr.config_files import MOVED_KEYS

    old = tmp_path / "old.yaml"
    old.write_text("judge:\n  top_k: 3\n  min_score: 8\n  tie_break: p_yes\ndetector:\n  threshold: 0.5\n")
    monkeypatch.setattr("ccsr.config_files._warned", set())  # warnings this process gave before do not count
    with caplog.at_level(logging.WARNING):
        cfg = load_config(old)
        load_config(old)  # read again (a resumed run reads its config.yaml more than once): no second line
    f = cfg.filter
    assert (f.top_k, f.min_score, f.tie_break, f.detection_threshold) == (3, 8, "p_yes", 0.5)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and all(o in warnings[0] and n in warnings[0] for o, n in MOVED_KEYS.items())

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        cfg = load_config(repo_root / "configs" / "tiny.yaml", ["judge.top_k=2", "detector.threshold=0"])
    assert cfg.filter.top_k == 2 and cfg.filter.detection_threshold == 0.0
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    assert load_config(old, ["filter.top_k=5"]).filter.top_k == 5, "a later source wins, by either name"
    with pytest.raises(ConfigError, match="'filter.top_k' must be > 0"):
        load_config(old, ["judge.top_k=0"])

    both = tmp_path / "both.yaml"
    both.write_text("judge:\n  top_k: 3\nfilter:\n  top_k: 2\n")
    with pytest.raises(ConfigError, match="'judge.top_k' and 'filter.top_k' are one setting"):
        load_config(both)


def test_a_config_saved_before_the_filter_section_reads_as_the_same_config(repo_root, tmp_path):
    """A run directory's config.yaml written before the filter section and evaluator.unit_size existed
    (its filter rules under judge and detector) loads as the config it was saved from."""
    import yaml

    from ccsr.config_files import save_config

    cfg = load_config(repo_root / "configs" / "shapes.yaml")  # top_k and min_score differ from the defaults
    saved = cfg.to_dict()
    rules = saved.pop("filter")
    saved["judge"] |= {
        "top_k": rules["top_k"],
        "min_score": rules["min_score"],
        "tie_break": rules["tie_break"],
    }
    saved["detector"]["threshold"] = rules["detection_threshold"]
    del saved["evaluator"]["unit_size"]
    before = tmp_path / "config.yaml"
    before.write_text(yaml.safe_dump(saved, sort_keys=False))
    assert load_config(before).to_dict() == cfg.to_dict()
    save_config(load_config(before), tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml").to_dict() == cfg.to_dict()


def test_the_evaluation_unit_defaults_to_the_generator_batch(repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml")
    assert cfg.evaluator.unit_size is None  # null: generator.batch_size, as before the key existed
    assert (
        load_config(repo_root / "configs" / "tiny.yaml", ["evaluator.unit_size=3"]).evaluator.unit_size == 3
    )
