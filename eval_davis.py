"""DAVIS-2017 semi-supervised label propagation and its J&F, for the frozen baseline and + Co-Settle.

PAPER.md "Evaluation: semi-supervised label propagation": the first-frame labels are carried through every
frame by feature affinities, with (or without, for the frozen baseline) the trained projection on top of the
frozen encoder's patch tokens; the masks are scored with the davis2017-evaluation J&F.

    python eval_davis.py --weights W.pth [--ckpt out/cosettle.pth [--compare]] --davis DAVIS/ --out results/
    python eval_davis.py --weights dino+ours/checkpoint-4.pth --compare --davis DAVIS/   # the authors' file vs paper
    python eval_davis.py --davis DAVIS/ --masks results/        # score an existing results folder
    python eval_davis.py --tradeoff --videos DIR [--ckpt ...]   # label-free trade-off metrics (paper Table 4)
    python eval_davis.py --bench                                # frames/s vs DINO's per-frame loop

Propagation follows facebookresearch/dino eval_video_segmentation.py line for line in what it computes, but
extracts features in batches, keeps the context queue as a ring buffer on the device and selects top-k on the
device (one host transfer per batch). The metric re-implements davisvideochallenge/davis2017-evaluation
(metrics.py, evaluation.py, utils.py, evaluation_method.py) with torch/numpy; it agrees to the last bit.
"""
import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cosettle import FAMILIES, BadInput, build_vit, cycle_loss, load_encoder, load_projection
from data import (IMAGENET_MEAN, IMAGENET_STD, atomic, davis_palette, find_videos, list_frames, load_rgb, make_davis,
                  synthetic_video)

# Two protocols, one code path (PAPER.md "Evaluation").
# dino: eval_video_segmentation.py exactly: short side 480, long side floored to a multiple of 64, std 0.228,
#   first frame + 7 previous soft predictions, square window |di|,|dj| <= 12, top-5 jointly over all context
#   frames, weights exp(cos / 0.1) normalised.
# paper: the SiamMAE/CropMAE/RSP setting the paper follows; values from CropMAE downstreams/propagation/start.py
#   (crop_size [480, 880], topk 7, radius 20, video_len 20, temperature 0.7, ImageNet std 0.229), run through
#   DINO's algorithm above (our assumption). CropMAE's videowalk code differs in details we do not copy: a
#   circular window (d < 20) not applied to the first frame, the queue pre-filled with copies of frame 0,
#   bilinear (soft) first-frame labels and no min-max normalisation before the argmax.
PROTOCOLS = {
    "paper": dict(height=480, width=880, mean=IMAGENET_MEAN, std=IMAGENET_STD, topk=7, context=20, radius=20,
                  temperature=0.7),
    "dino": dict(height=480, width=None, mean=IMAGENET_MEAN, std=(0.228, 0.224, 0.225), topk=5, context=7, radius=12,
                 temperature=0.1),
}
METRICS = ["J&F-Mean", "J-Mean", "J-Recall", "J-Decay", "F-Mean", "F-Recall", "F-Decay"]
PALETTE = np.array(davis_palette(), dtype=np.uint8).reshape(256, 3)

# The paper's Table 1, ViT-B/16, in %: VIP mIoU, DAVIS-2017 J&F mean, JHMDB PCK@0.1 of the frozen encoder and
# + Co-Settle (the same numbers as the "Checkpoints" table of yafeng19/Co-Settle README.md).
PUBLISHED = {
    "mae": {"baseline": {"vip": 29.3, "davis": 52.4, "jhmdb": 41.6},
           "cosettle": {"vip": 33.8, "davis": 59.6, "jhmdb": 48.4}},
    "ijepa": {"baseline": {"vip": 31.5, "davis": 53.9, "jhmdb": 42.6},
             "cosettle": {"vip": 35.3, "davis": 58.7, "jhmdb": 44.4}},
    "clip": {"baseline": {"vip": 38.1, "davis": 54.9, "jhmdb": 36.9},
            "cosettle": {"vip": 39.2, "davis": 58.3, "jhmdb": 40.6}},
    "blip": {"baseline": {"vip": 37.6, "davis": 58.8, "jhmdb": 35.1},
            "cosettle": {"vip": 39.6, "davis": 62.0, "jhmdb": 38.9}},
    "mocov3": {"baseline": {"vip": 38.8, "davis": 62.6, "jhmdb": 43.6},
              "cosettle": {"vip": 39.8, "davis": 62.9, "jhmdb": 45.3}},
    "ibot": {"baseline": {"vip": 39.6, "davis": 64.6, "jhmdb": 45.7},
            "cosettle": {"vip": 40.8, "davis": 65.1, "jhmdb": 46.1}},
    "dino": {"baseline": {"vip": 39.1, "davis": 63.2, "jhmdb": 44.4},
            "cosettle": {"vip": 39.8, "davis": 64.2, "jhmdb": 46.2}},
    "dinov2": {"baseline": {"vip": 38.4, "davis": 63.1, "jhmdb": 46.6},
              "cosettle": {"vip": 39.9, "davis": 63.7, "jhmdb": 47.3}},
}
TASK_METRIC = {"vip": "VIP mIoU", "davis": "DAVIS J&F", "jhmdb": "JHMDB PCK@0.1"}


def paper_row(family, task, measured):
    """One line, frozen -> + Co-Settle in %: what we measured (a pair of fractions) beside the paper's pair for
    `family`, e.g. 'DAVIS J&F   measured 63.0 -> 64.1   paper (dino, ViT-B/16) 63.2 -> 64.2'."""
    ours = f"{TASK_METRIC[task]:14s} measured {100 * measured[0]:.1f} -> {100 * measured[1]:.1f}"
    if family not in PUBLISHED:
        return f"  {ours}   paper: no published numbers for a {family!r} encoder"
    base, cosettle = PUBLISHED[family]["baseline"][task], PUBLISHED[family]["cosettle"][task]
    return f"  {ours}   paper ({family}, ViT-B/16) {base:.1f} -> {cosettle:.1f}"


def protocol_params(protocol, **overrides):
    if protocol not in PROTOCOLS:
        raise BadInput(f"--protocol {protocol}: unknown, use one of {', '.join(PROTOCOLS)}")
    unknown = set(overrides) - set(PROTOCOLS[protocol])
    if unknown:
        raise BadInput(f"unknown protocol setting(s) {', '.join(sorted(unknown))}")
    p = {**PROTOCOLS[protocol], **{k: v for k, v in overrides.items() if v is not None}}
    if p["topk"] < 1 or p["context"] < 0 or p["radius"] < 0 or not p["temperature"] > 0 or p["height"] < 1:
        raise BadInput(f"protocol settings out of range (topk >= 1, context >= 0, radius >= 0, temperature > 0): {p}")
    return p


def target_size(H, W, params):
    """(th, tw) the frame is resized to. paper: fixed 480x880 (880x480 for portrait frames). dino: read_frame's
    rule, short side -> 480 and the other side floored to a multiple of 64 (854x480 -> 832x480). For square
    frames DINO's read_frame and read_seg disagree (480x448 vs 448x480); we use read_frame's for both."""
    if params["width"]:
        return (params["height"], params["width"]) if W >= H else (params["width"], params["height"])
    if H > W:
        return int((params["height"] * H / W) // 64 * 64), params["height"]
    return params["height"], int((params["height"] * W / H) // 64 * 64)


# -----------------------------------------------------------------------------
# Files: reading what the user gave us, writing without ever leaving half a file


def read_ids(path, what="annotation"):
    """Object ids of a palette (or greyscale) PNG as uint8 [H, W]."""
    if not os.path.isfile(path):
        raise BadInput(f"{path}: {what} missing")
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise BadInput(f"{path}: {what} is a {img.mode} image, expected a palette or greyscale PNG of ids")
            return np.array(img)
    except (OSError, SyntaxError, ValueError) as e:
        raise BadInput(f"{path}: cannot read the {what} ({e})") from e


def image_size(path):
    try:
        with Image.open(path) as img:
            return img.size[::-1]  # (H, W)
    except (OSError, SyntaxError, ValueError) as e:
        raise BadInput(f"{path}: cannot read the frame ({e})") from e


def write_png(path, ids, rgb=False):
    img = Image.fromarray(ids)
    if not rgb:
        img.putpalette(PALETTE.ravel().tolist())
    atomic(path, lambda tmp: img.save(tmp, format="PNG"))


def write_csv(path, header, rows):
    """pandas' to_csv(index=False, float_format="%.3f"), as evaluation_method.py writes it (NaN -> empty)."""
    cell = lambda v: v if isinstance(v, str) else ("" if np.isnan(v) else "%.3f" % v)
    text = "".join(",".join(map(cell, r)) + "\n" for r in [header] + rows)
    atomic(path, lambda tmp: Path(tmp).write_text(text))


def read_davis(davis, scoring=True):
    """Check a DAVIS-2017 folder before anything is written: [(seq, frames, annotations, first annotation)].

    Propagation needs every frame of equal size and a first-frame annotation of that size (DINO's path:
    Annotations/480p/<seq>/<first frame>.png); scoring needs an annotation for every frame, which is what
    davis2017-evaluation reads (the sorted PNGs of Annotations/480p/<seq>)."""
    davis = Path(davis)
    listing = davis / "ImageSets" / "2017" / "val.txt"
    if not listing.is_file():
        raise BadInput(f"{listing}: missing, so {davis} is not a DAVIS-2017 folder")
    names = [s.strip() for s in listing.read_text().splitlines() if s.strip()]
    if not names:
        raise BadInput(f"{listing}: lists no sequences")
    out = []
    for seq in names:
        frames = sorted((davis / "JPEGImages" / "480p" / seq).glob("*.jpg"))
        if not frames:
            raise BadInput(f"{davis / 'JPEGImages' / '480p' / seq}: no .jpg frames for sequence {seq} of {listing}")
        anns = sorted((davis / "Annotations" / "480p" / seq).glob("*.png"))
        first = davis / "Annotations" / "480p" / seq / (frames[0].stem + ".png")
        size = read_ids(first, "first-frame annotation").shape
        for f in frames:
            if image_size(f) != size:
                raise BadInput(f"{f}: frame is {image_size(f)[1]}x{image_size(f)[0]}, its annotation {first.name} "
                               f"is {size[1]}x{size[0]}")
        if scoring and len(anns) < len(frames):
            raise BadInput(f"{first.parent}: ground truth for {len(anns)} of {len(frames)} frames, cannot score")
        out.append((seq, frames, anns, first))
    return out


# -----------------------------------------------------------------------------
# The metric: davis2017-evaluation (semi-supervised), written with torch


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
    """cv2.dilate(b, skimage.morphology.disk(r)) on bool [..., H, W]: OR over offsets dx^2 + dy^2 <= r^2.

    The disk is a stack of rows; row dy spans |dx| <= isqrt(r^2 - dy^2). Each row's horizontal dilation is a
    box test on a cumulative sum (O(1) per pixel), then shifted by dy: O(r) per pixel instead of O(r^2)."""
    W = b.shape[-1]
    cs = F.pad(b.to(torch.int32).cumsum(-1), (1, 0))  # cs[..., x] = number of set pixels left of x
    x = torch.arange(W, device=b.device)
    rows = {}
    for w in {math.isqrt(r * r - dy * dy) for dy in range(r + 1)}:
        hi, lo = (x + w + 1).clamp(max=W), (x - w).clamp(min=0)
        rows[w] = (cs[..., hi] - cs[..., lo]) > 0
    out = torch.zeros_like(b)
    H = b.shape[-2]
    for dy in range(-r, r + 1):
        row = rows[math.isqrt(r * r - dy * dy)]
        if abs(dy) < H:
            if dy >= 0:
                out[..., :H - dy, :] |= row[..., dy:, :]
            else:
                out[..., -dy:, :] |= row[..., :H + dy, :]
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
    """evaluation.py DAVISEvaluation('semi-supervised', 'val').evaluate + evaluation_method.py: objects are ids
    1..max of the first ground-truth frame (void 255 counted as background, as davis.py does), the first and
    last frames are not scored, every object is a row, global numbers are means over all objects. Writes the
    two CSVs into `results` and returns (global dict, [(name, J-Mean, F-Mean)])."""
    results = Path(results)
    plan = read_davis(davis)
    wanted = [(seq, a.stem) for seq, _, anns, _ in plan for a in anns[1:-1]]
    missing = [f"{seq}/{stem}.png" for seq, stem in wanted if not (results / seq / f"{stem}.png").is_file()]
    if missing:
        raise BadInput(f"{results}: {len(missing)} result frames missing: {', '.join(missing[:5])}"
                       f"{', ...' if len(missing) > 5 else ''}")
    stats = {k: [] for k in ("JM", "JR", "JD", "FM", "FR", "FD")}
    rows = []
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
        print(f"{results}: global results (val)\n" + table([glob]))
        print("per sequence\n" + "\n".join(f"  {name:30s} J {jm:.3f}  F {fm:.3f}" for name, jm, fm in rows))
    return glob, rows


def table(rows, names=None):
    head = "  " + ("" if names is None else f"{'':12s}") + " ".join(f"{k:>9s}" for k in METRICS)
    return "\n".join([head] + ["  " + ("" if names is None else f"{names[i]:12s}") +
                               " ".join(f"{r[k]:9.3f}" for k in METRICS) for i, r in enumerate(rows)])


# -----------------------------------------------------------------------------
# Label propagation (DINO's algorithm, batched and on the device)

_windows = {}


def outside_window(h, w, radius, device):
    """Bool [N, N]: key NOT within |di|, |dj| <= radius of the query (the complement of DINO's
    restrict_neighborhood, built with one broadcast comparison instead of four Python loops, cached per grid)."""
    key = (h, w, radius, str(device))
    if key not in _windows:
        i, j = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        i, j = i.flatten(), j.flatten()
        _windows[key] = ((i[:, None] - i[None]).abs() > radius) | ((j[:, None] - j[None]).abs() > radius)
    return _windows[key]


def norm_mask(x):
    """DINO's norm_mask on [K, H, W]: channels whose max is > 0 are min-max scaled to [0, 1] (a constant
    positive channel becomes NaN there too, and torch.max then picks it)."""
    mn, mx = x.amin((1, 2), keepdim=True), x.amax((1, 2), keepdim=True)
    return torch.where(mx > 0, (x - mn) / (mx - mn), x)


class Propagation:
    """One video's propagation state: DINO's queue (first frame + the `context` previous soft predictions) as
    a ring buffer of L2-normalised features and label maps on the device. Call with the next frame's features
    [h, w, C]; returns its labels [h*p, w*p] uint8 (still on the device)."""

    def __init__(self, feat0, labels0, params, patch):
        h, w, C = feat0.shape
        K, n = labels0.shape[0], params["context"]
        self.h, self.w, self.patch, self.params, self.pushed = h, w, patch, params, 0
        self.feats = torch.zeros(1 + n, h * w, C, device=feat0.device)
        self.labels = torch.zeros(1 + n, h * w, K, device=feat0.device)
        self.feats[0] = F.normalize(feat0.reshape(h * w, C).float(), dim=1)
        self.labels[0] = labels0.reshape(K, h * w).T
        self.outside = outside_window(h, w, params["radius"], feat0.device) if params["radius"] > 0 else None

    def __call__(self, feat):
        h, w, N, K, n = self.h, self.w, self.h * self.w, self.labels.shape[2], self.feats.shape[0] - 1
        q = F.normalize(feat.reshape(N, -1).float(), dim=1)
        m = 1 + min(self.pushed, n)  # context frames in use
        k = min(self.params["topk"], m * N)
        keys, labels = self.feats[:m].reshape(m * N, -1), self.labels[:m].reshape(m * N, K)
        soft = torch.empty(N, K, device=q.device)
        step = max(1, (1 << 24) // (m * N))  # queries per chunk: affinities stay under 64 MB
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
        up = F.interpolate(soft.T.reshape(1, K, h, w), scale_factor=self.patch, mode="bilinear",
                           align_corners=False, recompute_scale_factor=False)[0]
        return torch.max(norm_mask(up), dim=0).indices.to(torch.uint8)


def load_frame(path, size, mean, std):
    """RGB frame -> normalised [3, th, tw]. Bilinear (no antialias), rounded to uint8 as DINO's cv2.resize on
    a uint8 image is, then (x/255 - mean) / std."""
    x = torch.from_numpy(np.array(load_rgb(path))).permute(2, 0, 1).float()
    return normalise(x, size, mean, std)


def normalise(x, size, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """[3, H, W] float in 0..255 -> resized to `size` and (x/255 - mean) / std normalised."""
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0].round().clamp(0, 255)
    return (x / 255.0 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def first_labels(ann, h, w):
    """First-frame ids -> one-hot [K, h, w] on the feature grid: PIL NEAREST resize of the id image, K = max id
    + 1 after the resize (DINO's read_seg + to_one_hot). Void (255) is background here; DINO would make it a
    256th label that propagates and then fails the evaluation."""
    small = np.array(Image.fromarray(np.where(ann == 255, 0, ann).astype(np.uint8)).resize((w, h), Image.NEAREST))
    return F.one_hot(torch.from_numpy(small).long()).permute(2, 0, 1).float()


def segment(plan, embed, heads, outs, params, patch, device, batch_size=8, overlay=False, verbose=True):
    """Propagate every sequence of `plan` (read_davis) and write palette PNGs to outs[name]/<seq>/<frame>.png at
    the original size. embed: normalised frames [B, 3, th, tw] -> features [B, h, w, C]; heads: {name: module
    applied to those features, or None}. All heads share one forward of the encoder per batch. Returns frames."""
    n_frames = 0
    for seq, frames, _, first in plan:
        ann = read_ids(first, "first-frame annotation")
        ann = np.where(ann == 255, 0, ann).astype(np.uint8)
        H, W = ann.shape
        th, tw = target_size(H, W, params)
        th, tw = th // patch * patch, tw // patch * patch  # patch 14 (DINOv2, CLIP-L): 480 -> 476, as DINOv2's eval
        h, w = th // patch, tw // patch
        if h < 1 or w < 1:
            raise BadInput(f"{frames[0]}: {W}x{H} frame gives a {tw}x{th} input, smaller than one {patch}-px patch")
        labels0 = first_labels(ann, h, w).to(device)
        show = set(np.linspace(0, len(frames) - 1, 4).round().astype(int).tolist()) if overlay else set()
        props = {}
        for b0 in range(0, len(frames), batch_size):
            x = torch.stack([load_frame(f, (th, tw), params["mean"], params["std"])
                             for f in frames[b0:b0 + batch_size]])
            with torch.no_grad():
                base = embed(x.to(device))
                maps = {}
                for name, head in heads.items():
                    feats = base if head is None else head(base)
                    if b0 == 0:
                        props[name] = Propagation(feats[0], labels0, params, patch)
                    maps[name] = [props[name](f) for f in feats[1 if b0 == 0 else 0:]]
            for name, ms in maps.items():
                ms = ([ann] if b0 == 0 else []) + (list(torch.stack(ms).cpu().numpy()) if ms else [])  # one sync
                for t, m in enumerate(ms, start=b0):
                    if t > 0:  # back to the original size as DINO does (PIL NEAREST); frame 0 is the annotation
                        m = np.array(Image.fromarray(m).resize((W, H), Image.NEAREST))
                    write_png(outs[name] / seq / f"{frames[t].stem}.png", m)
                    if t in show:
                        write_png(outs[name] / "overlays" / seq / f"{frames[t].stem}.png", blend(frames[t], m), True)
        n_frames += len(frames)
        if verbose:
            print(f"  {seq}: {len(frames)} frames at {tw}x{th}, {labels0.shape[0] - 1} objects on the {w}x{h} grid")
    return n_frames


def blend(frame, ids):
    """The image with each object's palette colour laid over it at 50%, background untouched."""
    img = np.asarray(load_rgb(frame), dtype=np.float32)
    out = np.where(ids[..., None] > 0, 0.5 * img + 0.5 * PALETTE[ids], img)
    return out.round().astype(np.uint8)


def encoder_embed(encoder):
    p = encoder.patch_size
    return lambda x: encoder(x).float().reshape(x.shape[0], x.shape[2] // p, x.shape[3] // p, -1)


def run(encoder, heads, davis_root, out_dir, protocol="paper", device=None, batch_size=8, overlay=False,
        verbose=True, **overrides):
    """Propagate with each head and score it: {name: global metrics, or None where the set has no ground truth
    beyond the first frames}. One variant writes into out_dir, several into out_dir/<name>. davis_root None: a
    synthetic DAVIS set in a temporary folder."""
    params = protocol_params(protocol, **overrides)
    device = device or next(encoder.parameters()).device
    if davis_root is None:
        with tempfile.TemporaryDirectory() as tmp:
            if verbose:
                print(f"no --davis: evaluating on a synthetic DAVIS set made in {tmp} (data.make_davis)")
            return run(encoder, heads, make_davis(tmp), out_dir, protocol, device, batch_size, overlay, verbose,
                       **overrides)
    outs = {name: Path(out_dir) / name if len(heads) > 1 else Path(out_dir) for name in heads}
    plan = read_davis(davis_root, scoring=False)  # every check before the first file is written
    if verbose:
        print(f"propagating {len(plan)} sequences, protocol {protocol} {params}, device {device}")
    t0 = time.perf_counter()
    n = segment(plan, encoder_embed(encoder), heads, outs, params, encoder.patch_size, device, batch_size,
                overlay, verbose)
    dt = time.perf_counter() - t0
    if any(len(anns) < len(frames) for _, frames, anns, _ in plan):  # e.g. test-dev: first frames only
        if verbose:
            print(f"{davis_root}: no ground truth beyond the first frames, masks written to {out_dir}, not scored")
        return {name: None for name in heads}
    metrics = {name: score(davis_root, outs[name], device, verbose)[0] for name in heads}
    if verbose:
        print(f"{n} frames in {dt:.1f} s: {n / dt:.2f} frames/s ({len(heads)} variant(s) per encoder forward)")
    return metrics


def evaluate(encoder, projection, davis_root, out_dir, protocol="paper", **overrides):
    """J&F of one variant: the frozen encoder (projection None) or + Co-Settle -> the 7 global metrics (None
    when only first-frame annotations exist: the masks are written, nothing is scored).
    overrides: protocol settings (height, width, mean, std, topk, context, radius, temperature) and run()'s device,
    batch_size, overlay, verbose. davis_root None: a synthetic DAVIS set in a temporary folder."""
    name = "baseline" if projection is None else "cosettle"
    return run(encoder, {name: projection}, davis_root, out_dir, protocol, **overrides)[name]


def compare(encoder, projection, davis_root, out_dir, protocol="paper", **overrides):
    """Baseline and + Co-Settle on the same frames (one encoder forward feeds both):
    {'baseline': metrics, 'cosettle': metrics, 'difference': cosettle - baseline}."""
    m = run(encoder, {"baseline": None, "cosettle": projection}, davis_root, out_dir, protocol, **overrides)
    if m["baseline"] is None:  # nothing to score against
        return m
    m["difference"] = {k: m["cosettle"][k] - m["baseline"][k] for k in METRICS}
    if overrides.get("verbose", True):
        print("baseline vs + Co-Settle\n" + table(list(m.values()), list(m)))
        print(paper_row(encoder.family, "davis", (m["baseline"]["J&F-Mean"], m["cosettle"]["J&F-Mean"])))
    return m


# -----------------------------------------------------------------------------
# Label-free trade-off metrics (PAPER.md "Label-free trade-off metrics", paper Table 4)


def diameter(x):
    """Largest distance between two rows of L2-normalised x [M, D], in chunks: sqrt(2 - 2 min cos)."""
    lo = min((x[a:a + 256] @ x.T).min().item() for a in range(0, len(x), 256))
    return math.sqrt(max(2 - 2 * lo, 1e-12))


@torch.no_grad()
def tradeoff(encoder, heads, videos, device="cpu", batch_size=16):
    """{name: dict(cycle_acc, D_intra, D_inter, margin)} on every video folder under `videos`.

    Frames are resized to 224x224 (bilinear) and ImageNet-normalised; tokens are L2-normalised.
    cycle_acc: for frame pairs (t, t + g), g = max(1, int(0.15 n)), the share of the 2x2-pooled tokens (49 for
      patch 16) whose plain t -> t+g -> t walk, M = softmax(q1 q2^T / 0.03) softmax(q2 q1^T / 0.03), returns
      to itself (argmax_j M_ij = i): cosettle.cycle_loss(p1, p2, p1)'s accuracy, i.e. without PEA; mean over
      videos.
    D_intra: per consecutive pair, each token's distance to its nearest token of the next frame, the closest
      half averaged; over the pairs of a video, divided by the video's feature diameter; mean over videos.
    D_inter: for every two videos, the mean distance between same-position tokens of their middle frames,
      divided by the diameter of those two frames' tokens; mean over pairs (needs 2 videos, else NaN).
    margin: D_inter - 0.3 D_intra.
    """
    folders = find_videos(videos)
    acc = {k: [] for k in heads}
    intra = {k: [] for k in heads}
    middle = {k: [] for k in heads}
    for folder in folders:
        frames = list_frames(folder)
        x = torch.stack([load_frame(f, (224, 224), IMAGENET_MEAN, IMAGENET_STD) for f in frames])
        base = torch.cat([encoder(x[a:a + batch_size].to(device)).float() for a in range(0, len(x), batch_size)])
        g = max(1, int(0.15 * len(frames)))
        for name, head in heads.items():
            p = F.normalize(base if head is None else head(base), dim=-1)
            acc[name].append(cycle_loss(p[:-g], p[g:], p[:-g])[1].item())
            near = torch.cdist(p[:-1], p[1:]).amin(-1).sort(-1).values[:, : p.shape[1] // 2]
            intra[name].append(near.mean().item() / diameter(p.flatten(0, 1)))
            middle[name].append(p[len(p) // 2])
    out = {}
    for name in heads:
        mids = middle[name]
        inter = [(mids[i] - mids[j]).norm(dim=-1).mean().item() / diameter(torch.cat([mids[i], mids[j]]))
                 for i in range(len(mids)) for j in range(i + 1, len(mids))]
        d_intra, d_inter = float(np.mean(intra[name])), float(np.mean(inter)) if inter else float("nan")
        out[name] = dict(cycle_acc=float(np.mean(acc[name])), D_intra=d_intra, D_inter=d_inter,
                         margin=d_inter - 0.3 * d_intra)
    return out


# -----------------------------------------------------------------------------
# --bench: our path vs a straightforward re-implementation of DINO's per-frame loop


@torch.no_grad()
def dino_loop(x, labels0, embed, patch, params):
    """DINO eval_video_tracking_davis as written: one forward per frame, dense [context, N, N] affinity
    exp(cos / T) times the window mask, top-k along the key axis, normalise, label transfer, queue of soft
    predictions. (The window mask is built vectorised; DINO's four Python loops would only add time.)"""
    f0 = embed(x[:1])[0]
    h, w, _ = f0.shape
    N, K = h * w, labels0.shape[0]
    mask = (~outside_window(h, w, params["radius"], x.device)).float() if params["radius"] > 0 else 1.0
    queue, out = [], []
    for t in range(1, len(x)):
        ft = embed(x[t:t + 1])[0].reshape(N, -1)
        feats = F.normalize(torch.stack([f0.reshape(N, -1)] + [f for f, _ in queue]), dim=2)  # [m, N, D]
        segs = torch.stack([labels0] + [s for _, s in queue])  # [m, K, h, w]
        m = len(feats)
        aff = torch.exp(torch.bmm(F.normalize(ft, dim=1).expand(m, N, -1), feats.transpose(1, 2))
                        / params["temperature"]) * mask
        aff = aff.transpose(2, 1).reshape(-1, N)  # [m*N keys, N queries]
        kth = torch.topk(aff, dim=0, k=params["topk"]).values.min(dim=0).values
        aff[aff < kth] = 0
        aff = aff / aff.sum(0, keepdim=True)
        seg = (segs.reshape(m, K, N).transpose(2, 1).reshape(-1, K).T @ aff).reshape(K, h, w)
        if len(queue) == params["context"]:
            queue.pop(0)
        queue.append((ft, seg))
        up = F.interpolate(seg[None], scale_factor=patch, mode="bilinear", align_corners=False,
                           recompute_scale_factor=False)[0]
        for c in range(K):
            if up[c].max() > 0:
                up[c] = (up[c] - up[c].min()) / (up[c] - up[c].min()).max()
        out.append(torch.max(up, dim=0).indices.to(torch.uint8).cpu())
    return torch.stack(out)


@torch.no_grad()
def fast_loop(x, labels0, embed, patch, params, batch_size=8):
    """Our path on in-memory frames: batched forward, Propagation, one host transfer per batch."""
    out, prop = [], None
    for a in range(0, len(x), batch_size):
        feats = embed(x[a:a + batch_size])
        prop = prop if prop is not None else Propagation(feats[0], labels0, params, patch)
        out.append(torch.stack([prop(f) for f in feats[1 if a == 0 else 0:]]).cpu())
    return torch.cat(out)


def bench(encoder, device, n_frames=10, height=480, width=832):
    """Seconds per propagated frame, wall clock and CPU (the CPU seconds do not move when other processes load
    the machine), for our path and DINO's loop on the same in-memory frames and encoder; their agreement."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    embed, params, patch = encoder_embed(encoder), PROTOCOLS["dino"], encoder.patch_size
    height, width = height // patch * patch, width // patch * patch
    frames, masks = synthetic_video(0, n_frames, height, width, n_objects=2)
    x = torch.stack([normalise(torch.from_numpy(f).permute(2, 0, 1).float(), (height, width), params["mean"],
                               params["std"]) for f in frames]).to(device)
    labels0 = first_labels(masks[0], height // patch, width // patch).to(device)
    runs = [("DINO per-frame loop", dino_loop), ("ours", fast_loop),
            ("encoder forward alone", lambda x, *_: [embed(x[a:a + 8]) for a in range(0, len(x), 8)])]
    times, outs = {}, {}
    with torch.no_grad():
        embed(x[:2])  # warm-up
        for key, fn in runs:
            sync()
            wall, cpu = time.perf_counter(), time.process_time()
            outs[key] = fn(x, labels0, embed, patch, params)
            sync()
            times[key] = ((time.perf_counter() - wall) / (n_frames - 1), (time.process_time() - cpu) / (n_frames - 1))
    same = (outs["ours"] == outs["DINO per-frame loop"]).float().mean().item()
    a = encoder.arch
    print(f"bench: {n_frames} synthetic frames {width}x{height}, {encoder.family} ViT width {a['embed_dim']} "
          f"patch {patch}, dino protocol, {name}, torch {torch.__version__}")
    base = times["DINO per-frame loop"]
    for key, (wall, cpu) in times.items():
        print(f"  {key:22s} {wall:6.3f} s/frame ({1 / wall:5.2f} frames/s), {cpu:6.3f} CPU-s/frame   "
              f"speed-up x{base[0] / wall:.1f} wall, x{base[1] / cpu:.1f} CPU")
    print(f"  ours and DINO's loop give the same label on {100 * same:.3f}% of pixels")
    return times, same


# -----------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="encoder checkpoint (default: a seeded random ViT-S/16)")
    parser.add_argument("--family", choices=FAMILIES, help="force the checkpoint family instead of detecting it")
    parser.add_argument("--native-stats", action="store_true",
                        help="normalise with the family's own mean/std (CLIP, BLIP) instead of ImageNet's")
    parser.add_argument("--ckpt", help="train.py checkpoint with the trained projection, or an official "
                        "'+ Ours' checkpoint (its adapter)")
    parser.add_argument("--davis", help="DAVIS-2017 folder (default: a synthetic one in a temporary folder)")
    parser.add_argument("--out", default="results", help="where the result PNGs and CSVs go")
    parser.add_argument("--masks", help="score this results folder only (no propagation)")
    parser.add_argument("--protocol", default="paper", choices=list(PROTOCOLS))
    parser.add_argument("--topk", type=int)
    parser.add_argument("--context", type=int, help="previous frames in the queue (besides the first)")
    parser.add_argument("--radius", type=int, help="window half-size in patches (0: no window)")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--compare", action="store_true", help="baseline and + Co-Settle in one run (needs --ckpt, "
                        "or --weights an official '+ Ours' checkpoint)")
    parser.add_argument("--overlay", action="store_true", help="also write a few blended frames per sequence")
    parser.add_argument("--batch-size", type=int, default=8, help="frames per encoder forward")
    parser.add_argument("--tradeoff", action="store_true", help="label-free trade-off metrics on --videos")
    parser.add_argument("--videos", help="folder of frame folders for --tradeoff")
    parser.add_argument("--bench", action="store_true", help="frames/s of ours vs DINO's per-frame loop "
                        "(--weights, or a random ViT-S/16)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        if args.masks:
            if args.davis is None:
                raise BadInput("--masks needs --davis (the ground truth to score against)")
            score(args.davis, args.masks, device)
            return 0
        if args.tradeoff and not args.videos:
            raise BadInput("--tradeoff needs --videos DIR (a folder of frame folders)")
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
            res = tradeoff(encoder, heads, args.videos, device)
            print(f"{'':10s} {'cycle_acc':>10s} {'D_intra':>8s} {'D_inter':>8s} {'margin':>8s}")
            if len(res) > 1:
                res["difference"] = {k: res["cosettle"][k] - res["baseline"][k] for k in res["baseline"]}
            for name, r in res.items():
                print(f"{name:10s} {r['cycle_acc']:10.4f} {r['D_intra']:8.4f} {r['D_inter']:8.4f} {r['margin']:8.4f}")
            return 0
        kw = dict(device=device, batch_size=args.batch_size, overlay=args.overlay, topk=args.topk,
                  context=args.context, radius=args.radius, temperature=args.temperature)
        if args.native_stats:
            kw["mean"], kw["std"] = encoder.native_stats
        if args.compare:
            compare(encoder, projection, args.davis, args.out, args.protocol, **kw)
        else:
            evaluate(encoder, projection, args.davis, args.out, args.protocol, **kw)
        return 0
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
