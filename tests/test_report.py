"""``ccsr report``: a synthetic run directory (fake PNGs, hand-written records) rendered to one static HTML page.

The report is bookkeeping and rendering only, so fake data is the right input here: no model is involved.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
import yaml
from PIL import Image

from ccsr.cli import EXIT_BAD_INPUT, main
from ccsr.report import write_report
from ccsr.rundir import STAGES, atomic_write_json, write_jsonl

N = 10
SCRIPT_PROMPT = 'A giraffe <script>alert("x")</script> at dusk & "quoted"'
CHROMIUM = Path("/usr/bin/chromium")


# ---------------------------------------------------------------------------------------------------------------
# A synthetic run: iteration 1 complete with eval, iteration 2 stopped before training, one prompt without a pair
# ---------------------------------------------------------------------------------------------------------------


def _png(path: Path, seed: int, noisy: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    if noisy:  # ~27 KB: above the embedding threshold, linked by relative path
        image = Image.frombytes("RGB", (96, 96), bytes(rng.randrange(256) for _ in range(96 * 96 * 3)))
    else:  # a few hundred bytes: embedded as a data URI
        image = Image.new("RGB", (64, 64), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    image.save(path)


def _iteration(
    root: Path, k: int, prompts: list[str], pair_index: dict[int, int | None], noisy: bool, stages
):
    d = root / "iterations" / f"{k:03d}"
    prompt_records, cands, judgments, detections, pairs = [], [], [], [], []
    for i, text in enumerate(prompts):
        pid = f"{k:03d}-{i:03d}"
        prompt_records.append({"id": pid, "class": "giraffe", "prompt": text})
        best = pair_index.get(i)
        for j in range(N):
            rel = f"iterations/{k:03d}/candidates/{pid}-{j:02d}.png"
            _png(root / rel, seed=k * 1000 + i * 100 + j, noisy=noisy)
            cands.append(
                {"prompt_id": pid, "index": j, "seed": 7 * j + i, "path": rel, "lora": None, "scale": 0.0}
            )
            top = j in (2, 5)  # images 2 and 5 tie at the best score of every prompt
            answers = ["yes", "no", "yes", "yes", "yes", "no", "yes", "yes", "no", "yes"]
            if not top:
                answers[0] = "no"
                answers[2], answers[3:7] = "no", ["nan"] * 4
            score = 9 if top else 3
            judgments.append(
                {
                    "prompt_id": pid,
                    "index": j,
                    "answers": answers,
                    "score": score,
                    "p_yes": [round(0.1 * (q + 1) - 0.05, 3) for q in range(10)],
                }
            )
            if top:
                conf = 0.9 if best == j else (0.7 if best is not None else 0.3)
                detections.append({"prompt_id": pid, "index": j, "score": score, "confidence": conf})
        if best is not None:
            pairs.append(
                {
                    "prompt_id": pid,
                    "index": best,
                    "prompt": text,
                    "path": f"iterations/{k:03d}/candidates/{pid}-{best:02d}.png",
                    "score": 9,
                    "confidence": 0.9,
                }
            )
    write_jsonl(d / "prompts.jsonl", prompt_records)
    write_jsonl(d / "candidates.jsonl", cands)
    write_jsonl(d / "judgments.jsonl", judgments)
    write_jsonl(d / "detections.jsonl", detections)
    write_jsonl(d / "pairs.jsonl", pairs)
    done = {}
    for s in stages:
        done[s] = {"finished_at": 1.7e9, "seconds": 1.5 + STAGES.index(s)}
    if "prompts" in done:
        done["prompts"].update(
            {
                "dropped": {"near_duplicate": 2, "unparsable": 1},
                "attempts": 2,
                "diversity": {"mean_pairwise_similarity": 0.12, "distinct_bigrams": 0.9},
            }
        )
    atomic_write_json(d / "stages.json", done)
    return d


def _eval(root: Path, k: int, extended: bool) -> None:
    d = root / "iterations" / f"{k:03d}"
    scales = [0.0, 0.4, 1.0]
    records = []
    for v in range(2):
        for seed in range(2):
            for scale in scales:
                rel = f"iterations/{k:03d}/eval/scale-{scale:g}/val-{v:03d}-s{seed}.png"
                _png(root / rel, seed=v * 10 + seed + int(scale * 100), noisy=False)
                rec = {
                    "prompt_id": f"val-{v:03d}",
                    "prompt": f"validation giraffe {v}",
                    "seed": seed,
                    "generator_seed": 1000 * v + seed,
                    "scale": scale,
                    "clip_score": 20 + scale + v,
                }
                if extended:
                    rec.update({"judge_score": 5 + scale, "detected": scale > 0.5})
                records.append({**rec, "path": rel})
    write_jsonl(d / "eval" / "records.jsonl", records)
    by_scale = {}
    for scale in scales:
        row = {
            "clip_score": 20.5 + scale,
            "wins": int(scale * 4),
            "ties": 0,
            "losses": 4 - int(scale * 4),
            "win_rate": scale,
            "win_tie_rate": 1.0 if scale == 0 else scale,
        }
        if extended:
            row.update({"judge_score": 5 + scale, "detection_rate": scale / 2})
        by_scale[f"{scale:g}"] = row
    atomic_write_json(
        d / "eval.json",
        {
            "best_scale": 1.0,
            "win_rate": 1.0,
            "win_tie_rate": 1.0,
            "wins": 4,
            "ties": 0,
            "losses": 0,
            "clip_score_by_scale": {k: v["clip_score"] for k, v in by_scale.items()},
            "by_scale": by_scale,
            "n_images_per_scale": 4,
            "tie_band": 0.01,
            "lora": f"iterations/{k:03d}/lora",
        },
    )
    (d / "lora").mkdir(parents=True, exist_ok=True)
    (d / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"fake")


def make_run(root: Path, extended: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    cfg = {
        "class_name": "giraffe",
        "iterations": 3,
        "seed": 0,
        # An embedded model with an empty cache on purpose: the report must never build or load a model.
        "model_cache": str(root / "models"),
        "generator": {"model": "ccsr-tiny/stable-diffusion"},
        "judge": {"questions": "prompts/questions.yaml"},
        "detector": {"threshold": 0.6},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    write_jsonl(
        root / "validation_prompts.jsonl",
        [{"id": f"val-{v:03d}", "class": "giraffe", "prompt": f"validation giraffe {v}"} for v in range(2)],
    )
    _iteration(
        root,
        1,
        ["a giraffe under an acacia tree", SCRIPT_PROMPT, "a giraffe crossing a river"],
        {0: 5, 1: 2, 2: None},  # prompt 2: its best images are detected below 0.6 -> no pair
        noisy=False,
        stages=STAGES,
    )
    _eval(root, 1, extended)
    _iteration(
        root,
        2,
        ["two giraffes at a waterhole", "a giraffe in the mist"],
        {0: 2, 1: 5},
        noisy=True,
        # Stopped before training (no LoRA, no eval), unless the extended run needs two evaluated iterations.
        stages=STAGES if extended else STAGES[:4],
    )
    if extended:
        _eval(root, 2, extended)
        atomic_write_json(
            root / "champion.json",
            {
                "history": [
                    {"iteration": 1, "accepted": True, "reason": "beats base", "metric": 0.75, "scale": 1.0}
                ],
                "champion": {"iteration": 1, "scale": 1.0},
            },
        )
        # A record pointing outside the run directory must not be followed (records are data).
        cands = root / "iterations" / "002" / "candidates.jsonl"
        lines = cands.read_text().splitlines()
        rec = json.loads(lines[0])
        rec["path"] = "../../../etc/hostname"
        lines[0] = json.dumps(rec)
        cands.write_text("\n".join(lines) + "\n")
    return root


class ReportParser(HTMLParser):
    """Collects what the tests check: images, tags, and the candidate figures of each prompt block."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: dict[str, int] = {}
        self.images: list[str] = []
        self.figures: dict[str, list[dict]] = {}
        self.prompt_text: dict[str, str] = {}
        self._prompt: str | None = None
        self._in_prompt_text = False
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        classes = (a.get("class") or "").split()
        if tag == "img":
            self.images.append(a.get("src") or "")
        if tag == "div" and "prompt" in classes:
            self._prompt = a["data-prompt-id"]
            self.figures[self._prompt] = []
        if tag == "div" and "prompt-text" in classes:
            self._in_prompt_text = True
            self.prompt_text[self._prompt] = ""
        if tag == "figure" and "cand" in classes:
            self.figures[self._prompt].append(
                {
                    "index": int(a["data-index"]),
                    "selected": "selected" in classes,
                    "data": a.get("data-selected"),
                }
            )

    def handle_endtag(self, tag):
        if tag == "div":
            self._in_prompt_text = False

    def handle_data(self, data):
        self.text.append(data)
        if self._in_prompt_text:
            self.prompt_text[self._prompt] += data


def parse(html: str) -> ReportParser:
    parser = ReportParser()
    parser.feed(html)
    parser.close()
    return parser


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("report") / "giraffe")


@pytest.fixture(scope="module")
def report(run_dir) -> Path:
    return write_report(run_dir)


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------


def test_images_resolve_inside_run_dir_and_no_network(report, run_dir):
    html = report.read_text(encoding="utf-8")
    assert report == run_dir / "report.html"
    parser = parse(html)
    local = [src for src in parser.images if not src.startswith("data:")]
    embedded = [src for src in parser.images if src.startswith("data:image/png;base64,")]
    # Iteration 1's small PNGs are embedded, iteration 2's bigger ones and the plots are linked.
    assert embedded and local
    assert len(parser.images) == len(local) + len(embedded)
    for src in local:
        path = (report.parent / unquote(src)).resolve()
        assert path.is_file(), src
        assert path.is_relative_to(run_dir.resolve()), src
    assert "http://" not in html and "https://" not in html
    assert "//" not in "".join(local)
    # Nothing that could fetch or run anything: no scripts, stylesheets, frames or objects.
    for tag in ("script", "link", "iframe", "object", "embed"):
        assert tag not in parser.tags, tag


def test_grid_of_ten_and_selected_image_marked(report):
    parser = parse(report.read_text(encoding="utf-8"))
    expected_pair = {"001-000": 5, "001-001": 2, "001-002": None, "002-000": 2, "002-001": 5}
    assert set(parser.figures) == set(expected_pair)
    for pid, figures in parser.figures.items():
        assert [f["index"] for f in figures] == list(range(N)), pid  # 2 x 5 grid, in order
        selected = [f["index"] for f in figures if f["selected"]]
        want = expected_pair[pid]
        assert selected == ([] if want is None else [want]), pid
        assert all(f["data"] == "true" for f in figures if f["selected"])
    text = "".join(parser.text)
    assert text.count("\u2605 selected") == 4
    assert "no pair (no detection \u2265 0.60)" in text


def test_llm_prompt_is_escaped(report):
    html = report.read_text(encoding="utf-8")
    assert "<script>" not in html
    assert "&lt;script&gt;alert(" in html
    parser = parse(html)
    assert parser.prompt_text["001-001"] == SCRIPT_PROMPT  # shown verbatim as text
    assert "script" not in parser.tags


def test_summary_scores_answers_and_eval(report, run_dir):
    html = report.read_text(encoding="utf-8")
    text = "".join(parse(html).text)
    # Summary: class, iterations done / target, in-progress stage, pairs, best win-rate, stage times.
    assert "giraffe" in text
    assert "1 / 3" in text and "iteration 2: train" in text
    assert "best win-rate" in text and "1.00" in text
    assert 'id="stage-times"' in html and "1.5 s" in text
    # Near-duplicates dropped are reported per iteration.
    assert "2 near-duplicate" in text
    assert "mean pairwise similarity 0.12, distinct bigrams 0.90" in text
    # Score and detection confidence under each image ("-" where the detector did not look).
    assert "score 9 \u00b7 det 0.90" in text and "score 3 \u00b7 det -" in text
    # Per-question answers with the question text (class substituted) and P(yes), on demand.
    assert html.count("<summary>answers</summary>") == 5 * N
    assert "can you clearly see giraffe in the image?" in text
    assert "{class_name}" not in text
    # Eval only in iteration 1: one table, one per-iteration plot, the across-iterations plot.
    assert html.count('class="eval-table"') == 1
    assert (run_dir / "report" / "eval-iter-001.png").is_file()
    assert not (run_dir / "report" / "eval-iter-002.png").exists()
    # One evaluated iteration: nothing to plot across iterations yet.
    assert not (run_dir / "report" / "across-iterations.png").exists()
    assert "Champion history" not in html  # no champion.json: section skipped


def test_champion_extra_metrics_and_unsafe_paths(tmp_path):
    run = make_run(tmp_path / "giraffe", extended=True)
    out = write_report(run, embed_max_bytes=0)  # everything linked by relative path
    html = out.read_text(encoding="utf-8")
    parser = parse(html)
    text = "".join(parser.text)
    assert not any(src.startswith("data:") for src in parser.images)
    for src in parser.images:
        assert (out.parent / unquote(src)).resolve().is_relative_to(run.resolve()), src
    assert "etc/hostname" not in "".join(parser.images)
    assert "image missing" in text  # the record pointing outside the run is shown as missing, not followed
    assert 'id="champion-history"' in html and "beats base" in text and "accepted" in text
    assert "judge score" in text and "detection rate" in text
    assert "detected yes" in text  # per-image eval flag from records.jsonl
    assert html.count('class="eval-table"') == 2
    assert "report/across-iterations.png" in parser.images
    assert (run / "report" / "across-iterations.png").is_file()


def test_cli_report_prints_path_and_rejects_bad_dirs(tmp_path, run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == str(run_dir / "report.html")
    assert not (run_dir / "models").exists()  # no model was built to render the page

    assert main(["report", str(tmp_path / "nope")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("ccsr: error:") and "\n" not in err

    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == EXIT_BAD_INPUT
    assert "no config.yaml" in capsys.readouterr().err
    assert not (tmp_path / "empty" / "report.html").exists()


@pytest.mark.parametrize("command", ["report", "status"])
@pytest.mark.parametrize(
    "config, expected",
    [("class_name: [giraffe\n", "not valid YAML"), ("iterations: 0\n", "'iterations' must be > 0")],
)
def test_a_config_that_does_not_load_is_one_line(tmp_path, capsys, command, config, expected):
    run = make_run(tmp_path / "giraffe")
    (run / "config.yaml").write_text(config, encoding="utf-8")
    assert main([command, str(run)]) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.startswith("ccsr: error:") and "\n" not in err and expected in err, err
    assert str(run / "config.yaml") in err
    assert captured.out == ""
    assert not (run / "report.html").exists()


def test_rebuild_is_stable_for_plots(run_dir, report):
    first = (run_dir / "report" / "eval-iter-001.png").read_bytes()
    write_report(run_dir)
    assert (run_dir / "report" / "eval-iter-001.png").read_bytes() == first


@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs /usr/bin/chromium")
def test_headless_chromium_screenshot(report, tmp_path):
    from PIL import ImageStat

    shot = tmp_path / "report.png"
    profile = tmp_path / "profile"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        report.resolve().as_uri(),
    ]
    subprocess.run(cmd, check=False, capture_output=True, timeout=120)
    shutil.rmtree(profile, ignore_errors=True)
    assert shot.is_file()
    with Image.open(shot) as img:
        assert img.size == (1280, 2000)
        assert max(ImageStat.Stat(img.convert("RGB")).var) > 0


def test_status_reads_the_same_records(run_dir):
    from ccsr.status import format_status, run_status

    st = run_status(run_dir)
    assert st["class"] == "giraffe" and st["iterations_target"] == 3 and st["iterations_completed"] == 1
    assert st["stage"] == "train"  # iteration 2 stopped before training
    assert st["base_model"].startswith(str(run_dir / "models"))
    assert not (run_dir / "models").exists()
    first, second = st["iterations"]
    assert (first["prompts"], first["candidates"], first["judged"], first["detections"], first["pairs"]) == (
        3,
        3 * N,
        3 * N,
        6,
        2,
    )
    assert first["lora"] == str(run_dir / "iterations" / "001" / "lora") and second["lora"] is None
    assert first["eval"]["win_rate"] == 1.0 and second["eval"] is None
    assert first["prompt_stats"]["dropped"] == {"near_duplicate": 2, "unparsable": 1}
    assert st["validation_prompts"] == 2 and st["champion"] is None and st["heartbeat"] is None
    assert "1/3 iterations, stage: train" in format_status(st)


def test_unwritable_run_dir_is_one_line(tmp_path, capsys, monkeypatch):
    import ccsr.report

    def refuse(path, text):  # a read-only run directory (this also holds for root, who may write anywhere)
        raise PermissionError(13, "Permission denied", str(path))

    run = make_run(tmp_path / "giraffe")
    monkeypatch.setattr(ccsr.report, "atomic_write_text", refuse)
    assert main(["report", str(run)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.startswith("ccsr: error:") and "check its permissions" in err and "\n" not in err
    assert not (run / "report.html").exists()
