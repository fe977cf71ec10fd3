"""`daco report`: the static HTML report of an output folder (pipeline/report.py).

A tiny embedded `daco build` (two WordNet groups, untrained models) is made once per
session; the report is rendered in headless Chromium (Debian's chromium, offline) where
installed. A synthetic 15,000-concept dictionary checks the size limits."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main as daco
from pipeline.report import (CONCEPTS_PER_PAGE, MAP_BOX, MAX_PER_ROLE, SVG_MAX_POINTS, ReportError,
                             group_colours, group_separation, make_report, pca_2d)

CHROMIUM = Path("/usr/bin/chromium")
_LOCAL_REF = re.compile(r'(?:src|href)="([^"#]+)')


@pytest.fixture(scope="session")
def built(tiny_build) -> Path:
    """The tiny embedded build shared with test_build.py (conftest.py: ``tiny_build``)."""
    return tiny_build / "a"


@pytest.fixture(scope="session")
def reported(built):
    """The built folder after `daco report` (run through the CLI)."""
    assert daco(["report", str(built)]) == 0
    return built


def _refs(page: Path) -> list[str]:
    return _LOCAL_REF.findall(page.read_text())


def test_report_holds_summary_map_stats_and_gallery(reported):
    report = reported / "report"
    index = (report / "index.html").read_text()
    metadata = json.loads((reported / "metadata.json").read_text())
    assert "Run summary" in index and "Untrained models" in index
    for model in metadata["models"].values():
        assert model["id"] in index
    stages = {name.split(".")[0] for name in metadata["counters"]}
    assert {"shards", "retrieve", "directions"} <= stages
    for stage in stages:
        assert f"<h4>{stage}</h4>" in index
    assert 'id="concept-map" src="figures/concept_map.png"' in index
    assert "<title>" in index.split("<svg", 1)[1]  # hover titles of the small map
    for name in ("concept_map.png", "layer_stats.png"):
        assert (report / "figures" / name).read_bytes().startswith(b"\x89PNG")
    # groups of the build each have a gallery page linked from the index
    groups = {r["group"] for r in pq.read_table(reported / "concepts.parquet").to_pylist()}
    assert len(groups) >= 2
    pages = sorted((report / "gallery").glob("*.html"))
    assert {p.stem for p in pages} == groups
    for page in pages:
        assert f'href="gallery/{page.name}"' in index


def test_every_local_reference_resolves_and_thumbnails_are_lazy(reported):
    report = reported / "report"
    pages = [report / "index.html", *sorted((report / "gallery").glob("*.html"))]
    thumbs, figures = set(), 0
    for page in pages:
        text = page.read_text()
        for ref in _refs(page):
            assert not ref.startswith(("http:", "https:", "//")), f"{page.name} fetches {ref}"
            assert (page.parent / ref).is_file(), f"{page.name}: {ref} does not exist"
            if "thumbs/" in ref:
                thumbs.add((page.parent / ref).resolve())
        for tag in re.findall(r"<img [^>]*thumbs/[^>]*>", text):
            assert 'loading="lazy"' in tag
        figures += text.count("<figure")
        assert 'class="nothumb"' not in text  # every stimulus image was found in the shards
    assert thumbs == {p.resolve() for p in (report / "thumbs").rglob("*.jpg")} and thumbs
    assert figures == pq.read_table(reported / "stimuli").num_rows  # k=3, n_negatives=3 < MAX_PER_ROLE


def test_rerun_reuses_thumbnails_same_bytes_and_one_figures_section(reported):
    before = {p: p.read_bytes() for p in (reported / "report").rglob("*") if p.is_file()}
    again = make_report(reported)
    assert again.thumbs_written == 0 and again.thumbs_reused == len(list((reported / "report" / "thumbs").rglob("*.jpg")))
    after = {p: p.read_bytes() for p in (reported / "report").rglob("*") if p.is_file()}
    assert after == before
    card = (reported / "README.md").read_text()
    assert card.count("## Figures") == 1 and "](report/figures/concept_map.png)" in card
    from transforms.write import read_card_front_matter, validate_output_folder
    assert read_card_front_matter(card)["configs"]
    published = [f.path for f in validate_output_folder(reported)]  # the linked figures are uploaded with the card
    assert {"report/figures/concept_map.png", "report/figures/layer_stats.png"} <= set(published)


def test_concepts_option_limits_the_gallery_and_bad_options_fail(reported, tmp_path, capsys):
    concept_ids = [r["concept_id"] for r in pq.read_table(reported / "concepts.parquet").to_pylist()]
    out = tmp_path / "copy"  # a moved folder: its shards are found relative to it (metadata.json's "shards")
    shutil.copytree(reported, out, ignore=shutil.ignore_patterns("report", "embeddings"))
    report = make_report(out, concept_ids=concept_ids[:1], layer=1)
    assert report.layer == 1 and len(report.gallery_pages) == 1
    assert report.thumbs_written == len(list((out / "report" / "thumbs").rglob("*.jpg"))) > 0
    assert report.thumbs_missing == report.thumbs_reused == 0
    page = report.gallery_pages[0].read_text()
    assert f'id="{concept_ids[0]}"' in page and f'id="{concept_ids[1]}"' not in page
    with pytest.raises(KeyError, match=concept_ids[0]):
        make_report(out, concept_ids=[concept_ids[0] + "x"])
    with pytest.raises(ReportError, match=r"available layers: \[1, 2\]"):
        make_report(out, layer=7)
    assert daco(["report", str(out), "--layer", "7"]) == 2
    assert "--layer 7" in capsys.readouterr().err
    with pytest.raises(ReportError, match="metadata.json: missing"):
        make_report(tmp_path)


def test_a_nan_direction_is_refused_by_the_dictionary_loaders_own_check(reported, tmp_path):
    """The report reads dictionary files through steering.dictionary's reader, so it refuses what load_dictionary refuses."""
    import numpy as np
    import pyarrow as pa

    out = tmp_path / "copy"
    shutil.copytree(reported, out, ignore=shutil.ignore_patterns("report", "embeddings"))
    path = sorted((out / "dictionary").glob("*.parquet"))[0]
    table = pq.read_table(path)
    column = table.column("direction").combine_chunks()
    values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).copy()
    values[3] = np.nan
    broken = pa.FixedSizeListArray.from_arrays(pa.array(values), column.type.list_size)
    pq.write_table(table.set_column(table.column_names.index("direction"), "direction", broken), path)
    with pytest.raises(ReportError, match=r"direction\(s\) contain NaN/inf, e.g. .*; re-run the directions stage"):
        make_report(out, layer=int(table.column("layer")[0].as_py()))


def test_a_truncated_shard_leaves_its_later_images_missing_not_a_crash(reported, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(reported, out, ignore=shutil.ignore_patterns("report", "embeddings"))
    tar = next((out / "corpus" / "shards").glob("*.tar"))
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    metadata = json.loads((out / "metadata.json").read_text())
    (out / "metadata.json").write_text(json.dumps({**metadata, "shards": str(out / "corpus" / "shards" / "*.tar")}))
    report = make_report(out, update_card=False)
    assert report.thumbs_written > 0 and report.thumbs_missing > 0
    assert sum(p.read_text().count('class="nothumb"') for p in report.gallery_pages) >= report.thumbs_missing


def test_projection_and_separation_measure_planted_groups():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 32)) * 5
    labels = np.repeat(["a", "b", "c"], 20)
    clustered = centres[np.repeat(np.arange(3), 20)] + rng.normal(size=(60, 32))
    accuracy, chance, silhouette = group_separation(clustered, labels)
    assert accuracy == 1.0 and chance == pytest.approx(1 / 3) and silhouette > 0.5
    accuracy, _, silhouette = group_separation(rng.normal(size=(60, 32)), labels)
    assert accuracy < 0.7 and abs(silhouette) < 0.1
    assert group_separation(clustered, ["a"] * 60) == (None, None, None)
    coords, ratio = pca_2d(clustered)
    assert coords.shape == (60, 2) and 0 < ratio[1] <= ratio[0] <= 1
    np.testing.assert_array_equal(coords, pca_2d(clustered.copy())[0])
    assert len({tuple(np.round(coords[labels == g].mean(0), 1)) for g in "abc"}) == 3


# --------------------------------------------------------------------------- browser

def render(page: Path, png: Path, profile: Path, size=(1280, 1000)) -> str:
    """Screenshot ``page`` with headless Chromium, offline; returns its log (stderr).

    Console messages and uncaught exceptions appear in that log as ``INFO:CONSOLE`` lines
    (``--enable-logging=stderr --v=0``); the report has no scripts, so any such line is an error."""
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", f"--screenshot={png}",
           f"--window-size={size[0]},{size[1]}", page.as_uri()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0 and png.is_file(), done.stderr[-2000:]
    return done.stderr


def console_lines(log: str) -> list[str]:
    """The browser console lines of a Chromium log (messages and uncaught errors)."""
    return [line for line in log.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is not installed at "
                                    "/usr/bin/chromium (`make install` installs it: apt-get install chromium)")


@needs_chromium
def test_chromium_shows_the_map_without_console_errors(reported, tmp_path):
    from PIL import Image

    png = tmp_path / "index.png"
    log = render(reported / "report" / "index.html", png, tmp_path / "profile")
    assert console_lines(log) == []
    left, top, width, height = MAP_BOX
    pixels = np.asarray(Image.open(png).convert("RGB"))[top:top + height, left:left + width].reshape(-1, 3)
    inked = (pixels < 235).any(axis=1)
    assert inked.mean() > 0.01, "the map area of the screenshot is blank"
    # the map shows the concepts with directions (concepts.parquet also lists the retrieval reserve)
    mapped = set(pq.read_table(reported / "dictionary", columns=["concept_id"]).column("concept_id").to_pylist())
    groups = [r["group"] for r in pq.read_table(reported / "concepts.parquet").to_pylist() if r["concept_id"] in mapped]
    for group, colour in group_colours(groups).items():  # a dot of every group's colour is on screen
        rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(pixels.astype(int) - rgb).max(axis=1) < 24).sum() >= 4, f"no {group} dot in the map area"
    # the detector sees a console error where there is one
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>undefinedFunction();</script></body></html>")
    assert any("Uncaught ReferenceError" in line
               for line in console_lines(render(broken, tmp_path / "broken.png", tmp_path / "profile")))


# --------------------------------------------------------------------------- 15,000 concepts

N_LARGE, GROUPS_LARGE = 15_000, 26


@pytest.fixture(scope="module")
def large_folder(tmp_path_factory) -> Path:
    """A synthetic folder: 15,000 concepts in 26 groups, 2 layers of d=16, 4 stimuli each, no shards."""
    from steering.dictionary import write_dictionary_parquet
    from transforms import fileio
    from transforms.concepts import SCHEMA as CONCEPTS_SCHEMA
    from transforms.retrieve import SCHEMA as STIMULI_SCHEMA

    out = tmp_path_factory.mktemp("large")
    rng = np.random.default_rng(0)
    ids = [f"c{i:05d}.n.01" for i in range(N_LARGE)]
    groups = [f"noun.g{i % GROUPS_LARGE:02d}" for i in range(N_LARGE)]
    fileio.write_parquet_atomic(str(out / "concepts.parquet"), pa.Table.from_pylist([
        {"concept_id": c, "lemma": c[:6], "lemmas": [c[:6]], "definition": "synthetic", "group": g,
         "hypernym_path": ["entity.n.01", c], "depth": 2, "frequency": 1,
         "polarity": "undesirable" if i % 50 == 0 else "neutral", "polarity_source": ""}
        for i, (c, g) in enumerate(zip(ids, groups))], schema=CONCEPTS_SCHEMA))
    fileio.write_parquet_atomic(str(out / "stimuli" / "stimuli-00000-of-00001.parquet"), pa.Table.from_pylist([
        {"concept_id": c, "key": f"{i:08d}{role[0]}{r}", "caption": f"a {role} photo of {c}", "url": "",
         "shard": "00000", "s_img": 0.5, "s_txt": 0.5, "score": 1.0, "role": role, "rank": r}
        for i, c in enumerate(ids) for role in ("positive", "negative") for r in range(2)], schema=STIMULI_SCHEMA))
    for layer in (4, 8):
        mat = rng.normal(size=(N_LARGE, 16)).astype(np.float32)
        write_dictionary_parquet(out / "dictionary" / f"layer_{layer:03d}.parquet",
                                 [{"concept_id": c, "layer": layer, "direction": v, "n_pos": 2, "n_neg": 2}
                                  for c, v in zip(ids, mat)])
    (out / "metadata.json").write_text(json.dumps({
        "models": {"mllm": {"id": "untrained:qwen2_vl", "untrained": True}}, "layers": [4, 8], "untrained": True,
        "counters": {"shards.read": 0}, "shards": str(out / "nowhere" / "*.tar")}))
    (out / "README.md").write_text("---\nconfigs: []\n---\n\n# card\n")
    return out


def test_15000_concepts_stay_within_page_limits(large_folder, tmp_path):
    report = make_report(large_folder, update_card=False)
    index = report.index.read_text()
    assert report.index.stat().st_size < 1_000_000
    assert "<svg" not in index and f"above {SVG_MAX_POINTS:,}" in index
    per_group = -(-N_LARGE // GROUPS_LARGE)
    assert len(report.gallery_pages) == GROUPS_LARGE * -(-per_group // CONCEPTS_PER_PAGE)
    assert report.thumbs_missing == 4 * N_LARGE and report.thumbs_written == 0
    for page in report.gallery_pages:
        text = page.read_text()
        assert text.count('class="concept"') <= CONCEPTS_PER_PAGE
        assert text.count("<figure") <= CONCEPTS_PER_PAGE * 2 * MAX_PER_ROLE
        assert page.stat().st_size < 200_000
    if CHROMIUM.exists():  # the big index and a gallery page render, quietly
        for page in (report.index, report.gallery_pages[0]):
            assert console_lines(render(page, tmp_path / f"{page.stem}.png", tmp_path / "profile")) == []
