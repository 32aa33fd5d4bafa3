"""MitoEM instance AP and Lucchi Jaccard/DSC on constructed volumes with known answers."""

import json

import numpy as np
import pytest

from stt_model.metrics import dsc, evaluate, instance_ap, jaccard, label_overlap

SHAPE = (20, 64, 64)


def box(vol: np.ndarray, label: int, z: tuple[int, int], y: tuple[int, int], x: tuple[int, int]) -> np.ndarray:
    vol[z[0] : z[1], y[0] : y[1], x[0] : x[1]] = label
    return vol


def gt_three_sizes() -> np.ndarray:
    """One small (3,000), one medium (6,000) and one large (40,000 voxel) instance."""
    gt = np.zeros((40, 64, 64), np.uint32)
    box(gt, 1, (0, 10), (0, 15), (0, 20))  # 3,000
    box(gt, 2, (0, 10), (20, 50), (30, 50))  # 6,000
    box(gt, 3, (15, 40), (0, 40), (0, 40))  # 40,000
    return gt


def gt_two() -> np.ndarray:
    gt = np.zeros(SHAPE, np.uint16)
    box(gt, 1, (0, 10), (0, 20), (0, 20))  # 4,000
    box(gt, 2, (10, 20), (30, 60), (30, 60))  # 9,000
    return gt


def remove_voxels(vol: np.ndarray, label: int, m: int) -> np.ndarray:
    """Copy of ``vol`` with the first ``m`` voxels (C order) of ``label`` set to 0."""
    out = vol.copy().reshape(-1)
    out[np.flatnonzero(out == label)[:m]] = 0
    return out.reshape(vol.shape)


def test_perfect_prediction_scores_one():
    gt = gt_three_sizes()
    r = evaluate(gt, gt)
    for key in ("ap", "ap50", "ap75", "ap75_small", "ap75_medium", "ap75_large", "jaccard", "dsc"):
        assert r[key] == pytest.approx(1.0), key


def test_relabelled_prediction_scores_the_same():
    gt = gt_three_sizes()
    perm = np.array([0, 907, 5, 70000], np.uint32)
    assert instance_ap(perm[gt], gt) == instance_ap(gt, gt)
    assert instance_ap(gt.astype(np.int64), gt.astype(np.uint8)) == instance_ap(gt, gt)


def test_evaluate_keys_are_the_public_contract_and_json_serialisable():
    gt = gt_two()
    r = evaluate(gt, gt)
    assert set(r) == {"ap75", "ap50", "ap", "ap75_small", "ap75_medium", "ap75_large", "jaccard", "dsc"}
    assert all(type(v) is float for v in r.values())
    json.dumps(r, allow_nan=False)


@pytest.mark.parametrize("removed, ap75", [(999, 1.0), (1000, 1.0), (1001, 0.0)])
def test_iou_just_above_or_below_075_flips_ap75(removed, ap75):
    gt = np.zeros(SHAPE, np.uint32)
    box(gt, 1, (0, 10), (0, 20), (0, 20))  # 4,000 voxels: IoU = (4000 - removed) / 4000
    r = instance_ap(remove_voxels(gt, 1, removed), gt)
    assert r["ap75"] == pytest.approx(ap75)
    assert r["ap50"] == pytest.approx(1.0)
    # Thresholds .50 .. .75 (six of ten) pass when IoU >= 0.75.
    assert r["ap"] == pytest.approx(0.6 if ap75 else 0.5)


def test_missing_instance_halves_recall():
    gt = gt_two()
    pred = np.where(gt == 2, 2, 0).astype(np.uint32)
    r = instance_ap(pred, gt)
    # Precision 1 up to recall 0.5: 51 of the 101 recall points.
    assert r["ap75"] == pytest.approx(51 / 101)
    assert r["ap"] == pytest.approx(51 / 101)


def test_false_positive_counts_by_its_rank_in_size():
    gt = np.zeros(SHAPE, np.uint32)
    box(gt, 1, (0, 10), (0, 20), (0, 20))  # 4,000
    larger_fp = box(gt.copy(), 9, (10, 20), (30, 60), (30, 60))  # 9,000, ranked first
    smaller_fp = box(gt.copy(), 9, (10, 20), (30, 40), (30, 60))  # 3,000, ranked after the TP
    assert instance_ap(larger_fp, gt)["ap75"] == pytest.approx(0.5)
    assert instance_ap(smaller_fp, gt)["ap75"] == pytest.approx(1.0)


def test_split_instance_matches_only_the_larger_part():
    gt = np.zeros(SHAPE, np.uint32)
    box(gt, 1, (0, 10), (0, 20), (0, 40))  # 8,000
    pred = np.zeros_like(gt)
    box(pred, 1, (0, 10), (0, 20), (0, 24))  # 4,800: IoU 0.6
    box(pred, 2, (0, 10), (0, 20), (24, 40))  # 3,200: IoU 0.4, a false positive
    r = instance_ap(pred, gt)
    assert r["ap50"] == pytest.approx(1.0)  # the false positive comes after full recall
    assert r["ap75"] == 0.0
    assert r["ap"] == pytest.approx(0.3)  # thresholds .50 .55 .60


def test_merged_instances_match_one_ground_truth():
    gt = np.zeros(SHAPE, np.uint32)
    box(gt, 1, (0, 10), (0, 20), (0, 20))
    box(gt, 2, (0, 10), (0, 20), (20, 40))
    merged = (gt > 0).astype(np.uint32)  # IoU 0.5 with each
    r = instance_ap(merged, gt)
    assert r["ap50"] == pytest.approx(51 / 101)
    assert r["ap75"] == 0.0


def test_ground_truth_crumbs_are_removed():
    gt = gt_two()
    box(gt, 3, (0, 5), (40, 50), (0, 20))  # 1,000 voxels < 2,000
    without_crumb = np.where(gt == 3, 0, gt)
    # Missing the crumb is no false negative, predicting it (ranked last) changes nothing.
    assert instance_ap(without_crumb, gt)["ap"] == pytest.approx(1.0)
    assert instance_ap(gt, gt)["ap"] == pytest.approx(1.0)
    assert instance_ap(without_crumb, gt, crumb_size=0)["ap"] == pytest.approx(67 / 101)
    # As in the challenge code, a prediction whose only overlap is a crumb is a false
    # positive: here it is the largest prediction, so ranked first (FP, TP, TP).
    pred = box(without_crumb.copy(), 7, (0, 20), (38, 64), (0, 26))  # 13,520 voxels
    assert instance_ap(pred, gt)["ap75"] == pytest.approx(2 / 3)


def test_size_classes():
    gt = gt_three_sizes()
    pred = np.where(gt == 2, 0, gt)  # medium instance missed
    r = instance_ap(pred, gt)
    assert r["ap75_small"] == pytest.approx(1.0)
    assert r["ap75_medium"] == 0.0
    assert r["ap75_large"] == pytest.approx(1.0)
    assert r["ap75"] == pytest.approx(67 / 101)  # recall 2/3: points 0.00 .. 0.66

    # An unmatched medium-sized prediction (7,200 voxels, ranked before the 6,000 one) is
    # a false positive for "medium" and "all"; outside the small and large ranges it is
    # ignored there.
    fp = box(gt.copy(), 8, (10, 15), (40, 64), (0, 60))
    r = instance_ap(fp, gt)
    assert r["ap75_small"] == pytest.approx(1.0)
    assert r["ap75_large"] == pytest.approx(1.0)
    assert r["ap75_medium"] == pytest.approx(0.5)
    # Ranked TP, FP, TP, TP: precision 1 up to recall 1/3 (34 points), then 3/4.
    assert r["ap75"] == pytest.approx((34 + 67 * 0.75) / 101)


def test_no_ground_truth_is_undefined_and_no_prediction_is_zero():
    gt = gt_two()
    empty = np.zeros_like(gt)
    r = instance_ap(empty, gt)
    assert r["ap"] == r["ap75"] == r["ap75_small"] == r["ap75_medium"] == 0.0
    assert r["ap75_large"] == -1.0  # no large ground truth
    assert instance_ap(gt, empty)["ap"] == -1.0


def test_slab_size_and_h5py_input_do_not_change_the_result(tmp_path):
    h5py = pytest.importorskip("h5py")
    gt = gt_three_sizes()
    pred = remove_voxels(np.roll(gt, 3, axis=2), 3, 5000)
    expected = evaluate(pred, gt)
    for slab_voxels in (1, 4096, 10**4):
        assert evaluate(pred, gt, slab_voxels=slab_voxels) == expected
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["pred"], f["gt"] = pred, gt
        assert evaluate(f["pred"], f["gt"], slab_voxels=5000) == expected


def test_label_overlap_table():
    pred = np.zeros((2, 2, 3), np.uint32)
    gt = np.zeros((2, 2, 3), np.uint32)
    pred[0] = [[1, 1, 2], [0, 2, 2]]
    gt[0] = [[5, 0, 5], [5, 5, 0]]
    ov = label_overlap(pred, gt, slab_voxels=1)
    assert ov.pred_ids.tolist() == [1, 2] and ov.pred_sizes.tolist() == [2, 3]
    assert ov.gt_ids.tolist() == [5] and ov.gt_sizes.tolist() == [4]
    assert list(zip(ov.pair_pred.tolist(), ov.pair_gt.tolist(), ov.pair_counts.tolist())) == [(1, 5, 1), (2, 5, 2)]


def test_large_ids_beyond_32_bits():
    gt = gt_two().astype(np.uint64)
    pred = np.where(gt > 0, gt + np.uint64(2**40), 0).astype(np.uint64)
    assert instance_ap(pred, gt)["ap"] == pytest.approx(1.0)


def test_jaccard_and_dsc_by_hand():
    pred = np.zeros((1, 2, 4), bool)
    gt = np.zeros((1, 2, 4), np.uint8)
    pred[0, 0, :3] = True
    gt[0, 0, 1:] = 255
    assert jaccard(pred, gt) == pytest.approx(2 / 4)
    assert dsc(pred, gt) == pytest.approx(2 * 2 / 6)
    empty = np.zeros((1, 2, 4), bool)
    assert jaccard(empty, empty) == 1.0 and dsc(empty, empty) == 1.0
    assert jaccard(empty, gt) == 0.0 and dsc(pred, empty) == 0.0


def test_evaluate_foreground_scores_use_label_gt_zero():
    gt = gt_two()
    pred = remove_voxels(gt, 2, 1000)  # 12,000 of 13,000 foreground voxels
    r = evaluate(pred, gt)
    assert r["jaccard"] == pytest.approx(12000 / 13000)
    assert r["dsc"] == pytest.approx(2 * 12000 / 25000)


def test_bad_inputs_name_the_argument():
    gt = gt_two()
    with pytest.raises(ValueError, match=r"pred_instances has shape \(20, 64, 63\).*gt_instances"):
        instance_ap(gt[:, :, :63], gt)
    with pytest.raises(ValueError, match=r"gt_instances must be a 3-D \(Z, Y, X\) volume"):
        instance_ap(gt, gt[0])
    with pytest.raises(TypeError, match="pred_instances must hold integer labels.*float32"):
        instance_ap(gt.astype(np.float32), gt)
    with pytest.raises(ValueError, match="gt contains negative labels"):
        evaluate(gt, gt.astype(np.int32) - 1)
    with pytest.raises(ValueError, match="pred_instances contains negative labels"):
        instance_ap(gt.astype(np.int8) - 1, gt)
    with pytest.raises(ValueError, match="pred_mask has shape"):
        jaccard(gt[:1], gt)
    with pytest.raises(TypeError, match="gt_mask must hold integer labels"):
        dsc(gt, gt.astype(np.float64))
    with pytest.raises(ValueError, match="pred must be a 3-D"):
        evaluate(gt[None], gt)
