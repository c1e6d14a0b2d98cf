"""``tl-degeneracy explore`` end to end on the embedded model: the pages (every direction section with its
highlighted contexts of both signs, links that resolve, Chromium parses them), the Neuronpedia export made from
them, and a SIGKILLed examples pass resumed to the uninterrupted result."""
from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tl_degeneracy.cli import main
from tl_degeneracy.dashboards.neuronpedia import ACTIVATION_KEYS, BATCH_KEYS, FEATURE_KEYS

pytestmark = pytest.mark.models
ROOT = Path(__file__).resolve().parents[1]
ANALYZE = ["--tokens", "2048", "--context", "64", "--stages", "grams,jacobians", "--threads", "1"]


@pytest.fixture(scope="module")
def explored(tmp_path_factory):
    out = tmp_path_factory.mktemp("explore") / "run"
    assert main(["analyze", *ANALYZE, "--out", str(out)]) == 0
    assert main(["explore", str(out), "--threads", "1"]) == 0
    return out


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.sections = 0
        self.hits = 0
        self.tokens = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "a" and "href" in a:
            self.links.append(a["href"])
        if tag == "section":
            self.sections += 1
        if tag == "span" and "tok" in (a.get("class") or "").split():
            self.tokens += 1
            self.hits += "hit" in a["class"].split()


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_pages_hold_every_direction_with_contexts_of_both_signs(explored):
    folder = explored / "explore"
    report = json.loads((explored / "report.json").read_text())
    hooks = [h for h in report["spectra"] if h.endswith("hook_resid_pre")]
    assert hooks
    for hook in hooks:
        for basis in ("interaction", "pca"):
            page = folder / f"{hook}.{basis}.html"
            text = page.read_text(encoding="utf-8")
            parsed = _parse(page)
            assert parsed.sections == 32, (page, parsed.sections)  # the 32 most important directions
            for section in re.findall(r"<section id=\"d\d+\">.*?</section>", text, flags=re.S):
                positive, negative = section.split("<h3>Most negative</h3>")
                for side in (positive, negative):  # ≥ 10 highlighted contexts per sign (2048 tokens have them)
                    assert side.count('class="ctx"') >= 10 and side.count("tok hit") >= 10
                assert "background:#" in section and "Direct logit effect" in section
    assert "explore/index.html" in (explored / "report.html").read_text()


def test_every_link_resolves(explored):
    folder = explored / "explore"
    pages = {p.name: _parse(p) for p in folder.glob("*.html")}
    checked = 0
    for name, page in pages.items():
        for href in page.links:
            target, _, anchor = href.partition("#")
            if target == "../report.html":
                assert (explored / "report.html").is_file()
                continue
            target = target or name
            assert target in pages, (name, href)
            assert not anchor or anchor in pages[target].ids, (name, href)
            checked += 1
    assert checked > 100


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (scripts/test.sh installs it)")
def test_chromium_parses_the_pages(explored, tmp_path):
    folder = explored / "explore"
    for name in ["index.html", "blocks.1.hook_resid_pre.interaction.html"]:
        dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path}",
                              "--dump-dom", (folder / name).resolve().as_uri()],
                             capture_output=True, text=True, timeout=120).stdout
        assert "</html>" in dom and "<section" in dom if name != "index.html" else "<svg" in dom
        if name != "index.html":
            assert dom.count("tok hit") >= 32 * 2 * 10


def test_neuronpedia_export_follows_saedashboards_schema(explored, capsys):
    out = explored / "np"
    assert main(["export", str(explored), "--format", "neuronpedia", "--basis", "all", "--out", str(out)]) == 0
    batches = sorted(out.glob("*/batch-0.json"))
    assert len(batches) == 2 * 5  # two bases × the five residual hooks of the embedded model
    facts = json.loads((explored / "explore" / "directions.json").read_text())["facts"]
    for path in batches:
        batch = json.loads(path.read_text())
        assert tuple(batch) == BATCH_KEYS
        assert len(batch["features"]) == 2 * 32
        hook = next(h for h in facts if f"_{h}_" in path.parent.name)
        basis = "interaction" if "tld-interaction" in path.parent.name else "pca"
        k = int(path.parent.name.rsplit("_", 1)[1]) // 2
        by_index = {f["index"]: f for f in facts[hook][basis]}
        for feature in batch["features"]:
            assert tuple(feature) == FEATURE_KEYS
            negative = feature["feature_index"] >= k
            fact = by_index[feature["feature_index"] - k * negative]
            assert 0 <= feature["frac_nonzero"] <= 1 and len(feature["activations"]) >= 10
            for act in feature["activations"]:
                assert set(ACTIVATION_KEYS) <= set(act) and len(act["tokens"]) == len(act["values"])
                assert min(act["values"]) >= 0  # relu(±f̂)
            tops = [a["values"][a["qualifying_token_index"]] for a in feature["activations"]]
            assert tops == sorted(tops, reverse=True) and tops[-1] > 0
            assert all(a["bin_max"] == tops[0] for a in feature["activations"])  # the group's largest
            raises = fact["logits_bottom"] if negative else fact["logits_top"]
            assert feature["pos_str"] == [t["token"] for t in raises]


_KILLABLE = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    from tl_degeneracy.dashboards import examples
    compute = examples.DirectionExamples.compute
    def slow(self, *a, **k):  # a slow machine: time to kill it between checkpoints
        time.sleep(0.15)
        yield from compute(self, *a, **k)
    examples.DirectionExamples.compute = slow
    from tl_degeneracy.analysis.explore import ExploreConfig, explore
    from tl_degeneracy.default_model import default_text_dataset, load_default_model
    explore(load_default_model(), default_text_dataset(), sys.argv[1], ExploreConfig(max_tokens=2048, batch_size=2),
            progress=False, checkpoint_every=1)
""")


def test_examples_pass_killed_and_resumed_equals_uninterrupted(explored, tmp_path):
    from tl_degeneracy.analysis.explore import EXAMPLES_FILE, EXPLORE_CHECKPOINT_FILE, ExploreConfig, explore
    from tl_degeneracy.collection.stats import Stats
    from tl_degeneracy.default_model import default_text_dataset, load_default_model

    folder = tmp_path / "run"
    shutil.copytree(explored, folder, ignore=shutil.ignore_patterns("explore", "np", EXAMPLES_FILE))
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, str(folder)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    checkpoint = folder / EXPLORE_CHECKPOINT_FILE
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if checkpoint.exists() and (Stats.load(checkpoint).progress.batches_seen or 0) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    seen = Stats.load(checkpoint).progress.batches_seen
    assert 0 < seen < 16
    model, data = load_default_model(), default_text_dataset()
    config = ExploreConfig(max_tokens=2048, batch_size=2)
    explore(model, data, folder, config, resume=True, progress=False, checkpoint_every=1)
    resumed = Stats.load(folder / EXAMPLES_FILE)
    whole = tmp_path / "whole"
    shutil.copytree(explored, whole, ignore=shutil.ignore_patterns("explore", "np", EXAMPLES_FILE))
    explore(model, data, whole, config, progress=False)
    uninterrupted = Stats.load(whole / EXAMPLES_FILE)
    assert resumed.accumulators.keys() == uninterrupted.accumulators.keys()
    for key, acc in uninterrupted.accumulators.items():
        assert resumed.accumulators[key] == acc, key  # top-k exactly; histogram counts and sums exactly too
