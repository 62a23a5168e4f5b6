"""report.md / report.html rendered from a real `pddnet validate` report: the files exist,
every image is embedded (HTML) or linked (Markdown) and decodes to a non-blank PNG, the
numbers in both equal report.json's, failed gates show as FAIL, and a failure while writing
leaves nothing behind.

Data: 4 synthetic subjects (2 test pairs); model: the `tiny` preset randomly initialised with a
sharp softmax, exported at 48x40x64 with the entropy output (as tests/validation/test_validate.py).

Not tested here: how the figures look (a person reads them; docs/validation.md shows one).
"""

import base64
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from helpers.tiny_pipeline import tiny_pipeline

    return tiny_pipeline(tmp_path_factory.mktemp("render"), outputs=("entropy",))


@pytest.fixture(scope="module")
def rendered(setup):
    from pddnet.validation.compare import Candidate, Gate, compare, default_candidates
    from pddnet.validation.render import FigureCollector, write_report_files

    ref, cands = default_candidates(setup["ckpt"], setup["onnx"])
    # an impossible gate, so that the report shows a FAIL
    cands.append(Candidate("onnxruntime-strict", "onnxruntime", setup["onnx"], "fp32", {},
                           (Gate("disp_diff_max_vox", 0.0),)))
    figs = FigureCollector(2, ref.name)
    report = compare(ref, cands, setup["data"], threads=1, warmup=1, repeats=3, isolate=False,
                     progress=False, observe=figs)
    out = setup["tmp"] / "report"
    paths = write_report_files(report, out, figures=figs)
    return {"out": out, "paths": paths, "figs": figs,
            "json": json.loads((out / "report.json").read_text())}


def _png_ok(data: bytes):
    from pddnet.validation.render import check_png

    h, w = check_png(data)
    assert h > 50 and w > 50


def test_files_and_figures(rendered):
    out = rendered["out"]
    assert {"report.json", "report.md", "report.html"} <= {p.name for p in out.iterdir()}
    figs = sorted(p.name for p in (out / "figures").iterdir())
    assert figs == ["delta_dice_per_label.png", "latency.png", "pair_1.png", "pair_1_diff.png",
                    "pair_1_field.png", "pair_2.png", "pair_2_diff.png", "pair_2_field.png"]
    for f in figs:
        _png_ok((out / "figures" / f).read_bytes())
    data = rendered["figs"].data[0]
    assert set(data.panels) >= {"fixed", "moving", "warped", "disp_norm", "jacobian", "entropy",
                                "fixed_labels", "moving_labels", "warped_labels", "disp_inplane"}
    assert set(data.diffs) == {"onnxruntime-fp32", "onnxruntime-strict"}


def test_html_is_self_contained(rendered):
    page = (rendered["out"] / "report.html").read_text()
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(srcs) == 8 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        _png_ok(base64.b64decode(s.split(",", 1)[1]))
    assert "<script" not in page and "http://" not in page and "https://" not in page
    md = (rendered["out"] / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(f"figures/{n}" for n in
                                   ["delta_dice_per_label.png", "latency.png", "pair_1.png", "pair_1_diff.png",
                    "pair_1_field.png", "pair_2.png", "pair_2_diff.png", "pair_2_field.png"])
    # every table scrolls sideways on a narrow window instead of overflowing the page
    assert page.count("<table>") == page.count('<div class="scroll"><table>') > 0
    assert 'name="viewport"' in page and ".scroll{overflow-x:auto" in page


def _md_table(md: str, first_header: str) -> list[list[str]]:
    lines = md.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith(f"| {first_header} |"))
    rows = []
    for ln in lines[i + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", ln)[1:-1]])
    return rows


def test_numbers_match_report_json(rendered):
    from pddnet.validation.render import SUMMARY_HEADER, fmt

    rep = rendered["json"]
    md = (rendered["out"] / "report.md").read_text()
    page = (rendered["out"] / "report.html").read_text()
    rows = {r[0]: dict(zip(SUMMARY_HEADER, r)) for r in _md_table(md, "candidate")}
    assert set(rows) == set(rep["candidates"])
    for name, c in rep["candidates"].items():
        r = rows[name]
        assert r["Dice %"] == fmt(c["summary"]["dice_mean"], ".2f", 100)
        assert r["p50 ms"] == fmt(c["latency"]["p50_ms"], ".1f")
        assert r["p95 ms"] == fmt(c["latency"]["p95_ms"], ".1f")
        assert r["p99 ms"] == fmt(c["latency"]["p99_ms"], ".1f")
        assert r["max |du| vox"] == fmt(c["summary"]["disp_diff_max_vox"], ".2e")
        assert r["peak MB"] == fmt(c["memory"]["peak_rss_mb"], ".0f")
        for cell in (r["Dice %"], r["p50 ms"], r["p99 ms"]):
            assert f"<td>{cell}</td>" in page
    assert rows["pytorch"]["gates"] == "reference"
    assert rows["onnxruntime-fp32"]["gates"] == "PASS"
    assert rows["onnxruntime-strict"]["gates"] == "FAIL"
    assert '<td class="FAIL">FAIL</td>' in page and "Validation report: FAILED" in page
    failing = [n for n, c in rep["candidates"].items() if not c["reference"] and not c["passed"]]
    assert failing == ["onnxruntime-strict"]        # the headline names what failed
    assert f"# Validation report: FAILED (1 of {len(rep['candidates']) - 1} candidates: " \
        f"onnxruntime-strict)" in md
    # Dice per label
    per = {r[0]: r[1:] for r in _md_table(md, "label")}
    names = rep["label_names"]
    for lab, v in rep["candidates"]["pytorch"]["summary"]["dice_per_label"].items():
        assert per[f"{lab} {names[lab]}"][0] == fmt(v, ".2f", 100)


def test_delta_dice_hd95_and_mm_tables_match_independent_figures(rendered):
    """Per-label ΔDice (mean over pairs of the per-pair difference), HD95 per label (mean over
    pairs) with mm at the isotropic spacing, DSC30 and |du| in mm: recomputed here from the
    per-pair records of report.json and compared with the Markdown cells."""
    from pddnet.validation.render import SUMMARY_HEADER, fmt

    rep = rendered["json"]
    md = (rendered["out"] / "report.md").read_text()
    names = rep["label_names"]
    cands = rep["candidates"]
    delta = {r[0]: r for r in _md_table(md, "label")}
    header = next(ln for ln in md.splitlines() if ln.startswith("| label | pytorch Dice %"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    assert cols[2:] == [f"{n} ΔDice pt" for n in cands if n != "pytorch"]
    for k, n in enumerate(n for n in cands if n != "pytorch"):
        for lab in cands["pytorch"]["summary"]["dice_per_label"]:
            vals = [p["delta_dice_per_label_points"][lab] for p in cands[n]["pairs"]
                    if p["delta_dice_per_label_points"].get(lab) is not None
                    and np.isfinite(p["delta_dice_per_label_points"][lab])]
            want = fmt(float(np.mean(vals)), "+.3f") if vals else "-"
            assert delta[f"{lab} {names[lab]}"][2 + k] == want
    sp = {tuple(p["spacing_mm"]) for c in cands.values() for p in c["pairs"]}
    assert len(sp) == 1
    iso = next(iter(sp))[0]
    lines = md.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("| label | pytorch HD95"))
    hd = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]]
          for ln in lines[i + 2:] if ln.startswith("|")}
    for lab, name in names.items():
        xs = [p["hd95_per_label"].get(lab) for p in cands["pytorch"]["pairs"]]
        xs = [x for x in xs if x is not None and np.isfinite(x)]
        if f"{lab} {name}" in hd and xs:
            m = float(np.mean(xs))
            assert hd[f"{lab} {name}"][0] == f"{m:.2f} / {m * iso:.1f}"
    rows = {r[0]: dict(zip(SUMMARY_HEADER, r)) for r in _md_table(md, "candidate")}
    for n, c in cands.items():
        if c["reference"]:
            continue
        assert rows[n]["max |du| mm"] == fmt(max(p["disp_diff_max_mm"] for p in c["pairs"]),
                                             ".3g")
        assert rows[n]["p99 |du| mm"] == fmt(max(p["disp_diff_p99_mm"] for p in c["pairs"]),
                                             ".3g")
        assert rows[n]["HD95 mm"] == fmt(c["summary"]["hd95_mean"] * iso, ".1f")
        assert rows[n]["DSC30 %"] == fmt(c["summary"]["dsc30"], ".2f", 100)


def test_figure_helpers_analytic():
    """The checkerboard alternates its two images in tiles; the deformation grid of a zero
    field is the regular grid and a constant field shifts every line by it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pddnet.validation.render import _checkerboard, _deformation_grid

    a, b = np.zeros((16, 8)), np.ones((16, 8))
    cb = _checkerboard(a, b, tiles=4)              # tiles of 4 voxels
    assert cb[0, 0] == 0 and cb[4, 0] == 1 and cb[0, 4] == 1 and cb[4, 4] == 0
    assert cb.sum() == 64
    for shift in (0.0, 1.5):
        fig = Figure()
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        field = np.zeros((16, 8, 2), np.float32)
        field[..., 0] = shift
        _deformation_grid(ax, field, 4)
        xs = sorted({round(float(ln.get_xdata()[0]), 6) for ln in ax.lines[:4]})
        assert xs == [0 + shift, 4 + shift, 8 + shift, 12 + shift]
        assert len(ax.lines) == 4 + 2


def test_validate_cli_writes_the_renderings(setup, tmp_path):
    from pddnet.cli import main

    out = tmp_path / "rep"
    r = CliRunner().invoke(main, [
        "validate", "--checkpoint", str(setup["ckpt"]), "--onnx", str(setup["onnx"]), "--data",
        str(setup["data"]), "--out", str(out), "--threads", "1", "--warmup", "0", "--repeats",
        "1", "--in-process", "--no-progress", "--max-pairs", "1", "--figure-pairs", "1"])
    assert r.exit_code == 0, r.output
    assert "report.md" in r.output and "report.html" in r.output
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "delta_dice_per_label.png", "latency.png", "pair_1.png", "pair_1_diff.png",
        "pair_1_field.png"]


def test_a_failure_while_writing_leaves_nothing(rendered, tmp_path, monkeypatch):
    from pddnet.validation import report as report_mod
    from pddnet.validation.render import write_report_files

    def boom(*a, **k):
        raise KeyboardInterrupt  # as Ctrl-C in the last write

    monkeypatch.setattr(report_mod, "write_report", boom)
    out = tmp_path / "rep"
    with pytest.raises(KeyboardInterrupt):
        write_report_files(rendered["json"], out, figures=rendered["figs"])
    assert not out.exists()


def test_render_without_figures_or_latency_samples(rendered):
    from pddnet.validation.render import render

    rep = json.loads(json.dumps(rendered["json"]))
    for c in rep["candidates"].values():
        c["latency"]["samples_ms"] = []
    md, page, images = render(rep, None)
    assert set(images) == {"delta_dice_per_label.png", "latency.png"}
    assert "Registered pairs" not in md and np.all([n in page for n in rep["candidates"]])


def test_figures_without_matplotlib_name_the_report_extra(monkeypatch):
    import sys

    from pddnet.errors import PddnetError
    from pddnet.validation import render

    monkeypatch.setitem(sys.modules, "matplotlib", None)   # `import matplotlib` now fails
    with pytest.raises(PddnetError, match=r"pip install 'pddnet\[report\]'"):
        render._figure(2, 2)
