"""Data for Co-Settle. Training pairs: two frames `int(0.15·n)` apart in a video of n frames, one random-resized crop
and flip for both, resized on the device; where the official code (github.com/yafeng19/Co-Settle, util/video*) and
the paper differ we follow the code. Also: synthetic videos with object masks, a DAVIS-2017 writer, the DAVIS, VIP
and JHMDB readers (with a MATLAB v5 reader), result writers, and a CLI (VIP/JHMDB sets: test_cosettle.py --make-*):
    python data.py --make-davis DIR [--seqs N --frames N --height H --width W --seed S]
    python data.py --make-videos DIR [--videos N --frames N --height H --width W --seed S]
"""

import argparse
import hashlib
import json
import math
import os
import random
import struct
import sys
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cosettle import IMAGENET_MEAN, IMAGENET_STD, BadInput, at_least, positive, refuse_unused

FRAME_SUFFIXES = ('.jpg', '.jpeg', '.png')  # matched case-insensitively
VIDEO_SUFFIXES = ('.mp4', '.avi', '.mkv', '.webm', '.mov')  # video files, which need their frames extracted first
EXTRACT = "ffmpeg -nostdin -i CLASS/VIDEO.mp4 -q:v 2 FRAMES/CLASS/VIDEO/%05d.jpg"  # README, "Kinetics as downloaded"


def check_out_dir(path, flag="--out"):
    """Raise BadInput unless `path` is a folder we can write into, or one we could create; creates nothing, so a
    run that fails later leaves no empty folder behind. (As root every folder is writable.)"""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInput(f"{flag} {path}: is a file, not a folder.")
    probe = path.absolute()
    while not probe.exists():  # the nearest existing ancestor decides whether the folder can be made
        probe = probe.parent
    if not probe.is_dir():
        raise BadInput(f"{flag} {path}: cannot be created, {probe} is a file.")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BadInput(f"{flag} {path}: no permission to write in {probe}.")


# -----------------------------------------------------------------------------
# finding videos, and the random choices of one sample

def is_frame(name):
    return name.lower().endswith(FRAME_SUFFIXES)


def frame_names(folder):
    """The frame file names of one video folder, sorted (the official code sorts os.listdir the same way)."""
    try:
        with os.scandir(folder) as entries:
            return sorted(e.name for e in entries if is_frame(e.name) and e.is_file())
    except OSError as e:
        raise BadInput(f"{folder}: cannot list the video folder ({e.strerror or e}).") from e


def list_frames(folder):
    """The frame files of one video folder, sorted by name."""
    return [Path(folder) / name for name in frame_names(folder)]


def find_videos(path):
    """Sorted training video folders: every folder under the directory `path` holding frames (Kinetics class/video/
    or flat video/), or those listed one a line in a .txt (relative to its folder, not the working directory as in
    the official code; blank and `#` lines ignored). Under 2 frames: skipped, with one warning on stderr."""
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such file or directory.")
    if path.is_dir():
        # os.walk: one scandir per folder, no per-file stat (fine for 240k folders); followlinks: symlinked classes
        found, n_video_files = [], 0
        for dirpath, _, filenames in os.walk(path, followlinks=True):
            n = sum(1 for name in filenames if is_frame(name))
            if n > 0:
                found.append((Path(dirpath), n))
            n_video_files += sum(1 for name in filenames if name.lower().endswith(VIDEO_SUFFIXES))
        if not found and n_video_files:  # Kinetics as downloaded: .mp4 files, no frames yet
            raise BadInput(f"{path}: holds {n_video_files} video file{'s' * (n_video_files > 1)} but no folders of "
                           f"frames; extract the frames first, one folder per video, e.g. `{EXTRACT}` (README, "
                           f"\"Kinetics as downloaded\").")
    elif path.suffix.lower() == '.txt':
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise BadInput(f"{path}: cannot read the list of video folders ({e}).") from e
        folders = [path.parent / s for s in (line.strip() for line in lines) if s and not s.startswith('#')]
        found = [(folder, len(frame_names(folder)) if folder.is_dir() else 0) for folder in folders]
    else:
        raise BadInput(f"{path}: expected a folder of video folders or a .txt list of them.")
    if not found:
        raise BadInput(f"{path}: holds no folders with frames ({', '.join(FRAME_SUFFIXES)}).")
    videos = sorted(folder for folder, n in found if n >= 2)
    skipped = len(found) - len(videos)
    if skipped:
        print(f"warning: {path}: skipped {skipped} of {len(found)} video folders with fewer than 2 frames"
              f"{' (or missing)' if path.is_file() else ''}.", file=sys.stderr)
    if not videos:
        raise BadInput(f"{path}: no video folder with at least 2 frames is left after skipping {skipped}.")
    return videos

def sample_pair(n, clip_gap, rng):
    """0-based frames (i, j) of a pair by official `sample_two_frames_tuple` (train.sh passes --use_adapter): g =
    int(clip_gap·n); if n <= 4 or g < 1, i, j uniform on {0..n-1}; else i ~ U{1..n-g-1}, j = i + g (its 0-based
    `np.random.randint(1, n - g)`: frame 0 is never the first frame and j can be the last)."""
    g = int(clip_gap * n)
    if n <= 4 or g < 1 or g > n - 2:  # the last case: a gap the clip cannot hold (clip_gap near 1)
        return rng.randint(0, n - 1), rng.randint(0, n - 1)
    i = rng.randint(1, n - g - 1)  # random.randint includes both ends, numpy's excludes the upper one
    return i, i + g


def random_resized_crop_box(width, height, rng, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """(left, top, crop_w, crop_h) of a random-resized crop as official util/video/image_utils.py `RRC` draws it:
    the BYOL/TF variant, not torchvision's 10-attempt loop: one area fraction U(scale), a log-uniform ratio,
    w = round(sqrt(area·r)), h = round(sqrt(area/r)) clamped to the image, then a uniform position."""
    area = width * height * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    crop_w = max(1, min(int(round(math.sqrt(area * aspect))), width))
    crop_h = max(1, min(int(round(math.sqrt(area / aspect))), height))
    left = rng.randint(0, width - crop_w)
    top = rng.randint(0, height - crop_h)
    return left, top, crop_w, crop_h


# -----------------------------------------------------------------------------
# decoding, resizing and normalising on the device, and the training dataset

def load_rgb(path, draft_size=None):
    """One frame as an RGB PIL image (BadInput naming an unreadable file): alpha dropped as the official
    `img.convert("RGB")` does, 16-bit grey scaled to 8 bits (PIL's convert would clip). draft_size: (w, h) still
    needed; JPEGs then decode at 1/2, 1/4 or 1/8 scale in the DCT domain while at least that large (much faster)."""
    try:
        with Image.open(path) as img:
            if draft_size is not None:
                img.draft('RGB', draft_size)  # no-op for non-JPEG files
            img.load()  # decode now, so a truncated file fails here and not somewhere downstream
            if img.mode.startswith('I;16') or img.mode == 'I':
                grey = (np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
                return Image.fromarray(grey).convert('RGB')
            if img.mode == 'P':
                img = img.convert('RGBA')  # PIL warns on P -> RGB when the palette has transparency
            return img.convert('RGB')
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:  # what PIL raises
        raise BadInput(f"{path}: cannot decode the image ({e}).") from e


def bicubic_weights(n, lo, hi, out):
    """Pillow's BICUBIC resize of [lo, hi) on an n-pixel axis to `out` pixels as src/libImaging/Resample.c computes it
    (float32 box, filter widened by the downscale, rows normalised, 22-bit fixed point) -> (first source pixel, m
    pixels used, each output's first tap from there [out], tap weights [out, K]): a banded [out, m] matrix."""
    lo, hi = np.float32(lo), np.float32(hi)
    scale = float(hi - lo) / out
    stretch = max(scale, 1.0)
    support = 2.0 * stretch
    centre = float(lo) + (np.arange(out) + 0.5) * scale
    first = np.maximum((centre - support + 0.5).astype(np.int64), 0)  # C's (int): towards zero, then clamped
    last = np.minimum((centre + support + 0.5).astype(np.int64), n)
    taps = first[:, None] + np.arange(int(np.ceil(support)) * 2 + 1)  # each row's window, as Pillow's ksize
    d = np.abs((taps - centre[:, None] + 0.5) * (1.0 / stretch))
    w = np.where(d < 1, (1.5 * d - 2.5) * d * d + 1, np.where(d < 2, (((d - 5) * d + 8) * d - 4) * -0.5, 0.0))
    w *= taps < last[:, None]
    w = np.sign(w) * np.floor(np.abs(w / w.sum(1, keepdims=True)) * 2 ** 22 + 0.5) / 2 ** 22
    x0 = int(first[0])
    return x0, int(last[-1]) - x0, torch.from_numpy(first - x0), torch.from_numpy(w.astype(np.float32))


def banded(first, taps, m):
    """[..., out] first taps and [..., out, K] weights -> the dense [..., out, m] matrix (taps past m weigh 0)."""
    idx = (first[..., None] + torch.arange(taps.shape[-1], device=taps.device)).clamp_(max=m - 1)
    return torch.zeros(*taps.shape[:-1], m, dtype=taps.dtype, device=taps.device).scatter_add_(-1, idx, taps)


def resample(pixels, wy, wx):
    """uint8 [B, 3, h, w], banded wy = (first [B, S], taps [B, S, K]), wx alike -> float32 [B, 3, S, S] in 0..255:
    Pillow's 8-bit passes, horizontal first (Pillow 13 begins some portrait crops vertically), in fp32 (TF32 off)."""
    B, _, h, w = pixels.shape
    wy, wx = banded(*wy, h), banded(*wx, w)
    S = wx.shape[1]
    x = torch.bmm(pixels.to(wx.dtype).view(B, 3 * h, w), wx.transpose(1, 2)).add_(0.5).floor_().clamp_(0, 255)
    x = torch.bmm(wy, x.view(B, 3, h, S).transpose(1, 2).reshape(B, h, 3 * S)).add_(0.5).floor_().clamp_(0, 255)
    return x.view(B, S, 3, S).transpose(1, 2)


def collate_crops(items):
    """DataLoader collate for FramePairs: per frame of the pair, the crops zero-padded to the batch's largest and the
    tap weights to the most taps -> [(pixels, (first_y, taps_y), (first_x, taps_x)) of frame 1, the same of frame 2]."""
    def pad(ts, dtype=torch.float32):  # zero-pad tensors of one rank to the largest, and stack them
        out = torch.zeros(len(ts), *(max(sizes) for sizes in zip(*(t.shape for t in ts))), dtype=dtype)
        for k, t in enumerate(ts):
            out[(k, *map(slice, t.shape))] = t
        return out
    batch = []
    for crops in zip(*items):  # frame 1's crops, then frame 2's
        pixels, wy, wx = zip(*crops)
        batch.append((pad(pixels, torch.uint8), *((torch.stack(f), pad(k)) for f, k in (zip(*wy), zip(*wx)))))
    return batch


def model_input(crops, device, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """A collated batch (pixels, wy, wx) -> normalised float32 [B, 3, S, S] on the device: copied as uint8 pixels and
    banded weights (queued, not waited for, where the DataLoader pinned them), then resampled there."""
    pixels, wy, wx = crops
    to = lambda t: t.to(device, non_blocking=True)
    return normalise_batch(resample(to(pixels), tuple(map(to, wy)), tuple(map(to, wx))), mean, std)


def normalise_batch(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Images [..., 3, H, W] in 0..255 (uint8 or float) -> float32 (x/255 - mean) / std, where x is."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(3, 1, 1)  # no copy if already there
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x.float() / 255 - mean) / std

class FramePairs(torch.utils.data.Dataset):
    """Item idx: two frames of video idx, same crop and flip, each (uint8 crop window, wy, wx): the resize is applied
    on the device (model_input), so a worker only decodes; batch with collate_fn=collate_crops. Randomness is a
    function of (seed, epoch, idx) alone: any worker count, same after a resume. Call set_epoch(e) before building
    the epoch's iterator (workers copy the dataset at start: with persistent_workers a later call misses them)."""

    def __init__(self, videos, size, clip_gap, seed=0):
        self.videos = [Path(v) for v in videos]
        self.size = size
        self.clip_gap = clip_gap
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.videos)

    def draw(self, idx, n_frames):
        """The random choices of item idx: frame indices (i, j), relative crop window (l, t, w, h), flip."""
        rng = random.Random(f"{self.seed}-{self.epoch}-{idx}")
        i, j = sample_pair(n_frames, self.clip_gap, rng)
        # The official loader squashes every frame to 224×224 and draws the crop on that square, so its window is
        # a fixed fraction of the frame: draw it on a size×size grid the same way and keep it relative.
        left, top, w, h = random_resized_crop_box(self.size, self.size, rng)
        box = (left / self.size, top / self.size, w / self.size, h / self.size)
        return i, j, box, rng.random() < 0.5  # the flip

    def crop(self, img, box, flip, weights):
        """-> (uint8 window [3, h, w] at the frame's resolution, wy, wx: the weights that resize it to size×size, flip
        in wx, kept in `weights` by frame size for the clip's other frame). The official code resamples twice (frame,
        then crop, to 224×224); one resample shows the same window without that loss."""
        W, H = img.size
        left, top, w, h = box
        if img.size not in weights:
            wx = bicubic_weights(W, left * W, (left + w) * W, self.size)
            weights[img.size] = bicubic_weights(H, top * H, (top + h) * H, self.size), \
                wx[:2] + ((wx[2].flip(0), wx[3].flip(0)) if flip else wx[2:])
        (y0, n, *wy), (x0, m, *wx) = weights[img.size]
        pixels = np.asarray(img.crop((x0, y0, x0 + m, y0 + n))).transpose(2, 0, 1)
        return torch.from_numpy(pixels.copy()), tuple(wy), tuple(wx)

    def load(self, idx):
        names = frame_names(self.videos[idx])  # a Path per frame of a 300-frame video would cost ~1 ms a clip
        if len(names) < 2:
            raise BadInput(f"{self.videos[idx]}: has {len(names)} frames, needs at least 2.")
        i, j, box, flip = self.draw(idx, len(names))
        # Decode only frames i and j (the official code also decodes i-1 and j-1 and never uses them). The
        # draft size keeps the crop at least size×size after JPEG DCT-domain downscaling.
        draft_size = (math.ceil(self.size / box[2]), math.ceil(self.size / box[3]))
        weights = {}
        return tuple(self.crop(load_rgb(self.videos[idx] / names[t], draft_size), box, flip, weights) for t in (i, j))

    def __getitem__(self, idx):
        if not 0 <= idx < len(self.videos):
            raise IndexError(idx)  # also ends `for x in dataset`, which the wrap-around below would not
        # A bad video must not end a 5-epoch run: warn and take the next video (deterministically).
        tries = min(len(self.videos), 10)
        for k in range(tries):
            v = (idx + k) % len(self.videos)
            try:
                return self.load(v)
            except BadInput as e:  # one line naming the file (warnings.warn would add its own source line)
                print(f"warning: {e} Using video {(v + 1) % len(self.videos)} instead.", file=sys.stderr, flush=True)
        raise BadInput(f"{self.videos[idx]}: this and the next {tries - 1} videos all failed to load.")


# -----------------------------------------------------------------------------
# synthetic videos with object masks

def saturated_colour(hue):
    """RGB in [0, 255] of a bright colour on the hue circle (HSV with S=0.8, V=0.9)."""
    k = (np.array([5.0, 3.0, 1.0]) + 6.0 * hue) % 6.0
    return 255.0 * 0.9 * (1.0 - 0.8 * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0))


def synthetic_video(seed, n_frames=16, height=96, width=128, n_objects=2):
    """A small textured video with known objects: (frames uint8 [T,H,W,3], masks uint8 [T,H,W]): panning
    stripes behind textured ellipses, rectangles and blobs that move, rotate and breathe; id k+1 occludes id k,
    masks give each pixel's visible owner (0 = background). Deterministic in `seed` (numpy default_rng's)."""
    frames, masks = zip(*synthetic_frames(seed, n_frames, height, width, n_objects))
    return np.stack(frames), np.stack(masks)


def synthetic_frames(seed, n_frames=16, height=96, width=128, n_objects=2):
    """synthetic_video one (frame [H,W,3], mask [H,W]) at a time: the same values, memory independent of n_frames
    (every random choice is drawn up front, in synthetic_video's order, then each frame is rendered alone)."""
    if n_frames < 1 or height < 16 or width < 16 or not 1 <= n_objects <= 255:
        raise BadInput(f"synthetic video: need n_frames >= 1, height and width >= 16 and 1..255 objects, "
                       f"got {n_frames}, {height}x{width}, {n_objects}.")
    rng = np.random.default_rng(seed)
    # background: per channel a base value and three sine waves (angle, frequency, phase, amplitude) over panned
    # coordinates (a camera pan, pixels per frame along x and y)
    pan = rng.uniform(0.5, 1.5, 2) * rng.choice([-1.0, 1.0], 2)
    channels = [(rng.uniform(70, 180), [(rng.uniform(0, np.pi), rng.uniform(0.02, 0.07), rng.uniform(0, 2 * np.pi),
                                         rng.uniform(8, 20)) for _ in range(3)]) for _ in range(3)]
    hue0 = rng.uniform()
    objects = []
    for k in range(n_objects):
        o = dict(colour=saturated_colour((hue0 + k / n_objects) % 1.0))  # hues spread apart: distinct colours
        o["rx"], o["ry"] = min(height, width) * rng.uniform(0.12, 0.2, 2)  # half-axes in pixels
        # centre: c0 + amp·sin(2πt/period + phase), bounded for any video length and inside the frame
        o["c0"] = rng.uniform(0.35, 0.65, 2) * (width, height)
        o["amp"] = rng.uniform(0.08, 0.16, 2) * (width, height)
        o["period"], o["phase"] = rng.uniform(20, 40, 2), rng.uniform(0, 2 * np.pi, 2)
        o["theta"] = rng.uniform(0, 2 * np.pi), rng.uniform(-0.08, 0.08)  # angle at t = 0, slow rotation
        o["breath"] = rng.uniform(15, 30), rng.uniform(0, 2 * np.pi)  # period and phase of a 10% breathing
        o["shape"] = rng.integers(3)
        if o["shape"] == 2:
            o["lobes"], o["rim_phase"] = rng.integers(3, 6), rng.uniform(0, 2 * np.pi)
        o["wavelength"] = rng.uniform(4, 9)
        o["beta"] = rng.uniform(0, np.pi) if rng.uniform() < 0.5 else None  # stripes at an angle, or a checker
        objects.append(o)

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)  # [H,W]
    for ti in range(n_frames):
        t = np.full((1, 1), ti, dtype=np.float32)
        bx, by = x + pan[0] * t, y + pan[1] * t
        frame = np.empty((height, width, 3), dtype=np.float32)
        for c, (value, waves) in enumerate(channels):  # value + wave 1 + wave 2 + wave 3, in that order
            frame[..., c] = sum((amp * np.sin(2 * np.pi * freq * (np.cos(angle) * bx + np.sin(angle) * by) + phase)
                                 for angle, freq, phase, amp in waves), value)
        mask = np.zeros((height, width), dtype=np.uint8)
        for k, o in enumerate(objects):
            cx = o["c0"][0] + o["amp"][0] * np.sin(2 * np.pi * t / o["period"][0] + o["phase"][0])
            cy = o["c0"][1] + o["amp"][1] * np.sin(2 * np.pi * t / o["period"][1] + o["phase"][1])
            theta = o["theta"][0] + o["theta"][1] * t
            s = 1.0 + 0.1 * np.sin(2 * np.pi * t / o["breath"][0] + o["breath"][1])
            # object-body coordinates in pixels: the texture rotates and scales with the object
            u = (np.cos(theta) * (x - cx) + np.sin(theta) * (y - cy)) / s
            v = (-np.sin(theta) * (x - cx) + np.cos(theta) * (y - cy)) / s
            rx, ry = o["rx"], o["ry"]
            if o["shape"] == 0:  # ellipse
                inside = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
            elif o["shape"] == 1:  # rectangle
                inside = np.maximum(np.abs(u) / rx, np.abs(v) / ry) <= 1.0
            else:  # blob: an ellipse with a wavy rim
                rim = 1.0 + 0.25 * np.sin(o["lobes"] * np.arctan2(v, u) + o["rim_phase"])
                inside = np.sqrt((u / rx) ** 2 + (v / ry) ** 2) <= rim
            wavelength, beta = o["wavelength"], o["beta"]
            texture = (np.sin(2 * np.pi * u / wavelength) * np.sin(2 * np.pi * v / wavelength) if beta is None
                       else np.sin(2 * np.pi * (np.cos(beta) * u + np.sin(beta) * v) / wavelength))
            frame[inside] = o["colour"] * (0.7 + 0.3 * texture[inside])[:, None]
            mask[inside] = k + 1
        yield np.clip(frame + 0.5, 0, 255).astype(np.uint8), mask


def atomic(path, write):
    """write(tmp) under a temporary name in the same folder, then rename over `path`: no reader ever sees half a
    file, and a crash leaves none behind (train.py's log.jsonl, appended a record at a time, is not written so)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def prepare_root(root):
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise BadInput(f"{root}: exists and is not a folder.")
    return root


def write_synthetic_videos(root, n_videos=8, n_frames=16, height=96, width=128, seed=0):
    """Write synthetic videos as root/video_000/00000.jpg … (JPEG quality 95); returns the video folders."""
    root = prepare_root(root)
    if n_videos < 1:
        raise BadInput(f"synthetic videos: need at least 1 video, got {n_videos}.")
    folders = [root / f"video_{v:03d}" for v in range(n_videos)]
    for v, folder in enumerate(folders):
        for t, (frame, _) in enumerate(synthetic_frames((seed, 0, v), n_frames, height, width)):
            atomic(folder / f"{t:05d}.jpg", lambda tmp: Image.fromarray(frame).save(tmp, "JPEG", quality=95))
    return folders


def davis_palette():
    """The DAVIS / PASCAL VOC colour map as 768 ints (index 0 black, 1 (128,0,0), 2 (0,128,0), 3 (128,128,0), …):
    bits 0, 1, 2 of the index go to the top bit of R, G, B; bits 3, 4, 5 to the next bit; 6, 7 to the third."""
    return [sum(((index >> (3 * k + c)) & 1) << (7 - k) for k in range(3)) for index in range(256) for c in range(3)]


def make_davis(root, n_seqs=3, n_frames=12, height=96, width=128, seed=0):
    """Write and return a synthetic DAVIS-2017 folder: ImageSets/2017/val.txt, JPEGImages/480p/<seq>/00000.jpg …, and
    Annotations/480p/<seq>/00000.png … (DAVIS palette, pixel = object id); sequence s has 1 + s % 3 objects."""
    root = prepare_root(root)
    if n_seqs < 1:
        raise BadInput(f"synthetic DAVIS: need at least 1 sequence, got {n_seqs}.")
    palette = davis_palette()
    names = [f"synth-{s:03d}" for s in range(n_seqs)]
    for s, name in enumerate(names):
        image_dir, annotation_dir = (root / top / '480p' / name for top in ('JPEGImages', 'Annotations'))
        for t, (frame, mask) in enumerate(synthetic_frames((seed, 1, s), n_frames, height, width, 1 + s % 3)):
            atomic(image_dir / f"{t:05d}.jpg", lambda tmp: Image.fromarray(frame).save(tmp, "JPEG", quality=95))
            annotation = Image.frombytes('P', (width, height), mask.tobytes())
            annotation.putpalette(palette)
            atomic(annotation_dir / f"{t:05d}.png", lambda tmp: annotation.save(tmp, "PNG"))
    atomic(root / 'ImageSets' / '2017' / 'val.txt', lambda tmp: tmp.write_text(''.join(n + '\n' for n in names)))
    return root


# -----------------------------------------------------------------------------
# JHMDB: MATLAB v5 MAT-files and the dataset layout
# The format is MathWorks' "MAT-File Format" (v5/v6/v7): a 128-byte header, then data elements. Details checked
# against scipy/scipy scipy/io/matlab/_mio5.py and _mio5_utils.pyx (small data elements, padding, flags).

MI_MATRIX, MI_COMPRESSED = 14, 15
MI_DTYPES = {1: 'i1', 2: 'u1', 3: 'i2', 4: 'u2', 5: 'i4', 6: 'u4', 7: 'f4', 9: 'f8', 12: 'i8', 13: 'u8'}
MX_DTYPES = {6: 'f8', 7: 'f4', 8: 'i1', 9: 'u1', 10: 'i2', 11: 'u2', 12: 'i4', 13: 'u4', 14: 'i8', 15: 'u8'}
MAT_LOGICAL, MAT_COMPLEX = 0x200, 0x800  # array-flag bits (class in the low byte)


def mat_element(buf, p, order):
    """The data element at buf[p:]: (type, data bytes, position of the next element). A tag with non-zero upper 16
    bits is a small element (count << 16 | type, data in the next 4 bytes); else (type, count), data padded to 8."""
    if p + 8 > len(buf):
        raise ValueError("element tag past the end")
    word, count = struct.unpack_from(order + 'II', buf, p)
    if word >> 16:
        return word & 0xFFFF, buf[p + 4:p + 4 + (word >> 16)], p + 8
    if p + 8 + count > len(buf):
        raise ValueError("element data past the end")
    return word, buf[p + 8:p + 8 + count], p + 8 + count + (-count) % 8


def mat_matrix(buf, order):
    """(name, array) of one miMATRIX element's data; None for an empty element or a non-numeric class."""
    if not buf:
        return None
    _, flags, p = mat_element(buf, 0, order)
    flags = struct.unpack_from(order + 'I', flags)[0]
    if flags & 0xFF not in MX_DTYPES:
        return None
    _, dims, p = mat_element(buf, p, order)
    _, name, p = mat_element(buf, p, order)
    kind, real, p = mat_element(buf, p, order)
    # the stored type may be narrower than the class (MATLAB saves a double of small integers as miUINT8)
    values = np.frombuffer(real, order + MI_DTYPES[kind]).astype(MX_DTYPES[flags & 0xFF])
    if flags & MAT_COMPLEX:
        kind, imag, p = mat_element(buf, p, order)
        values = values + 1j * np.frombuffer(imag, order + MI_DTYPES[kind])
    if flags & MAT_LOGICAL:
        values = values != 0
    dims = tuple(int(d) for d in np.frombuffer(dims, order + 'i4'))
    # MATLAB stores arrays column-major: pos_img comes back (2, 15, T) as MATLAB shows it
    return name.decode('latin-1'), values.reshape(dims, order='F')


def read_mat(path):
    """The numeric variables of a MATLAB v5 MAT-file, compressed or not, either byte order, as {name: array}
    (MATLAB's shapes and classes); other classes are skipped. v7.3 (HDF5), truncated or non-MAT files: BadInput."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise BadInput(f"{path}: cannot read the MAT-file ({e.strerror or e}).") from e
    if raw.startswith(b'MATLAB 7.3') or raw[:8] == b'\x89HDF\r\n\x1a\n':
        raise BadInput(f"{path}: is a MATLAB v7.3 (HDF5) MAT-file, which is not supported; "
                       f"re-save it in MATLAB with save(..., '-v7').")
    if not raw.startswith(b'MATLAB 5.0 MAT-file'):
        raise BadInput(f"{path}: is not a MATLAB v5 MAT-file (no 'MATLAB 5.0 MAT-file' header).")
    if len(raw) < 128 or raw[126:128] not in (b'IM', b'MI'):
        raise BadInput(f"{path}: truncated or damaged MAT-file header.")
    order = '<' if raw[126:128] == b'IM' else '>'  # 'MI' written as a uint16 by the saving machine
    version = struct.unpack_from(order + 'H', raw, 124)[0]
    if version != 0x0100:
        raise BadInput(f"{path}: MAT-file version 0x{version:04x} is not supported (only v5, 0x0100).")
    arrays, p = {}, 128
    try:
        while p < len(raw):
            kind, body, _ = mat_element(raw, p, order)
            p += 8 + len(body)  # top-level elements are not padded (a compressed one has any length)
            if kind == MI_COMPRESSED:
                kind, body, _ = mat_element(zlib.decompress(body), 0, order)
            variable = mat_matrix(body, order) if kind == MI_MATRIX else None
            if variable is not None and variable[0]:  # a nameless one is MATLAB's subsystem data
                arrays[variable[0]] = variable[1]
    except (ValueError, KeyError, struct.error, zlib.error) as e:
        raise BadInput(f"{path}: truncated or damaged MAT-file (element at byte {p}: {e}).") from e
    return arrays


def numbered(paths, folder):
    """Files sorted by the number their name starts with, as CropMAE sorts frames and labels (int of the name up to
    its first dot; src/data/vos.py and jhmdb.py make_paths). A name that is not a number is refused."""
    try:
        return sorted(paths, key=lambda p: int(p.name.split('.')[0]))
    except ValueError:
        raise BadInput(f"{folder}: frame names must be numbers (00001.png …), found {sorted(paths)[0].name}.")


def png_frames(folder):
    """The .png frames of a JHMDB video folder sorted by number (CropMAE data/jhmdb.py make_paths); [] if none."""
    try:
        names = [n for n in os.listdir(folder) if n.lower().endswith('.png')]
    except OSError:
        return []
    return numbered([Path(folder) / n for n in names], folder)


def jhmdb_video(mat, frames_dir, source):
    """(name "<action>/<video>", frame paths, pos_img (2, 15, T) float64), checked; source names the list."""
    frames_dir, mat = Path(frames_dir), Path(mat)
    frames = png_frames(frames_dir)
    if not frames:
        raise BadInput(f"{source}: the frames folder {frames_dir} is missing or holds no .png frames.")
    if not mat.is_file():
        raise BadInput(f"{source}: the joint positions file {mat} is missing.")
    arrays = read_mat(mat)
    if 'pos_img' not in arrays:
        raise BadInput(f"{mat}: has no numeric pos_img variable (found {sorted(arrays) or 'none'}).")
    pos = arrays['pos_img'].astype(np.float64)
    if pos.ndim == 2:
        pos = pos[..., None]  # MATLAB drops a trailing singleton: a one-frame video
    if pos.ndim != 3 or pos.shape[:2] != (2, 15):
        raise BadInput(f"{mat}: pos_img has shape {pos.shape}, expected (2, 15, T).")
    if pos.shape[2] > len(frames):
        # CropMAE's eval_pck.py indexes the predictions by the GT frame index: more annotations than frames fails
        raise BadInput(f"{mat}: annotates {pos.shape[2]} frames but {frames_dir} holds only {len(frames)}.")
    return f"{frames_dir.parent.name}/{frames_dir.name}", frames, pos


def read_jhmdb(path, split=1, list_order=None):
    """The JHMDB test videos, checked: [(name "<action>/<video>", frames sorted by number, pos_img)]. `path`: the root
    (videos marked 2 in splits/*_test_split<split>.txt), or a list of "<mat> <frames dir>" (CropMAE jhmdb_vallist.txt)
    or "<frames dir> <mat>" lines (ajabri/videowalk code/data/jhmdb.py); list_order None: the '.mat' column decides.
    Relative list paths: from the current folder, else from the list's folder."""
    path = Path(path)
    videos = []
    if path.is_dir():
        split_files = sorted((path / 'splits').glob(f"*_test_split{split}.txt"))
        if not split_files:
            raise BadInput(f"{path}: no splits/*_test_split{split}.txt files (is this the JHMDB root?).")
        for split_file in split_files:
            action = split_file.name[:-len(f"_test_split{split}.txt")]
            for n, line in enumerate(split_file.read_text().splitlines(), 1):
                fields = line.split()
                if fields and (len(fields) != 2 or fields[1] not in ('1', '2')):
                    raise BadInput(f"{split_file}: line {n} is not '<video>.avi 1|2': {line.strip()!r}.")
                if fields[1:] != ['2']:  # a blank line, or a training video (1)
                    continue
                video = fields[0].removesuffix('.avi')
                frames_dir = path / 'Rename_Images' / action / video
                mat = path / 'joint_positions' / action / video / 'joint_positions.mat'
                if not frames_dir.is_dir():
                    raise BadInput(f"{split_file}: names video {video}, but {frames_dir} is missing.")
                videos.append(jhmdb_video(mat, frames_dir, split_file))
    elif path.is_file():
        if list_order not in (None, 'mat-first', 'frames-first'):
            raise BadInput(f"JHMDB list order must be 'mat-first' or 'frames-first', got {list_order!r}.")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise BadInput(f"{path}: line {n} is not '<mat> <frames dir>': {line.strip()!r}.")
            order = list_order or ('mat-first' if fields[0].endswith('.mat') else
                                   'frames-first' if fields[1].endswith('.mat') else None)
            if order is None:
                raise BadInput(f"{path}: line {n} names no .mat file: {line.strip()!r}.")
            mat, frames_dir = [Path(f) if Path(f).is_absolute() or Path(f).exists() else path.parent / f
                               for f in (fields if order == 'mat-first' else fields[::-1])]
            videos.append(jhmdb_video(mat, frames_dir, f"{path} line {n}"))
    else:
        raise BadInput(f"{path}: no such JHMDB folder or list file.")
    if not videos:
        raise BadInput(f"{path}: lists no test videos" + (f" for split {split}." if path.is_dir() else "."))
    return videos


# results written whole or not at all (atomic)

def write_csv(path, header, rows):
    """pandas' to_csv(index=False, float_format="%.3f"), as evaluation_method.py writes it (NaN -> empty)."""
    cell = lambda v: v if isinstance(v, str) else ("" if np.isnan(v) else "%.3f" % v)
    text = "".join(",".join(map(cell, r)) + "\n" for r in [header] + rows)
    atomic(path, lambda tmp: Path(tmp).write_text(text))


def save_npy(path, array):
    with open(path, "wb") as f:  # a file object: np.save would add ".npy" to the temporary name
        np.save(f, array)


def write_json(path, obj):
    """JSON with NaN (a class or joint never seen) written as null, as strict parsers need."""
    clean = lambda o: {k: clean(v) for k, v in o.items()} if isinstance(o, dict) else \
        [clean(v) for v in o] if isinstance(o, list) else None if isinstance(o, float) and math.isnan(o) else o
    atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(clean(obj), indent=1, allow_nan=False) + "\n"))


# frame 0's JHMDB labels: alexandre-eymael/CropMAE downstreams/propagation/src/data/jhmdb.py

def draw_labelmap(h, w, x, y, sigma=0.5):
    """float64 [h, w]: one joint's Gaussian (peak 1) at grid point (x, y) by CropMAE data/jhmdb.py draw_labelmap_np:
    a (6σ+1)² kernel centred on its cell size//2, top-left at (int(x - 3σ), int(y - 3σ)) (int() truncates toward
    zero), clipped to the grid. σ = 0.5: a 4x4 kernel, offsets -2..+1, peak at round-half-up(x) for x >= 1.5."""
    out = np.zeros((h, w))
    left, top = int(x - 3 * sigma), int(y - 3 * sigma)
    right, bottom = int(x + 3 * sigma + 1), int(y + 3 * sigma + 1)  # exclusive
    if left >= w or top >= h or right < 0 or bottom < 0:
        return out
    size = 6 * sigma + 1
    k = np.arange(0, size, 1.0)
    g = np.exp(-((k[None] - size // 2) ** 2 + (k[:, None] - size // 2) ** 2) / (2 * sigma ** 2))
    # the grid window and the part of the kernel that lands in it
    x0, x1, y0, y1 = max(0, left), min(right, w), max(0, top), min(bottom, h)
    out[y0:y1, x0:x1] = g[y0 - top:y1 - top, x0 - left:x1 - left]
    return out


def jhmdb_labels(pos_xy, W0, H0, grid=(20, 20), size=(320, 320), patch=16, sigma=0.5):
    """float32 [16, grid h, grid w] from frame 0's joints pos_xy [15, 2] (0-based pixels of the W0 x H0 frame):
    channel 0 = 1 where no joint map is non-zero, then a Gaussian per joint at x * (size W / W0) / patch, likewise
    y (CropMAE data/jhmdb.py JhmdbSet.__getitem__ stretches the frame to `size`; no half-cell offset)."""
    pos_xy = np.asarray(pos_xy, dtype=np.float64)
    gx = pos_xy[:, 0] * size[1] / W0 / patch
    gy = pos_xy[:, 1] * size[0] / H0 / patch
    joints = np.stack([draw_labelmap(grid[0], grid[1], x, y, sigma) for x, y in zip(gx, gy)])
    return np.concatenate([(joints.sum(0) == 0)[None], joints]).astype(np.float32)  # channel 0: background


# -----------------------------------------------------------------------------
# DAVIS-2017 and VIP: the evaluation sets, checked before anything is written

VIP_CLASSES = ["background", "hat", "hair", "sun-glasses", "upper-clothes", "dress", "coat", "socks", "pants",
               "gloves", "scarf", "skirt", "torso-skin", "face", "right-arm", "left-arm", "right-leg", "left-leg",
               "right-shoe", "left-shoe"]  # HCPLab-SYSU/ATEN evaluate/test_parsing.py: ids 0..19


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


def read_davis(davis, scoring=True):
    """Check a DAVIS-2017 folder: [(seq, frames, annotations, first annotation)]. Propagation needs equal-size frames
    and DINO's Annotations/480p/<seq>/<first>.png; scoring needs every frame's (as davis2017-evaluation). Fully
    annotated sets are scored, first-frame-only ones (test-dev) refused when `scoring`; anything between, refused."""
    davis = Path(davis)
    listing = davis / "ImageSets" / "2017" / "val.txt"
    if not listing.is_file():
        raise BadInput(f"{listing}: missing, so {davis} is not a DAVIS-2017 folder")
    names = [s.strip() for s in listing.read_text().splitlines() if s.strip()]
    if not names:
        raise BadInput(f"{listing}: lists no sequences")
    out, missing, later = [], [], 0
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
        missing += [a for a in (first.parent / (f.stem + ".png") for f in frames[1:]) if not a.is_file()]
        later += len(frames) - 1
        out.append((seq, frames, anns, first))
    if missing and len(missing) < later:
        shown = ", ".join(str(m.relative_to(davis)) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise BadInput(f"{davis}: {len(missing)} of {later} annotations after the first frames are missing ({shown}); "
                       f"give every frame its annotation to score, or only the first frames' to propagate unscored")
    if scoring and missing:
        raise BadInput(f"{davis}: ground truth for the first frames only, cannot score")
    return out


def read_vip(path):
    """Check a VIP set: [(video, frames, labels, first label)]. path: VIP_Fine (Images/videos<N>/*.jpg,
    Annotations/Category_ids/videos<N>/*.png, lists/val_videos.txt) or a CropMAE vip_vallist.txt of `<images dir>
    <labels dir>` lines (relative to the current folder). Labels: same name and size, ids 0..19 (255 after frame 0)."""
    path, listing = Path(path), Path(path) / "lists" / "val_videos.txt"
    if path.is_file():
        pairs = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                if len(line.split()) != 2:
                    raise BadInput(f"{path}: line {i} is not '<images dir> <labels dir>'")
                pairs.append(tuple(map(Path, line.split())))
    else:
        if not listing.is_file():
            raise BadInput(f"{listing}: missing, so {path} is neither a VIP_Fine folder nor a list file")
        pairs = [(path / "Images" / v, path / "Annotations" / "Category_ids" / v)
                 for v in (line.split()[0] for line in listing.read_text().splitlines() if line.strip())]
    if not pairs:
        raise BadInput(f"{path}: lists no videos")
    out = []
    for images, labels in pairs:
        for folder, what in ((images, "frames"), (labels, "labels")):
            if not folder.is_dir():
                where = f"{path} (paths relative to the current folder)" if path.is_file() else listing
                raise BadInput(f"{folder}: no such folder, so no {what} for {images.name} of {where}")
        frames = numbered([f for f in images.iterdir() if is_frame(f.name)], images)
        anns = numbered(list(labels.glob("*.png")), labels)
        if not frames or not anns:
            raise BadInput(f"{images if not frames else labels}: no {'frames' if not frames else 'labels'}")
        if [f.stem for f in frames] != [a.stem for a in anns]:
            odd = sorted({f.stem for f in frames} ^ {a.stem for a in anns})
            raise BadInput(f"{labels}: {len(anns)} labels for {len(frames)} frames of {images}, unpaired: "
                           f"{', '.join(odd[:5])}")
        for t, (f, a) in enumerate(zip(frames, anns)):
            ids = read_ids(a, "label")
            if image_size(f) != ids.shape:
                raise BadInput(f"{a}: label is {ids.shape[1]}x{ids.shape[0]}, its frame {f.name} is "
                               f"{image_size(f)[1]}x{image_size(f)[0]}")
            # the metric ignores pixels outside 0..19 (255: void); frame 0's labels are propagated, so they must
            # all be parts there (CropMAE would propagate 255 as a class, then abort scoring it)
            bad = ids[(ids >= len(VIP_CLASSES)) & ((ids != 255) | (t == 0))]
            if bad.size:
                raise BadInput(f"{a}: part id {bad.max()}, VIP has ids 0..{len(VIP_CLASSES) - 1}"
                               f"{' (255, void, is ignored after the first frame)' if t == 0 else ''}")
        out.append((images.name, frames, anns, anns[0]))
    return out


# The sets behind the paper's Table 1: the lists of T-CoRe, the authors' previous paper, whose pipeline the paper
# runs (yafeng19/T-CORE downstreams/propagation/davis_vallist_480_880.txt, vip_vallist.txt, jhmdb_vallist.txt).
# JHMDB's 268 "<action>/<video>" names are too long to keep: their count and the sha1 of the sorted names, one a line.
PAPER_SETS = {
    "davis": ("30 DAVIS-2017 val sequences", (
        "bike-packing blackswan bmx-trees breakdance camel car-roundabout car-shadow cows dance-twirl dog dogs-jump "
        "drift-chicane drift-straight goat gold-fish horsejump-high india judo kite-surf lab-coat libby loading "
        "mbike-trick motocross-jump paragliding-launch parkour pigs scooter-black shooting soapbox").split()),
    "vip": ("50 VIP validation videos", [f"videos{n}" for n in (
        "338 311 233 361 37 208 344 333 350 400 113 84 297 359 368 190 189 247 268 133 175 117 380 329 168 198 285 "
        "151 174 370 136 404 91 154 40 226 270 299 129 294 234 95 376 182 8 12 75 184 102 141").split()]),
    "jhmdb": ("268 JHMDB split-1 test videos", (268, "5609283fa467523ffb7bb462dc41dd1c1bf0b837"))}


def describe(task, plan):
    """A plan (read_davis/read_vip/read_jhmdb) for summary.json: counts, frame sizes, a fingerprint (sha1 of sorted
    names with annotation byte sizes or JHMDB joints) and whether it is the paper's set (`note`: how not)."""
    names = sorted(p[0] for p in plan)
    firsts = [read_ids(p[3], "first-frame annotation") for p in plan] if task != "jhmdb" else []
    sizes = dict(Counter("{1}x{0}".format(*image_size(p[1][0])) for p in plan))
    items = sorted(f"{p[0]} " + (hashlib.sha1(p[2].tobytes()).hexdigest() if task == "jhmdb" else
                                 " ".join(str(a.stat().st_size) for a in p[2])) for p in plan)
    out = {"videos": len(plan), "frames": sum(len(p[1]) for p in plan), "resolution": sizes,
           "fingerprint": hashlib.sha1("\n".join(items).encode()).hexdigest()[:12]}
    if task == "davis":
        out["objects"] = sum(int(np.where(a == 255, 0, a).max()) for a in firsts)
    elif task == "vip":
        out["parts"] = len(set(np.unique(np.concatenate([a.ravel() for a in firsts])).tolist()) - {0})
    else:
        out["joints"] = 15
    what, ref = PAPER_SETS[task]
    if task == "jhmdb":
        same = (len(names), hashlib.sha1("\n".join(names).encode()).hexdigest()) == ref
        note = f"{len(names)} JHMDB videos, not the paper's {what} (not the same names)"
    else:
        missing, extra = sorted(set(ref) - set(names)), sorted(set(names) - set(ref))
        same = not missing and not extra
        shown = lambda v: ", ".join(v[:5]) + (", ..." if len(v) > 5 else "")
        note = f"none of the paper's {what}; instead {shown(extra)}" if len(missing) == len(ref) else \
            f"{len(ref) - len(missing)} of the paper's {what}" + (f"; missing: {shown(missing)}" if missing else "") \
            + (f"; {len(extra)} not among them: {shown(extra)}" if extra else "")
    out["paper_set"], out["note"] = same, None if same else note
    if task == "davis" and set(sizes) == {"880x480"}:  # CropMAE's DAVIS_480_880 copy, resized with PIL NEAREST
        out["note"] = "; ".join(filter(None, [out["note"], "a copy pre-resized to 880x480: read and scored at 880x480, "
                                              "not at DAVIS's 480p"]))
    return out


# -----------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description="Write synthetic data for Co-Settle: training videos or a DAVIS "
                                     "set (VIP and JHMDB sets: python test_cosettle.py --make-vip/--make-jhmdb).")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument('--make-davis', metavar='DIR', help='write a synthetic DAVIS-2017 folder')
    target.add_argument('--make-videos', metavar='DIR', help='write synthetic training videos (frame folders)')
    parser.add_argument('--seqs', type=positive(), default=3, help='DAVIS sequences')
    parser.add_argument('--videos', type=positive(), default=8, help='training videos')
    parser.add_argument('--frames', type=positive(), help='frames per video (default 12 DAVIS, 16 videos)')
    parser.add_argument('--height', type=at_least(16), default=96)
    parser.add_argument('--width', type=at_least(16), default=128)
    parser.add_argument('--seed', type=at_least(0), default=0)
    args = parser.parse_args(argv)
    davis = bool(args.make_davis)
    refuse_unused(parser, args, '--make-davis' if davis else '--make-videos',
                  {'make_davis', 'make_videos', 'frames', 'height', 'width', 'seed', 'seqs' if davis else 'videos'})
    n_frames, size = args.frames or (12 if davis else 16), f"{args.height}x{args.width}"
    try:
        if davis:
            root = make_davis(args.make_davis, args.seqs, n_frames, args.height, args.width, args.seed)
            print(f"wrote {args.seqs} synthetic DAVIS-2017 sequences ({n_frames} frames, {size}) to {root}")
        else:
            folders = write_synthetic_videos(args.make_videos, args.videos, n_frames, args.height, args.width,
                                             args.seed)
            print(f"wrote {len(folders)} synthetic videos ({n_frames} frames, {size}) to {args.make_videos}")
    except (BadInput, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
