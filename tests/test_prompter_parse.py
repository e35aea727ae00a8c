"""Parsing of realistic LLM outputs in many styles, near-duplicate filtering, diversity figures."""

from ccsr.prompter import diversity, parse_prompts, similarity

NUMBERED = """Here are 4 prompts:

1. A tall giraffe browsing acacia leaves at sunset, golden hour, 200mm lens, f/2.8, photo-realistic
2. Two giraffes crossing a dusty road in the Serengeti, midday sun, wide angle, national geographic
3) A baby giraffe nursing beside its mother, soft morning light, 85mm, shallow depth of field
#4 A giraffe silhouette against a stormy sky, dramatic clouds, 5.6 aperture, high contrast

I hope these help with your image generation!"""

BULLETS = """Sure! Here you go:
- "A giraffe drinking at a waterhole, reflections in the water, evening light, 8k"
* **A close-up of a giraffe's eye with long eyelashes, macro lens, sharp focus**
• giraffe; a herd of giraffes walking in a line across the savanna, aerial view, drone photo"""

WRAPPED = """1. A majestic giraffe standing under an acacia tree,
   warm afternoon light, telephoto lens, highly detailed
2. A giraffe in a misty forest clearing at dawn, soft diffuse light,
   muted green tones, 35mm film photo

Let me know if you want more."""

PLAIN = """Prompt: a giraffe running through tall grass, motion blur, 1/250 s, sports photography
Prompt 2: three giraffes resting under a baobab tree, blue hour, calm mood, 50mm"""


def test_numbered_list_with_preamble_and_closing():
    got = parse_prompts(NUMBERED, "giraffe")
    assert len(got) == 4
    assert got[0].startswith("A tall giraffe browsing")
    assert "f/2.8" in got[0]
    assert got[1].startswith("Two giraffes")
    assert "5.6 aperture" in got[3]
    assert not any("hope" in p for p in got)


def test_bullets_quotes_markdown_and_class_prefix():
    got = parse_prompts(BULLETS, "giraffe")
    assert got == [
        "A giraffe drinking at a waterhole, reflections in the water, evening light, 8k",
        "A close-up of a giraffe's eye with long eyelashes, macro lens, sharp focus",
        "a herd of giraffes walking in a line across the savanna, aerial view, drone photo",
    ]


def test_wrapped_prompts_join_and_closing_remark_is_dropped():
    got = parse_prompts(WRAPPED, "giraffe")
    assert got == [
        "A majestic giraffe standing under an acacia tree, warm afternoon light, telephoto lens, highly detailed",
        "A giraffe in a misty forest clearing at dawn, soft diffuse light, muted green tones, 35mm film photo",
    ]


def test_plain_lines_with_labels():
    got = parse_prompts(PLAIN, "giraffe")
    assert got[0] == "a giraffe running through tall grass, motion blur, 1/250 s, sports photography"
    assert got[1].startswith("three giraffes resting")


def test_garbage_gives_nothing():
    assert parse_prompts("", "giraffe") == []
    assert parse_prompts("ok\n\n??", "giraffe") == []


# --- answers as chat models actually write them ------------------------------------------------------------
JSON_ARRAY = """[
  "A giraffe browsing acacia leaves at sunrise, warm backlight, 300mm telephoto, wildlife photo",
  "Two giraffes \\"necking\\" in a dusty clearing, midday haze, wide angle, documentary style",
  "A giraffe calf hiding behind its mother, soft overcast light, 85mm, shallow depth of field"
]"""

JSON_OBJECTS = """Here are the prompts as JSON:
[
  {"id": 1, "title": "Dawn", "prompt": "giraffe: a lone giraffe on a ridge at dawn, pink sky, 200mm"},
  {"id": 2, "title": "Rain", "Prompt": "a giraffe standing in warm summer rain, wet coat, 70mm"},
  {"id": 3, "title": "Empty", "prompt": ""}
]
Let me know if you want more!"""

FENCED_JSON = """Sure! Here are 3 prompts for a giraffe:

```json
{"prompts": [
  "a giraffe walking through tall golden grass, evening light, 135mm lens",
  "aerial view of a giraffe herd crossing a dry riverbed, drone photo, noon",
  "a giraffe"
]}
```

Each prompt varies the light and the viewpoint."""

BOLD_TITLES = """Here are 4 prompts for a giraffe:

1. **Savanna sunset:** a giraffe silhouetted against an orange sky, acacia trees, 200mm, golden hour
2. **Morning mist** - a giraffe emerging from morning fog, muted colors, 85mm, soft light
3. **Close-up:**
   a giraffe's head and ossicones in sharp focus, blurred green background, 105mm macro
4. **A giraffe drinking at a waterhole with its legs splayed wide, reflections, dusk light**

These prompts cover different times of day and viewpoints."""

PROMPT_LABELS = """**Prompt 1:** a giraffe crossing a dirt road in front of a safari jeep, midday sun, 24mm
Prompt 2 - a giraffe grazing beside zebras on the open plain, late afternoon, telephoto
Prompt 3:
a giraffe resting on the ground with its legs folded, early morning, 50mm, calm mood"""

QUOTED_LINES = """Here you go:

"A giraffe peering over a tree top, blue sky, low angle, 16mm wide lens",
"A giraffe in a snowy zoo enclosure, cold winter light, 70-200mm",
'A giraffe reflected in a still pond at dusk, symmetry, 35mm'"""

PARAGRAPHS = """Here are three prompts:

A giraffe standing alone on a golden plain at sunset,
   long shadows, warm rim light, 400mm telephoto lens

Giraffe; a mother giraffe licking her calf under an acacia tree, soft morning light, 85mm

A giraffe running across the savanna, dust trail, motion blur, 1/60 s panning shot

I hope you like them."""

TRUNCATED_JSON = """[
  "a giraffe at the edge of a waterhole, elephants behind, golden light, 300mm",
  {"prompt": "a giraffe under a starry night sky, long exposure, milky way, 14mm"},
  "a giraffe walking through a bush fire haze, orange light, dramatic, 2"""


def test_json_array_of_strings_loses_its_quotes_and_commas():
    got = parse_prompts(JSON_ARRAY, "giraffe")
    assert got == [
        "A giraffe browsing acacia leaves at sunrise, warm backlight, 300mm telephoto, wildlife photo",
        'Two giraffes "necking" in a dusty clearing, midday haze, wide angle, documentary style',
        "A giraffe calf hiding behind its mother, soft overcast light, 85mm, shallow depth of field",
    ]


def test_json_objects_with_a_prompt_field_between_preamble_and_outro():
    got = parse_prompts(JSON_OBJECTS, "giraffe")
    assert got == [
        "a lone giraffe on a ridge at dawn, pink sky, 200mm",  # class prefix cleaned
        "a giraffe standing in warm summer rain, wet coat, 70mm",  # field name in any case
    ]


def test_fenced_json_object_holding_the_list():
    got = parse_prompts(FENCED_JSON, "giraffe")
    assert got == [  # "a giraffe" is below min_words
        "a giraffe walking through tall golden grass, evening light, 135mm lens",
        "aerial view of a giraffe herd crossing a dry riverbed, drone photo, noon",
    ]
    assert len(parse_prompts(FENCED_JSON, "giraffe", min_words=1)) == 3


def test_json_that_is_cut_off_is_read_line_by_line():
    """The LLM ran out of tokens inside the array: no valid JSON, each complete line still counts."""
    got = parse_prompts(TRUNCATED_JSON, "giraffe")
    assert got[:2] == [
        "a giraffe at the edge of a waterhole, elephants behind, golden light, 300mm",
        "a giraffe under a starry night sky, long exposure, milky way, 14mm",
    ]
    assert not any(p.startswith(("[", "{", '"')) or p.endswith((",", '"')) for p in got)


def test_bracketed_numbers_in_a_preamble_are_not_json():
    text = "Here are [2] prompts:\n1. a giraffe at dawn, mist, 85mm\n2. a giraffe at noon, harsh sun, 24mm"
    assert parse_prompts(text, "giraffe") == [
        "a giraffe at dawn, mist, 85mm",
        "a giraffe at noon, harsh sun, 24mm",
    ]


def test_bold_titles_are_dropped_and_a_bold_prompt_is_kept():
    got = parse_prompts(BOLD_TITLES, "giraffe")
    assert got == [
        "a giraffe silhouetted against an orange sky, acacia trees, 200mm, golden hour",
        "a giraffe emerging from morning fog, muted colors, 85mm, soft light",
        "a giraffe's head and ossicones in sharp focus, blurred green background, 105mm macro",
        "A giraffe drinking at a waterhole with its legs splayed wide, reflections, dusk light",
    ]


def test_prompt_labels_inline_and_on_their_own_line():
    got = parse_prompts(PROMPT_LABELS, "giraffe")
    assert got == [
        "a giraffe crossing a dirt road in front of a safari jeep, midday sun, 24mm",
        "a giraffe grazing beside zebras on the open plain, late afternoon, telephoto",
        "a giraffe resting on the ground with its legs folded, early morning, 50mm, calm mood",
    ]


def test_quoted_lines_with_trailing_commas():
    got = parse_prompts(QUOTED_LINES, "giraffe")
    assert got == [
        "A giraffe peering over a tree top, blue sky, low angle, 16mm wide lens",
        "A giraffe in a snowy zoo enclosure, cold winter light, 70-200mm",
        "A giraffe reflected in a still pond at dusk, symmetry, 35mm",
    ]


def test_blank_line_separated_paragraphs_join_their_wrapped_lines():
    got = parse_prompts(PARAGRAPHS, "giraffe")
    assert got == [
        "A giraffe standing alone on a golden plain at sunset, long shadows, warm rim light, 400mm telephoto "
        "lens",
        "a mother giraffe licking her calf under an acacia tree, soft morning light, 85mm",
        "A giraffe running across the savanna, dust trail, motion blur, 1/60 s panning shot",
    ]


def test_one_prompt_per_line_without_blank_lines_stays_one_per_line():
    text = "a giraffe at dawn, mist, 85mm\na giraffe at noon, harsh sun, 24mm\na giraffe at night, 14mm"
    assert len(parse_prompts(text, "giraffe")) == 3


def test_similarity_and_diversity():
    a = "a giraffe at sunset, golden light, 200mm"
    assert similarity(a, a) == 1.0
    assert similarity(a, "a zebra in the snow, blue hour, macro lens") < 0.2
    near = "a giraffe at sunset, golden light, 300mm"
    assert similarity(a, near) > 0.5
    d = diversity([a, a])
    assert d["mean_pairwise_similarity"] == 1.0
    assert diversity([a, "a zebra in the snow, blue hour"])["mean_pairwise_similarity"] < 0.2


class FakeChat:
    """Stands in for the LLM only to test the collection bookkeeping (retries, de-duplication)."""

    def __init__(self, outputs):
        self.outputs = list(outputs)
        self.calls = 0

    def sample(self, messages, num, seed):
        self.calls += 1
        return [self.outputs.pop(0) if self.outputs else "" for _ in range(num)]


def test_collect_drops_near_duplicates_and_retries(repo_root):
    from ccsr.config_files import load_config
    from ccsr.prompter import collect_prompts

    cfg = load_config(repo_root / "configs" / "tiny.yaml", ["prompter.max_attempts=3"])
    first = (
        "1. a giraffe at sunset, golden light, 200mm lens\n2. a giraffe at sunset, golden light, 200mm lens"
    )
    second = "1. two giraffes in the rain, grey sky, 35mm\n2. a giraffe calf asleep in grass, morning mist"
    chat = FakeChat([first, second])
    avoid = ["two giraffes in the rain, grey sky, 35mm"]
    batch = collect_prompts(chat, cfg, "giraffe", 2, avoid, seed=0)
    assert batch.prompts == [
        "a giraffe at sunset, golden light, 200mm lens",
        "a giraffe calf asleep in grass, morning mist",
    ]
    assert batch.dropped["near_duplicate"] == 2
    assert chat.calls == 2


def test_collect_never_returns_a_validation_prompt_even_when_repeats_are_kept(repo_root):
    from ccsr.config_files import load_config
    from ccsr.prompter import collect_prompts

    # threshold 1 keeps exact repeats of earlier iterations' prompts (the shapes world relies on it) ...
    cfg = load_config(repo_root / "configs" / "tiny.yaml", ["prompter.similarity_threshold=1.0"])
    seen = "a giraffe at sunset, golden light, 200mm lens"
    held = "two giraffes in the rain, grey sky, 35mm"
    chat = FakeChat([f"1. {seen}\n2. {held}\n3. a giraffe calf asleep in grass, morning mist"])
    batch = collect_prompts(chat, cfg, "giraffe", 2, [seen], seed=0, held_out=[held])
    assert batch.prompts == [seen, "a giraffe calf asleep in grass, morning mist"]
    # ... but a validation prompt, which the gate evaluates, is never a training prompt
    assert held not in batch.prompts and batch.dropped["near_duplicate"] == 1


def test_collect_gives_up_after_budget(repo_root):
    from ccsr.config_files import load_config
    from ccsr.prompter import collect_prompts

    cfg = load_config(repo_root / "configs" / "tiny.yaml", ["prompter.max_attempts=2"])
    chat = FakeChat([])
    batch = collect_prompts(chat, cfg, "giraffe", 3, [], seed=0)
    assert batch.prompts == [] and batch.attempts == 2
    assert batch.dropped["unparsable"] >= 2


def test_prompt_with_braces_is_kept_literally(repo_root):
    from ccsr.config_files import load_config
    from ccsr.prompter import build_messages

    cfg = load_config(repo_root / "configs" / "tiny.yaml")
    msgs = build_messages(cfg, "{n} giraffe {examples}", 5)
    assert "{n} giraffe {examples}" in msgs[0]["content"]


class SeedRecorder:
    """Stands in for the LLM to record the seed of every sample, as vLLM gives them: sample i gets seed + i."""

    seeds: list[int] = []

    def __init__(self, cfg):
        pass

    def sample(self, messages, num, seed):
        from ccsr.prompter import MAX_SAMPLES_PER_CALL

        assert 1 <= num <= MAX_SAMPLES_PER_CALL
        SeedRecorder.seeds.extend(seed + i for i in range(num))
        return [""] * num  # nothing usable: every call of the retry budget is spent

    def close(self):
        pass


def test_no_two_samples_of_a_run_share_a_seed(tmp_path, repo_root, monkeypatch):
    """Validation and every iteration, each call asking for the most samples: every sample seed distinct."""
    from ccsr import backends
    from ccsr.config_files import load_config, save_config
    from ccsr.loop import Loop
    from ccsr.prompter import MAX_SAMPLES_PER_CALL
    from ccsr.rundir import RunDir

    monkeypatch.setitem(backends.BACKENDS["prompter"], "seeds", "tests.test_prompter_parse:SeedRecorder")
    monkeypatch.syspath_prepend(str(repo_root))
    monkeypatch.setattr(SeedRecorder, "seeds", [])
    overrides = ["prompter.max_attempts=5", "prompter.prompts_per_call=1"]
    overrides += ["prompter.n_prompts=40", "prompter.n_validation=40"]
    cfg = load_config(repo_root / "configs" / "tiny.yaml", overrides, class_name="giraffe")
    cfg.prompter.backend = "seeds"
    run = RunDir(tmp_path / "giraffe")
    run.root.mkdir()
    save_config(cfg, run.config_path)
    loop = Loop(cfg, run)
    for k in (1, 2, 3, 4):
        run.iteration_dir(k).mkdir(parents=True)
        assert loop.stage_prompts(k)["attempts"] == 5
    seeds = SeedRecorder.seeds
    assert len(seeds) == (1 + 4) * 5 * MAX_SAMPLES_PER_CALL  # validation + 4 iterations, 5 calls of 4 each
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)  # what torch's and vLLM's generators take
