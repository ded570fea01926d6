"""COCOEvaluator: perfect predictions, independent re-scoring of detections.json, zero detections,
images without detections, category-id mapping and de-duplication across (fake) DDP ranks."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import mnv2det.coco_eval as coco_eval
from mnv2det.coco_eval import STAT_NAMES, COCOEvaluator

CAT_IDS = [3, 8, 90]  # non-contiguous: label k <-> CAT_IDS[k - 1]


def _gt() -> COCO:
    """12 images (one without objects) with small / medium / large boxes of 3 categories and a crowd box."""
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(12):
        images.append({"id": 100 + i, "file_name": f"{i}.jpg", "width": 320, "height": 240})
        if i == 5:
            continue  # an image without objects
        for _ in range(int(rng.integers(1, 5))):
            size = float(rng.choice([12.0, 50.0, 150.0])) * rng.uniform(0.8, 1.2)  # small / medium / large
            x, y = rng.uniform(0, 320 - size), rng.uniform(0, 240 - size)
            w, h = size, size * rng.uniform(0.6, 1.0)
            anns.append({"id": len(anns) + 1, "image_id": 100 + i, "category_id": int(rng.choice(CAT_IDS)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    anns.append({"id": len(anns) + 1, "image_id": 100, "category_id": 8, "bbox": [0, 0, 100, 100],
                 "area": 10000.0, "iscrowd": 1})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": c, "name": f"c{c}"} for c in CAT_IDS]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _perfect(coco: COCO, img_ids: list[int]) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in img_ids:
        anns = [a for a in coco.imgToAnns[i] if not a["iscrowd"]]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        labels = torch.tensor([CAT_IDS.index(a["category_id"]) + 1 for a in anns], dtype=torch.long)
        out.append({"boxes": boxes, "scores": torch.ones(len(anns)), "labels": labels})
    return out


def _noisy(coco: COCO, img_ids: list[int], seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Jittered true boxes with random scores, some wrong labels, plus random false positives."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for det in _perfect(coco, img_ids):
        n = len(det["boxes"])
        wh = (det["boxes"][:, 2:] - det["boxes"][:, :2]).repeat(1, 2)
        boxes = det["boxes"] + 0.15 * wh * torch.randn(n, 4, generator=g)
        labels = torch.where(torch.rand(n, generator=g) < 0.2, torch.randint(1, 4, (n,), generator=g), det["labels"])
        fp_xy = torch.rand(3, 2, generator=g) * torch.tensor([250.0, 180.0])
        fp = torch.cat([fp_xy, fp_xy + 10 + 50 * torch.rand(3, 2, generator=g)], 1)
        out.append({"boxes": torch.cat([boxes, fp]), "scores": torch.rand(n + 3, generator=g),
                    "labels": torch.cat([labels, torch.randint(1, 4, (3,), generator=g)])})
    return out


def _feed(ev: COCOEvaluator, img_ids: list[int], dets: list[dict[str, torch.Tensor]], batch: int = 5) -> None:
    for s in range(0, len(img_ids), batch):
        ev.update(torch.tensor(img_ids[s:s + batch]), dets[s:s + batch])


def test_perfect_predictions_give_map_1() -> None:
    gt = _gt()
    ids = sorted(gt.getImgIds())
    ev = COCOEvaluator(gt, CAT_IDS)
    _feed(ev, ids, _perfect(gt, ids))
    m = ev.compute()
    for k in ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_100"):
        assert m[k] == pytest.approx(1.0), k
    assert "Average Precision" in ev.report and "maxDets=100" in ev.report
    per_class = [line.split() for line in ev.report.splitlines() if line.split()[:1] in (["c3"], ["c8"], ["c90"])]
    assert sorted(r[0] for r in per_class) == ["c3", "c8", "c90"]
    assert all(r[1:] == ["1.000", "1.000"] for r in per_class)


def test_detections_json_rescored_independently(tmp_path: Path) -> None:
    gt = _gt()
    ids = sorted(gt.getImgIds())
    ev = COCOEvaluator(gt, CAT_IDS)
    _feed(ev, ids, _noisy(gt, ids))
    m = ev.compute()
    assert 0.05 < m["map"] < 0.95  # a non-trivial score, so agreement below means something
    ev.save(tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    dets = json.loads((tmp_path / "detections.json").read_text())
    assert {d["category_id"] for d in dets} <= set(CAT_IDS)  # labels mapped back to the dataset's ids
    assert all(len(d["bbox"]) == 4 and d["bbox"][2] > -50 for d in dets)

    # Independent scoring: a fresh GT from the same dicts, loadRes of the file, plain COCOeval.
    gt2 = COCO()
    gt2.dataset = json.loads(json.dumps(gt.dataset))
    with contextlib.redirect_stdout(io.StringIO()):
        gt2.createIndex()
        res = gt2.loadRes(str(tmp_path / "detections.json"))
        e = COCOeval(gt2, res, "bbox")
        e.evaluate()
        e.accumulate()
        e.summarize()
    for name, value in zip(STAT_NAMES, e.stats):
        assert saved[name] == float(value), name  # exactly the same numbers


def test_label_to_category_id_round_trip() -> None:
    gt = _gt()
    ev = COCOEvaluator(gt, CAT_IDS)
    box = torch.tensor([[1.0, 2.0, 11.0, 22.0]] * 3)
    ev.update(torch.tensor([101]), [{"boxes": box, "scores": torch.tensor([0.9, 0.8, 0.7]),
                                     "labels": torch.tensor([3, 1, 2])}])
    res = ev.to_coco_results(ev._local)
    assert [r["category_id"] for r in res] == [90, 3, 8]
    assert res[0]["bbox"] == [1.0, 2.0, 10.0, 20.0] and res[0]["image_id"] == 101
    cat_to_label = {c: i + 1 for i, c in enumerate(CAT_IDS)}
    assert [cat_to_label[r["category_id"]] for r in res] == [3, 1, 2]
    with pytest.raises(ValueError, match="labels must be in 1..3"):
        ev.update(torch.tensor([102]), [{"boxes": box[:1], "scores": torch.ones(1), "labels": torch.tensor([4])}])
        ev.compute()


def test_zero_detections_give_zero() -> None:
    gt = _gt()
    ids = sorted(gt.getImgIds())
    ev = COCOEvaluator(gt, CAT_IDS)
    empty = {"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
    _feed(ev, ids, [empty] * len(ids))
    m = ev.compute()
    assert set(m) == set(STAT_NAMES) and all(v == 0.0 for v in m.values())
    assert "no detections" in ev.report
    ev.reset()
    assert ev.compute()["map"] == 0.0  # nothing fed at all


def test_images_without_detections_count_as_misses() -> None:
    gt = _gt()
    ids = sorted(gt.getImgIds())
    ev = COCOEvaluator(gt, CAT_IDS)
    half = ids[: len(ids) // 2]
    _feed(ev, half, _perfect(gt, half))
    m = ev.compute()
    n_half = sum(1 for i in half for a in gt.imgToAnns[i] if not a["iscrowd"])
    n_all = sum(1 for a in gt.dataset["annotations"] if not a["iscrowd"])
    assert 0 < n_half < n_all
    assert m["map_50"] < 0.9 and m["mar_100"] < 0.9  # the other half's objects are missed


def test_fake_ranks_are_gathered_and_deduplicated(monkeypatch: pytest.MonkeyPatch) -> None:
    gt = _gt()
    ids = sorted(gt.getImgIds())
    dets = _noisy(gt, ids)
    ref = COCOEvaluator(gt, CAT_IDS)
    _feed(ref, ids, dets)
    expected = ref.compute()

    # DistributedSampler-style split: rank r gets ids[r::2], padded by repeating the first images;
    # rank 1's copies of the duplicated images carry different (wrong) detections that must not count.
    rank0 = COCOEvaluator(gt, CAT_IDS)
    _feed(rank0, ids[0::2], dets[0::2])
    rank1 = COCOEvaluator(gt, CAT_IDS)
    _feed(rank1, ids[1::2], dets[1::2])
    junk = {"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0]]), "scores": torch.ones(1), "labels": torch.ones(1, dtype=torch.long)}
    rank1.update(torch.tensor([ids[0], ids[2]]), [junk, junk])   # padding duplicates from rank 0's share
    rank0.update(torch.tensor([ids[0]]), [junk])                  # a duplicate within one rank: first copy wins

    def fake_all_gather_object(out: list, obj: object) -> None:
        out[0], out[1] = rank0._local, rank1._local

    monkeypatch.setattr(coco_eval, "_is_distributed", lambda: True)
    monkeypatch.setattr(coco_eval.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(coco_eval.dist, "all_gather_object", fake_all_gather_object)
    got = rank0.compute()
    assert got == expected
    assert len(rank0.results) == len(ref.results)
    assert rank0.num_images_with_detections == len(ids)


def test_model_category_ids_are_matched_by_id() -> None:
    """A model with its own ids (a TF label map): label k -> the model's id; a GT category the model does
    not know scores as missed (AP 0), detections of an id the GT lacks are not scored; the per-class
    table names the GT's categories."""
    gt = _gt()
    ids = sorted(gt.getImgIds())
    model_ids = [90, 3, 55]  # label 1 = category 90, label 2 = category 3, label 3 = an id the GT lacks
    label = {90: 1, 3: 2}
    dets = []
    for i, det in zip(ids, _perfect(gt, ids)):
        cats = [CAT_IDS[k - 1] for k in det["labels"].tolist()]
        keep = torch.tensor([c in label for c in cats], dtype=torch.bool)
        n = int(keep.sum())
        dets.append({"boxes": torch.cat([det["boxes"][keep], torch.tensor([[0.0, 0.0, 30.0, 30.0]])]),
                     "scores": torch.cat([torch.ones(n), torch.full((1,), 0.99)]),
                     "labels": torch.tensor([label[c] for c, k in zip(cats, keep.tolist()) if k] + [3])})
    ev = COCOEvaluator(gt, model_ids, class_names=["zebra", "dog", "phone"])
    _feed(ev, ids, dets)
    m = ev.compute()
    assert {d["category_id"] for d in ev.results} == {90, 3, 55}
    per_class = {r[0]: r[1:] for r in (line.split() for line in ev.report.splitlines()) if r[:1] and r[0] in
                 ("c3", "c8", "c90", "zebra", "dog", "phone")}
    assert per_class == {"c3": ["1.000", "1.000"], "c8": ["0.000", "0.000"], "c90": ["1.000", "1.000"]}
    assert m["map"] == pytest.approx(2 / 3) and m["map_50"] == pytest.approx(2 / 3)
