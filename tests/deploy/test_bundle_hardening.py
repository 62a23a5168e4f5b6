"""Hostile bundles: archive members checked before anything is extracted (links, devices, names
outside the folder, unlisted or duplicated members, sizes that differ from the manifest, headers
that claim more than the size budget), the private temporary folder removed on every failure
(Ctrl-C included), and the manifest's schema (wrong types, deep nesting, huge numbers, NaN) --
each refused with one line, never a traceback, never a write outside the temporary folder.

The property tests mutate the real manifest of a packaged bundle field by field with random
JSON-like values (hypothesis) and check that verification passes or refuses with one line.
"""

from __future__ import annotations

import copy
import gzip
import io
import json
import math
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers.deploy_helpers import build_bundle, environment
from helpers.json_paths import DELETE, set_path
from helpers.json_paths import paths as json_paths
from pddnet.errors import PddnetError
from pddnet.runtime import bundle as B

GiB = 1024 ** 3


# --------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A packaged bundle (fp32 + fp16 ONNX, TensorRT engines for both) and its .tar.gz."""
    d = tmp_path_factory.mktemp("hardening")
    res, _ = build_bundle(d, precisions=("fp32", "fp16"), engines_env=environment(), tar=True)
    manifest = json.loads((res.bundle / "manifest.json").read_text())
    return {"folder": res.bundle, "tar": res.tar, "manifest": manifest}


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Point tempfile (where open_bundle unpacks) at a folder of this test, to watch it."""
    d = tmp_path / "systmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


@pytest.fixture
def no_extraction(monkeypatch):
    """Fail the test if anything is extracted from an archive."""
    calls = []

    def refuse(self, *a, **k):
        calls.append(a)
        raise AssertionError("extracted before every member was checked")

    monkeypatch.setattr(tarfile.TarFile, "extractall", refuse)
    monkeypatch.setattr(tarfile.TarFile, "_extract_member", refuse)
    return calls


def _members(folder: Path, top: str = "b") -> list[tuple[str, bytes]]:
    """(archive name, bytes) of every file of ``folder``, sorted as `pddnet package` writes."""
    return [(f"{top}/{p.relative_to(folder).as_posix()}", p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()]


def _write_tar(path: Path, entries: list, *, gz: bool = True) -> Path:
    """A tar(.gz) of ``entries``: ``(name, bytes)`` files or ready ``TarInfo`` objects (with
    bytes or None). ``("raw", TarInfo, payload)`` writes the header itself followed by
    ``payload`` (padded to a block) -- the header may claim any size."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for e in entries:
            if e[0] == "raw":
                _, info, payload = e
                header = info.tobuf(tf.format, tf.encoding, tf.errors)
                padded = payload + b"\0" * (-len(payload) % tarfile.BLOCKSIZE)
                tf.fileobj.write(header + padded)
                tf.offset += len(header) + len(padded)
            elif isinstance(e[0], tarfile.TarInfo):
                info, data = e
                tf.addfile(info, io.BytesIO(data) if data is not None else None)
            else:
                name, data = e
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    path.write_bytes(gzip.compress(raw, compresslevel=1) if gz else raw)
    return path


def _file_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    return info


def _one_line_refusal(fn, *needles: str) -> str:
    with pytest.raises(PddnetError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg and msg.strip() == msg and len(msg) < 1500, msg
    for n in needles:
        assert n in msg, msg
    return msg


def _leftovers(d: Path) -> list[str]:
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*"))


def _model_rel(manifest) -> str:
    return next(m["file"] for m in manifest["models"] if m["id"] == "fp32")


# --------------------------------------------------------------------------------------------
# archives: every member checked before extraction
# --------------------------------------------------------------------------------------------
def test_good_archive_unpacks_privately_and_is_removed_on_close(good, private_tmp):
    with B.open_bundle(good["tar"]) as b:
        assert b.root.is_relative_to(private_tmp) and (b.root / "manifest.json").is_file()
        assert b.manifest == good["manifest"]
    assert _leftovers(private_tmp) == []
    # the same members re-written by hand (with folder members, as GNU tar writes) open too
    members = _members(good["folder"])
    dirs = sorted({n.rsplit("/", 1)[0] for n, _ in members} | {"b"})
    entries = [(_dir(d), None) for d in dirs] + members
    path = _write_tar(private_tmp.parent / "gnu.tar.gz", entries)
    with B.open_bundle(path) as b:
        assert b.manifest == good["manifest"]
    assert _leftovers(private_tmp) == []


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info


@pytest.mark.parametrize("claim", [5 * GiB, 64 * GiB, 8 ** 11 * 16])
def test_header_claiming_a_huge_size_is_refused_before_extraction(good, tmp_path, private_tmp,
                                                                  no_extraction, claim):
    """A member whose header claims far more than the budget, followed by a small payload:
    refused at its header -- nothing extracted, no temporary folder, nothing big anywhere."""
    members = _members(good["folder"])
    rel = "b/" + _model_rel(good["manifest"])
    entries = [("raw", _file_info(n, claim), d[:100]) if n == rel else (n, d)
               for n, d in members]
    path = _write_tar(tmp_path / "bomb.tar.gz", entries)
    assert path.stat().st_size < 100_000
    msg = _one_line_refusal(lambda: B.open_bundle(path), repr(rel), str(claim), "size budget",
                            "before extracting anything")
    print(msg)
    assert no_extraction == [] and _leftovers(private_tmp) == []


def test_header_size_that_differs_from_the_manifest_is_refused_at_its_header(
        good, tmp_path, private_tmp, no_extraction):
    """Manifest first, then a member claiming 1 GiB (within the budget): refused at its header
    with the manifest's size, without decompressing the claimed gigabyte."""
    members = _members(good["folder"])
    members.sort(key=lambda e: e[0] != "b/manifest.json")
    rel = "b/" + _model_rel(good["manifest"])
    want = good["manifest"]["files"][_model_rel(good["manifest"])]["bytes"]
    entries = [("raw", _file_info(n, GiB), d[:100]) if n == rel else (n, d) for n, d in members]
    path = _write_tar(tmp_path / "liar.tar.gz", entries)
    _one_line_refusal(lambda: B.open_bundle(path), repr(rel), f"is {GiB} bytes",
                      f"manifest.json says {want}")
    assert no_extraction == [] and _leftovers(private_tmp) == []


def test_a_real_decompression_bomb_is_refused_by_the_budget(good, tmp_path, private_tmp,
                                                           no_extraction):
    """48 MB of zeros (gzip: ~50 KB) under a budget of 16 MB, listed in a forged manifest."""
    big = 48 * 1024 ** 2
    manifest = copy.deepcopy(good["manifest"])
    manifest["files"]["models/zeros.bin"] = {"sha256": "0" * 64, "bytes": big}
    entries = [(n, d) for n, d in _members(good["folder"]) if n != "b/manifest.json"]
    entries += [("b/manifest.json", json.dumps(manifest).encode()),
                ("b/models/zeros.bin", bytes(big))]
    path = _write_tar(tmp_path / "zeros.tar.gz", entries)
    assert path.stat().st_size < 2_000_000
    _one_line_refusal(lambda: B.open_bundle(path, max_bytes=16 * 1024 ** 2),
                      "'b/models/zeros.bin'", "size budget of 16777216 bytes")
    assert no_extraction == [] and _leftovers(private_tmp) == []


def test_budget_counts_every_member_and_is_a_keyword(good, private_tmp):
    total = sum(v["bytes"] for v in good["manifest"]["files"].values()) + \
        (good["folder"] / "manifest.json").stat().st_size
    _one_line_refusal(lambda: B.open_bundle(good["tar"], max_bytes=total - 1),
                      f"would unpack to {total} bytes", f"size budget of {total - 1} bytes")
    assert _leftovers(private_tmp) == []
    with B.open_bundle(good["tar"], max_bytes=total) as b:   # exactly the budget: fine
        assert b.manifest == good["manifest"]
    for bad in (0, -1, "1GB", True, 1.5):
        _one_line_refusal(lambda: B.open_bundle(good["tar"], max_bytes=bad), "max_bytes")
    assert _leftovers(private_tmp) == []


def _link(name, kind, target="/etc/passwd"):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize("kind, what", [
    (tarfile.SYMTYPE, "a symbolic link to '/etc/passwd'"),
    (tarfile.LNKTYPE, "a hard link to '/etc/passwd'"),
    (tarfile.CHRTYPE, "a device"),
    (tarfile.BLKTYPE, "a device"),
    (tarfile.FIFOTYPE, "a fifo"),
])
def test_links_and_special_members_are_refused(good, tmp_path, private_tmp, no_extraction,
                                               kind, what):
    rel = "b/" + _model_rel(good["manifest"])
    entries = [((_link(n, kind), None) if n == rel else (n, d))
               for n, d in _members(good["folder"])]
    path = _write_tar(tmp_path / "link.tar.gz", entries)
    _one_line_refusal(lambda: B.open_bundle(path), repr(rel), "is a link or special file", what)
    assert no_extraction == [] and _leftovers(private_tmp) == []


def test_symlink_member_listed_last_is_refused_and_nothing_escapes(good, tmp_path, private_tmp,
                                                                   no_extraction):
    """A symlink plus a file written through it: the classic escape. Refused at the link."""
    entries = _members(good["folder"]) + [(_link("b/esc", tarfile.SYMTYPE, str(tmp_path)), None),
                                          ("b/esc/owned.txt", b"x")]
    path = _write_tar(tmp_path / "esc.tar.gz", entries)
    _one_line_refusal(lambda: B.open_bundle(path), "'b/esc'", "symbolic link")
    assert not (tmp_path / "owned.txt").exists()
    assert no_extraction == [] and _leftovers(private_tmp) == []


def _members_with(good, change):
    members = _members(good["folder"])
    return change(members)


@pytest.mark.parametrize("case, needles", [
    ("unlisted", ["'b/models/fp32/extra.onnx'", "not listed in manifest.json"]),
    ("duplicate", ["appears twice"]),
    ("outside_folder", ["'other/readme.txt'", "lies outside the bundle folder b/"]),
    ("dotdot", ["would be written outside the bundle folder"]),
    ("absolute", ["would be written outside the bundle folder"]),
    ("stray_folder", ["'b/empty'", "a folder that holds no file manifest.json lists"]),
    ("folder_for_file", ["a folder, but the manifest lists a file of that name"]),
    ("missing", ["is listed in the manifest but missing"]),
    ("no_manifest", ["holds no manifest.json"]),
    ("big_manifest", ["more than the 1048576 bytes a manifest.json may have"]),
    ("bad_manifest", ["manifest.json field files is"]),
    ("negative_size", ["has a negative size"]),
])
def test_members_that_do_not_match_the_manifest_are_refused(good, tmp_path, private_tmp,
                                                            no_extraction, case, needles):
    members = _members(good["folder"])
    rel = "b/" + _model_rel(good["manifest"])
    data = dict(members)
    if case == "unlisted":
        members.append(("b/models/fp32/extra.onnx", b"x"))
    elif case == "duplicate":
        members.append((rel, data[rel]))
    elif case == "outside_folder":
        members.append(("other/readme.txt", b"x"))
    elif case == "dotdot":
        members.append(("b/../../evil.txt", b"x"))
    elif case == "absolute":
        members.insert(0, ("/tmp/pddnet-hardening-evil.txt", b"x"))
    elif case == "stray_folder":
        members.append((_dir("b/empty"), None))
    elif case == "folder_for_file":
        members = [(_dir(n), None) if n == rel else (n, d) for n, d in members]
    elif case == "missing":
        members = [(n, d) for n, d in members if n != rel]
    elif case == "no_manifest":
        members = [(n, d) for n, d in members if n != "b/manifest.json"]
    elif case == "big_manifest":
        m = copy.deepcopy(good["manifest"])
        m["notes"] = ["x" * 1000] * 1100
        members = [(n, json.dumps(m).encode() if n == "b/manifest.json" else d)
                   for n, d in members]
    elif case == "bad_manifest":
        m = copy.deepcopy(good["manifest"])
        m["files"] = list(m["files"])
        members = [(n, json.dumps(m).encode() if n == "b/manifest.json" else d)
                   for n, d in members]
    elif case == "negative_size":
        info = _file_info("b/models/neg.bin", 0)
        info.size = -5
        members = [("raw", info, b"")] + members
    path = _write_tar(tmp_path / f"{case}.tar.gz", members)
    msg = _one_line_refusal(lambda: B.open_bundle(path), *needles)
    print(msg)
    assert not Path("/tmp/pddnet-hardening-evil.txt").exists()
    assert not (tmp_path.parent / "evil.txt").exists()
    assert no_extraction == [] and _leftovers(private_tmp) == []


def test_too_many_members_and_huge_extended_headers_are_refused(good, tmp_path, private_tmp,
                                                                no_extraction, monkeypatch):
    monkeypatch.setattr(B, "MAX_ARCHIVE_MEMBERS", 20)
    many = [(f"b/d{i}", b"") for i in range(30)] + _members(good["folder"])
    _one_line_refusal(lambda: B.open_bundle(_write_tar(tmp_path / "many.tar.gz", many)),
                      "more than 20 members")
    # a GNU long-name header claiming 1 GiB: tarfile would read it into memory
    info = _file_info("././@LongLink", GiB)
    info.type = tarfile.GNUTYPE_LONGNAME
    path = _write_tar(tmp_path / "longname.tar.gz", [("raw", info, b"b/x" * 10)]
                      + _members(good["folder"]))
    _one_line_refusal(lambda: B.open_bundle(path), "not a readable bundle archive",
                      "extended header claims")
    assert no_extraction == [] and _leftovers(private_tmp) == []


@pytest.mark.parametrize("garbage", [b"", b"\x1f\x8b\x08\x00garbage", b"x" * 1000])
def test_unreadable_archives_are_one_line(tmp_path, private_tmp, garbage):
    path = tmp_path / "junk.tar.gz"
    path.write_bytes(garbage)
    _one_line_refusal(lambda: B.open_bundle(path), "junk.tar.gz")
    assert _leftovers(private_tmp) == []


# --------------------------------------------------------------------------------------------
# the temporary folder is removed on every failure path
# --------------------------------------------------------------------------------------------
def test_temporary_folder_removed_when_verification_fails(good, tmp_path, private_tmp):
    """Same size, one byte flipped: passes the member checks, fails the SHA-256 after
    unpacking -- and the unpacked copy is removed."""
    rel = "b/" + _model_rel(good["manifest"])
    members = []
    for n, d in _members(good["folder"]):
        if n == rel:
            d = bytearray(d)
            d[len(d) // 2] ^= 1
            d = bytes(d)
        members.append((n, d))
    path = _write_tar(tmp_path / "tampered.tar.gz", members)
    _one_line_refusal(lambda: B.open_bundle(path), "does not match its SHA-256")
    assert _leftovers(private_tmp) == []


@pytest.mark.parametrize("where", ["extract", "verify", "echo"])
def test_temporary_folder_removed_on_keyboard_interrupt(good, private_tmp, monkeypatch, where):
    real_extractall = tarfile.TarFile.extractall
    seen = []

    def interrupt(*a, **k):
        seen.append(_leftovers(private_tmp))
        raise KeyboardInterrupt

    if where == "extract":
        def half(self, path, members=None, **k):
            real_extractall(self, path, members=members[:3], **k)
            interrupt()
        monkeypatch.setattr(tarfile.TarFile, "extractall", half)
    elif where == "verify":
        monkeypatch.setattr(B, "verify_folder", interrupt)
    with pytest.raises(KeyboardInterrupt):
        B.open_bundle(good["tar"], echo=interrupt if where == "echo" else None)
    assert seen and seen[0], "the interrupt came after something was unpacked"
    assert _leftovers(private_tmp) == []


# --------------------------------------------------------------------------------------------
# the manifest's schema
# --------------------------------------------------------------------------------------------
def _fp32(m):
    return next(e for e in m["models"] if e["id"] == "fp32")


def _trt(m):
    return next(e for e in m["models"] if e["kind"] == "tensorrt")


def _first_file(m):
    return m["files"][sorted(m["files"])[0]]


SCHEMA_CASES = [
    ("files_list", lambda m: m.update(files=list(m["files"])), "field files is"),
    ("files_null", lambda m: m.update(files=None), "lists no files"),
    ("entry_list", lambda m: m["files"].update({sorted(m["files"])[0]: [1, 2]}),
     "should be an object {sha256, bytes}"),
    ("bytes_string", lambda m: _first_file(m).update(bytes="12"), ".bytes is '12' (str)"),
    ("bytes_bool", lambda m: _first_file(m).update(bytes=True), ".bytes is True (bool)"),
    ("bytes_float", lambda m: _first_file(m).update(bytes=12.0), ".bytes is 12.0 (float)"),
    ("bytes_negative", lambda m: _first_file(m).update(bytes=-1), "integer >= 0"),
    ("sha_missing", lambda m: _first_file(m).pop("sha256"), ".sha256 is None"),
    ("sha_short", lambda m: _first_file(m).update(sha256="abc"), "64 lowercase hex digits"),
    ("models_dict", lambda m: m.update(models={"a": 1}), "field models is"),
    ("models_empty", lambda m: m.update(models=[]), "lists no models"),
    ("model_not_dict", lambda m: m["models"].insert(0, "fp32"), "field models[0] is 'fp32'"),
    ("model_no_precision", lambda m: _fp32(m).pop("precision"), ".precision is None"),
    ("model_bad_precision", lambda m: _fp32(m).update(precision="fp64"), ".precision is"),
    ("model_id_int", lambda m: _fp32(m).update(id=3), ".id is 3 (int)"),
    ("model_id_newline", lambda m: _fp32(m).update(id="fp\n32"), ".id is 'fp\\n32'"),
    ("model_id_duplicate", lambda m: _trt(m).update(id="fp32"), "unique"),
    ("model_kind", lambda m: _fp32(m).update(kind="pytorch"), "unknown kind 'pytorch'"),
    ("model_file_int", lambda m: _fp32(m).update(file=7), "not a non-empty string"),
    ("model_file_outside", lambda m: _fp32(m).update(file="../x.onnx"), "leaves the bundle"),
    ("model_sha_list", lambda m: _fp32(m).update(sha256=["a"]), ".sha256 is ['a']"),
    ("validation_list", lambda m: _fp32(m).update(validation=[True]), ".validation is"),
    ("candidates_str", lambda m: _fp32(m)["validation"].update(candidates="x"),
     ".validation.candidates is 'x'"),
    ("candidate_int", lambda m: _fp32(m)["validation"].update(candidates=[1]),
     ".validation.candidates[0] is 1"),
    ("latency_list", lambda m: _fp32(m)["validation"]["candidates"][0].update(latency=[1]),
     ".latency is [1]"),
    ("engines_list", lambda m: _trt(m).update(engines=["a"]), ".engines is ['a']"),
    ("engines_empty", lambda m: _trt(m).update(engines={}), "lists no engines"),
    ("engine_path_int", lambda m: _trt(m)["engines"].update(head=5), "not a non-empty string"),
    ("trt_model_missing", lambda m: _trt(m).update(model="nope"), "the id of an ONNX model"),
    ("trt_model_trt", lambda m: _trt(m).update(model=_trt(m)["id"]), "the id of an ONNX model"),
    ("env_nested", lambda m: _trt(m).update(env={"gpu_name": {"a": 1}}), ".env is"),
    ("env_newline", lambda m: _trt(m)["env"].update(gpu_name="H100\nfake"), "printable values"),
    ("versions_list", lambda m: m.update(versions=[1]), "field versions is [1]"),
    ("preprocessing_null", lambda m: m.update(preprocessing=None), "field preprocessing is"),
    ("huge_int", lambda m: m.update(name=10 ** 30), "fit in 64 bits"),
    ("deep", lambda m: m.update(notes=_nested(40)), "nests deeper than 32 levels"),
    ("schema_int", lambda m: m.update(schema=1), "has schema 1 (int)"),
    ("not_object", lambda m: None, "has schema 'list'"),
    ("path_control", lambda m: m["files"].update({"a\x07b": _first_file(m)}),
     "a path with control characters"),
    ("path_long", lambda m: m["files"].update({"a" * 5000: _first_file(m)}),
     "longer than 1024 characters"),
    ("lists_itself", lambda m: m["files"].update({"manifest.json": _first_file(m)}),
     "lists itself"),
]


def _nested(depth):
    v = []
    for _ in range(depth):
        v = [v]
    return v


@pytest.mark.parametrize("case, change, needle", SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_malformed_manifest_fields_are_refused_with_one_line(good, tmp_path, case, change, needle):
    m = copy.deepcopy(good["manifest"])
    change(m)
    if case == "not_object":
        m = [m]
    folder = tmp_path / "bundle"
    shutil.copytree(good["folder"], folder)
    (folder / "manifest.json").write_text(json.dumps(m))
    msg = _one_line_refusal(lambda: B.verify_folder(folder), "manifest", needle)
    print(msg)
    _one_line_refusal(lambda: B.read_manifest(folder), needle)
    # Bundle.select checks the schema too (a Bundle made from an unchecked dict)
    if isinstance(m, dict):
        _one_line_refusal(lambda: B.Bundle(folder, m, folder).select(env=None), needle)


@pytest.mark.parametrize("text, needle", [
    ("[" * 100_000 + "]" * 100_000, "nests deeper than JSON can be read"),
    ('{"schema": "pddnet.bundle/1", "files": {}, "x": ' + "[" * 500 + "]" * 500 + "}",
     "nests deeper than 32 levels"),
    ('{"schema": "pddnet.bundle/1", "n": NaN}', "non-standard JSON constant NaN"),
    ('{"schema": "pddnet.bundle/1", "n": -Infinity}', "non-standard JSON constant -Infinity"),
    ('{"schema": "pddnet.bundle/1", "n": 1e400}', "number 1e400 is out of range"),
    ('{"schema": "pddnet.bundle/1", "n": ' + "9" * 5000 + "}", "not valid JSON"),
    ("\ufeff{}", "not valid JSON"),
    ('"just a string"', "has schema 'str'"),
])
def test_unparseable_manifests_are_refused_with_one_line(good, tmp_path, text, needle):
    folder = tmp_path / "bundle"
    shutil.copytree(good["folder"], folder)
    (folder / "manifest.json").write_text(text, encoding="utf-8")
    _one_line_refusal(lambda: B.verify_folder(folder), needle)


def test_oversized_manifest_in_a_folder_is_refused_unread(good, tmp_path):
    folder = tmp_path / "bundle"
    shutil.copytree(good["folder"], folder)
    with open(folder / "manifest.json", "ab") as fh:
        fh.truncate(B.MAX_MANIFEST_BYTES + 1)
    _one_line_refusal(lambda: B.verify_folder(folder), "more than the 1048576 bytes")


def test_valid_bundle_still_verifies_and_selects(good):
    m = B.verify_folder(good["folder"])
    assert m == good["manifest"] and B.check_manifest(copy.deepcopy(m), where="x") == m
    sel = B.Bundle(good["folder"], m, good["folder"]).select(env=None, providers=["cpu"])
    assert sel.backend == "onnxruntime"


# --------------------------------------------------------------------------------------------
# property tests: the real manifest mutated field by field with random JSON-like values
# --------------------------------------------------------------------------------------------
JSON_LEAVES = (st.none() | st.booleans()
               | st.integers(min_value=-(2 ** 70), max_value=2 ** 70)
               | st.sampled_from([0, -1, 1, 2 ** 63, -(2 ** 63), 10 ** 30])
               | st.floats(allow_nan=True, allow_infinity=True)
               | st.text(max_size=12)
               | st.sampled_from(["", "fp32", "onnx", "tensorrt", "../x", "/etc/passwd",
                                  "manifest.json", "a\nb", "0" * 64]))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda children: (
    st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=12)

@st.composite
def mutated_manifests(draw, manifest):
    doc = copy.deepcopy(manifest)
    for _ in range(draw(st.integers(1, 3))):
        paths = list(json_paths(doc))
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        value = draw(st.just(DELETE) | JSON_VALUES) if path else draw(JSON_VALUES)
        doc = set_path(doc, path, value)
        if doc is None or not isinstance(doc, (dict, list)):
            break
    return doc


def _snapshot(*folders):
    return {f: sorted((p.relative_to(f).as_posix(), p.stat().st_size if p.is_file() else -1)
                      for p in f.rglob("*")) for f in folders}


@pytest.fixture(scope="module")
def workdir(good, tmp_path_factory):
    """A copy of the bundle folder whose manifest each example rewrites, and a private
    temporary folder for the archive's unpacking."""
    d = tmp_path_factory.mktemp("prop")
    shutil.copytree(good["folder"], d / "bundle")
    (d / "systmp").mkdir()
    return d


@settings(max_examples=50, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_property_mutated_manifests_verify_or_refuse_with_one_line(good, workdir, data,
                                                                    monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(workdir / "systmp"))
    doc = data.draw(mutated_manifests(good["manifest"]))
    folder = workdir / "bundle"
    text = json.dumps(doc, allow_nan=True)
    (folder / "manifest.json").write_text(text)
    before = _snapshot(folder, workdir / "systmp")
    cwd_before = sorted(os.listdir("."))
    try:
        m = B.verify_folder(folder)
    except PddnetError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and len(msg) < 1500, msg
        event("folder refused")
    else:
        event("folder verified")
        # it passed: every field the runtime reads has its type
        assert isinstance(m["files"], dict) and isinstance(m["models"], list)
        b = B.Bundle(folder, m, folder)
        b.summary()
        try:
            b.select(env=None, providers=["cpu"])
        except PddnetError as exc:
            assert "\n" not in str(exc)
    # the same manifest inside an archive: checked before extraction, same outcome kind
    arch = workdir / "b.tar.gz"
    _write_tar(arch, [(n, text.encode() if n == "b/manifest.json" else d)
                      for n, d in _members(folder)])
    try:
        with B.open_bundle(arch) as b:
            assert b.root.is_relative_to(workdir / "systmp")
    except PddnetError as exc:
        assert "\n" not in str(exc), str(exc)
    assert _leftovers(workdir / "systmp") == []
    assert _snapshot(folder, workdir / "systmp") == before
    assert sorted(os.listdir(".")) == cwd_before


@settings(max_examples=50, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=JSON_VALUES, wrap=st.booleans())
def test_property_check_manifest_never_raises_anything_else(good, doc, wrap):
    """Arbitrary JSON-like documents (and the real manifest with one extra random field)."""
    if wrap:
        real = copy.deepcopy(good["manifest"])
        real["extra"] = doc
        doc = real
    try:
        B.check_manifest(doc, where="m")
    except PddnetError as exc:
        assert "\n" not in str(exc)
    else:
        assert isinstance(doc, dict) and doc.get("schema") == B.SCHEMA
        for v in doc["files"].values():
            assert isinstance(v["bytes"], int) and not isinstance(v["bytes"], bool)
        for f in _floats(doc):
            assert math.isfinite(f)


def _floats(v):
    if isinstance(v, float):
        yield v
    elif isinstance(v, dict):
        for x in v.values():
            yield from _floats(x)
    elif isinstance(v, list):
        for x in v:
            yield from _floats(x)


def test_unpack_folders_of_dead_processes_are_removed(tmp_path):
    """What a kill -9 during ``register`` from a .tar.gz leaves in the temporary folder is
    removed by the next unpack; a live process's folder and other folders are left alone."""
    import subprocess
    import sys

    from pddnet.runtime.bundle import UNPACK_PREFIX, remove_stale_unpacked

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f"{UNPACK_PREFIX}{dead}-abc"
    live = tmp_path / f"{UNPACK_PREFIX}{os.getpid()}-def"
    other = tmp_path / f"{UNPACK_PREFIX}notapid-x"
    for d in (stale, live, other):
        (d / "b").mkdir(parents=True)
        (d / "b" / "model.onnx").write_bytes(os.urandom(64))
    assert remove_stale_unpacked(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and other.exists()
