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
    from ccsr.config import Config, save_config
    from ccsr.status import run_status

    cache = tmp_path / "empty-cache"
    monkeypatch.setenv("CCSR_CACHE", str(cache))
    run = tmp_path / "giraffe"
    save_config(Config(class_name="giraffe", generator=Config().generator), run / "config.yaml")
    st = run_status(run)
    assert st["class"] == "giraffe" and st["iterations_completed"] == 0
    assert st["base_model"].startswith(str(cache)) and "stable-diffusion" in st["base_model"]
    assert not cache.exists(), "status must not build the embedded models"
