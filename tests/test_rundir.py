import pytest

from ccsr.evaluation import summarise, win_tie_loss
from ccsr.rundir import RunDirError, append_jsonl, read_jsonl, slugify


def test_jsonl_torn_tail_is_ignored_then_cut(tmp_path):
    path = tmp_path / "r.jsonl"
    append_jsonl(path, [{"a": 1}, {"a": 2}])
    with open(path, "ab") as f:
        f.write(b'{"a": 3, "tr')  # a crash mid-append
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    append_jsonl(path, [{"a": 4}])
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 4}]


@pytest.mark.parametrize("bad", ["", "  ", "..", "a/b", "a\\b", "gir\x00affe", "x" * 500])
def test_bad_class_names(bad):
    with pytest.raises(RunDirError):
        slugify(bad)


@pytest.mark.parametrize(
    "name, slug",
    [("Giraffe", "giraffe"), ("zebra crossing", "zebra-crossing"), ("松鼠", "松鼠"), ("Schwan", "schwan")],
)
def test_slugs(name, slug):
    assert slugify(name) == slug


def test_win_tie_loss_tie_band():
    w = win_tie_loss([30.0, 30.005, 29.0, 31.0], [30.0, 30.0, 30.0, 30.0], 0.01)
    assert (w.wins, w.ties, w.losses) == (1, 2, 1)
    assert w.win_rate == 0.25 and w.win_tie_rate == 0.75


def test_summarise_picks_best_scale():
    recs = []
    for pid in ("a", "b"):
        recs.append({"prompt_id": pid, "seed": 0, "scale": 0.0, "clip_score": 20.0})
        recs.append({"prompt_id": pid, "seed": 0, "scale": 0.5, "clip_score": 21.0})
        recs.append({"prompt_id": pid, "seed": 0, "scale": 1.0, "clip_score": 19.0})
    s = summarise(recs, [0.0, 0.5, 1.0], 0.01)
    assert s["best_scale"] == 0.5 and s["win_rate"] == 1.0 and s["wins"] == 2
    assert s["by_scale"]["0"]["ties"] == 2
    assert s["clip_score_by_scale"] == {"0": 20.0, "0.5": 21.0, "1": 19.0}


def test_clean_temp_removes_only_temp_names(tmp_path):
    from ccsr.rundir import RunDir

    (tmp_path / "iterations" / "001" / ".dataset.tmp123").mkdir(parents=True)
    (tmp_path / "iterations" / "001" / ".dataset.tmp123" / "a.png").write_bytes(b"x")
    (tmp_path / ".config.yaml.tmp99").write_text("x")
    (tmp_path / "keep.tmp").write_text("x")
    (tmp_path / ".hidden").write_text("x")
    assert RunDir(tmp_path).clean_temp() == 2
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [".hidden", "keep.tmp"]


def test_status_reads_a_run_without_building_models(tmp_path, monkeypatch):
    from ccsr.config import Config
    from ccsr.config_files import save_config
    from ccsr.status import run_status

    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("CCSR_CACHE", str(cache))
    run = tmp_path / "giraffe"
    save_config(Config(class_name="giraffe", generator=Config().generator), run / "config.yaml")
    st = run_status(run)
    assert st["class"] == "giraffe" and st["iterations_completed"] == 0
    assert st["base_model"].startswith(str(cache)) and "stable-diffusion" in st["base_model"]
    assert not cache.exists(), "status must not build the embedded models"


def test_training_and_preference_datasets_load_with_datasets(tmp_path):
    """The iteration's image folders are what datasets' imagefolder reads: one image and a caption per pair;
    a preferred and a rejected image per preference pair, Pick-a-Pic's column names, label_0 = 1."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from ccsr.records import Pair, Preference, write_dataset, write_preference_dataset
    from ccsr.rundir import RunDir

    run = RunDir(tmp_path / "run")
    cand = run.candidates_dir(1)
    cand.mkdir(parents=True)
    colours = {0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255)}
    for j, rgb in colours.items():
        Image.new("RGB", (8, 8), rgb).save(cand / f"001-000-{j:02d}.png")
    path = {j: f"iterations/001/candidates/001-000-{j:02d}.png" for j in colours}
    pairs = [Pair("001-000", j, "one red circle", path[j], 10 - j, 0.9) for j in (0, 1)]
    prefs = [Preference("001-000", "one red circle", j, 2, path[j], path[2], 10 - j, 3) for j in (0, 1)]
    write_dataset(run, 1, pairs)
    write_preference_dataset(run, 1, prefs)

    sft = datasets.load_dataset("imagefolder", data_dir=str(run.files(1)["dataset"]), split="train")
    assert {(r["text"], r["image"].getpixel((0, 0))) for r in sft} == {
        ("one red circle", colours[0]),
        ("one red circle", colours[1]),
    }
    dpo = datasets.load_dataset(
        "imagefolder", data_dir=str(run.files(1)["preference_dataset"]), split="train"
    )
    rows = sorted(dpo, key=lambda r: r["score_0"], reverse=True)
    assert [r["jpg_0"].getpixel((0, 0)) for r in rows] == [colours[0], colours[1]]
    assert [r["jpg_1"].getpixel((0, 0)) for r in rows] == [colours[2], colours[2]]
    assert [(r["caption"], r["label_0"], r["score_1"]) for r in rows] == [("one red circle", 1, 3)] * 2
