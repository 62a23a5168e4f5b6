"""Reader for Learn2Reg-style datasets (real data users bring, and our synthetic ones).

Layout: a folder with ``imagesTr/*.nii.gz``, ``labelsTr/*.nii.gz`` and one ``*_dataset.json``
whose ``training`` list holds ``{"image": "./imagesTr/...", "label": "./labelsTr/..."}``
entries and whose ``registration_val`` / ``registration_test`` lists hold
``{"fixed": "./imagesTr/...", "moving": "./imagesTr/..."}`` pairs. Paths are resolved relative
to the folder holding the json. Test images may live elsewhere (``imagesTs/``, listed under
``test`` or only in the pairs): an image that no ``training`` entry lists takes its label map
where the official evaluation looks for it, the image path with ``images`` replaced by
``labels`` (``./imagesTs/X_0000.nii.gz`` -> ``./labelsTs/X_0000.nii.gz``), else
``labelsTr/<file name>``; a missing label map is no problem (the pair is registered, not
scored).

A subject's *name* is its image file name without ``.nii``/``.nii.gz`` and without a trailing
``_0000`` (Learn2Reg's channel suffix): ``./imagesTr/AbdomenCTCT_0001_0000.nii.gz`` is
``AbdomenCTCT_0001``.

Splits for :meth:`Learn2RegDataset.pairs`: ``train`` is every ordered pair (fixed != moving)
among the training subjects: those in the ``pddnet`` block's train split when the json has one
(our synthetic data), else the ``training`` subjects that appear in no validation or test pair.
``val`` and ``test`` are the json's ``registration_val`` and ``registration_test`` lists.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pddnet.errors import PddnetError

#: Two affines agree when every entry differs by at most this (mm for the translation).
AFFINE_ATOL = 1e-2
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Subject:
    name: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class Pair:
    fixed: Subject
    moving: Subject

    def __str__(self) -> str:
        return f"{self.fixed.name} <- {self.moving.name}"


def subject_name(path: str | os.PathLike) -> str:
    """``.../AbdomenCTCT_0001_0000.nii.gz`` -> ``AbdomenCTCT_0001``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith("_0000"):
        name = name[: -len("_0000")]
    return name


def find_dataset_json(root: str | os.PathLike) -> Path:
    """The one ``*_dataset.json`` (or ``dataset.json``) in ``root``, or ``root`` itself if it
    is a json file."""
    p = Path(root)
    if p.is_file():
        return p
    if not p.exists():
        raise PddnetError(f"{p}: no such folder or file; give a Learn2Reg dataset folder or its "
                          "*_dataset.json")
    found = sorted(q for q in p.glob("*dataset.json") if q.is_file())
    if not found:
        raise PddnetError(f"{p} holds no *_dataset.json; is this a Learn2Reg dataset folder? "
                          "(create one with `pddnet data synth --out DIR`)")
    if len(found) > 1:
        names = ", ".join(q.name for q in found)
        raise PddnetError(f"{p} holds several dataset jsons ({names}); pass the path of the one "
                          f"to use, e.g. {found[0]}")
    return found[0]


class Learn2RegDataset:
    """A Learn2Reg dataset folder: subjects, registration pairs per split, label names."""

    def __init__(self, root: str | os.PathLike):
        self.json_path = find_dataset_json(root)
        self.root = self.json_path.parent
        try:
            text = self.json_path.read_text()
        except OSError as exc:
            raise PddnetError(f"{self.json_path}: cannot be read ({exc})") from exc
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PddnetError(f"{self.json_path} is not valid JSON: {exc.msg} at line "
                              f"{exc.lineno}, column {exc.colno}") from exc
        if not isinstance(doc, dict):
            raise PddnetError(f"{self.json_path}: expected a JSON object at the top level, got "
                              f"{type(doc).__name__}")
        self.doc = doc
        self.name = str(doc.get("name") or self.json_path.name.replace("_dataset.json", ""))
        if "training" not in doc:
            raise PddnetError(f"{self.json_path} has no 'training' key; a Learn2Reg dataset json "
                              "lists its images under 'training'")
        training = doc["training"]
        if not isinstance(training, list):
            raise PddnetError(f"{self.json_path}: 'training' must be a list of "
                              "{{'image': ..., 'label': ...}} entries")
        self._by_image: dict[Path, Subject] = {}
        self.subjects: list[Subject] = []
        for i, entry in enumerate(training):
            if isinstance(entry, str):
                entry = {"image": entry}
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise PddnetError(f"{self.json_path}: training entry {i} has no 'image' path: "
                                  f"{entry!r}")
            label = entry.get("label")
            if label is not None and not isinstance(label, str):
                raise PddnetError(f"{self.json_path}: training entry {i} has a 'label' that is "
                                  f"not a path: {label!r}")
            subj = Subject(subject_name(entry["image"]), self._resolve(entry["image"]),
                           self._resolve(label) if label else None)
            self.subjects.append(subj)
            self._by_image[subj.image] = subj
        self._pairs: dict[str, list[Pair] | None] = {
            "val": self._read_pairs("registration_val"),
            "test": self._read_pairs("registration_test"),
        }

    # ---------------------------------------------------------------------------------
    def _resolve(self, rel: str) -> Path:
        p = Path(rel)
        return p if p.is_absolute() else (self.root / p)

    def _label_for(self, rel: str) -> Path | None:
        """Where the official evaluation looks for an image's label map (``images`` ->
        ``labels`` in the path as the json writes it), else ``labelsTr/<file name>``; ``None``
        when neither exists."""
        guesses = []
        if "images" in rel:
            guesses.append(self._resolve(rel.replace("images", "labels")))
        guesses.append(self.root / "labelsTr" / Path(rel).name)
        return next((g for g in guesses if g.exists()), None)

    def _subject_for(self, rel: str) -> Subject:
        path = self._resolve(rel)
        if path in self._by_image:
            return self._by_image[path]
        subj = Subject(subject_name(path), path, self._label_for(rel))
        self._by_image[path] = subj
        return subj

    def _read_pairs(self, key: str) -> list[Pair] | None:
        if key not in self.doc:
            return None
        items = self.doc[key]
        if not isinstance(items, list):
            raise PddnetError(f"{self.json_path}: '{key}' must be a list of "
                              "{'fixed': ..., 'moving': ...} entries")
        pairs = []
        for i, item in enumerate(items):
            if not (isinstance(item, dict) and isinstance(item.get("fixed"), str)
                    and isinstance(item.get("moving"), str)):
                raise PddnetError(f"{self.json_path}: {key} entry {i} needs 'fixed' and "
                                  f"'moving' image paths, got {item!r}")
            pairs.append(Pair(self._subject_for(item["fixed"]), self._subject_for(item["moving"])))
        return pairs

    # ---------------------------------------------------------------------------------
    @property
    def label_names(self) -> dict[int, str]:
        """``{label: name}`` from the json's ``labels`` (Learn2Reg nests them per modality)."""
        labels = self.doc.get("labels")
        if not isinstance(labels, dict) or not labels:
            return {}
        first = next(iter(labels.values()))
        table = first if isinstance(first, dict) else labels
        out = {}
        for k, v in table.items():
            try:
                out[int(k)] = str(v)
            except (TypeError, ValueError):
                continue
        return dict(sorted(out.items()))

    def train_subjects(self) -> list[Subject]:
        block = self.doc.get("pddnet")
        if isinstance(block, dict) and isinstance(block.get("split"), dict) \
                and isinstance(block["split"].get("train"), list):
            wanted = [str(n) for n in block["split"]["train"]]
            by_name = {s.name: s for s in self.subjects}
            missing = [n for n in wanted if n not in by_name]
            if missing:
                raise PddnetError(f"{self.json_path}: the pddnet train split names subjects that "
                                  f"are not in 'training': {', '.join(missing)}")
            return [by_name[n] for n in wanted]
        used = {s.image for ps in self._pairs.values() if ps for p in ps
                for s in (p.fixed, p.moving)}
        return [s for s in self.subjects if s.image not in used]

    def pairs(self, split: str) -> list[Pair]:
        """Registration pairs of ``split`` (``train``, ``val`` or ``test``)."""
        if split == "train":
            subs = self.train_subjects()
            return [Pair(a, b) for a in subs for b in subs if a is not b]
        if split not in SPLITS:
            raise PddnetError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        pairs = self._pairs[split]
        if pairs is None:
            key = "registration_val" if split == "val" else "registration_test"
            raise PddnetError(f"{self.json_path} has no '{key}' list, so there are no {split} "
                              "pairs; add it to the json (a list of {'fixed': ..., 'moving': "
                              "...} image paths) or use another split")
        return list(pairs)

    def load_pair(self, pair: Pair):
        """``(fixed Volume, moving Volume, fixed labels or None, moving labels or None)``."""
        from pddnet.data.io import load_nifti

        fixed = load_nifti(pair.fixed.image, kind="image")
        moving = load_nifti(pair.moving.image, kind="image")
        fl = load_nifti(pair.fixed.label, kind="label") if pair.fixed.label else None
        ml = load_nifti(pair.moving.label, kind="label") if pair.moving.label else None
        return fixed, moving, fl, ml

    # ---------------------------------------------------------------------------------
    def _all_pairs(self) -> dict[str, list[Pair]]:
        out = {}
        for split in SPLITS:
            try:
                out[split] = self.pairs(split)
            except PddnetError:
                out[split] = []
        return out

    def problems(self) -> list[str]:
        """Every problem found: missing files, unreadable headers, geometry mismatches."""
        import nibabel as nib

        problems: list[str] = []
        geoms: dict[Path, tuple | None] = {}

        def rel(p: Path) -> str:
            try:
                return str(p.relative_to(self.root))
            except ValueError:
                return str(p)

        def geom(p: Path):
            if p in geoms:
                return geoms[p]
            g = None
            if not p.exists():
                problems.append(f"missing file: {rel(p)}")
            else:
                try:
                    img = nib.load(str(p))
                    shape = tuple(int(n) for n in img.shape)
                    if len(shape) == 4 and shape[3] == 1:
                        shape = shape[:3]
                    g = (shape, np.asarray(img.affine, dtype=np.float64))
                except Exception as exc:  # nibabel raises many types
                    problems.append(f"cannot read {rel(p)}: {type(exc).__name__}: {exc}")
            geoms[p] = g
            return g

        def compare(a: Path, b: Path, what: str) -> None:
            ga, gb = geom(a), geom(b)
            if ga is None or gb is None:
                return
            if ga[0] != gb[0]:
                problems.append(f"{what}: shapes differ, {rel(a)} {ga[0]} vs {rel(b)} {gb[0]}")
                return
            sa = np.sqrt((ga[1][:3, :3] ** 2).sum(0))
            sb = np.sqrt((gb[1][:3, :3] ** 2).sum(0))
            if not np.allclose(sa, sb, rtol=1e-4, atol=1e-5):
                problems.append(f"{what}: spacings differ, {rel(a)} {tuple(np.round(sa, 4))} vs "
                                f"{rel(b)} {tuple(np.round(sb, 4))} mm")
            elif not np.allclose(ga[1], gb[1], rtol=0.0, atol=AFFINE_ATOL):
                problems.append(f"{what}: affines differ (beyond {AFFINE_ATOL} mm), {rel(a)} vs "
                                f"{rel(b)}")

        for s in self.subjects:
            geom(s.image)
            if s.label is not None:
                compare(s.image, s.label, f"subject {s.name} image vs label")
        pairs = self._all_pairs()
        seen: set[tuple[Path, Path]] = set()
        for split in ("val", "test"):
            for p in pairs[split]:
                for s in (p.fixed, p.moving):
                    if s not in self.subjects and s.label is not None:
                        compare(s.image, s.label, f"subject {s.name} image vs label")
                key = (p.fixed.image, p.moving.image)
                if key not in seen and key[::-1] not in seen:
                    seen.add(key)
                    compare(p.fixed.image, p.moving.image, f"{split} pair {p}")
        train = self.train_subjects()
        for s in train[1:]:  # all training pairs share the first subject's geometry
            compare(train[0].image, s.image, f"train subjects {train[0].name} and {s.name}")
        # keep the order of discovery but drop duplicates
        return list(dict.fromkeys(problems))

    def check(self) -> None:
        """Raise one :class:`PddnetError` listing every problem :meth:`problems` finds."""
        problems = self.problems()
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise PddnetError(f"{self.json_path}: {len(problems)} problem(s):\n{lines}")

    def info(self) -> dict:
        """What :meth:`describe` prints, as a JSON-ready dict (``pddnet data info --json``):
        ``name``, ``json``, ``subjects``, ``subjects_with_labels``, ``geometry`` (``{"192x160x256
        voxels at 2 x 2 x 2 mm": count}``), ``labels`` (``{label: name}``, string keys),
        ``pddnet`` (the generator block or ``None``), ``splits`` (per split: ``pairs``, the
        number of pairs or ``None`` without a list, and ``pairs_with_labels``, the pairs whose
        fixed and moving label maps both exist) and ``problems`` (:meth:`problems`)."""
        import nibabel as nib

        geoms: dict[str, int] = {}
        for s in self.subjects:
            try:
                img = nib.load(str(s.image))
                sp = np.sqrt((np.asarray(img.affine)[:3, :3] ** 2).sum(0))
                key = (f"{'x'.join(str(int(n)) for n in img.shape)} voxels at "
                       f"{' x '.join(f'{v:g}' for v in np.round(sp, 3))} mm")
            except Exception:
                key = "unreadable or missing"
            geoms[key] = geoms.get(key, 0) + 1
        splits: dict[str, dict] = {}
        for split in SPLITS:
            try:
                ps = self.pairs(split)
            except PddnetError:
                splits[split] = {"pairs": None, "pairs_with_labels": None}
                continue
            labelled = sum(1 for p in ps if p.fixed.label is not None and p.fixed.label.exists()
                           and p.moving.label is not None and p.moving.label.exists())
            splits[split] = {"pairs": len(ps), "pairs_with_labels": labelled}
        block = self.doc.get("pddnet")
        return {
            "name": self.name,
            "json": str(self.json_path),
            "subjects": len(self.subjects),
            "subjects_with_labels": sum(1 for s in self.subjects if s.label is not None),
            "geometry": geoms,
            "labels": {str(k): v for k, v in self.label_names.items()},
            "pddnet": ({k: block.get(k) for k in ("generator", "version", "preset", "seed")}
                       if isinstance(block, dict) else None),
            "splits": splits,
            "problems": self.problems(),
        }

    def describe(self, info: dict | None = None) -> str:
        """A human-readable summary: counts, geometry, labels, pairs per split, problems."""
        d = info if info is not None else self.info()
        lines = [f"dataset {d['name']}", f"json: {d['json']}"]
        lines.append(f"subjects: {d['subjects']} listed under 'training' "
                     f"({d['subjects_with_labels']} with label maps)")
        lines.append("geometry: " + "; ".join(f"{k} ({v})" for k, v in d["geometry"].items()))
        lines.append("labels: " + (", ".join(f"{k} {v}" for k, v in d["labels"].items())
                                   if d["labels"] else "(none listed)"))
        block = d["pddnet"]
        if block is not None:
            lines.append(f"pddnet: generator {block.get('generator')} {block.get('version')}, "
                         f"preset {block.get('preset')}, seed {block.get('seed')}")
        for split in SPLITS:
            sp = d["splits"][split]
            if sp["pairs"] is None:
                lines.append(f"{split} pairs: none (no "
                             f"{'registration_' + split if split != 'train' else 'train'} list)")
            else:
                lines.append(f"{split} pairs: {sp['pairs']} ({sp['pairs_with_labels']} with "
                             "label maps for both scans)")
        problems = d["problems"]
        if problems:
            lines.append(f"problems ({len(problems)}):")
            lines += [f"  - {p}" for p in problems]
        else:
            lines.append("problems: none found")
        return "\n".join(lines)


# -------------------------------------------------------------------------------------------
# the official evaluation's file names
# -------------------------------------------------------------------------------------------
#: ``long``: ``disp_FFFF_mmmm_MMMM_nnnn``, ``short``: ``disp_FFFF_MMMM`` (see
#: :func:`submission_name`)
NAME_STYLES = ("long", "short")


def case_id(image: str | os.PathLike) -> tuple[str, str]:
    """``(subject, modality)`` of an image as the official evaluation reads them: the four
    characters at ``[-16:-12]`` and ``[-11:-7]`` of its path, i.e. ``0001`` and ``0000`` of
    ``.../AbdomenCTCT_0001_0000.nii.gz``."""
    name = Path(image).name
    if not name.endswith(".nii.gz") or len(name) < 17 or name[-12] != "_":
        raise PddnetError(f"{name}: the Learn2Reg evaluation reads the subject and modality "
                          "from image names of the form NAME_SSSS_MMMM.nii.gz (e.g. "
                          "AbdomenCTCT_0001_0000.nii.gz); rename the images (and the json "
                          "entries) that way to make a submission")
    return name[-16:-12], name[-11:-7]


def submission_name(pair: Pair, style: str = "long") -> str:
    """The file name the official evaluation looks for, for ``pair``'s displacement field.

    * ``long`` (default): ``disp_FFFF_mmmm_MMMM_nnnn.nii.gz`` (fixed subject and modality,
      moving subject and modality). The current evaluation (``MDL-UzL/L2R``
      ``evaluation/evaluation.py`` since February 2025) accepts it for every pair.
    * ``short``: ``disp_FFFF_MMMM.nii.gz``. The only name of the 2022 evaluation (May 2022 -
      June 2023); from June 2023 to February 2025 the required name when both scans share a
      modality (or fixed 0000, moving 0001), the long one otherwise; the current evaluation
      accepts it only for fixed 0000, moving 0001.

    Both read the field ``(i, j, k, 3)`` in voxels of the fixed image at full resolution
    (``nib.load(...).get_fdata()``). The 2020 and 2021 challenges took half-resolution float16
    ``.npz`` files instead (``pddnet register --l2r-half``).
    """
    if style not in NAME_STYLES:
        raise PddnetError(f"unknown submission name style {style!r}; choose one of "
                          f"{', '.join(NAME_STYLES)}")
    fs, fm = case_id(pair.fixed.image)
    ms, mm = case_id(pair.moving.image)
    return f"disp_{fs}_{ms}.nii.gz" if style == "short" else f"disp_{fs}_{fm}_{ms}_{mm}.nii.gz"
