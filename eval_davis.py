"""Label propagation for the paper's three dense benchmarks (Table 1), frozen baseline vs + Co-Settle: the first
frame's labels carried through every frame by feature affinities. DAVIS-2017: object masks, J&F. VIP: semantic
parts, mIoU. JHMDB: 15 joints, PCK.

    python eval_davis.py --weights W.pth [--ckpt C.pth] [--compare] --davis DAVIS/ --vip VIP_Fine/ --jhmdb JHMDB/
    python eval_davis.py --weights dino+ours/checkpoint-4.pth --compare --davis DAVIS/   # the authors' file
    python eval_davis.py --davis DAVIS/ --masks results/        # score an existing results folder
    python eval_davis.py --tradeoff --videos LIST [--ckpt ...]  # label-free trade-off metrics (paper Table 4)
    python eval_davis.py --bench                                # s/frame of each pipeline, peak memory
    python eval_davis.py --table ckpts/ --davis DAVIS/ --vip VIP_Fine/ --jhmdb JHMDB/   # all of Table 1

Two propagation algorithms: CRW's as CropMAE runs it (alexandre-eymael/CropMAE downstreams/propagation, what the
authors' T-CoRe evaluates with) and DINO's. The J&F re-implements davis2017-evaluation to the last bit.
"""
import argparse
import math
import os
import sys
import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from cosettle import (FAMILIES, IMAGENET_MEAN, IMAGENET_STD, BadInput, at_least, build_vit, load_encoder,
                      load_projection, positive, refuse_unused, timeit)
from data import (VIP_CLASSES, atomic, check_out_dir, davis_palette, describe, find_videos, image_size, jhmdb_labels,
                  list_frames, load_rgb, make_davis, read_davis, read_ids, read_jhmdb, read_vip, save_npy,
                  synthetic_video, write_csv, write_json)

# DAVIS's two protocols (README). paper, behind Table 1: CRWPropagation, alexandre-eymael/CropMAE downstreams/
# propagation (util.py defaults) as the authors' T-CoRe runs it (yafeng19/T-CORE scripts/eval.sh). dino: Propagation,
# facebookresearch/dino eval_video_segmentation.py exactly. Sizes: (height, width) is fixed; one number is a rule.
PROTOCOLS = {"paper": dict(algorithm="crw", size=(480, 880), mean=IMAGENET_MEAN, std=IMAGENET_STD, topk=7, context=20,
                           radius=20, temperature=0.7),
             "dino": dict(algorithm="dino", size=480, mean=IMAGENET_MEAN, std=(0.228, 0.224, 0.225), topk=5,
                          context=7, radius=12, temperature=0.1)}
# VIP and JHMDB always run CropMAE's pipeline: VIP with top-10 and `crop_size [880]` (448x880 for 16:9 frames; the
# paper's text says 480x880: --vip-size), JHMDB with every frame stretched to 320x320 (a 20x20 grid at patch 16).
VIP = dict(PROTOCOLS["paper"], size=880, topk=10)
JHMDB = dict(PROTOCOLS["paper"], size=(320, 320))
METRICS = ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
PALETTE = np.array(davis_palette(), dtype=np.uint8).reshape(256, 3)

# The paper's Table 1, ViT-B/16, in % (the same numbers as the "Checkpoints" table of yafeng19/Co-Settle
# README.md): family: (VIP mIoU, DAVIS-2017 J&F mean, JHMDB PCK@0.1) of the frozen encoder, then + Co-Settle.
TABLE_1 = {"mae": ((29.3, 52.4, 41.6), (33.8, 59.6, 48.4)), "ijepa": ((31.5, 53.9, 42.6), (35.3, 58.7, 44.4)),
           "clip": ((38.1, 54.9, 36.9), (39.2, 58.3, 40.6)), "blip": ((37.6, 58.8, 35.1), (39.6, 62.0, 38.9)),
           "mocov3": ((38.8, 62.6, 43.6), (39.8, 62.9, 45.3)), "ibot": ((39.6, 64.6, 45.7), (40.8, 65.1, 46.1)),
           "dino": ((39.1, 63.2, 44.4), (39.8, 64.2, 46.2)), "dinov2": ((38.4, 63.1, 46.6), (39.9, 63.7, 47.3))}
PUBLISHED = {family: {variant: dict(zip(("vip", "davis", "jhmdb"), row)) for variant, row in
                      zip(("baseline", "cosettle"), rows)} for family, rows in TABLE_1.items()}
HEADLINE = {"davis": ("DAVIS J&F", "J&F-Mean"), "vip": ("VIP mIoU", "mIoU"),  # each task's Table 1 number
            "jhmdb": ("JHMDB PCK@0.1", "PCK@0.1")}


def paper_row(family, task, measured, unlike=None):
    """One line, frozen -> + Co-Settle in %: the measured pair of fractions beside the paper's pair for `family`,
    unless `unlike` says why the measurement is not like for like."""
    ours = f"{HEADLINE[task][0]:14s} measured {100 * measured[0]:.1f} -> {100 * measured[1]:.1f} " \
           f"({100 * (measured[1] - measured[0]):+.1f})"
    if unlike:
        return f"  {ours}   not beside the paper's: {unlike}"
    if family not in PUBLISHED:
        return f"  {ours}   paper: no published numbers for a {family!r} encoder"
    base, cosettle = PUBLISHED[family]["baseline"][task], PUBLISHED[family]["cosettle"][task]
    return f"  {ours}   paper ({family}, ViT-B/16) {base:.1f} -> {cosettle:.1f} ({cosettle - base:+.1f})"


def protocol_params(protocol, **overrides):
    base = protocol if isinstance(protocol, dict) else PROTOCOLS.get(protocol)
    if base is None:
        raise BadInput(f"--protocol {protocol}: unknown, use one of {', '.join(PROTOCOLS)}")
    unknown = set(overrides) - set(base)
    if unknown:
        raise BadInput(f"unknown protocol setting(s) {', '.join(sorted(unknown))}")
    p = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    if p["topk"] < 1 or p["context"] < 0 or p["radius"] < 0 or not p["temperature"] > 0 or min(np.atleast_1d(
            p["size"])) < 1:
        raise BadInput(f"protocol settings out of range (topk >= 1, context >= 0, radius >= 0, temperature > 0): {p}")
    return p


def target_size(H, W, params):
    """(th, tw) for an H x W frame: a (height, width) size as it is; one number, the other side floored to a multiple
    of 64: dino, read_frame's short side -> size (854x480 -> 832x480; on square frames DINO's read_frame and read_seg
    disagree, 480x448 vs 448x480: we use read_frame's); crw, CropMAE vos.py's long side (1280x720 -> 880x448)."""
    s = params["size"]
    if not np.isscalar(s):
        return tuple(s)
    if params["algorithm"] == "dino":
        return (int((s * H / W) // 64 * 64), s) if H > W else (s, int((s * W / H) // 64 * 64))
    return (int(int(H * s / W) // 64 * 64), s) if W > H else (s, int(int(W * s / H) // 64 * 64))


def write_png(path, ids, mode="P"):
    """ids uint8 [H, W] as a palette PNG (DAVIS) or a greyscale one (VIP's Category_ids); RGB pictures as they are."""
    img = Image.fromarray(ids)
    if mode == "P":
        img.putpalette(PALETTE.ravel().tolist())
    atomic(path, lambda tmp: img.save(tmp, format="PNG"))


# -----------------------------------------------------------------------------
# The metrics: VIP's, HCPLab-SYSU/ATEN evaluate/test_parsing.py; DAVIS's, davis2017-evaluation (semi-supervised)


def score_vip(plan, results, verbose=True):
    """The official metric (README) from one confusion matrix over every frame of every video, predictions at another
    size brought to the label's with PIL NEAREST as eval_vip.py does: {IoU per class, mIoU, pixel_accuracy,
    mean_accuracy, fwIoU} as fractions; a class absent from both prediction and truth: NaN, left out of the means."""
    results, n = Path(results), len(VIP_CLASSES)
    hist = np.zeros((n, n), np.int64)
    for video, _, anns, _ in plan:
        for a in anns:
            gt = read_ids(a, "label").astype(np.int64)
            res_path = results / video / a.name
            res = read_ids(res_path, "result mask")
            if res.shape != gt.shape:
                res = np.array(Image.fromarray(res).resize(gt.shape[::-1], Image.NEAREST))
            if res.max() >= n:
                raise BadInput(f"{res_path}: part id {res.max()}, VIP has ids 0..{n - 1}")
            valid = gt < n
            hist += np.bincount(n * gt[valid] + res[valid], minlength=n * n).reshape(n, n)
    correct, gt, pred = np.diag(hist), hist.sum(1), hist.sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou, acc = correct / (gt + pred - correct), correct / gt
        freq = gt / hist.sum()
    m = {"mIoU": float(np.nanmean(iou)), "IoU": iou.tolist(), "pixel_accuracy": float(correct.sum() / hist.sum()),
         "mean_accuracy": float(np.nanmean(acc)), "fwIoU": float((freq[freq > 0] * iou[freq > 0]).sum())}
    if verbose:
        print(f"{results}: VIP mIoU {m['mIoU']:.4f}, pixel accuracy {m['pixel_accuracy']:.4f}, mean accuracy "
              f"{m['mean_accuracy']:.4f}, fwIoU {m['fwIoU']:.4f}\n  {'class':15s} {'IoU':>7s} {'acc':>7s}")
        for c in range(n):
            print(f"  {c:2d} {VIP_CLASSES[c]:12s} {m['IoU'][c]:7.4f} {acc[c]:7.4f}")
    return m


def seg2bmap(seg):
    """metrics.py _seg2bmap on bool [..., H, W]: a pixel is boundary when it differs from its right, lower or
    lower-right neighbour (outside the image counts as 0); the last row compares only to the right, the last
    column only downward, the bottom-right pixel never is. No thinning."""
    e, s, se = torch.zeros_like(seg), torch.zeros_like(seg), torch.zeros_like(seg)
    e[..., :, :-1] = seg[..., :, 1:]
    s[..., :-1, :] = seg[..., 1:, :]
    se[..., :-1, :-1] = seg[..., 1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[..., -1, :] = seg[..., -1, :] ^ e[..., -1, :]
    b[..., :, -1] = seg[..., :, -1] ^ s[..., :, -1]
    b[..., -1, -1] = False
    return b


def dilate_disk(b, r):
    """cv2.dilate(b, skimage.morphology.disk(r)) on bool [..., H, W]: OR over offsets dx^2 + dy^2 <= r^2. Row dy of
    the disk spans |dx| <= isqrt(r^2 - dy^2): a box test on a cumulative sum, shifted by dy (O(r) per pixel)."""
    H, W = b.shape[-2:]
    cs = F.pad(b.to(torch.int32).cumsum(-1), (1, 0))  # cs[..., x] = number of set pixels left of x
    x = torch.arange(W, device=b.device)
    rows = {}
    for w in {math.isqrt(r * r - dy * dy) for dy in range(r + 1)}:
        hi, lo = (x + w + 1).clamp(max=W), (x - w).clamp(min=0)
        rows[w] = (cs[..., hi] - cs[..., lo]) > 0
    out = torch.zeros_like(b)
    for dy in range(-min(r, H - 1), min(r, H - 1) + 1):  # a shift by H rows or more leaves the image
        up, down = max(dy, 0), max(-dy, 0)  # output row y takes row y + dy of the horizontal dilation
        out[..., down:H - up, :] |= rows[math.isqrt(r * r - dy * dy)][..., up:H - down, :]
    return out


def jaccard(gt, res):
    """metrics.py db_eval_iou per object for bool [n, H, W]: |gt & res| / |gt | res|, 1 where both are empty."""
    inter = (gt & res).sum((-2, -1)).cpu().numpy()
    union = (gt | res).sum((-2, -1)).cpu().numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        j = inter / union
    j[np.isclose(union, 0)] = 1
    return j


def boundary_f(gt, res, bound_th=0.008):
    """metrics.py f_measure per object for bool [n, H, W]: boundary precision/recall within a disk of
    ceil(bound_th * image diagonal) pixels (bound_th >= 1: that many pixels), with the reference's degenerate
    cases (no predicted boundary: P=1, R=0; no true boundary: P=0, R=1; neither: 1, 1; P+R=0: F=0)."""
    r = int(bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(gt.shape[-2:])))
    fg_b, gt_b = seg2bmap(res), seg2bmap(gt)
    fg_hit = (fg_b & dilate_disk(gt_b, r)).sum((-2, -1)).tolist()
    gt_hit = (gt_b & dilate_disk(fg_b, r)).sum((-2, -1)).tolist()
    out = []
    for n_fg, n_gt, a, b in zip(fg_b.sum((-2, -1)).tolist(), gt_b.sum((-2, -1)).tolist(), fg_hit, gt_hit):
        if n_fg == 0 or n_gt == 0:
            precision, recall = (1, 0) if n_gt > 0 else (0, 1) if n_fg > 0 else (1, 1)
        else:
            precision, recall = a / float(n_fg), b / float(n_gt)
        out.append(0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return np.array(out, dtype=np.float64)


def db_statistics(values):
    """utils.py db_statistics: mean, recall (share > 0.5) and decay (first minus last of 4 quantised bins).
    The uint8 cast of the bin edges is the reference's (it wraps for sequences longer than 256 frames)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an empty bin, as the reference
        mean, recall = np.nanmean(values), np.nanmean(values > 0.5)
        ids = (np.round(np.linspace(1, len(values), 5) + 1e-10) - 1).astype(np.uint8)
        bins = [values[ids[i]:ids[i + 1] + 1] for i in range(4)]
        decay = np.nanmean(bins[0]) - np.nanmean(bins[3])
    return mean, recall, decay


def score(davis, results, device="cpu", verbose=True):
    """evaluation.py DAVISEvaluation('semi-supervised', 'val').evaluate + evaluation_method.py: objects are ids 1..max
    of the first ground-truth frame (void 255 is background, as davis.py), first and last frames not scored, means
    over all objects. Writes the two CSVs into `results`; returns (global dict, [(name, J-Mean, F-Mean)])."""
    results = Path(results)
    plan = read_davis(davis)
    missing = [f"{seq}/{a.stem}.png" for seq, _, anns, _ in plan for a in anns[1:-1]
               if not (results / seq / f"{a.stem}.png").is_file()]
    if missing:
        raise BadInput(f"{results}: {len(missing)} result frames missing: {', '.join(missing[:5])}"
                       f"{', ...' if len(missing) > 5 else ''}")
    stats, rows = {k: [] for k in ("JM", "JR", "JD", "FM", "FR", "FD")}, []
    for seq, _, anns, _ in plan:
        gt0 = read_ids(anns[0], "ground truth")
        n = int(np.where(gt0 == 255, 0, gt0).max())
        ids = torch.arange(1, n + 1, device=device)[:, None, None]
        J, Fm = np.zeros((n, max(0, len(anns) - 2))), np.zeros((n, max(0, len(anns) - 2)))
        for t, ann in enumerate(anns[1:-1]):
            gt = read_ids(ann, "ground truth")
            res_path = results / seq / (ann.stem + ".png")
            res = read_ids(res_path, "result mask")
            if gt.shape != gt0.shape or res.shape != gt.shape:
                raise BadInput(f"{res_path}: {res.shape[1]}x{res.shape[0]}, ground truth {ann} is "
                               f"{gt.shape[1]}x{gt.shape[0]} (first frame {gt0.shape[1]}x{gt0.shape[0]})")
            extra = sorted(set(np.unique(res).tolist()) - set(range(n + 1)))
            if extra:
                raise BadInput(f"{res_path}: object ids {extra} that the ground truth of {seq} (ids 1..{n}) "
                               "does not have")
            gt_t = torch.from_numpy(np.where(gt == 255, 0, gt)).to(device)[None] == ids
            res_t = torch.from_numpy(res).to(device)[None] == ids
            J[:, t], Fm[:, t] = jaccard(gt_t, res_t), boundary_f(gt_t, res_t)
        for i in range(n):
            for key, values in (("J", J[i]), ("F", Fm[i])):
                for s, v in zip("MRD", db_statistics(values)):
                    stats[key + s].append(v)
            rows.append((f"{seq}_{i + 1}", stats["JM"][-1], stats["FM"][-1]))
    m = {k: np.mean(v) for k, v in stats.items()}
    glob = dict(zip(METRICS, map(float, [(m["JM"] + m["FM"]) / 2.0, m["JM"], m["JR"], m["JD"], m["FM"], m["FR"],
                                         m["FD"]])))
    write_csv(results / "global_results-val.csv", METRICS, [list(glob.values())])
    write_csv(results / "per-sequence_results-val.csv", ["Sequence", "J-Mean", "F-Mean"], rows)
    if verbose:
        print(f"{results}: global results (val)\n  " + " ".join(f"{k:>9s}" for k in METRICS) + "\n  "
              + " ".join(f"{glob[k]:9.3f}" for k in METRICS))
        print("per sequence\n" + "\n".join(f"  {name:30s} J {jm:.3f}  F {fm:.3f}" for name, jm, fm in rows))
    return glob, rows


# -----------------------------------------------------------------------------
# JHMDB (alexandre-eymael/CropMAE downstreams/propagation/src/): keypoints (x, y) as heatmaps [C, h, w], channel 0
# the background (data.jhmdb_labels), PCK. Each joint's parent, as utils/test_utils.py vis_pose draws the skeleton:
JHMDB_PARENTS = (1, 0, 0, 0, 0, 1, 1, 3, 4, 5, 6, 7, 8, 9, 10)
JHMDB_COLOURS = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
                 (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255),
                 (85, 0, 255), (170, 0, 255))
PCK_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5)
JHMDB_JOINTS = ("neck", "belly", "face", "r-shoulder", "l-shoulder", "r-hip", "l-hip", "r-elbow", "l-elbow",
                "r-knee", "l-knee", "r-wrist", "l-wrist", "r-ankle", "l-ankle")  # pos_img's joint order


def keypoints_from_maps(maps, topk=5):
    """float64 [T, 15, 2] (x, y) grid cells from maps [T, 16, h, w] (channel 0: background), CropMAE test_utils.py
    process_pose: the value-weighted mean of each map's top-k cells (ties: lower index); (-1, -1) for an empty map."""
    maps = maps.detach().cpu().numpy() if torch.is_tensor(maps) else np.asarray(maps)
    T, C, h, w = maps.shape
    flat = maps[:, 1:].reshape(T, C - 1, h * w).astype(np.float64)
    ids = np.argsort(-flat, axis=-1, kind='stable')[..., :topk]
    vals = np.take_along_axis(flat, ids, axis=-1)
    empty = flat.sum(-1) == 0
    with np.errstate(invalid='ignore', divide='ignore'):
        weights = vals / vals.sum(-1, keepdims=True)
    out = np.stack([(weights * (ids % w)).sum(-1), (weights * (ids // w)).sum(-1)], axis=-1)
    out[empty] = -1.0
    return out


def keypoints_to_pixels(kps, W0, H0, grid=(20, 20)):
    """[..., 15, 2] grid cells -> 0-based original pixels (x / grid w · W0, y / grid h · H0, CropMAE
    eval/eval_pck.py); -1 stays -1 (no prediction)."""
    kps = np.asarray(kps, dtype=np.float64)
    out = kps * [W0 / grid[1], H0 / grid[0]]
    out[kps[..., 0] < 0] = -1.0
    return out


def pck(preds, gts, sizes, alphas=PCK_ALPHAS, grid=(20, 20)):
    """PCK as CropMAE eval/eval_pck.py computes it (README), over all videos of preds (per video [T >= T_gt, 15, 2]
    grid cells), gts (the .mat's 1-based pos_img (2, 15, T_gt)) and sizes ((W0, H0)): {'PCK@0.1': mean over the 15
    joints, ..., 'per_joint': {'PCK@0.1': [15], ...}, 'count': [15 scored (joint, frame) pairs]}; a joint never
    scored is NaN in per_joint and left out of the mean (upstream: 0/0); a one-point box: scored, never correct."""
    dists = [[] for _ in range(15)]
    for pred, gt, (W0, H0) in zip(preds, gts, sizes):
        gt = np.asarray(gt, dtype=np.float64).transpose(2, 1, 0) - 1.0  # [T_gt, 15, 2], 0-based
        pred = np.asarray(pred, dtype=np.float64)
        if len(pred) < len(gt):
            raise ValueError(f"pck: {len(pred)} predicted frames for {len(gt)} annotated ones.")
        visible = pred[:, :, 0] >= 0
        pixels = pred[:, :, :2] * [W0 / grid[1], H0 / grid[0]]
        for k in range(1, len(gt)):
            seen = visible[k]
            if not seen.any():
                continue
            box = gt[k, seen]  # eval_pck.py starts its box at max -1, min 1e6: a box wholly left of x = -1 reaches it
            reference = 0.6 * np.linalg.norm(np.maximum(box.max(0), -1) - np.minimum(box.min(0), 1e6))
            with np.errstate(invalid='ignore', divide='ignore'):
                d = np.linalg.norm(pixels[k] - gt[k], axis=-1) / reference
            for j in np.flatnonzero(seen):
                dists[j].append(d[j])
    count = [len(d) for d in dists]
    result = {'per_joint': {}, 'count': count}
    for alpha in alphas:
        with np.errstate(invalid='ignore'):
            per_joint = [float(np.mean(np.asarray(d) <= alpha)) if d else float('nan') for d in dists]
        result[f'PCK@{alpha:g}'] = float(np.nanmean(per_joint)) if any(count) else float('nan')
        result['per_joint'][f'PCK@{alpha:g}'] = per_joint
    return result


def draw_skeleton(rgb, kps, width=4):
    """A copy of rgb with the 15-joint tree drawn (CropMAE utils/test_utils.py vis_pose: each joint joined to its
    parent in the joint's colour, unless an end has a coordinate int() makes negative); kps [15, 2] (x, y) in rgb's
    pixels. Upstream draws 8-px lines on the 320x320 input; `width` is ours."""
    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    pen = ImageDraw.Draw(image)
    points = [(int(x), int(y)) for x, y in np.asarray(kps, dtype=np.float64)]
    for j, parent in enumerate(JHMDB_PARENTS):
        (x1, y1), (x2, y2) = points[parent], points[j]
        if min(x1, y1, x2, y2) >= 0:
            pen.line([(x1, y1), (x2, y2)], fill=JHMDB_COLOURS[j], width=width)
    return np.asarray(image)


# -----------------------------------------------------------------------------
# Label propagation: DINO's algorithm and CRW's (as CropMAE runs it), batched and on the device

def offsets(h, w, device):
    """[N, N] row and column offsets between the cells of an h x w grid (row-major): query cells x key cells."""
    i, j = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    i, j = i.flatten(), j.flatten()
    return i[:, None] - i[None], j[:, None] - j[None]


def chunk_scores(device):
    """How many scores (queries x keys) a propagation step computes at once: 64 MB on a CPU, as the CPU results were
    checked with; 1 GB on a GPU, where each chunk costs ~20 kernel launches (ViT-S/8 at 480x880: 4 chunks a frame)."""
    return 1 << (24 if device.type == "cpu" else 28)


class Propagation:
    """DINO's propagation for one video: the queue (first frame + the `context` previous soft predictions) as a ring
    buffer on the device. Call with the next frame's features [h, w, D]; returns its soft labels [K, h, w]."""

    def __init__(self, feat0, labels0, params):
        h, w, C = feat0.shape
        K, n = labels0.shape[0], params["context"]
        self.h, self.w, self.params, self.pushed = h, w, params, 0
        self.feats = torch.zeros(1 + n, h * w, C, device=feat0.device)
        self.labels = torch.zeros(1 + n, h * w, K, device=feat0.device)
        self.feats[0] = F.normalize(feat0.reshape(h * w, C).float(), dim=1)
        self.labels[0] = labels0.reshape(K, h * w).T
        di, dj, r = *offsets(h, w, feat0.device), params["radius"]  # keys outside DINO's restrict_neighborhood
        self.outside = ((di.abs() > r) | (dj.abs() > r)) if r > 0 else None

    def __call__(self, feat):
        h, w, N, K, n = self.h, self.w, self.h * self.w, self.labels.shape[2], self.feats.shape[0] - 1
        q = F.normalize(feat.reshape(N, -1).float(), dim=1)
        m = 1 + min(self.pushed, n)  # context frames in use
        k = min(self.params["topk"], m * N)
        keys, labels = self.feats[:m].reshape(m * N, -1), self.labels[:m].reshape(m * N, K)
        soft = torch.empty(N, K, device=q.device)
        step = max(1, chunk_scores(q.device) // (m * N))  # queries per chunk
        for a in range(0, N, step):
            aff = q[a:a + step] @ keys.T  # [queries, all context keys]: cosine similarity
            if self.outside is not None:  # keys outside the window can never be chosen
                aff.view(-1, m, N).masked_fill_(self.outside[a:a + step, None, :], -math.inf)
            # top-k jointly over all context frames. DINO keeps every key tied with the k-th value; ties come
            # from repeated frames, at most one per context frame, so k + m - 1 candidates hold them all.
            vals, idx = aff.topk(min(k + m - 1, m * N), dim=1)
            vals = vals.masked_fill(vals < vals[:, k - 1:k], -math.inf)
            # exp(cos / T) normalised to sum 1 over the kept keys is a softmax
            weights = torch.softmax(vals / self.params["temperature"], dim=1)
            soft[a:a + step] = (weights[..., None] * labels[idx]).sum(1)
        if n > 0:  # push: slot 1 + (pushed mod n) holds the oldest prediction
            slot = 1 + self.pushed % n
            self.feats[slot], self.labels[slot] = q, soft
        self.pushed += 1
        return soft.T.reshape(K, h, w)


def read_out(soft, params, patch, size):
    """Soft maps [b, C, h, w] -> channel indices [b, th, tw] at the processing size. dino: ×patch bilinear, min-max
    per channel, argmax. crw (CropMAE src/utils/test_utils.py dump_predictions): bilinear to the size, argmax."""
    if params["algorithm"] == "dino":
        up = F.interpolate(soft, scale_factor=patch, mode="bilinear", align_corners=False, recompute_scale_factor=False)
        # DINO's norm_mask: channels whose max is > 0 min-max scaled to [0, 1] (a constant positive channel becomes
        # NaN there too, and torch.max then picks it)
        mn, mx = up.amin((-2, -1), keepdim=True), up.amax((-2, -1), keepdim=True)
        return torch.where(mx > 0, (up - mn) / (mx - mn), up).max(1).indices
    return F.interpolate(soft, size=size, mode="bilinear", align_corners=False).argmax(1)


class CRWPropagation:
    """CRW's propagation as CropMAE runs it (src/test.py test(), src/utils/test_utils.py context_index_bank and
    mem_efficient_batched_affinity), for one video. Call with frame t's features [h, w, D], t = 1, 2, ...; returns
    its soft labels [C, h, w], also fed back as frame t's labels. The reference pads the video with n = `context`
    copies of frame 0 and gives target t the first frame (the long-memory slot, unrestricted) plus the n previous
    padded positions (cells at Euclidean distance < radius only), so frame 0 comes 1 + max(0, n + 1 - t) times, real
    frames max(1, t - n) .. t - 1 once each; then softmax over the top-k of cos / T of all slots jointly. Copies of
    frame 0 score alike, so here the top-k of each distinct slot (frame 0 unrestricted, frame 0 within the radius
    carrying its n + 1 - t copies, each real frame) are merged, each candidate taken min(copies, what is left of k)
    times, and a candidate taken c times weighs c exp(s / T) in the softmax."""

    def __init__(self, feat0, labels0, params):
        h, w, D = feat0.shape
        C, n, N = labels0.shape[0], params["context"], h * w
        self.shape, self.params, self.t = (C, h, w), params, 1
        self.key0 = F.normalize(feat0.reshape(N, D).float(), dim=1)
        self.label0 = labels0.reshape(C, N).T.float()
        self.feats = torch.zeros(n, N, D, device=feat0.device)  # ring of the n latest real frames t >= 1
        self.labels = torch.zeros(n, N, C, device=feat0.device)
        # [queries, keys]: 0 within the Euclidean radius, -inf outside (added to the scores, as the reference adds
        # -1e10; CropMAE src/utils/__init__.py MaskedAttention.make: sqrt of the float squared distance, strict <)
        di, dj = offsets(h, w, feat0.device)
        within = (di ** 2 + dj ** 2).float() ** 0.5 < params["radius"]
        self.bias = torch.zeros(N, N, device=feat0.device).masked_fill_(~within, -math.inf)

    def __call__(self, feat):
        (C, h, w), N, n, t = self.shape, self.shape[1] * self.shape[2], self.params["context"], self.t
        q = F.normalize(feat.reshape(N, -1).float(), dim=1)
        r = min(t - 1, n)  # real frames among the short-term slots: ring slots 0 .. r-1 (their order is moot)
        copies = max(0, n + 1 - t)  # copies of frame 0 among the short-term slots
        k, kk = self.params["topk"], min(self.params["topk"], N)  # k in all; at most N from one slot
        labels = torch.cat([self.label0, self.labels[:r].reshape(r * N, C)])  # [(1 + r) N, C]
        offset = N * torch.arange(1, r + 1, device=q.device)[:, None, None]  # real frame j's cells in `labels`
        soft = torch.empty(N, C, device=q.device)
        step = max(1, chunk_scores(q.device) // (max(r, 1) * N))  # queries per chunk
        for a in range(0, N, step):
            qa, bias = q[a:a + step], self.bias[a:a + step]
            s0 = qa @ self.key0.T
            cands = [(*s0.topk(kk, dim=1), 1)]  # (scores, key ids, copies): the long-memory slot, unrestricted, once
            if copies:
                cands.append((*(s0 + bias).topk(kk, dim=1), copies))
            if r:
                vals, idx = torch.baddbmm(bias, qa.expand(r, -1, -1), self.feats[:r].transpose(1, 2)).topk(kk, dim=2)
                cands.append((vals.permute(1, 0, 2).flatten(1), (idx + offset).permute(1, 0, 2).flatten(1), 1))
            vals, idx = torch.cat([v for v, _, _ in cands], 1), torch.cat([i for _, i, _ in cands], 1)
            count = torch.cat([torch.full_like(v, c) for v, _, c in cands], 1)
            count = count.masked_fill(vals == -math.inf, 0)  # outside the radius: never a candidate
            vals, order = vals.topk(min(k, vals.shape[1]), dim=1)
            c, idx = count.gather(1, order), idx.gather(1, order)
            take = torch.minimum(c, (k - (c.cumsum(1) - c)).clamp(min=0))  # copies of each kept in the top-k
            weights = torch.softmax(vals / self.params["temperature"] + take.log(), dim=1)
            soft[a:a + step] = (weights[..., None] * labels[idx]).sum(1)
        if n > 0:
            self.feats[(t - 1) % n], self.labels[(t - 1) % n] = q, soft
        self.t += 1
        return soft.T.reshape(C, h, w)


CORES = {"dino": Propagation, "crw": CRWPropagation}  # the propagation core of each protocol's algorithm


def normalise(x, size, mean=IMAGENET_MEAN, std=IMAGENET_STD, quantise=True):
    """[3, H, W] float in 0..255 -> resized to `size` bilinearly without antialiasing, (x/255 - mean) / std.
    quantise: round to uint8 after the resize, as DINO's cv2.resize of a uint8 image does (CropMAE does not)."""
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]
        x = x.round().clamp(0, 255) if quantise else x
    return (x / 255.0 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def first_labels(ann, h, w):
    """DINO's read_seg + to_one_hot: first-frame ids PIL NEAREST to the grid, one-hot [K, h, w], K = max id + 1 there.
    Void (255) is background here; DINO would make it a 256th label that propagates and then fails the evaluation."""
    small = np.array(Image.fromarray(np.where(ann == 255, 0, ann).astype(np.uint8)).resize((w, h), Image.NEAREST))
    return F.one_hot(torch.from_numpy(small).long()).permute(2, 0, 1).float()


def nearest_index(n_in, n_out, device="cpu"):
    """OpenCV's INTER_NEAREST along one axis (imgproc resize.cpp resizeNN): source floor(dst * (1 / (out / in))) in
    double, at most in - 1 (torch's float32 'nearest' picks the pixel before at exact integers: 1024 -> 880)."""
    i = np.minimum(np.floor(np.arange(n_out) * (1.0 / (n_out / n_in))), n_in - 1).astype(np.int64)
    return torch.from_numpy(i).to(device)


def nearest(ids, size):
    """An id map [..., H, W] resized with OpenCV's INTER_NEAREST."""
    ids = torch.as_tensor(ids)
    rows, cols = nearest_index(ids.shape[-2], size[0], ids.device), nearest_index(ids.shape[-1], size[1], ids.device)
    return ids[..., rows, :][..., cols]


def crw_labels(path, ann, size, grid):
    """CropMAE vos.py's first-frame labels (README): (ids in channel order, [C, h, w]). CropMAE reads labels with
    cv2.imread, so its channels are the distinct BGR colours sorted (np.unique): for palette PNGs that is palette
    order, not id order; it only decides exact argmax ties, and we keep it."""
    small = nearest(ann, size).numpy()
    with Image.open(path) as img:
        pal = np.array(img.getpalette() or [], dtype=np.int64).reshape(-1, 3) if img.mode == "P" else None
    ids = np.unique(small)
    if pal is not None:
        pal = np.concatenate([pal, np.zeros((256 - len(pal), 3), np.int64)])
        ids = ids[np.lexsort(pal[ids].T)]  # by (B, G, R): lexsort's last key (B) sorts first
    onehot = torch.from_numpy(small[None] == ids[:, None, None]).float()
    return ids, F.interpolate(onehot[None], size=grid, mode="bilinear", align_corners=False)[0]


def soft_maps(frames, labels0, size, embed, heads, params, device, batch_size=8):
    """Propagate labels0 [C, h, w] through `frames` with every head (None: the features as they are), one forward a
    batch for all: yields (t0, {name: soft labels [b, C, h, w]}) per batch t0 .. t0 + b - 1 (frame 0's is labels0)."""
    core, props = CORES[params["algorithm"]], {}
    for b0 in range(0, len(frames), batch_size):
        x = torch.stack([normalise(torch.from_numpy(np.array(load_rgb(f))).permute(2, 0, 1).float(), size,
                                   params["mean"], params["std"], params["algorithm"] == "dino")
                         for f in frames[b0:b0 + batch_size]])
        with torch.no_grad():
            base, out = embed(x.to(device)), {}
            for name, head in heads.items():
                feats = base if head is None else head(base)
                if b0 == 0:
                    props[name] = core(feats[0], labels0, params)
                out[name] = torch.stack(([labels0] if b0 == 0 else []) + [props[name](f) for f in feats[b0 == 0:]])
        yield b0, out


def grid_size(H, W, params, patch, where):
    """Processing size floored to the patch grid (patch 14, DINOv2 or CLIP-L: 480 -> 476, as DINOv2's own eval)."""
    th, tw = target_size(H, W, params)
    th, tw = th // patch * patch, tw // patch * patch
    if th < patch or tw < patch:
        raise BadInput(f"{where}: {W}x{H} frame gives a {tw}x{th} input, smaller than one {patch}-px patch")
    return th, tw


def segment(plan, embed, heads, outs, params, patch, device, batch_size=8, overlay=False, verbose=True, vip=False):
    """Propagate every video of `plan` (read_davis or read_vip) into id PNGs outs[name]/<video>/<frame>.png at the
    annotation's size (after read_out, dino: PIL NEAREST, frame 0 the annotation itself; crw: OpenCV's nearest for
    DAVIS, CropMAE src/eval/convert_davis.py, PIL's for VIP, src/eval/eval_vip.py). Returns the number of frames."""
    dino, n_frames = params["algorithm"] == "dino", 0
    for seq, frames, _, first in plan:
        ann = read_ids(first, "first-frame annotation")
        ann = np.where(ann == 255, 0, ann).astype(np.uint8) if not vip else ann
        H, W = ann.shape
        th, tw = grid_size(H, W, params, patch, frames[0])
        h, w = th // patch, tw // patch
        ids, labels0 = (np.arange(256), first_labels(ann, h, w)) if dino else crw_labels(first, ann, (th, tw), (h, w))
        lookup, labels0 = torch.from_numpy(ids.astype(np.uint8)).to(device), labels0.to(device)
        show = set(np.linspace(0, len(frames) - 1, 4).round().astype(int).tolist()) if overlay else set()
        for b0, maps in soft_maps(frames, labels0, (th, tw), embed, heads, params, device, batch_size):
            for name, soft in maps.items():
                small = lookup[read_out(soft, params, patch, (th, tw))]
                if not (dino or vip):
                    small = nearest(small, (H, W))
                for t, m in enumerate(small.to(torch.uint8).cpu().numpy(), start=b0):  # one sync per batch
                    if dino and t == 0:
                        m = ann
                    elif m.shape != (H, W):
                        m = np.array(Image.fromarray(m).resize((W, H), Image.NEAREST))
                    write_png(outs[name] / seq / f"{frames[t].stem}.png", m, mode="L" if vip else "P")
                    if t in show:
                        write_png(outs[name] / "overlays" / seq / f"{frames[t].stem}.png", blend(frames[t], m, vip),
                                  mode="RGB")
        n_frames += len(frames)
        if verbose:
            print(f"  {seq}: {len(frames)} frames at {tw}x{th}, {labels0.shape[0]} labels on the {w}x{h} grid")
    return n_frames


def track(plan, embed, heads, outs, params, patch, device, batch_size=8, overlay=False, verbose=True):
    """JHMDB (CropMAE src/test.py on src/data/jhmdb.py): frame 0's joints as maps (data.jhmdb_labels), propagated,
    read out by keypoints_from_maps. Writes outs[name]/<action>/<video>.npy, (T, 15, 2) (x, y) in 0-based original
    pixels (-1: empty map); returns ({name: [keypoints in grid cells per video]}, number of frames)."""
    preds, n_frames = {name: [] for name in heads}, 0
    for video, frames, pos in plan:
        H0, W0 = image_size(frames[0])
        th, tw = grid_size(H0, W0, params, patch, frames[0])
        grid = (th // patch, tw // patch)
        labels0 = jhmdb_labels(pos[:, :, 0].T - 1, W0, H0, grid=grid, size=(th, tw), patch=patch)
        kps = {name: [] for name in heads}
        for _, maps in soft_maps(frames, torch.from_numpy(labels0).to(device), (th, tw), embed, heads, params,
                                 device, batch_size):
            for name, soft in maps.items():
                kps[name].append(keypoints_from_maps(soft))  # one sync per batch
        show = set(np.linspace(0, len(frames) - 1, 4).round().astype(int).tolist()) if overlay else set()
        for name in heads:
            preds[name].append(np.concatenate(kps[name]))
            pixels = keypoints_to_pixels(preds[name][-1], W0, H0, grid)
            atomic(outs[name] / f"{video}.npy", lambda tmp: save_npy(tmp, pixels))
            for t in sorted(show):
                pic = draw_skeleton(np.asarray(load_rgb(frames[t])), pixels[t])
                write_png(outs[name] / "overlays" / video / f"{frames[t].stem}.png", pic, mode="RGB")
        n_frames += len(frames)
        if verbose:
            print(f"  {video}: {len(frames)} frames at {tw}x{th}, 15 joints on the {grid[1]}x{grid[0]} grid")
    return preds, n_frames


def score_jhmdb(plan, preds, params, patch, where, verbose=True):
    """pck() of the grid keypoints `preds` against the plan's ground truth, printed under `where` (results folder)."""
    th, tw = grid_size(*params["size"], params, patch, "JHMDB")  # a fixed size: 320x320
    m = pck(preds, [pos for _, _, pos in plan], [image_size(frames[0])[::-1] for _, frames, _ in plan],
            grid=(th // patch, tw // patch))
    if verbose:
        print(f"{where}: JHMDB " + ", ".join(f"PCK@{a:g} {m[f'PCK@{a:g}']:.4f}" for a in PCK_ALPHAS))
        print("  per joint PCK@0.1: " + " ".join(f"{JHMDB_JOINTS[j]} {v:.3f}"
                                                 for j, v in enumerate(m["per_joint"]["PCK@0.1"])))
    return m


def blend(frame, ids, key=False):
    """The image with each label's palette colour laid over it at 50%, background untouched; key (VIP): one swatch
    and name per part class present, in a strip under the picture."""
    img = np.asarray(load_rgb(frame), dtype=np.float32)
    pic = np.where(ids[..., None] > 0, 0.5 * img + 0.5 * PALETTE[ids], img).round().astype(np.uint8)
    if not key:
        return pic
    present = [int(i) for i in np.unique(ids) if 0 < i < len(VIP_CLASSES)]
    out = Image.new("RGB", (pic.shape[1], pic.shape[0] + 12 * max(1, len(present)) + 4), (255, 255, 255))
    out.paste(Image.fromarray(pic))
    draw = ImageDraw.Draw(out)
    for r, i in enumerate(present):
        y = pic.shape[0] + 2 + 12 * r
        draw.rectangle([2, y, 12, y + 9], fill=tuple(int(v) for v in PALETTE[i]))
        draw.text((16, y - 1), f"{i} {VIP_CLASSES[i]}", fill=(0, 0, 0))
    return np.array(out)


def encoder_embed(encoder):
    p = encoder.patch_size
    return lambda x: encoder(x).float().reshape(x.shape[0], x.shape[2] // p, x.shape[3] // p, -1)


def checked(fn, what, stride=None):
    """fn, its output checked: floats [B, h, w, D] for a [B, 3, H, W] batch, h, w = H / stride, W / stride (the
    feature function), or for [B, h, w, D] features (a head); anything else is one sentence naming what came."""
    def call(x):
        y = fn(x)
        B, h, w = (x.shape[0], x.shape[2] // stride, x.shape[3] // stride) if stride else tuple(x.shape[:3])
        if not (torch.is_tensor(y) and y.dim() == 4 and tuple(y.shape[:3]) == (B, h, w) and y.is_floating_point()):
            got = f"a {type(y).__name__}" if not torch.is_tensor(y) else str(list(y.shape)) + \
                ("" if y.is_floating_point() else f" of {y.dtype}")
            raise BadInput(f"{what} returned {got} for a {list(x.shape)} {'batch' if stride else 'input'}; expected "
                           f"[{B}, {h}, {w}, D] floats" + (f" at stride {stride}" if stride else ""))
        return y.float()
    return call


def run(features, stride, tasks, out_dir, heads=None, protocol="paper", device=None, batch_size=8, overlay=False,
        verbose=True, vip_size=None, jhmdb_split=1, jhmdb_order=None, **overrides):
    """Propagate with any feature function (normalised frames [B, 3, H, W] -> [B, H / stride, W / stride, D], README
    "Any encoder") and heads on it ({name: None or a function of the features}, one forward for all) on each task
    ({"davis": DAVIS-2017 folder or None for a synthetic one, "vip", "jhmdb": folder or list file}); score and write
    each head's summary.json under out_dir[/<name>][/<task>] when several. Returns {name: {task: metrics (None: DAVIS
    with first-frame annotations only), "data": {task: data.describe and settings}}}. `protocol` is DAVIS's;
    overrides (topk, context, radius, temperature, size, mean, std) apply to every task."""
    heads = {"model": None} if heads is None else heads
    if not callable(features) or not (isinstance(stride, int) and stride > 0):
        raise BadInput(f"run() needs a callable feature function and a positive whole stride, got "
                       f"{type(features).__name__} and {stride!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if tasks.get("davis", "") is None:
        with tempfile.TemporaryDirectory() as tmp:
            if verbose:
                print(f"no --davis: evaluating on a synthetic DAVIS set made in {tmp} (data.make_davis)")
            return run(features, stride, {**tasks, "davis": make_davis(tmp)}, out_dir, heads, protocol, device,
                       batch_size, overlay, verbose, vip_size, jhmdb_split, jhmdb_order, **overrides)
    params = {"davis": protocol_params(protocol, **overrides),
              "vip": protocol_params(VIP, **{"size": vip_size, **overrides}),
              "jhmdb": protocol_params(JHMDB, **overrides)}
    plans = {"davis": lambda p: read_davis(p, scoring=False), "vip": read_vip,
             "jhmdb": lambda p: read_jhmdb(p, jhmdb_split, jhmdb_order)}
    plans = {task: plans[task](path) for task, path in tasks.items()}  # every check before the first file
    paper = {"davis": PROTOCOLS["paper"], "vip": VIP, "jhmdb": JHMDB}
    sets = {task: dict(describe(task, plan), settings=params[task], settings_differ=[
        k for k in paper[task] if params[task][k] != paper[task][k]]) for task, plan in plans.items()}
    root = {name: Path(out_dir) / name if len(heads) > 1 else Path(out_dir) for name in heads}
    results = {name: {} for name in heads}
    embed = checked(features, "the feature function", stride)
    heads = {name: head if head is None else checked(head, f"head {name!r}") for name, head in heads.items()}
    for task, plan in plans.items():
        outs = {name: root[name] / task if len(tasks) > 1 else root[name] for name in heads}
        if verbose:
            print(f"{task}: propagating {len(plan)} videos, {params[task]}, device {device}")
            if sets[task]["note"]:
                print(f"{task}: {sets[task]['note']}")
        t0 = time.perf_counter()
        if task == "jhmdb":
            preds, n = track(plan, embed, heads, outs, params[task], stride, device, batch_size, overlay, verbose)
        else:
            n = segment(plan, embed, heads, outs, params[task], stride, device, batch_size, overlay, verbose,
                        vip=task == "vip")
        dt = time.perf_counter() - t0
        if verbose:
            print(f"{task}: {n} frames in {dt:.1f} s: {n / dt:.2f} frames/s ({len(heads)} head(s) per forward)")
        for name in heads:
            if task == "jhmdb":
                results[name][task] = score_jhmdb(plan, preds[name], params[task], stride, outs[name], verbose)
            elif task == "vip":
                results[name][task] = score_vip(plan, outs[name], verbose)
            elif any(len(anns) < len(frames) for _, frames, anns, _ in plan):  # e.g. test-dev: first frames only
                if verbose:
                    print(f"{tasks[task]}: annotations for the first frames only (like test-dev), masks written "
                          f"to {outs[name]}, not scored")
                results[name][task] = None
            else:
                results[name][task] = score(tasks[task], outs[name], device, verbose)[0]
    for name in heads:
        results[name]["data"] = sets
        write_json(root[name] / "summary.json", results[name])
    return results


def compare(encoder, projection, tasks, out_dir, protocol="paper", **overrides):
    """Baseline and + Co-Settle from one encoder forward: {'baseline': {task: metrics}, 'cosettle': {...}, 'difference':
    {task: cosettle - baseline}}, also out_dir/summary.json. tasks: run()'s, or a DAVIS folder (None: synthetic)."""
    tasks = tasks if isinstance(tasks, dict) else {"davis": tasks}
    overrides["device"] = overrides.get("device") or next(encoder.parameters()).device
    m = run(encoder_embed(encoder), encoder.patch_size, tasks, out_dir, {"baseline": None, "cosettle": projection},
            protocol, **overrides)
    m["difference"] = {task: difference(m["baseline"][task], m["cosettle"][task]) for task in tasks}
    write_json(Path(out_dir) / "summary.json", m)
    if overrides.get("verbose", True):
        print("frozen -> + Co-Settle, measured and as published (the paper's Table 1)")
        for task in (t for t in tasks if m["baseline"][t] is not None):
            key = HEADLINE[task][1]
            print(paper_row(encoder.family, task, (m["baseline"][task][key], m["cosettle"][task][key]),
                            unlike(m["baseline"]["data"][task])))
    return m


def unlike(d):
    """Why results on a set (run()'s "data" entry for a task) are not like for like with Table 1, or None."""
    why = ([] if d["paper_set"] else [d["note"]]) + \
        ([f"settings other than the paper's ({', '.join(d['settings_differ'])})"] if d["settings_differ"] else [])
    return "; ".join(why) or None


def table_1(root, tasks, out_dir, protocol="paper", native_stats=False, device=None, **overrides):
    """The paper's Table 1 from the authors' files as downloaded: each <family>+ours/checkpoint*.pth under `root`
    (frozen encoder and adapter in one file) is compare()d on `tasks` into out_dir/<family>, unless its summary.json
    is there already. Prints the table, measured beside published, in markdown; writes out_dir/table.json."""
    found = {}
    for folder in sorted(p for p in Path(root).rglob("*+ours") if p.is_dir()):
        family, files = folder.name[:-len("+ours")], sorted(folder.glob("checkpoint*.pth"))
        if family not in PUBLISHED or len(files) != 1 or family in found:
            raise BadInput(f"--table {folder}: {len(files)} checkpoint*.pth files; expected one in each of the eight "
                           f"families' <family>+ours folders, one folder per family")
        found[family] = files[0]
    if not found:
        raise BadInput(f"--table {root}: no <family>+ours/checkpoint*.pth of the authors' files under it")
    missing = [f for f in PUBLISHED if f not in found]
    print(f"--table: {', '.join(found)} found" + (f"; not found: {', '.join(missing)}" if missing else ""))
    device, runs = device or torch.device("cuda" if torch.cuda.is_available() else "cpu"), {}
    for family, path in found.items():
        out = Path(out_dir) / family
        if (out / "summary.json").is_file():  # done before: read back, not rerun
            runs[family] = json.loads((out / "summary.json").read_text())
            absent = sorted(set(tasks) - set(runs[family]["baseline"].get("data", {})))  # data: what it ran on
            if absent:
                raise BadInput(f"{out / 'summary.json'}: no {', '.join(absent)} results; remove it, or another --out")
            print(f"{family}: results already in {out}, not rerun")
            continue
        encoder = load_encoder(path, verbose=True).to(device)
        if (encoder.family, bool(encoder.official)) != (family, True):
            raise BadInput(f"{path}: not an official '+ Ours' {family} checkpoint (a {encoder.family} encoder"
                           f"{'' if encoder.official else ' without adapter'})")
        stats = dict(zip(("mean", "std"), encoder.native_stats)) if native_stats else {}
        runs[family] = compare(encoder, load_projection(path, encoder).to(device), tasks, out, protocol,
                               device=device, **overrides, **stats)
    order, rows, cells = ("vip", "davis", "jhmdb"), [], {}
    for family in PUBLISHED:
        m = runs.get(family, {})
        cells[family] = {v: {t: m[v][t][HEADLINE[t][1]] if t in m.get(v, {}) and m[v][t] else None for t in order}
                         for v in ("baseline", "cosettle")}
        cells[family]["unlike"] = {t: unlike(m["baseline"]["data"][t]) for t in order if t in m.get("baseline", {})}
        measured = lambda v, t: "–" if cells[family][v][t] is None else \
            f"{100 * cells[family][v][t]:.1f}" + ("*" if cells[family]["unlike"][t] else "")
        for v, label in (("baseline", family), ("cosettle", f"{family} + Co-Settle")):
            rows.append(f"| {label} | " + " | ".join(f"{PUBLISHED[family][v][t]:.1f} | {measured(v, t)}"
                                                     for t in order) + " |")
    notes = sorted({f"* {HEADLINE[t][0]}: {why}" for c in cells.values() for t, why in c["unlike"].items() if why})
    text = "\n".join(["| ViT-B/16 | " + " | ".join(f"{HEADLINE[t][0]} paper | measured" for t in order) + " |",
                      "|---" * 7 + "|"] + rows + [""] * bool(notes) + notes)
    print(text)
    write_json(Path(out_dir) / "table.json", {"measured": cells, "paper": PUBLISHED, "not_found": missing,
                                              "files": {f: str(p) for f, p in found.items()}, "markdown": text})
    return cells


def difference(a, b):
    if a is None or b is None:
        return None
    return {k: (difference(a[k], b[k]) if isinstance(a[k], dict) else
                [y - x for x, y in zip(a[k], b[k])] if isinstance(a[k], list) else b[k] - a[k])
            for k in a if k != "count"}  # JHMDB's scored (joint, frame) counts are the same for both


# -----------------------------------------------------------------------------
# Label-free trade-off metrics (paper Table 4): yafeng19/Co-Settle cal_metric.py as scripts/cal_metric_*.sh run it

N_FRAMES, PERCENTILES = 40, (90, 95, 100)
CYCLE_PAIRS = torch.tensor([[0.25, 0.4], [0.35, 0.5], [0.45, 0.6], [0.55, 0.7], [0.65, 0.8]])  # (t1, t2) / T
CLS_TOO = ("dino", "ibot", "mocov3", "blip", "dinov2")  # their forward_no_adapter keeps the normed CLS token


def tradeoff_videos(path):
    """--videos: cal_metric.py's --sample_csv_path (one frame folder per line, relative to the working directory,
    in order) or a folder of frame folders; those without exactly 40 frames are skipped, as there."""
    try:
        folders = [Path(s.strip()) for s in Path(path).read_text().splitlines() if s.strip()] \
            if Path(path).is_file() else find_videos(path)
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"--videos {path}: cannot read the list of video folders ({e}).") from e
    n = {f: len(list_frames(f)) if f.is_dir() else None for f in folders}
    for f in (f for f in folders if n[f] != N_FRAMES):
        print(f"Skipping {f}: " + ("path does not exist" if n[f] is None else f"has {n[f]} frames, expected 40"))
    if N_FRAMES not in n.values():
        raise BadInput(f"--videos {path}: no video with exactly {N_FRAMES} frames.")
    print(f"Found {list(n.values()).count(N_FRAMES)} valid videos with exactly {N_FRAMES} frames")
    return [f for f in folders if n[f] == N_FRAMES]


def tradeoff_frame(path, mean, std):
    """torchvision's Resize(256) + CenterCrop(224) on the PIL image: PIL bilinear (antialiased when shrinking)."""
    img = load_rgb(path)
    w, h = (256, int(256 * img.height / img.width)) if img.width <= img.height else \
        (int(256 * img.width / img.height), 256)
    left, top = int(round((w - 224) / 2.0)), int(round((h - 224) / 2.0))
    img = img.resize((w, h), Image.BILINEAR).crop((left, top, left + 224, top + 224))
    return normalise(torch.from_numpy(np.array(img)).permute(2, 0, 1).float(), (224, 224), mean, std)


def video_metrics(f):
    """One video's tokens [T, P, D] (P = S*S, or 1 + S*S, CLS first) -> (intra, diameters [3], cycle, middle)."""
    T, P, D = f.shape
    near = torch.cdist(f[3:T - 4], f[4:T - 3]).amin(-1)  # frames 3..T-4: each token's nearest in the next frame
    intra = near.topk(int(P * 0.5), dim=-1, largest=False).values.mean(-1).mean()
    r = (f.reshape(T * P, D) - f.reshape(T * P, D).mean(0)).norm(dim=-1)
    diameters = torch.stack([2 * (r.max() if p == 100 else torch.quantile(r, p / 100.0)) for p in PERCENTILES])
    s = math.isqrt(P)
    g = F.avg_pool2d(f[:, P - s * s:].transpose(1, 2).reshape(T, D, s, s), 2).flatten(2).transpose(1, 2)  # no CLS
    t1, t2 = (CYCLE_PAIRS * T).long().clamp(max=T - 1).T
    walk = F.softmax(g[t1] @ g[t2].transpose(1, 2) / 0.03, -1) @ F.softmax(g[t2] @ g[t1].transpose(1, 2) / 0.03, -1)
    cycle = (torch.log(walk + 1e-6).argmax(-1) == torch.arange(walk.shape[-1], device=f.device)).float().mean()
    return intra, diameters, cycle, f[T // 2]


def tradeoff_metrics(videos):
    """cal_metric.py's numbers from video_metrics() of the videos, in list order. Cycle accuracy: the mean of the
    means of batches of 32 videos; inter-video: 8 token positions drawn by randperm on a CPU generator seeded 42."""
    intra, diam, cycle, mid = (torch.stack(v) for v in zip(*videos))  # [N], [N, 3], [N], [N, P, D]
    N, P, D = mid.shape
    m = {"cycle": float(np.mean([cycle[a:a + 32].mean().item() for a in range(0, N, 32)]))}
    q = F.normalize(torch.linalg.svdvals(mid.reshape(N * P, D)), p=1, dim=0) + 1e-12  # singular values / their sum
    m["rank"] = (torch.exp(-(q * q.log()).sum()) / min(N * P, D)).item()
    m["intra"] = [intra.mean().item()] + (intra[:, None] / (diam + 1e-8)).mean(0).tolist()
    x = mid[:, torch.randperm(P, generator=torch.Generator().manual_seed(42))[:8]] if P > 8 else mid
    inter = torch.cat([(x[i + 1:] - x[i]).norm(dim=-1).mean(-1) for i in range(N)]).mean().item()  # NaN if N = 1
    r = (x.reshape(-1, D) - x.reshape(-1, D).mean(0)).norm(dim=-1).sort().values
    m["inter"] = [inter] + [inter / (2 * r[:int(len(r) * p / 100.0)].max().item() + 1e-8) for p in PERCENTILES]
    return m


def print_tradeoff(name, m):
    """cal_metric.py's printout, and the cycle accuracy it writes to its CSV (its print is commented out)."""
    print(f"\n{'=' * 40}\nGlobal Video Metric Results ({name}):\n- Cycle Accuracy: {m['cycle']:.4f}\n"
          f"- Effective Rank: {m['rank']:.4f}")
    labels = ["Original"] + [f"Normalized by {p}% diameter" for p in PERCENTILES]
    for kind in ("Inter", "Intra"):
        print(f"\n{kind}-video Distances:", *(f"- {k}: {v:.4f}" for k, v in zip(labels, m[kind.lower()])), sep="\n")
    ratios = zip(["Original"] + [f"{p}% normalized" for p in PERCENTILES], m["inter"], m["intra"])
    print("\nInter/Intra ratios:", *(f"- {k}: {a / b if b else math.nan:.4f}" for k, a, b in ratios), "=" * 40,
          sep="\n")


@torch.no_grad()
def tradeoff(encoder, heads, videos, device="cpu", batch_size=16, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """{name: tradeoff_metrics(...)} of each head, one encoder pass per video. Head None: the frozen encoder's
    patch tokens, with its CLS in front for CLS_TOO families as in cal_metric.py; else the projection's tokens."""
    folders, kept, cls = tradeoff_videos(videos), {k: [] for k in heads}, []
    hook = encoder.blocks[-1].register_forward_hook(lambda mod, inp, out: cls.append(encoder.norm(out[:, :1])))
    t0, every = time.perf_counter(), max(1, len(folders) // 20)
    try:
        for i, folder in enumerate(folders):
            if i % every == 0:  # about 20 progress lines however many videos
                print(f"tradeoff: video {i + 1}/{len(folders)}, {time.perf_counter() - t0:.0f} s", flush=True)
            x, cls[:] = torch.stack([tradeoff_frame(f, mean, std) for f in list_frames(folder)]), []
            z = torch.cat([encoder(x[a:a + batch_size].to(device)).float() for a in range(0, len(x), batch_size)])
            base = torch.cat([torch.cat(cls).float(), z], 1) if encoder.family in CLS_TOO else z
            for name, head in heads.items():
                kept[name].append(video_metrics(base if head is None else head(z)))
    finally:
        hook.remove()
    return {name: tradeoff_metrics(v) for name, v in kept.items()}


# -----------------------------------------------------------------------------
# --bench


def peak_memory(device, fn):
    """Peak memory fn() adds, in MB: CUDA's allocator peak, or on CPU the growth of the process's peak RSS."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    import resource  # POSIX; ru_maxrss is in kB on Linux
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def bench(encoder, device, n_frames=10):
    """The peak memory of the paper propagation over 25, then 75 more frames at 854x480; then seconds per frame of
    each pipeline, the encoder and the propagation (at its steady state: a full context) apart, wall clock and CPU.
    (`python test_cosettle.py --bench-dino` times DINO's own per-frame loop against ours.)"""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    embed, patch, a = encoder_embed(encoder), encoder.patch_size, encoder.arch
    print(f"bench: {n_frames} synthetic frames, {encoder.family} ViT width {a['embed_dim']} patch {patch}, {name}, "
          f"torch {torch.__version__}")

    with torch.no_grad():
        h, w = 480 // patch, 880 // patch
        g = torch.Generator(device=device).manual_seed(0)
        prop = CRWPropagation(torch.randn(h, w, a["embed_dim"], device=device), torch.ones(4, h, w, device=device),
                              PROTOCOLS["paper"])

        def frames(n):
            for _ in range(n):
                prop(torch.randn(h, w, a["embed_dim"], device=device, generator=g))  # the output is dropped
        mb = [peak_memory(device, lambda: frames(25)), peak_memory(device, lambda: frames(75))]
        bounded = mb[1] <= max(1.0, 0.05 * mb[0])  # the 75 later frames raised the peak by < 5% (or 1 MB)
        print(f"  paper propagation at 854x480 ({w}x{h} grid, width {a['embed_dim']}, 4 labels): peak memory "
              f"+{mb[0]:.0f} MB over frames 1-25, +{mb[1]:.0f} MB more over frames 26-100"
              + (" (bounded in the length)" if bounded else ""))
        setups = [("DAVIS dino", PROTOCOLS["dino"], (480, 854), 3), ("DAVIS paper", PROTOCOLS["paper"], (480, 854), 3),
                  ("VIP", VIP, (720, 1280), 8), ("JHMDB", JHMDB, (240, 320), 16)]
        for task, params, (H, W), K in setups:
            th, tw = grid_size(H, W, params, patch, "bench")
            video, masks = synthetic_video(0, n_frames, th, tw, n_objects=2)
            x = torch.stack([normalise(torch.from_numpy(f).permute(2, 0, 1).float(), (th, tw), params["mean"],
                                       params["std"]) for f in video]).to(device)
            labels0 = F.one_hot(torch.from_numpy(masks[0][::patch, ::patch]).long() % K, K).permute(2, 0, 1).float()
            embed(x[:2])  # warm-up
            # each timed once, cold (a propagation has state): (wall, cpu) seconds a frame
            *enc, feats = timeit(lambda: torch.cat([embed(x[i:i + 8]) for i in range(0, len(x), 8)]), warmup=0,
                                 iters=1, device=device.type)
            enc = [s / n_frames for s in enc]
            warm = params["context"] + 1
            prop = CORES[params["algorithm"]](feats[0], labels0.to(device), params)
            for t in range(1, warm):
                prop(feats[t % n_frames])

            def steady():
                soft = torch.stack([prop(feats[t % n_frames]) for t in range(warm, warm + 4)])
                return read_out(soft, params, patch, (th, tw)).cpu()
            core_t = [s / 4 for s in timeit(steady, warmup=0, iters=1, device=device.type)[:2]]
            adds = [100 * c / e for e, c in zip(enc, core_t)]
            print(f"  {task:12s} {tw}x{th}: {1 / (enc[0] + core_t[0]):6.2f} frames/s; encoder {enc[0]:6.3f} s/frame, "
                  f"propagation + read-out {core_t[0]:6.3f} s/frame: it adds {adds[0]:.0f}% to the encoder's wall "
                  f"time ({adds[1]:.0f}% of its CPU time)")


def size_arg(text):
    h, _, w = text.partition("x")
    if not (h.isdigit() and w.isdigit() and int(h) > 0 and int(w) > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size HxW such as 480x880")
    return int(h), int(w)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="encoder checkpoint (default: a seeded random ViT-S/16)")
    parser.add_argument("--family", choices=FAMILIES, help="force the checkpoint family instead of detecting it")
    parser.add_argument("--native-stats", action="store_true", help="normalise with the family's mean/std (CLIP, BLIP)")
    parser.add_argument("--ckpt", help="the trained projection: a train.py checkpoint, or an official '+ Ours' one")
    parser.add_argument("--davis", help="DAVIS-2017 folder (with no task given: a synthetic one, temporary)")
    parser.add_argument("--vip", help="VIP_Fine folder, or a list file of '<images dir> <labels dir>' lines")
    parser.add_argument("--jhmdb", help="JHMDB folder (Rename_Images, joint_positions, splits), or a list file of "
                        "'<mat> <frames dir>' lines (CropMAE's order; CRW's reverse order is detected)")
    parser.add_argument("--jhmdb-split", type=int, choices=(1, 2, 3), help="a JHMDB folder's test split (default 1)")
    parser.add_argument("--vip-size", type=size_arg, help="VIP's HxW (default: CropMAE's long side 880 rule)")
    parser.add_argument("--out", default="results", help="where the results and summary.json go")
    parser.add_argument("--masks", help="score this results folder of --davis or --vip only (no propagation)")
    parser.add_argument("--protocol", default="paper", choices=list(PROTOCOLS), help="DAVIS's protocol")
    parser.add_argument("--topk", type=positive(), help="these four override every task's setting")
    parser.add_argument("--context", type=at_least(0), help="previous frames in the queue (besides the first)")
    parser.add_argument("--radius", type=at_least(0), help="in patches: the square window's half-size (dino; 0: "
                        "no window) or the Euclidean reach of the short-term slots (paper, VIP, JHMDB; 0: none)")
    parser.add_argument("--temperature", type=positive(float))
    parser.add_argument("--compare", action="store_true", help="frozen and + Co-Settle (--ckpt, or a '+ Ours' file)")
    parser.add_argument("--overlay", action="store_true", help="also write a few blended frames per sequence")
    parser.add_argument("--batch-size", type=positive(), default=8, help="frames per encoder forward")
    parser.add_argument("--tradeoff", action="store_true", help="label-free trade-off metrics on --videos")
    parser.add_argument("--videos", help="--tradeoff's list of frame folders (a .csv/.txt) or folder of them")
    parser.add_argument("--table", metavar="DIR", help="the paper's Table 1: every <family>+ours/checkpoint*.pth "
                        "under DIR (the authors' files as downloaded), frozen and + Co-Settle, on the tasks given")
    parser.add_argument("--bench", action="store_true", help="frames/s of each pipeline, what propagation adds to "
                        "the encoder, peak memory")
    args = parser.parse_args(argv)
    given = {t: getattr(args, t) for t in ("davis", "vip", "jhmdb") if getattr(args, t)}
    reads = {"masks": {"davis", "vip"}, "bench": {"weights", "family"},  # what each mode reads besides its flag
             "tradeoff": {"videos", "weights", "family", "native_stats", "ckpt", "batch_size"}}
    mode = next((m for m in reads if getattr(args, m)), None)
    if mode:
        refuse_unused(parser, args, f"--{mode}", reads[mode] | {mode})
    else:
        refuse_unused(parser, args, "--table" if args.table else f"evaluating {', '.join(sorted(given)) or 'DAVIS'}",
                      set(vars(args)) - {"videos"}
                      - ({"weights", "family", "ckpt", "compare"} if args.table else set())
                      - ({"protocol"} if given and "davis" not in given else set())  # DAVIS's protocol
                      - ({"vip_size"} if not args.vip else set())
                      - ({"jhmdb_split"} if not args.jhmdb or Path(args.jhmdb).is_file() else set()))
    device, tasks = torch.device("cuda" if torch.cuda.is_available() else "cpu"), given or {"davis": None}
    try:
        if args.masks:
            if len(given) != 1 or args.jhmdb:
                raise BadInput("--masks needs one of --davis or --vip (the ground truth to score against)")
            task, plan = ("vip", read_vip(args.vip)) if args.vip else ("davis", read_davis(args.davis))
            m = score_vip(plan, args.masks) if args.vip else score(args.davis, args.masks, device)[0]
            write_json(Path(args.masks) / "summary.json", {task: m, "data": {task: describe(task, plan)}})
            return 0
        if args.tradeoff and not args.videos:
            raise BadInput("--tradeoff needs --videos (a list of frame folders, or a folder of them)")
        if not (args.tradeoff or args.bench):
            check_out_dir(args.out)  # before the encoder loads, not after its first batch
        kw = dict(device=device, batch_size=args.batch_size, overlay=args.overlay, vip_size=args.vip_size,
                  jhmdb_split=args.jhmdb_split or 1, topk=args.topk, context=args.context, radius=args.radius,
                  temperature=args.temperature)
        if args.table:
            if not given:
                raise BadInput("--table needs the sets to evaluate on: --davis, --vip and/or --jhmdb")
            table_1(args.table, tasks, args.out, args.protocol, args.native_stats, **kw)
            return 0
        if args.weights:
            encoder = load_encoder(args.weights, args.family, verbose=True).to(device)
        else:
            print("no --weights: using a seeded random ViT-S/16 (build_vit(seed=0)); numbers mean nothing")
            encoder = build_vit("vit_small", 16, seed=0).to(device).eval()
        if args.bench:
            bench(encoder, device)
            return 0
        if args.compare and not args.ckpt:
            if not encoder.official:
                raise BadInput("--compare needs --ckpt (the projection to compare the frozen encoder with), or "
                               "--weights an official Co-Settle '+ Ours' checkpoint (it holds its projection)")
            args.ckpt = args.weights  # the projection is the adapter of the same file
        projection = load_projection(args.ckpt, encoder).to(device) if args.ckpt else None
        if args.tradeoff:
            heads = {"baseline": None} if projection is None else {"baseline": None, "cosettle": projection}
            stats = encoder.native_stats if args.native_stats else (IMAGENET_MEAN, IMAGENET_STD)
            for name, m in tradeoff(encoder, heads, args.videos, device, args.batch_size, *stats).items():
                print_tradeoff(name, m)
            return 0
        if args.native_stats:
            kw["mean"], kw["std"] = encoder.native_stats
        if args.compare:
            compare(encoder, projection, tasks, args.out, args.protocol, **kw)
        else:
            name = "baseline" if projection is None else "cosettle"
            run(encoder_embed(encoder), encoder.patch_size, tasks, args.out, {name: projection}, args.protocol, **kw)
        return 0
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
