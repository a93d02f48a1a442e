"""Tests for Co-Settle-ref: data.py, cosettle.py, train.py, eval_davis.py (tiny models; on whatever device the code
picks, CPU or CUDA; ~2 minutes on 2 CPUs).

Every claim the code makes about the paper and the official code is checked against an independent computation
written here, never against the code under test:
- data: the official pair-sampling rule exhaustively, crop statistics, every PIL mode, shifted textures, PNG/MAT
  files built by hand, the device-side resize against Pillow's own Image.resize;
- method: the official cycle-loss formulation (Eq. 2, official_cycle_loss here, also the --bench-loss yardstick)
  with 2x2 pooling by avg_pool2d, KL by hand and by F.kl_div (Eq. 3), the fused kernel against the eager one;
- ViT + loader: one explicit float64 ViT forward (`explicit_forward`) read from each family's native tensors
  (`timm_params`, `clip_params`), OpenAI CLIP's own modules, the authors' '+ Ours' files with ST_adapter's block;
- training: an uninterrupted run (resume is bit-equal), one process (DDP is equal), an untrained projection;
- evaluation: slow per-pixel loops of davis2017-evaluation, DINO's dense loop, CropMAE's padded CRW propagation
  and its DAVIS path end to end, VIP and JHMDB metrics worked by hand, the trade-off metrics against a
  transcription of the official cal_metric.py;
- CLIs: one table of bad inputs per script: exit 2, one sentence naming the flag or file, nothing written.
"""
import argparse
import contextlib
import copy
import functools
import io
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import warnings
import zlib
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import cosettle
import data
import eval_davis as ed
import train
from cosettle import BadInput, Projection, build_vit, infer_arch, load_encoder
from data import davis_palette, make_davis, synthetic_video

REPO = Path(__file__).resolve().parent
MEAN, STD = np.array(cosettle.IMAGENET_MEAN), np.array(cosettle.IMAGENET_STD)
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CLIP_STATS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
TOL = 1e-4

# OpenAI ships CLIP as TorchScript, so the fixture and the loader use torch.jit, deprecated in recent torch
pytestmark = [pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:'torch.load' received a zip file that looks like a TorchScript")]


@pytest.fixture(autouse=True)
def _one_thread_and_signals():
    """One intra-op thread (these tensors are tiny: on a busy 2-core box two OpenMP threads are ~10x slower, not
    faster), and SIGTERM/SIGINT handlers put back after each test (train() installs its own and keeps them)."""
    threads = torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for s, h in handlers.items():
        signal.signal(s, h)


# =============================================================================
# shared helpers

def write_video(folder, frames, suffix='.png'):
    """Write uint8 frames (H×W×3 or H×W) as folder/00000<suffix> …; returns the file paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for t, frame in enumerate(frames):
        path = folder / f"{t:05d}{suffix}"
        Image.fromarray(np.asarray(frame, dtype=np.uint8)).save(path, quality=95)
        paths.append(path)
    return paths


class Pairs(data.FramePairs):
    """FramePairs whose items are the two frames as the training step has them before normalising: collated and
    resampled (data.resample, on the CPU) to uint8 [3, size, size]."""

    def __getitem__(self, idx):
        batch = data.collate_crops([super().__getitem__(idx)])
        return tuple(data.resample(*crops)[0].to(torch.uint8) for crops in batch)


def pairs(videos, size, **kw):
    """Pairs at the paper's clip gap."""
    return Pairs(videos, size=size, clip_gap=cosettle.CLIP_GAP, **kw)


def noise_frame(seed, height=48, width=64):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape, std=1.0):
    return torch.randn(*shape, generator=g) * std


def unit(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=dtype), dim=-1)


def images(H, W, B=2, seed=1):
    return torch.randn(B, 3, H, W, generator=_gen(seed))


def assert_rel_close(actual, expected, rel):
    """max |a - e| <= rel * max |e| (relative error in the max norm)."""
    scale = expected.abs().max().item()
    err = (actual - expected).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3e} > {rel:g} x {scale:.3e}"


def assert_tokens(ours, ref, tol=TOL):
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert ours.dtype == torch.float32
    err = (ours.double() - ref.double()).abs().max().item()
    assert err < tol, f"max abs difference {err:.2e} >= {tol}"


def run(main, argv, capsys=None):
    """main(argv) in-process -> (exit code, stdout, stderr), whether it returns its code or raises SystemExit."""
    try:
        code = main([str(a) for a in argv]) or 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


def check_error(code, err, *needles, argparse_error=False, warnings_ok=False):
    """The one way every script refuses input: exit 2, no traceback, and one line on stderr starting 'error: '
    (argparse: its usage, then its own error line last; `warnings_ok`: 'warning:' lines may come before) that
    holds every needle (a string, a compiled pattern, or a tuple of alternatives). -> that line."""
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not (warnings_ok and line.startswith("warning:"))]
    if argparse_error:
        line = lines[-1]
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), err
        line = lines[0]
    for needle in needles:
        if isinstance(needle, re.Pattern):
            assert needle.search(line), (needle, line)
        else:
            assert any(str(n) in line for n in (needle if isinstance(needle, tuple) else [needle])), (needle, line)
    return line


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# =============================================================================
# data.py: videos, frame pairs, crops, files, synthetic sets

def test_find_videos_layouts(tmp_path):
    write_video(tmp_path / 'b_class' / 'vid2', [noise_frame(0, 8, 8)] * 3, '.jpg')
    write_video(tmp_path / 'a_class' / 'vid9', [noise_frame(0, 8, 8)] * 2, '.JPG')  # suffix case ignored
    write_video(tmp_path / 'a_class' / 'vid1', [noise_frame(0, 8, 8)] * 2, '.png')
    (tmp_path / 'a_class' / 'vid1' / 'notes.txt').write_text('not a frame')
    (tmp_path / 'a_class' / 'readme.md').write_text('class folders hold no frames')
    videos = data.find_videos(tmp_path)
    assert videos == [tmp_path / 'a_class' / 'vid1', tmp_path / 'a_class' / 'vid9', tmp_path / 'b_class' / 'vid2']
    assert [p.name for p in data.list_frames(videos[1])] == ['00000.JPG', '00001.JPG']
    assert [p.name for p in data.list_frames(videos[0])] == ['00000.png', '00001.png']
    flat = tmp_path / 'flat'  # flat layout, and a video folder on its own
    for name in ['v10', 'v02', 'v01']:
        write_video(flat / name, [noise_frame(0, 8, 8)] * 4, '.jpeg')
    assert [v.name for v in data.find_videos(flat)] == ['v01', 'v02', 'v10']
    assert data.find_videos(flat / 'v02') == [flat / 'v02']
    txt = flat / 'train.txt'  # a .txt list: comments, blank lines, relative to the list or absolute
    txt.write_text(f"# header comment\n\nv10\n  {tmp_path / 'a_class' / 'vid1'}  \n")
    assert data.find_videos(txt) == sorted([flat / 'v10', tmp_path / 'a_class' / 'vid1'])


def test_find_videos_skips_short_folders_with_one_warning(tmp_path, capsys):
    write_video(tmp_path / 'good1', [noise_frame(0, 8, 8)] * 2)
    write_video(tmp_path / 'good2', [noise_frame(0, 8, 8)] * 5)
    write_video(tmp_path / 'one_a', [noise_frame(0, 8, 8)])
    write_video(tmp_path / 'one_b', [noise_frame(0, 8, 8)])
    assert [v.name for v in data.find_videos(tmp_path)] == ['good1', 'good2']
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'skipped 2 of 4' in err[0]

    txt = tmp_path / 'list.txt'  # a listed folder that does not exist counts as skipped
    txt.write_text('good1\nmissing\none_a\n')
    assert [v.name for v in data.find_videos(txt)] == ['good1']
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'skipped 2 of 3' in err[0]
    with pytest.raises(BadInput, match='no video folder with at least 2 frames'):
        data.find_videos(tmp_path / 'one_a')  # nothing left after skipping


def _write(tmp, name, text):
    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp / name).write_text(text)
    return tmp / name


@pytest.mark.parametrize("make, says", [
    (lambda tmp: tmp / 'nope', 'nope'),
    (lambda tmp: _write(tmp, 'empty/sub/a.txt', 'x').parent.parent, 'no folders with frames'),
    (lambda tmp: _write(tmp, 'only_comments.txt', '# nothing\n\n'), 'only_comments.txt'),
    (lambda tmp: _write(tmp, 'videos.csv', 'a\n'), 'videos.csv'),
], ids=["missing", "no frames", "comments only", "csv"])
def test_find_videos_errors_name_the_path(tmp_path, make, says):
    with pytest.raises(BadInput, match=says):
        data.find_videos(make(tmp_path))


def test_sample_pair_follows_the_official_rule_exhaustively():
    for n in range(2, 41):
        g = int(0.15 * n)
        rng = random.Random(n)
        drawn = [data.sample_pair(n, 0.15, rng) for _ in range(3000)]
        if n <= 4 or g < 1:  # official fallback: two independent uniform frames, ties and any order allowed
            assert n <= 6
            assert set(drawn) == {(a, b) for a in range(n) for b in range(n)}
        else:
            assert g >= 1 and all(j - i == g for i, j in drawn)
            # 0-based i in {1, ..., n-g-1}: frame 0 is never first, the last frame can be second
            assert {i for i, _ in drawn} == set(range(1, n - g))
            assert max(j for _, j in drawn) == n - 1
    assert int(0.15 * 20) == 3  # a 2-fps Kinetics clip of 20 frames: frames 1..16 paired with 4..19
    assert {data.sample_pair(20, 0.15, random.Random(s)) for s in range(2000)} == {(i, i + 3) for i in range(1, 17)}
    # a --clip-gap the clip cannot hold falls back to two random frames; train.py accepts (0, 1) only
    rng = random.Random(0)
    for n, gap in [(5, 0.8), (10, 0.9), (20, 0.95)]:
        for _ in range(200):
            i, j = data.sample_pair(n, gap, rng)
            assert 0 <= i < n and 0 <= j < n
    assert train.parse_args(["--clip-gap", "0.5"]).clip_gap == 0.5
    with pytest.raises(SystemExit):
        train.parse_args(["--clip-gap", "1.5"])


def test_random_resized_crop_box_statistics():
    rng = random.Random(0)
    fractions, ratios = [], []
    for _ in range(5000):
        left, top, w, h = data.random_resized_crop_box(224, 224, rng)
        assert 0 <= left and left + w <= 224 and 0 <= top and top + h <= 224 and w >= 1 and h >= 1
        fractions.append(w * h / 224 ** 2)
        ratios.append(w / h)
    fractions, ratios = np.array(fractions), np.array(ratios)
    assert fractions.min() >= 0.5 - 0.01 and fractions.max() <= 1.0
    assert ratios.min() >= 3 / 4 - 0.01 and ratios.max() <= 4 / 3 + 0.01
    assert 0.70 < fractions.mean() < 0.78  # uniform(0.5, 1) pulled down a little by the clamp to the image
    assert abs(np.log(ratios).mean()) < 0.01  # log-uniform ratio: symmetric around 1
    assert 0.05 < (ratios > 1.2).mean() < 0.3 and 0.05 < (ratios < 1 / 1.2).mean() < 0.3
    # non-square images: still always inside
    for _ in range(2000):
        left, top, w, h = data.random_resized_crop_box(340, 256, rng)
        assert 0 <= left and left + w <= 340 and 0 <= top and top + h <= 256
    # degenerate ranges give exactly the whole image; the same rng state gives the same box
    assert data.random_resized_crop_box(100, 100, rng, scale=(1, 1), ratio=(1, 1)) == (0, 0, 100, 100)
    assert data.random_resized_crop_box(224, 224, random.Random(5)) == \
        data.random_resized_crop_box(224, 224, random.Random(5))


def test_load_rgb_every_mode(tmp_path):
    Image.new('L', (4, 3), 100).save(tmp_path / 'l.png')
    Image.new('LA', (4, 3), (200, 0)).save(tmp_path / 'la.png')
    Image.new('RGBA', (4, 3), (10, 20, 30, 0)).save(tmp_path / 'rgba.png')
    Image.new('CMYK', (4, 3), (0, 255, 255, 0)).save(tmp_path / 'cmyk.jpg', quality=100)
    p = Image.new('P', (4, 3), 1)
    p.putpalette([0, 0, 0, 250, 5, 7] + [0] * 762)
    p.save(tmp_path / 'p.png', transparency=bytes([255, 128]))  # per-index alpha, stored as bytes
    Image.fromarray(np.array([[32768, 65535], [0, 256]], dtype=np.uint16)).save(tmp_path / 'i16.png')
    assert Image.open(tmp_path / 'i16.png').mode == 'I;16'

    def px(name):
        img = data.load_rgb(tmp_path / name)
        assert img.mode == 'RGB'
        return np.asarray(img)

    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no PIL palette-transparency warning either
        assert (px('l.png') == 100).all()
        assert (px('la.png') == 200).all()
        assert (px('rgba.png') == [10, 20, 30]).all()  # alpha dropped, colour kept (no compositing)
        assert np.abs(px('cmyk.jpg').astype(int) - [255, 0, 0]).max() <= 3  # cyan-free, magenta+yellow = red
        assert (px('p.png') == [250, 5, 7]).all()
        assert px('i16.png')[..., 0].tolist() == [[128, 255], [0, 1]]  # 16 -> 8 bits, not clipped


def test_load_rgb_corrupt_files_and_draft(tmp_path):
    good = tmp_path / 'good.jpg'
    Image.fromarray(noise_frame(0, 64, 64)).save(good, quality=95)
    raw = good.read_bytes()
    (tmp_path / 'cut.jpg').write_bytes(raw[:len(raw) // 2])
    (tmp_path / 'junk.jpg').write_bytes(b'not an image at all')
    for name in ['cut.jpg', 'junk.jpg', 'absent.jpg']:
        with pytest.raises(BadInput, match=name):
            data.load_rgb(tmp_path / name)
    path = tmp_path / 'big.jpg'  # draft mode downscales large JPEGs only as far as needed
    Image.fromarray(noise_frame(1, 768, 1024)).save(path, quality=90)
    assert data.load_rgb(path).size == (1024, 768)
    assert data.load_rgb(path, (100, 100)).size == (256, 192)  # 1/8 would give 96 rows < 100: 1/4 it is
    assert data.load_rgb(path, (600, 300)).size == (1024, 768)  # no reduction keeps 600 columns


def test_normalise_batch_numbers():
    white, black = torch.full((3, 4, 5), 255, dtype=torch.uint8), torch.zeros((3, 4, 5), dtype=torch.uint8)
    x = data.normalise_batch(torch.stack([white, black]))
    assert x.dtype == torch.float32
    assert np.allclose(x[0, :, 0, 0].numpy(), [2.2489083, 2.4285715, 2.64], atol=1e-5)  # (1 - mean) / std
    assert np.allclose(x[1, :, 2, 3].numpy(), -MEAN / STD, atol=1e-5)
    clip_white = data.normalise_batch(white, *CLIP_STATS)[:, 3, 4].numpy()  # the family-native option
    assert np.allclose(clip_white, (1 - np.array(CLIP_STATS[0])) / CLIP_STATS[1], atol=1e-5)


def normalising_loader(ds, idx):
    """The loader before the crop-resize moved to the device, the reference: item idx of FramePairs `ds` drawn as ds
    draws it, each frame JPEG-drafted, PIL bicubic box-resized, flipped and normalised in float32 numpy in the
    worker -> (the two frames [3, size, size], their DCT draft scales)."""
    folder, S = ds.videos[idx], ds.size
    names = data.frame_names(folder)
    i, j, (left, top, w, h), flip = ds.draw(idx, len(names))
    frames, scales = [], []
    for t in (i, j):
        with Image.open(folder / names[t]) as img:
            width = img.width
            img.draft('RGB', (math.ceil(S / w), math.ceil(S / h)))
            img = img.convert('RGB')
        x = img.resize((S, S), Image.BICUBIC, box=(left * img.width, top * img.height, (left + w) * img.width,
                                                   (top + h) * img.height))
        x = np.asarray(x.transpose(Image.FLIP_LEFT_RIGHT) if flip else x, dtype=np.float32)
        frames.append(((x / 255.0 - MEAN.astype(np.float32)) / STD.astype(np.float32)).transpose(2, 0, 1))
        scales.append(width // img.width)
    return frames, scales


def test_frame_pairs_equal_the_normalising_loader_at_real_sizes(tmp_path):
    """FramePairs ships the crop window and its resize weights, and the step resamples and normalises, against the
    loader that did it all in the worker (normalising_loader), on 340x256 JPEGs (Kinetics frames: never drafted)
    and 1280x720 ones (drafted), through collate_crops and model_input. float32 rounding may move a pixel a level."""
    drafted, diffs = [], []
    big = write_video(tmp_path / "big", [noise_frame(9, 1000, 1000)] * 2, '.png')[0].parent  # its crops pad ours
    big = data.FramePairs([big], size=224, clip_gap=cosettle.CLIP_GAP)[0]
    for H, W in [(256, 340), (720, 1280)]:
        frames = [Image.fromarray(noise_frame(t, H // 8, W // 8)).resize((W, H), Image.BICUBIC) for t in range(8)]
        folder = write_video(tmp_path / f"{W}", frames, '.jpg')[0].parent
        ds = data.FramePairs([folder], size=224, clip_gap=cosettle.CLIP_GAP, seed=3)
        for epoch in range(8):
            ds.set_epoch(epoch)
            rng = random.Random(f"3-{epoch}-0")  # the draws, as the normalising loader made them
            i, j = data.sample_pair(8, cosettle.CLIP_GAP, rng)
            left, top, w, h = (v / 224 for v in data.random_resized_crop_box(224, 224, rng))
            assert ds.draw(0, 8) == (i, j, (left, top, w, h), rng.random() < 0.5)
            batch = data.collate_crops([ds[0], big])
            assert batch[0][0].shape[-1] > ds[0][0][0].shape[-1]  # ds[0]'s crop was padded
            refs, scales = normalising_loader(ds, 0)
            for k, (ref, s) in enumerate(zip(refs, scales)):
                x = data.model_input(batch[k], "cpu")
                # the DCT scale: the smallest whose crop still covers 224 x 224
                assert s == 1 or (w * W / s >= 224 and h * H / s >= 224)
                assert s == 8 or w * W / (2 * s) < 224 or h * H / (2 * s) < 224
                drafted.append(s > 1)
                diffs.append((x[0].numpy() - ref) * STD[:, None, None] * 255)  # in levels
    assert not any(drafted[:16]) and any(drafted[16:])
    diffs = np.abs(np.stack(diffs))
    assert diffs.max() < 1 + 1e-3 and (diffs < 1e-3).mean() > 0.9999


def test_resample_is_pillows_bicubic_box_resize():
    """bicubic_weights + resample in float64 give Pillow's Image.resize(BICUBIC, box) bit for bit: down- and
    upscaling, fractional boxes, whole frames, odd sizes, with the flip folded into wx."""
    rng = np.random.default_rng(0)
    for trial in range(40):
        H, W = [(256, 340), (720, 1280), (31, 47)][trial % 3]
        img = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        left, top = rng.uniform(0, 0.5) * W, rng.uniform(0, 0.5) * H
        box = (0, 0, W, H) if trial % 5 == 0 else (left, top, left + rng.uniform(0.1, 0.5) * W,
                                                  top + rng.uniform(0.1, 0.5) * H)
        S = (224, 17)[trial % 2]
        ref = img.resize((S, S), Image.BICUBIC, box=box)
        ref = np.asarray(ref.transpose(Image.FLIP_LEFT_RIGHT) if trial % 4 == 1 else ref).transpose(2, 0, 1)
        x0, m, *wx = data.bicubic_weights(W, box[0], box[2], S)
        y0, n, *wy = data.bicubic_weights(H, box[1], box[3], S)
        wx = [v.flip(0) for v in wx] if trial % 4 == 1 else wx
        crop = torch.from_numpy(np.asarray(img)[y0:y0 + n, x0:x0 + m].transpose(2, 0, 1).copy())
        out = data.resample(crop[None], *((f[None], k[None].double()) for f, k in (wy, wx)))[0]
        assert np.array_equal(out.numpy(), ref), trial


def test_frame_pairs_same_crop_and_flip_on_both_frames(tmp_path):
    # identical frames: any difference in crop or flip would show
    frame = noise_frame(3, 40, 56)
    videos = [p.parent for p in (write_video(tmp_path / f"v{k}", [frame] * 8)[0] for k in range(3))]
    ds = pairs(videos, size=24)
    for epoch in range(6):
        ds.set_epoch(epoch)
        for idx in range(3):
            x1, x2 = ds[idx]
            assert x1.shape == (3, 24, 24) and torch.equal(x1, x2)

    # a left-to-right ramp: flipped outputs fall from left to right, about half of them
    ramp = np.repeat(np.repeat(np.linspace(0, 255, 64)[None, :, None], 48, 0), 3, 2)
    ds = pairs([write_video(tmp_path / 'ramp', [ramp] * 5)[0].parent], size=16)
    flips = []
    for epoch in range(40):
        ds.set_epoch(epoch)
        x1, x2 = ds[0]
        falling = (x1[0, :, -1] < x1[0, :, 0]).all().item()
        assert falling == ds.draw(0, 5)[3]
        assert falling == (x2[0, :, -1] < x2[0, :, 0]).all().item()
        flips.append(falling)
    assert 8 <= sum(flips) <= 32
    # white frames stay white, as uint8
    write_video(tmp_path / 'white', [np.full((30, 40, 3), 255)] * 6, '.jpg')
    x1, x2 = pairs([tmp_path / 'white'], size=16)[0]
    assert x1.shape == x2.shape == (3, 16, 16) and x1.dtype == torch.uint8 and (x1 == 255).all()


def test_frame_pairs_shifted_frames_move_by_the_expected_amount(tmp_path):
    # frame k shows a smooth texture moved right by k·d pixels, so frames i -> j move (j - i)·d pixels;
    # in the output that is (j - i)·d·size / crop_width pixels, to the left when flipped
    H, W, n, d, size = 48, 64, 8, 5, 48
    big = np.random.default_rng(0).random((H // 4, (W + (n - 1) * d) // 4, 3))
    big = np.asarray(Image.fromarray((big * 255).astype(np.uint8)).resize(((W + (n - 1) * d), H), Image.BICUBIC))
    frames = [big[:, (n - 1 - k) * d:(n - 1 - k) * d + W] for k in range(n)]
    ds = pairs([write_video(tmp_path / 'v', frames)[0].parent], size=size)
    for epoch in range(12):
        ds.set_epoch(epoch)
        i, j, box, flip = ds.draw(0, n)
        assert j - i == int(0.15 * n) == 1
        expected = (j - i) * d * size / (box[2] * W) * (-1 if flip else 1)
        x1, x2 = (x.float().numpy() for x in ds[0])
        m = 14  # ignore the margins where new content enters
        errors = {s: np.abs(x2[:, :, m:-m] - x1[:, :, m - s:size - m - s]).mean() for s in range(-13, 14)}
        best = min(errors, key=errors.get)
        assert abs(best - expected) <= 1, (epoch, best, expected)
        assert errors[best] < 0.5 * errors[0]


def test_frame_pairs_deterministic_in_seed_epoch_idx(tmp_path):
    videos = [write_video(tmp_path / f"v{k}", [noise_frame(10 * k + t) for t in range(10)])[0].parent
              for k in range(4)]
    ds = pairs(videos, size=20, seed=7)
    first = [ds[idx] for idx in range(4)]
    again = pairs(videos, size=20, seed=7)
    for idx in range(4):
        assert all(torch.equal(a, b) for a, b in zip(first[idx], again[idx]))
    ds.set_epoch(1)
    assert sum(not torch.equal(first[idx][0], ds[idx][0]) for idx in range(4)) >= 3
    other_seed = pairs(videos, size=20, seed=8)
    assert sum(not torch.equal(first[idx][0], other_seed[idx][0]) for idx in range(4)) >= 3

    # the same items whatever the number of DataLoader workers
    def collect(workers):
        loader = torch.utils.data.DataLoader(pairs(videos, size=20, seed=7), batch_size=2, num_workers=workers)
        return torch.cat([x1 for x1, _ in loader])

    assert torch.equal(collect(0), collect(2))
    assert len(ds) == 4 and len(list(ds)) == 4  # plain iteration stops at the end
    with pytest.raises(IndexError):
        ds[4]
    assert torch.equal(collect(0), torch.stack([x1 for x1, _ in first]))


def test_frame_pairs_decodes_only_the_two_sampled_frames(tmp_path, monkeypatch):
    paths = write_video(tmp_path / 'v', [noise_frame(t, 16, 16) for t in range(20)], '.jpg')
    opened = []
    real_load_rgb = data.load_rgb

    def counting_load_rgb(path, *args, **kwargs):
        opened.append(Path(path))
        return real_load_rgb(path, *args, **kwargs)

    monkeypatch.setattr(data, 'load_rgb', counting_load_rgb)
    ds = pairs([tmp_path / 'v'], size=16)
    for epoch in range(5):
        ds.set_epoch(epoch)
        opened.clear()
        ds[0]
        i, j, _, _ = ds.draw(0, 20)
        assert opened == [paths[i], paths[j]] and j - i == 3


def test_frame_pairs_corrupt_frames_warn_and_fall_back(tmp_path, capsys):
    bad = write_video(tmp_path / 'a_bad', [noise_frame(t, 32, 32) for t in range(6)], '.jpg')
    for path in bad:
        path.write_bytes(path.read_bytes()[:300])  # truncated JPEGs
    write_video(tmp_path / 'b_good', [noise_frame(t, 32, 32) for t in range(6)], '.jpg')
    ds = pairs(data.find_videos(tmp_path), size=16)
    x1, x2 = ds[0]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith('warning: ') and 'a_bad' in err[0]  # one line naming the file
    assert x1.dtype == torch.uint8 and x1.shape == (3, 16, 16)
    good1, good2 = ds[1]
    assert torch.equal(x1, good1) and torch.equal(x2, good2)  # the fallback is video 1's own sample

    only_bad = pairs([tmp_path / 'a_bad', tmp_path / 'gone'], size=16)
    with pytest.raises(BadInput, match='a_bad'):
        only_bad[0]


def test_synthetic_video_deterministic_moving_textured_objects():
    frames, masks = data.synthetic_video(3, n_frames=16, height=96, width=128, n_objects=2)
    assert frames.shape == (16, 96, 128, 3) and frames.dtype == np.uint8
    assert masks.shape == (16, 96, 128) and masks.dtype == np.uint8
    same_frames, same_masks = data.synthetic_video(3, n_frames=16, height=96, width=128, n_objects=2)
    assert np.array_equal(frames, same_frames) and np.array_equal(masks, same_masks)
    assert not np.array_equal(frames, data.synthetic_video(4)[0])

    assert set(np.unique(masks)) == {0, 1, 2}
    f3, m3 = data.synthetic_video(5, n_frames=8, n_objects=3)
    assert set(np.unique(m3)) == {0, 1, 2, 3}
    for t in range(16):
        for k in (1, 2):
            area = (masks[t] == k).mean()
            assert 0.005 < area < 0.3  # visible in every frame, never the whole frame
    assert frames.reshape(16, -1, 3).std(axis=1).min() > 10  # textured, not flat

    def centroid(t, k):
        ys, xs = np.nonzero(masks[t] == k)
        return np.array([xs.mean(), ys.mean()])

    for k in (1, 2):
        assert np.linalg.norm(centroid(0, k) - centroid(15, k)) > 3  # objects move
        steps = [np.linalg.norm(centroid(t + 1, k) - centroid(t, k)) for t in range(15)]
        assert max(steps) < 10  # smoothly
    # the background pans: background pixels drift further from frame 0 as time goes on
    def background_change(t):
        background = (masks[0] == 0) & (masks[t] == 0)
        return np.abs(frames[t].astype(int) - frames[0].astype(int))[background].mean()

    assert 0.5 < background_change(1) < background_change(4) < background_change(8) and background_change(8) > 5
    # objects have their own colour: mean colour inside each mask differs from the other object's
    colour = [frames[0][masks[0] == k].mean(axis=0) for k in (1, 2)]
    assert np.abs(colour[0] - colour[1]).max() > 30


def test_synthetic_data_is_written_frame_by_frame(tmp_path):
    """make_davis's peak memory does not grow with the frame count (it did, ~40 MB per 480p frame), and
    the frames are bit for bit those of before the change (checksums taken from the whole-video version)."""
    import hashlib
    import tracemalloc
    peaks = []
    for n in (3, 18):
        tracemalloc.start()
        make_davis(tmp_path / f"d{n}", n_seqs=1, n_frames=n, height=96, width=128)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 1.3 * peaks[0], peaks
    for args, digest in [(((0, 1, 0), 12, 96, 128, 1), "1795edf1b534c6e42699e13440803961801e0c0c"),
                         ((7, 40, 64, 80, 2), "a2e6c1adc1628c4c6b1b0341e7839981c0485d8f")]:
        frames, masks = synthetic_video(*args)
        assert hashlib.sha1(frames.tobytes() + masks.tobytes()).hexdigest() == digest


def test_write_synthetic_videos_is_found_and_loads(tmp_path):
    folders = data.write_synthetic_videos(tmp_path, n_videos=3, n_frames=8, height=32, width=40, seed=1)
    assert folders == [tmp_path / f"video_{v:03d}" for v in range(3)]
    assert data.find_videos(tmp_path) == folders
    assert [p.name for p in data.list_frames(folders[0])] == [f"{t:05d}.jpg" for t in range(8)]
    assert Image.open(folders[0] / '00000.jpg').size == (40, 32)
    assert not list(tmp_path.rglob('*.tmp'))
    x1, x2 = pairs(folders, size=16)[2]  # 8 frames: gap int(1.2) = 1, two different frames
    assert x1.shape == (3, 16, 16) and not torch.equal(x1, x2)


def test_davis_palette_is_the_voc_colour_map():
    palette = data.davis_palette()
    assert len(palette) == 768 and all(0 <= c <= 255 for c in palette)
    colour = [tuple(palette[3 * i:3 * i + 3]) for i in range(256)]
    assert colour[:9] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128),
                          (0, 128, 128), (128, 128, 128), (64, 0, 0)]
    assert colour[255] == (224, 224, 192)  # the VOC "void" colour
    assert len(set(colour)) == 256


def test_make_davis_layout_and_cli(tmp_path, capsys):
    root = data.make_davis(tmp_path / 'davis', n_seqs=3, n_frames=5, height=32, width=48, seed=2)
    assert root == tmp_path / 'davis'
    names = (root / 'ImageSets' / '2017' / 'val.txt').read_text().splitlines()
    assert names == ['synth-000', 'synth-001', 'synth-002']
    for s, name in enumerate(names):
        images = sorted((root / 'JPEGImages' / '480p' / name).iterdir())
        annotations = sorted((root / 'Annotations' / '480p' / name).iterdir())
        assert [p.name for p in images] == [f"{t:05d}.jpg" for t in range(5)]
        assert [p.name for p in annotations] == [f"{t:05d}.png" for t in range(5)]
        _, masks = data.synthetic_video((2, 1, s), 5, 32, 48, n_objects=1 + s % 3)
        for t, path in enumerate(annotations):
            annotation = Image.open(path)
            assert annotation.mode == 'P' and annotation.size == (48, 32)
            assert annotation.getpalette()[:12] == [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0]
            assert np.array_equal(np.asarray(annotation), masks[t])
        assert set(np.unique(np.asarray(Image.open(annotations[0])))) == set(range(2 + s % 3))
        assert Image.open(images[0]).mode == 'RGB' and Image.open(images[0]).size == (48, 32)
    assert not list(root.rglob('*.tmp'))
    assert data.main(['--make-davis', str(tmp_path / 'd'), '--seqs', '2', '--frames', '3', '--height', '24',
                      '--width', '32']) == 0
    assert 'wrote 2 synthetic DAVIS-2017 sequences' in capsys.readouterr().out
    assert len(list((tmp_path / 'd' / 'Annotations' / '480p' / 'synth-001').iterdir())) == 3
    assert data.main(['--make-videos', str(tmp_path / 'v'), '--videos', '2', '--frames', '4']) == 0
    assert len(data.find_videos(tmp_path / 'v')) == 2


# =============================================================================
# cosettle.py, the method: PEA, the cycle loss (Eq. 2), the separability loss (Eq. 3), the objective, projection

def pos_grid(pos):  # [1, s*s, D] -> [D, s, s]
    _, n, D = pos.shape
    s = math.isqrt(n)
    return pos[0].reshape(s, s, D).permute(2, 0, 1)


@pytest.mark.parametrize("ratio", [10.0, 1.0])
def test_pea_is_a_window_of_the_bicubic_upsample(ratio):
    pos = torch.randn(1, 196, 16, generator=_gen(0))
    up_side = int((1 + ratio) * 14)
    up = F.interpolate(pos_grid(pos).double()[None], size=(up_side, up_side), mode="bicubic",
                       align_corners=False)[0]
    starts = up_side - 14 + 1  # where a 14 x 14 window can start, in each direction
    offsets = []
    for seed in range(6):
        out = cosettle.shifted_pos_embed(pos, ratio, _gen(seed))
        assert out.shape == pos.shape
        window = pos_grid(out).double()
        corner = ((up[:, :starts, :starts] - window[:, :1, :1]) ** 2).sum(0)  # the window found by its corner
        i, j = divmod(int(corner.argmin()), starts)
        torch.testing.assert_close(window, up[:, i:i + 14, j:j + 14], rtol=0, atol=1e-5)
        offsets.append((i, j))
        assert torch.equal(cosettle.shifted_pos_embed(pos, ratio, _gen(seed)), out)  # same seed, same window
    assert len(set(offsets)) >= 4  # different generators, different windows
    assert any(o != (0, 0) for o in offsets)
    torch.testing.assert_close(cosettle.shifted_pos_embed(pos, 0.0, _gen(5)), pos, rtol=0, atol=1e-6)  # ratio 0


def grid_pool(p):
    """2x2 average pooling of row-major grid tokens [B, s*s, D] via avg_pool2d (independent of pool_tokens)."""
    B, n, D = p.shape
    s = math.isqrt(n)
    return F.avg_pool2d(p.transpose(1, 2).reshape(B, D, s, s), 2).flatten(2).transpose(1, 2)


def official_cycle_loss(p1, p2, p1b, temp=0.03):
    """Eq. 2 as the official code computes it (yafeng19/Co-Settle engine_pretrain.py): M = A A~ on 2x2-pooled
    tokens, then the cross-entropy of log(M + 1e-6) with the identity over the B n rows; eager, the yardstick."""
    q1, q2, q1b = grid_pool(p1), grid_pool(p2), grid_pool(p1b)
    B, n, _ = q1.shape
    M = torch.softmax(q1 @ q2.transpose(1, 2) / temp, -1) @ torch.softmax(q2 @ q1b.transpose(1, 2) / temp, -1)
    return F.cross_entropy(torch.log(M + 1e-6).reshape(B * n, n), torch.arange(n, device=M.device).repeat(B))


def official_objective(h, z, temp=0.03, lambda_reg=3.0):
    """Eq. 4 as the official code computes it: the cycle loss above plus F.kl_div(..., 'batchmean')."""
    p, z = F.normalize(h, dim=-1), F.normalize(z, dim=-1)
    reg = F.kl_div(torch.log_softmax(p, -1), torch.softmax(z, -1), reduction="batchmean")
    return official_cycle_loss(*p.chunk(3, dim=1), temp) + lambda_reg * reg


def orthonormal_tokens(B, D, seed):
    """[B, 196, D] tokens whose 2x2-pooled 7x7 grid is 49 orthonormal vectors (each repeated over its 2x2 cell)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(B):
        q, _ = torch.linalg.qr(torch.randn(D, 49, generator=g, dtype=torch.float64))  # columns orthonormal
        cells = q.T.reshape(7, 7, D)
        out.append(cells.repeat_interleave(2, 0).repeat_interleave(2, 1).reshape(196, D))
    return torch.stack(out)


def _noisy(p, scale, seed):
    return F.normalize(p + scale * unit(*p.shape, seed=seed), dim=-1)


CYCLE_CASES = {  # name: (p1, p2, p1b) builder, relative tolerance, gradient atol (0: compare gradients), check
    "chance": (lambda: [unit(6, 196, 16, seed=s) for s in (0, 1, 2)], 1e-9, 0.0,
               lambda loss, acc, sim: acc < 0.15 and loss > math.log(49) * 0.5),  # chance is 1/49
    # p1 = p2 = p1b with 49 orthonormal pooled tokens: M is the identity to ~1e-13, loss ~ 49e-6 - 1e-6
    "perfect": (lambda: [orthonormal_tokens(3, 64, seed=0)] * 3, 1e-9, 1e-12,
                lambda loss, acc, sim: acc == 1.0 and sim > 0.999
                and loss == pytest.approx(math.log1p(49e-6) - math.log1p(1e-6), rel=1e-6)),
    "near perfect": (lambda: (lambda p1: [p1, _noisy(p1, 0.1, 1), p1.clone()])(unit(3, 196, 64, seed=0)), 1e-6,
                     0.0, lambda loss, acc, sim: acc > 0.9 and sim > 0.5 and loss < 0.5),
    "batch of one, correlated": (lambda: (lambda p1: [p1, _noisy(p1, 0.3, 1), _noisy(p1, 0.3, 2)])(
        unit(1, 196, 32, seed=0)), 1e-9, 0.0, lambda loss, acc, sim: acc > 0.5),  # well above chance
}


@pytest.mark.parametrize("case", list(CYCLE_CASES))
def test_cycle_loss_equals_the_official_formulation(case):
    build, rel, grad_atol, expected = CYCLE_CASES[case]
    p1, p2, p1b = build()
    leaves = [p.detach().clone().requires_grad_() for p in (p1, p2, p1b)]
    loss, acc, sim = cosettle.cycle_loss(*leaves)
    loss.backward()
    ref_leaves = [p.detach().clone().requires_grad_() for p in (p1, p2, p1b)]
    ref = official_cycle_loss(*ref_leaves)
    ref.backward()
    assert_rel_close(loss.detach(), ref.detach(), rel)
    for a, b in zip(leaves, ref_leaves):
        if grad_atol:  # gradients at float64 noise level: both must be ~0
            assert a.grad.abs().max() < grad_atol and b.grad.abs().max() < grad_atol
        else:
            assert_rel_close(a.grad, b.grad, rel)
    # accuracy and sim_identity read off the full M
    q1, q2, q1b = grid_pool(p1), grid_pool(p2), grid_pool(p1b)
    M = torch.softmax(q1 @ q2.transpose(1, 2) / 0.03, -1) @ torch.softmax(q2 @ q1b.transpose(1, 2) / 0.03, -1)
    B, n, _ = M.shape
    assert acc.item() == pytest.approx(np.mean([int(torch.argmax(M[b, i])) == i for b in range(B) for i in range(n)]),
                                       abs=1e-6)
    eye = torch.eye(n, dtype=M.dtype).expand(B, n, n)
    assert sim.item() == pytest.approx(F.cosine_similarity(M.flatten(), eye.flatten(), dim=0).item(), rel=1e-6)
    assert expected(loss.item(), acc.item(), sim.item()), (loss.item(), acc.item(), sim.item())


def test_cycle_loss_float32_accuracy_one_and_pooling():
    p1, p2, p1b = (unit(4, 196, 32, seed=s) for s in (3, 4, 5))
    p2 = F.normalize(p1 + 0.5 * p2, dim=-1)
    loss32, _, _ = cosettle.cycle_loss(p1.float(), p2.float(), p1b.float())
    assert_rel_close(loss32.double(), official_cycle_loss(p1, p2, p1b), 1e-5)
    t = orthonormal_tokens(2, 64, seed=1).float()  # distinct orthonormal pooled tokens: accuracy 1
    assert cosettle.cycle_loss(t, t, t)[1].item() == 1.0
    p = unit(3, 196, 8, seed=9)
    torch.testing.assert_close(cosettle.pool_tokens(p), grid_pool(p), rtol=0, atol=1e-12)


@pytest.mark.parametrize("tokens", [197, 225, 224])
def test_cycle_loss_names_what_it_expects(tokens):
    """197 (CLS kept), 15x15 (odd side), 14x16 (not square): a sentence, not a view error."""
    p = unit(1, tokens, 8, seed=0, dtype=torch.float32)
    with pytest.raises(ValueError, match=f"{tokens} tokens per frame are not an even square grid"):
        cosettle.cycle_loss(p, p, p)
    p = unit(1, 196, 8, seed=0, dtype=torch.float32)
    assert torch.isfinite(cosettle.cycle_loss(p, p, p)[0])


def test_separability_loss_by_hand_and_as_kl_div_batchmean():
    rng = np.random.default_rng(0)
    B = 2
    p, z = rng.normal(size=(B, 3, 4)), rng.normal(size=(B, 3, 4))

    def kl(a, b):  # KL(softmax(a) || softmax(b)), summed over every token, divided by B
        sa, sb = (np.exp(v) / np.exp(v).sum(-1, keepdims=True) for v in (a, b))
        return (sa * (np.log(sa) - np.log(sb))).sum() / B

    ours = cosettle.separability_loss(torch.from_numpy(p), torch.from_numpy(z)).item()
    assert ours == pytest.approx(kl(z, p), rel=1e-12)  # KL(softmax(z) || softmax(p)): the code's direction
    assert abs(ours - kl(p, z)) > 1e-3  # not the paper's written direction
    swapped = cosettle.separability_loss(torch.from_numpy(z), torch.from_numpy(p)).item()
    assert swapped == pytest.approx(kl(p, z), rel=1e-12)
    p, z = unit(3, 3 * 16, 32, seed=0), unit(3, 3 * 16, 32, seed=1)
    expected = F.kl_div(torch.log_softmax(p, -1), torch.softmax(z, -1), reduction="batchmean")
    assert cosettle.separability_loss(p, z).item() == pytest.approx(expected.item(), rel=1e-10)
    assert abs(cosettle.separability_loss(z, p).item() - expected.item()) > 1e-6 * expected.item()
    assert abs(cosettle.separability_loss(p, p).item()) < 1e-12


def test_objective_is_cycle_plus_lambda_kl():
    g = _gen(2)
    h, z = (torch.randn(2, 3 * 196, 16, generator=g, dtype=torch.float64) for _ in range(2))
    loss, cyc, reg, acc, sim = cosettle.objective(h, z, temp=0.05, lambda_reg=2.5)
    p, zn = F.normalize(h, dim=-1), F.normalize(z, dim=-1)
    ref_cyc = official_cycle_loss(*p.chunk(3, dim=1), temp=0.05)
    ref_reg = F.kl_div(torch.log_softmax(p, -1), torch.softmax(zn, -1), reduction="batchmean")
    assert cyc.item() == pytest.approx(ref_cyc.item(), rel=1e-6)
    assert reg.item() == pytest.approx(ref_reg.item(), rel=1e-6)  # objective computes in float32
    assert loss.item() == pytest.approx(ref_cyc.item() + 2.5 * ref_reg.item(), rel=1e-6)


def test_fused_objective_equals_eager():
    fused = cosettle.fuse(cosettle.objective, (2, 3 * 16, 32))  # the shape it sees: compiled once, quietly
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(2, 3 * 16, 32, generator=g)  # 4x4 grid per stream
    z = torch.randn(2, 3 * 16, 32, generator=g)
    outs, grads = [], []
    for fn in (cosettle.objective, fused):
        h = h0.clone().requires_grad_()
        out = fn(h, z)
        out[0].backward()
        outs.append([o.detach() for o in out])
        grads.append(h.grad)
    for eager, compiled in zip(*outs):
        assert_rel_close(compiled, eager, 1e-5)
    assert_rel_close(grads[1], grads[0], 1e-5)
    assert grads[0].abs().max() > 0


def test_quiet_compile_is_local_and_precise():
    """Importing cosettle installs no warnings filter; while fuse() compiles, only cpp_extension's
    "No CUDA runtime is found" record is dropped, and after it the logger is as before."""
    assert not any("_prims_common" in str(f[1] and f[1].pattern) for f in warnings.filters)
    log, seen = logging.getLogger("torch.utils.cpp_extension"), []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log.addHandler(handler)
    try:
        with cosettle.quiet_compile():
            log.warning("No CUDA runtime is found, using CUDA_HOME='/inside'")
            log.warning("something else")
        log.warning("No CUDA runtime is found, using CUDA_HOME='/after'")
    finally:
        log.removeHandler(handler)
    assert seen == ["something else", "No CUDA runtime is found, using CUDA_HOME='/after'"]


def test_projection_structure_and_size():
    D = 768
    proj = cosettle.Projection(D)
    assert sum(p.numel() for p in proj.parameters()) == D * D + D + 2 * D == 592_128  # 0.59M
    assert isinstance(proj.linear, nn.Linear) and isinstance(proj.norm, nn.LayerNorm)
    assert proj.norm.eps == 1e-5 and proj.norm.elementwise_affine
    assert torch.count_nonzero(proj.linear.bias) == 0
    assert 0.018 < proj.linear.weight.std().item() < 0.022  # trunc_normal std 0.02
    small = cosettle.Projection(32)
    with torch.no_grad():
        for prm in small.parameters():
            prm.add_(torch.randn(prm.shape, generator=torch.Generator().manual_seed(prm.numel())))
    z = torch.randn(4, 10, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tanh(z @ small.linear.weight.T + small.linear.bias)
    mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    expected = (y - mu) / torch.sqrt(var + 1e-5) * small.norm.weight + small.norm.bias
    torch.testing.assert_close(small(z), expected, rtol=0, atol=1e-5)


def test_only_projection_trains(built):
    model = cosettle.CoSettle(load_encoder(str(built("dino_bare").path)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"projection.linear.weight", "projection.linear.bias", "projection.norm.weight",
                         "projection.norm.bias"}
    model.train()
    assert model.projection.training and not model.encoder.training
    assert not any(m.training for m in model.encoder.modules())
    out = model(images(64, 64, seed=0), images(64, 64, seed=2), generator=_gen(0))
    assert set(out) == {"loss", "cycle", "reg", "accuracy", "sim_identity"}
    out["loss"].backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.projection.parameters())


# =============================================================================
# cosettle.py, the ViT and its loader: one native checkpoint per family (eight families), compared with one
# explicit forward written here from the raw native tensors in float64, without any of cosettle's modules:
# patches by reshape + matmul, attention by q k^T * scale -> softmax -> v, LayerNorm, GELU and QuickGELU by
# formula. Each family's tensors are read by a small extractor (`timm_params`, `clip_params`) that knows that
# family's key names, so the loader's renaming is checked, not reused.

BLOCK_PARTS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
               "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")


def timm_backbone(D, depth, patch=16, grid=4, cls=True, registers=0, layerscale=False, seed=0, pos=None):
    """A DINO/timm-named ViT state dict with O(1) activations (so attention is far from uniform)."""
    g = _gen(seed)
    sd = OrderedDict()
    sd["cls_token"] = _randn(g, 1, 1, D, std=0.5)
    sd["pos_embed"] = _randn(g, 1, int(cls) + grid * grid, D, std=0.5) if pos is None else pos
    if not cls:
        del sd["cls_token"]
    if registers:
        sd["register_tokens"] = _randn(g, 1, registers, D, std=0.5)
    if layerscale:
        sd["mask_token"] = torch.zeros(1, D)
    sd["patch_embed.proj.weight"] = _randn(g, D, 3, patch, patch, std=(3 * patch * patch) ** -0.5)
    sd["patch_embed.proj.bias"] = _randn(g, D, std=0.1)
    H = 4 * D
    shapes = {"norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D), "attn.qkv.bias": (3 * D,),
              "attn.proj.weight": (D, D), "attn.proj.bias": (D,), "ls1.gamma": (D,), "norm2.weight": (D,),
              "norm2.bias": (D,), "mlp.fc1.weight": (H, D), "mlp.fc1.bias": (H,), "mlp.fc2.weight": (D, H),
              "mlp.fc2.bias": (D,), "ls2.gamma": (D,)}
    for i in range(depth):
        for part, shape in shapes.items():
            if part.startswith("ls") and not layerscale:
                continue
            norm_weight = part.startswith("norm") and part.endswith("weight")  # about 1, std 0.2
            std = 0.7 if part.startswith("ls") else 0.2 if norm_weight else 0.1 if len(shape) == 1 else shape[1] ** -0.5
            sd[f"blocks.{i}.{part}"] = int(norm_weight) + _randn(g, *shape, std=std)
    sd["norm.weight"] = 1 + _randn(g, D, std=0.2)
    sd["norm.bias"] = _randn(g, D, std=0.1)
    return sd


def prefixed(sd, prefix):
    return OrderedDict((prefix + k, v) for k, v in sd.items())


def mae_sincos(D, grid, cls=True):
    """MAE util/pos_embed.py get_2d_sincos_pos_embed (numpy, w first), CLS row zeros; [1, cls+grid^2, D]."""
    def one_d(dim, pos):
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    g = np.arange(grid, dtype=np.float32)
    mesh = np.stack(np.meshgrid(g, g), axis=0).reshape(2, 1, grid, grid)  # grid_w first, as MAE's
    emb = np.concatenate([one_d(D // 2, mesh[0]), one_d(D // 2, mesh[1])], axis=1)
    if cls:
        emb = np.concatenate([np.zeros([1, D]), emb], axis=0)
    return torch.from_numpy(emb).float()[None]


def moco_sincos(D, grid, temperature=10000.0):
    """MoCo v3 vit_moco.py build_2d_sincos_position_embedding, CLS row zeros; [1, 1+grid^2, D]."""
    grid_w, grid_h = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                    indexing="ij")
    pos_dim = D // 4
    omega = 1.0 / temperature ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim)
    out_w = torch.einsum("m,d->md", grid_w.flatten(), omega)
    out_h = torch.einsum("m,d->md", grid_h.flatten(), omega)
    pos = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)[None]
    return torch.cat([torch.zeros(1, 1, D), pos], dim=1)


def dino_head_keys(prefix, D, g, out=65):
    """DINOHead keys: mlp (Linear, GELU, ...), last_layer with weight norm (weight_g, weight_v)."""
    return OrderedDict([(prefix + "mlp.0.weight", _randn(g, 32, D)), (prefix + "mlp.0.bias", _randn(g, 32)),
                        (prefix + "mlp.2.weight", _randn(g, 16, 32)), (prefix + "mlp.2.bias", _randn(g, 16)),
                        (prefix + "last_layer.weight_g", torch.ones(out, 1)),
                        (prefix + "last_layer.weight_v", _randn(g, out, 16))])


def moco_head(prefix, D, g, hid=32, out=16):
    """MoCo v3 projector/predictor: Linear, BatchNorm1d, ReLU, Linear, BatchNorm1d(affine=False)."""
    sd = OrderedDict([(prefix + "0.weight", _randn(g, hid, D))])
    for j, n, affine in ((1, hid, True), (4, out, False)):
        if affine:
            sd[f"{prefix}{j}.weight"], sd[f"{prefix}{j}.bias"] = torch.ones(n), torch.zeros(n)
        sd[f"{prefix}{j}.running_mean"], sd[f"{prefix}{j}.running_var"] = _randn(g, n), torch.ones(n)
        sd[f"{prefix}{j}.num_batches_tracked"] = torch.tensor(7)
    sd[prefix + "3.weight"] = _randn(g, out, hid)
    return sd


def timm_params(sd, prefix="", registers=False, layerscale=False, cls=True, chunk=None):
    """Read the backbone of a timm/DINO-named state dict (under `prefix`) into the explicit forward's parameters.
    chunk(i) gives DINOv2's block_chunks index of block i (keys blocks.<chunk>.<i>.*)."""
    def get(k):
        return sd[prefix + k].detach().double()

    D = sd[prefix + "patch_embed.proj.weight"].shape[0]
    pos = get("pos_embed")[0]
    depth = 1 + max(int(k[len(prefix):].split(".")[2 if chunk else 1]) for k in sd
                    if k.startswith(prefix + "blocks."))
    blocks = []
    for i in range(depth):
        b = f"blocks.{chunk(i)}.{i}." if chunk else f"blocks.{i}."
        blk = {part: get(b + part) for part in BLOCK_PARTS}
        blk["ls1"] = get(b + "ls1.gamma") if layerscale else torch.ones(D, dtype=torch.float64)
        blk["ls2"] = get(b + "ls2.gamma") if layerscale else torch.ones(D, dtype=torch.float64)
        blocks.append(blk)
    return dict(conv_w=get("patch_embed.proj.weight"), conv_b=get("patch_embed.proj.bias"),
                cls=get("cls_token")[0] if cls else None, pos_cls=pos[:1] if cls else None,
                pos=pos[1:] if cls else pos, reg=get("register_tokens")[0] if registers else None,
                ln_pre=None, blocks=blocks, norm=(get("norm.weight"), get("norm.bias")))


CLIP_PARTS = dict(zip(BLOCK_PARTS, ("ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
                                     "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
                                     "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")))


def clip_params(sd):
    """Read OpenAI CLIP's visual tower (visual.conv1, class_embedding, positional_embedding, ln_pre,
    transformer.resblocks.i.{ln_1, attn.in_proj_*, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}, ln_post)."""
    def get(k):
        return sd["visual." + k].detach().double()

    depth = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("visual.transformer.resblocks."))
    ones = torch.ones(sd["visual.ln_pre.weight"].shape[0], dtype=torch.float64)
    blocks = [{**{part: get(f"transformer.resblocks.{i}.{name}") for part, name in CLIP_PARTS.items()},
               "ls1": ones, "ls2": ones} for i in range(depth)]
    pos = get("positional_embedding")
    return dict(conv_w=get("conv1.weight"), conv_b=None, cls=get("class_embedding")[None], pos_cls=pos[:1],
                pos=pos[1:], reg=None, ln_pre=(get("ln_pre.weight"), get("ln_pre.bias")), blocks=blocks,
                norm=(get("ln_post.weight"), get("ln_post.bias")))


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


ACTS = {"gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))),
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}


def explicit_forward(P, x, heads, eps=1e-6, act="gelu", patch_pos=None, naive_resize=False):
    """Patch tokens after the final norm, computed from the parameters P in float64.

    patch_pos ([1 or B, N, D] on the stored grid) replaces P['pos'] (the PEA stream). A grid other than the
    stored one is reached with DINO's rule: bicubic, scale_factor (rows + 0.1) / grid ("a small number to avoid
    floating point error"); naive_resize=True resizes to the size instead (what a naive port would do: only used
    to show that the tests can tell the two apart)."""
    x = x.double()
    B, _, H, W = x.shape
    D, _, p, _ = P["conv_w"].shape
    h, w = H // p, W // p
    patches = x.reshape(B, 3, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, 3 * p * p)
    t = patches @ P["conv_w"].reshape(D, 3 * p * p).T
    if P["conv_b"] is not None:
        t = t + P["conv_b"]
    pos = (P["pos"] if patch_pos is None else patch_pos.detach().double()).reshape(-1, P["pos"].shape[0], D)
    g = math.isqrt(pos.shape[1])
    if (h, w) != (g, g):
        resize = dict(size=(h, w)) if naive_resize else dict(scale_factor=((h + 0.1) / g, (w + 0.1) / g))
        grid = F.interpolate(pos.reshape(-1, g, g, D).permute(0, 3, 1, 2), mode="bicubic", **resize)
        pos = grid.permute(0, 2, 3, 1).reshape(-1, h * w, D)
    t = t + pos
    prefix = []
    if P["cls"] is not None:
        prefix.append((P["cls"] + P["pos_cls"]).expand(B, 1, D))
    if P["reg"] is not None:
        prefix.append(P["reg"].expand(B, -1, D))
    n_prefix = sum(q.shape[1] for q in prefix)
    t = torch.cat(prefix + [t], dim=1)
    if P["ln_pre"] is not None:
        t = layer_norm(t, *P["ln_pre"], eps)
    n, hd = t.shape[1], D // heads
    f = ACTS[act]
    for blk in P["blocks"]:
        y = layer_norm(t, blk["norm1.weight"], blk["norm1.bias"], eps)
        qkv = y @ blk["attn.qkv.weight"].T + blk["attn.qkv.bias"]
        q, k, v = (z.reshape(B, n, heads, hd).transpose(1, 2) for z in qkv.chunk(3, dim=-1))
        a = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5, dim=-1) @ v
        a = a.transpose(1, 2).reshape(B, n, D) @ blk["attn.proj.weight"].T + blk["attn.proj.bias"]
        t = t + blk["ls1"] * a
        y = layer_norm(t, blk["norm2.weight"], blk["norm2.bias"], eps)
        m = f(y @ blk["mlp.fc1.weight"].T + blk["mlp.fc1.bias"]) @ blk["mlp.fc2.weight"].T + blk["mlp.fc2.bias"]
        t = t + blk["ls2"] * m
    return layer_norm(t, *P["norm"], eps)[:, n_prefix:]


# CLIP: a real TorchScript archive, built like OpenAI's model.py

class _QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class _ResidualAttentionBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads)
        self.ln_1 = nn.LayerNorm(d)  # eps 1e-5, as CLIP's LayerNorm subclass
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(d, 4 * d)), ("gelu", _QuickGELU()),
                                              ("c_proj", nn.Linear(4 * d, d))]))
        self.ln_2 = nn.LayerNorm(d)

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class _Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.resblocks = nn.Sequential(*[_ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x):
        return self.resblocks(x)


class _VisionTransformer(nn.Module):
    def __init__(self, patch, grid, width, layers, heads, output_dim):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = _Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, output_dim))

    def forward(self, x):
        """Co-Settle's encode_image: ln_post on the patch tokens, no proj (models/clip/model.py)."""
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x).permute(1, 0, 2)  # NLD -> LND, as nn.MultiheadAttention(batch_first=False) wants
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 1:, :])


class _CLIP(nn.Module):
    def __init__(self, patch=16, grid=4, width=128, layers=2, embed_dim=512, text_width=64, vocab=100):
        super().__init__()
        self.visual = _VisionTransformer(patch, grid, width, layers, width // 64, embed_dim)
        self.token_embedding = nn.Embedding(vocab, text_width)
        self.positional_embedding = nn.Parameter(torch.zeros(77, text_width))
        self.transformer = _Transformer(text_width, 1, text_width // 64)
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.zeros(text_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))
        for name, value in (("input_resolution", patch * grid), ("context_length", 77), ("vocab_size", vocab)):
            self.register_buffer(name, torch.tensor(value))  # build_model deletes these "if present"

    def forward(self, image):
        return self.visual(image)


def _convert_weights(model):
    """OpenAI clip/model.py convert_weights: conv and linear weights and biases, the MHA's in_proj_*, q/k/v_proj_weight
    and bias_k/v (None here), and the two projections to fp16."""
    for m in model.modules():
        names = ["weight", "bias"] if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)) else []
        if isinstance(m, nn.MultiheadAttention):
            names += ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "bias_k",
                      "bias_v"]
        names += [n for n in ["text_projection", "proj"] if isinstance(getattr(m, n, None), torch.Tensor)]
        for tensor in (getattr(m, n) for n in names):
            if tensor is not None:
                tensor.data = tensor.data.half()


def make_clip(path):
    """Write a TorchScript CLIP archive; returns (state dict as saved, fp32 reference module holding the
    fp16-rounded values)."""
    model = _CLIP()
    g = _gen(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 0:  # logit_scale
                continue
            if "ln_" in name and name.endswith("weight"):
                p.copy_(1 + _randn(g, *p.shape, std=0.2))
            elif p.dim() == 1 or name.endswith("bias") or "embedding" in name:
                p.copy_(_randn(g, *p.shape, std=0.5 if "embedding" in name else 0.1))
            else:
                fan_in = p.shape[0] if name in ("visual.proj", "text_projection") else p[0].numel()
                p.copy_(_randn(g, *p.shape, std=fan_in ** -0.5))
    model.eval()
    _convert_weights(model)
    reference = copy.deepcopy(model).float()
    torch.jit.save(torch.jit.script(model), str(path))
    return model.state_dict(), reference


# one native checkpoint per family

class Case:
    """A native checkpoint at `path`; `params` is the backbone the loader must pick, `native` the other encoder
    in the file (if any); heads, eps and activation of the reference forward are the expected arch's."""

    def __init__(self, path, family, arch, params, sizes, native=None):
        self.path, self.family, self.arch, self.params, self.sizes = path, family, arch, params, sizes
        self.heads, self.eps, self.act, self.native = arch["heads"], arch["eps"], arch["act"], native

    def reference(self, x, patch_pos=None):
        return explicit_forward(self.params, x, self.heads, self.eps, self.act, patch_pos)

    def saved(self):
        """The file as written (CLIP's TorchScript archive: its state dict)."""
        if self.family == "clip":
            return torch.jit.load(str(self.path)).state_dict()
        return torch.load(self.path, weights_only=False)


def _vit_arch(D, depth, patch=16, grid=4, **kw):
    return dict(patch_size=patch, embed_dim=D, depth=depth, heads=max(1, D // 64), grid=(grid, grid), mlp_dim=4 * D,
                qkv_bias=True, eps=1e-6, cls_token=True, registers=0, layerscale=False, ln_pre=False, patch_bias=True,
                act="gelu") | kw


def save_to(path, ckpt):
    torch.save(ckpt, path)
    return path


def case_dino_bare(tmp):
    sd = timm_backbone(128, 2, seed=10)
    return Case(save_to(tmp / "dino_vitbase16_pretrain.pth", sd), "dino", _vit_arch(128, 2), timm_params(sd),
                [(64, 64), (64, 96), (48, 32)])


def case_dino_full(tmp):
    teacher, student = timm_backbone(128, 2, seed=11), timm_backbone(128, 2, seed=12)
    g = _gen(13)
    ckpt = {"student": OrderedDict(**prefixed(student, "module.backbone."), **dino_head_keys("module.head.", 128, g)),
            "teacher": OrderedDict(**prefixed(teacher, "backbone."), **dino_head_keys("head.", 128, g)),
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}, "epoch": 3,
            "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, lr=0.0005),
            "fp16_scaler": None, "dino_loss": {"center": torch.zeros(1, 65)}}
    return Case(save_to(tmp / "checkpoint.pth", ckpt), "dino", _vit_arch(128, 2), timm_params(teacher), [(64, 64)],
                native=timm_params(student))


def case_ibot(tmp):
    sd = timm_backbone(64, 2, seed=20)
    return Case(save_to(tmp / "checkpoint_teacher.pth", {"state_dict": sd}), "ibot", _vit_arch(64, 2), timm_params(sd),
                [(64, 64), (80, 48)])


def case_mae(tmp):
    sd = timm_backbone(128, 2, seed=30, pos=mae_sincos(128, 4))
    g, Dd = _gen(31), 32
    sd.update(mask_token=torch.zeros(1, 1, Dd), decoder_pos_embed=mae_sincos(Dd, 4))
    sd["decoder_embed.weight"], sd["decoder_embed.bias"] = _randn(g, Dd, 128), torch.zeros(Dd)
    decoder = timm_backbone(Dd, 1, seed=32)
    sd.update((k.replace("blocks.", "decoder_blocks."), v) for k, v in decoder.items() if k.startswith("blocks."))
    sd["decoder_norm.weight"], sd["decoder_norm.bias"] = torch.ones(Dd), torch.zeros(Dd)
    sd["decoder_pred.weight"], sd["decoder_pred.bias"] = _randn(g, 16 * 16 * 3, Dd), torch.zeros(16 * 16 * 3)
    ckpt = {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 799,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0},
            "args": argparse.Namespace(model="mae_vit_base_patch16")}
    return Case(save_to(tmp / "checkpoint-799.pth", ckpt), "mae", _vit_arch(128, 2), timm_params(sd),
                [(64, 64), (96, 64)])


def case_mocov3(tmp):
    pos = moco_sincos(128, 4)
    base, momentum = timm_backbone(128, 2, seed=40, pos=pos), timm_backbone(128, 2, seed=41, pos=pos)
    g = _gen(42)
    sd = OrderedDict(**prefixed(base, "module.base_encoder."), **moco_head("module.base_encoder.head.", 128, g),
                     **prefixed(momentum, "module.momentum_encoder."),
                     **moco_head("module.momentum_encoder.head.", 128, g), **moco_head("module.predictor.", 16, g))
    ckpt = {"epoch": 300, "arch": "vit_base", "state_dict": sd, "optimizer": {}}
    return Case(save_to(tmp / "vit-b-300ep.pth.tar", ckpt), "mocov3", _vit_arch(128, 2), timm_params(momentum),
                [(64, 64), (64, 80)], native=timm_params(base))


def case_ijepa(tmp):
    pos = mae_sincos(128, 4, cls=False)
    enc, target = timm_backbone(128, 2, cls=False, seed=50, pos=pos), timm_backbone(128, 2, cls=False, seed=51, pos=pos)
    g = _gen(52)
    predictor = OrderedDict([("module.predictor_embed.weight", _randn(g, 32, 128)),
                             ("module.predictor_embed.bias", torch.zeros(32)),
                             ("module.mask_token", torch.zeros(1, 1, 32)),
                             ("module.predictor_pos_embed", mae_sincos(32, 4, cls=False)),
                             ("module.predictor_blocks.0.norm1.weight", torch.ones(32)),
                             ("module.predictor_norm.weight", torch.ones(32)),
                             ("module.predictor_proj.weight", _randn(g, 128, 32))])
    ckpt = {"encoder": prefixed(enc, "module."), "predictor": predictor, "target_encoder": prefixed(target, "module."),
            "opt": {"state": {}, "param_groups": []}, "scaler": None, "epoch": 1, "loss": 0.25, "batch_size": 128,
            "world_size": 16, "lr": 0.001}
    return Case(save_to(tmp / "ijepa-ep800.pth.tar", ckpt), "ijepa", _vit_arch(128, 2, cls_token=False),
                timm_params(enc, cls=False), [(64, 64), (48, 80)], native=timm_params(target, cls=False))


def case_dinov2(tmp, file, D, seed, sizes, registers=0, chunk=None, teacher=False):
    """The released DINOv2 layout (patch 14, 5x5 grid, LayerScale); chunk(i): the block_chunks index of block i
    (keys blocks.<chunk>.<i>.*, BlockChunk pads with Identity); teacher: under {"teacher": backbone.*}."""
    sd = timm_backbone(D, 2, patch=14, grid=5, registers=registers, layerscale=True, seed=seed)
    if chunk:
        sd = OrderedDict((f"blocks.{chunk(int(k.split('.')[1]))}.{k[len('blocks.'):]}" if k.startswith("blocks.")
                          else k, v) for k, v in sd.items())
        assert f"blocks.{chunk(1)}.1.attn.qkv.weight" in sd
    ckpt = {"teacher": prefixed(sd, "backbone.")} if teacher else sd
    return Case(save_to(tmp / file, ckpt), "dinov2", _vit_arch(D, 2, patch=14, grid=5, registers=registers,
                                                              layerscale=True),
                timm_params(sd, registers=bool(registers), layerscale=True, chunk=chunk), sizes)


def case_dinov2_cosettle(tmp):
    """Co-Settle's own DINOv2: ViT-B/16 recipe with 4 registers, pos_embed 1+grid^2, teacher checkpoint with heads."""
    sd = timm_backbone(128, 2, patch=16, grid=4, registers=4, layerscale=True, seed=62)
    g = _gen(63)
    teacher = OrderedDict(**prefixed(sd, "backbone."), **dino_head_keys("dino_head.", 128, g),
                          **dino_head_keys("ibot_head.", 128, g))
    return Case(save_to(tmp / "teacher_checkpoint.pth", {"teacher": teacher}), "dinov2",
                _vit_arch(128, 2, registers=4, layerscale=True), timm_params(sd, registers=True, layerscale=True),
                [(64, 64), (80, 64)])


def case_clip(tmp):
    path = tmp / "ViT-B-16.pt"
    sd, reference = make_clip(path)
    case = Case(path, "clip", _vit_arch(128, 2, eps=1e-5, act="quick_gelu", ln_pre=True, patch_bias=False),
                clip_params(sd), [(64, 64), (48, 80)])
    case.module = reference
    return case


def blip_resize(pos):
    """BLIP's interpolate_pos_embed at load (the CLS row is kept): patch rows [s*s, D] -> 224/16 = 14x14, bicubic,
    align_corners=False."""
    s, D = math.isqrt(pos.shape[0]), pos.shape[1]
    grid = F.interpolate(pos.reshape(1, s, s, D).permute(0, 3, 1, 2), size=(14, 14), mode="bicubic",
                         align_corners=False)
    return grid[0].permute(1, 2, 0).reshape(196, D)


def case_blip(tmp):
    D, gb = 64, 6
    vis, mom = timm_backbone(D, 1, grid=gb, seed=70), timm_backbone(D, 1, grid=gb, seed=71)
    g = _gen(72)
    model = OrderedDict(**prefixed(vis, "visual_encoder."), **prefixed(mom, "visual_encoder_m."))
    model.update({"text_encoder.embeddings.word_embeddings.weight": _randn(g, 100, 32),
                  "text_encoder.encoder.layer.0.attention.self.query.weight": _randn(g, 32, 32),
                  "vision_proj.weight": _randn(g, 16, D), "vision_proj.bias": torch.zeros(16),
                  "text_proj.weight": _randn(g, 16, 32), "itm_head.weight": _randn(g, 2, 32),
                  "image_queue": _randn(g, 16, 8), "idx_queue": torch.zeros(1, 8, dtype=torch.long),
                  "ptr_queue": torch.zeros(1, dtype=torch.long), "temp": torch.tensor(0.07)})
    ckpt = {"model": model, "optimizer": {}, "config": {"image_size": 384, "vit": "base"}, "epoch": 5}
    P = timm_params(vis)
    P["pos"] = blip_resize(P["pos"])
    return Case(save_to(tmp / "model_base_retrieval_coco.pth", ckpt), "blip", _vit_arch(D, 1, grid=14), P,
                [(224, 224), (64, 64)], native=timm_params(mom))


CASES = {"dino_bare": case_dino_bare, "dino_full": case_dino_full, "ibot": case_ibot, "mae": case_mae,
         "mocov3": case_mocov3, "ijepa": case_ijepa,
         "dinov2_reg": functools.partial(case_dinov2, file="dinov2_vitb14_reg4_pretrain.pth", D=128, seed=60,
                                         registers=4, sizes=[(70, 70), (56, 56), (42, 84)]),
         "dinov2_noreg": functools.partial(case_dinov2, file="dinov2_vits14_pretrain.pth", D=64, seed=61,
                                           sizes=[(70, 70), (56, 56)]),
         "dinov2_cosettle": case_dinov2_cosettle,
         "dinov2_chunks1": functools.partial(case_dinov2, file="dinov2_chunked.pth", D=128, seed=64, registers=4,
                                             chunk=lambda i: 0, sizes=[(56, 56)]),  # block_chunks=1: blocks.0.<i>
         "dinov2_chunks2": functools.partial(case_dinov2, file="dinov2_chunked2.pth", D=128, seed=65, teacher=True,
                                             chunk=lambda i: i, sizes=[(70, 70)]),  # block_chunks=2, depth 2
         "clip": case_clip, "blip": case_blip}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> its Case, written and loaded once per module (tests that change an encoder load their own)."""
    cache = {}

    def get(name):
        if name not in cache:
            case = CASES[name](tmp_path_factory.mktemp(name))
            case.encoder = load_encoder(str(case.path))
            cache[name] = case
        return cache[name]
    return get


ARCHS = {  # name: (width, patch, grid, heads), depth 12, mlp 4x
    "S/16": (384, 16, 14, 6),
    "B/16": (768, 16, 14, 12),
    "S/8": (384, 8, 28, 6),
}


def make_layout(sd, layout, dim):
    head = dino_head_keys("head.", dim, _gen(1))
    if layout == "bare":
        return sd
    if layout == "teacher":  # a DINO full checkpoint: teacher and a *different* student, plus training state
        student = {f"module.backbone.{k}": -v for k, v in sd.items()}
        return {"student": student, "teacher": {**prefixed(sd, "backbone."), **head}, "epoch": 100,
                "args": argparse.Namespace(arch="vit")}
    if layout == "student":
        return {"student": {**prefixed(sd, "module.backbone."), **prefixed(head, "module.")}}
    if layout == "model":
        return {"model": dict(sd)}
    if layout == "state_dict":
        return {"state_dict": prefixed(sd, "module.")}
    raise ValueError(layout)


# every layout goes through the full load_encoder at least once, every arch at least once (a ViT-B/16 load costs
# seconds, mostly in ViT.__init__'s weight init); the others check the loader's state dict and inferred arch
FULL_LOAD = {"S/16": ("teacher", "state_dict"), "B/16": ("bare",), "S/8": ("student", "model")}


def loader_view(path):
    """What the loader makes of a file before building the model: (backbone state dict, inferred arch)."""
    ckpt = cosettle.read_checkpoint(str(path))
    family, sd = cosettle.detect_family(ckpt)
    found = cosettle.backbone_state_dict(sd, family, str(path))
    return found, cosettle.infer_arch(found, family, str(path))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_checkpoint_layouts_and_arch_inference(arch, tmp_path):
    dim, patch, grid, heads = ARCHS[arch]
    sd = timm_backbone(dim, 12, patch, grid, seed=0)
    if arch == "B/16":  # halves the B/16 file; also checks the upcast
        sd = OrderedDict((k, v.half()) for k, v in sd.items())
    expected_arch = dict(patch_size=patch, embed_dim=dim, depth=12, heads=heads, grid=(grid, grid),
                         mlp_dim=4 * dim, qkv_bias=True)
    for layout in ("bare", "teacher", "student", "model", "state_dict"):
        path = tmp_path / f"{layout}.pth"
        torch.save(make_layout(sd, layout, dim), path)
        found, inferred = loader_view(path)
        assert set(found) == set(sd), layout  # prefixes stripped, DINO head dropped, nothing else lost
        for k, v in sd.items():  # the teacher, not the negated student; fp16 upcast exactly
            assert torch.equal(found[k].float(), v.float()), (layout, k)
        assert {k: inferred[k] for k in expected_arch} == expected_arch, layout
        assert inferred.get("registers", 0) == 0 and inferred.get("cls_token", True)
        if layout in FULL_LOAD[arch]:
            model = cosettle.load_encoder(str(path))
            assert {k: model.arch[k] for k in expected_arch} == expected_arch
            assert model.arch["eps"] == 1e-6 and model.arch.get("act", "gelu") == "gelu"
            assert (model.patch_size, model.embed_dim, model.grid) == (patch, dim, (grid, grid))
            assert len(model.blocks) == 12 and model.blocks[0].attn.heads == heads
            assert model.patch_embed.proj.stride == (patch, patch)
            loaded = model.state_dict()
            assert set(loaded) == set(sd)
            for k, v in sd.items():
                assert loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.float()), (layout, k)
        path.unlink()


def test_heads_come_from_the_width_table_and_family(tmp_path):
    """ViT-g is 1408 wide with 16 heads (not 1408 / 64 = 22); an unknown width is refused; MoCo v3's ViT-S is
    384 wide with 12 heads (not DINO's 6), and the forward really uses 12; ViT-H (I-JEPA) is 1280/16."""
    def meta_sd(D, patch=16, rows=1 + 196, hidden=None):
        sd = {"patch_embed.proj.weight": torch.empty(D, 3, patch, patch, device="meta"),
              "pos_embed": torch.empty(1, rows, D, device="meta")}
        for i in range(12):
            sd[f"blocks.{i}.mlp.fc1.weight"] = torch.empty(hidden or 4 * D, D, device="meta")
            sd[f"blocks.{i}.attn.qkv.bias"] = torch.empty(3 * D, device="meta")
        return sd

    assert infer_arch(meta_sd(1408, patch=14, rows=1 + 256, hidden=6144))["heads"] == 16
    with pytest.raises(BadInput, match="width 320"):
        infer_arch(meta_sd(320), path="odd.pth")
    assert infer_arch(meta_sd(384), "mocov3")["heads"] == 12
    assert infer_arch(meta_sd(384), "dino")["heads"] == 6
    assert infer_arch(meta_sd(768), "mocov3")["heads"] == 12
    arch = infer_arch(meta_sd(1280, patch=14, rows=256), "ijepa")
    assert (arch["heads"], arch["grid"], arch["depth"], arch["cls_token"]) == (16, (16, 16), 12, False)
    pos = moco_sincos(384, 2)
    momentum = timm_backbone(384, 1, grid=2, seed=45, pos=pos)
    sd = OrderedDict(**prefixed(timm_backbone(384, 1, grid=2, seed=44, pos=pos), "module.base_encoder."),
                     **prefixed(momentum, "module.momentum_encoder."))
    path = tmp_path / "vit-s-300ep.pth.tar"
    torch.save({"epoch": 300, "arch": "vit_small", "state_dict": sd, "optimizer": {}}, path)
    enc = load_encoder(str(path))
    assert (enc.family, enc.arch["heads"], enc.arch["embed_dim"]) == ("mocov3", 12, 384)
    x = images(32, 32)
    with torch.no_grad():
        ours = enc(x)
    P = timm_params(momentum)
    assert_tokens(ours, explicit_forward(P, x, 12))
    assert (ours.double() - explicit_forward(P, x, 6)).abs().max() > 1e-2


@pytest.mark.parametrize("name", list(CASES))
def test_native_checkpoint_loads_as_its_family_and_matches_explicit_forward(built, capsys, name):
    case = built(name)
    capsys.readouterr()
    load_encoder(str(case.path))
    assert capsys.readouterr().out == ""  # quiet by default; verbose: one line naming the file, family and arch
    enc = load_encoder(str(case.path), verbose=True)
    out, a = capsys.readouterr().out, case.arch
    assert out.count("\n") == 1 and str(case.path) in out, out
    for word in (case.family, f"patch {a['patch_size']}", f"width {a['embed_dim']}", f"depth {a['depth']}",
                 f"{a['heads']} heads", str(a["grid"]), f"{a['registers']} registers"):
        assert word in out, (word, out)
    assert enc.family == case.family
    assert {k: enc.arch.get(k) for k in case.arch} == case.arch
    assert enc.native_stats == (CLIP_STATS if case.family in ("clip", "blip") else IMAGENET)
    assert not enc.training and not any(m.training for m in enc.modules())
    assert not any(p.requires_grad for p in enc.parameters())
    norms = [m for m in enc.modules() if isinstance(m, nn.LayerNorm)]
    assert len(norms) == 2 * case.arch["depth"] + 1 + case.arch["ln_pre"]
    assert {m.eps for m in norms} == {case.eps}
    for H, W in case.sizes:
        x = images(H, W)
        with torch.no_grad():
            ours = enc(x)
        p = case.arch["patch_size"]
        assert ours.shape == (2, (H // p) * (W // p), case.arch["embed_dim"])
        assert_tokens(ours, case.reference(x))
        # the other encoder in the file (DINO student, MoCo v3 base, I-JEPA target, BLIP momentum copy) is not it
        if case.native is not None:
            assert (ours.double() - explicit_forward(case.native, x, case.heads, case.eps, case.act)).abs().max() > 0.1
    with pytest.raises(ValueError, match="not divisible"):
        enc(images(case.arch["patch_size"] * 4, case.arch["patch_size"] * 4 - 4))


@pytest.mark.parametrize("name, switch", [
    ("dino_bare", dict(naive_resize=True)),  # DINO's +0.1 scale-factor rule, not a resize to the size
    ("clip", dict(act="gelu")), ("clip", dict(ln_pre=None)),  # QuickGELU, ln_pre
    ("dinov2_reg", dict(reg=None)), ("dinov2_reg", dict(layerscale=False)),  # registers, LayerScale
    ("dino_bare", dict(pos_cls=0)),  # the CLS row of the positional table
])
def test_each_family_switch_matters(built, name, switch):
    """The explicit forward with one switch off is far from the loader's tokens, so each match above is not an
    accident of a switch being a no-op (the size is off the stored grid, so the resize rule is used)."""
    case = built(name)
    x = images(case.sizes[-1][0] if name == "dino_bare" else case.sizes[0][0], case.sizes[-1][1], seed=4)
    with torch.no_grad():
        ours = case.encoder(x).double()
    P, kw = dict(case.params), dict(act=case.act, eps=case.eps)
    if "layerscale" in switch:  # every gamma 1
        P["blocks"] = [dict(b, ls1=1, ls2=1) for b in P["blocks"]]
    elif "naive_resize" in switch or "act" in switch:  # an argument of the forward
        kw.update(switch)
    else:  # a parameter: no ln_pre, no registers, a zero CLS position
        P.update(switch)
    assert (ours - case.reference(x)).abs().max() < TOL
    assert (ours - explicit_forward(P, x, case.heads, **kw)).abs().max() > 1e-2


def test_clip_archive_is_torchscript_with_fp16_weights_and_matches_clip_modules(built):
    """The fixture is what OpenAI ships: torch.load refuses it under weights_only, and conv/linear/in_proj/proj
    are fp16 while LayerNorms and embeddings are fp32. CLIP's own modules (nn.MultiheadAttention, QuickGELU,
    ln_pre, ln_post on the patch tokens as Co-Settle's encode_image does) on the fp16-rounded weights, in fp32,
    match the loader's tokens and the explicit forward."""
    case = built("clip")
    with pytest.raises(RuntimeError):
        torch.load(case.path, weights_only=True)
    sd = case.saved()
    assert sd["visual.conv1.weight"].dtype == torch.float16 and "visual.conv1.bias" not in sd
    assert sd["visual.transformer.resblocks.1.attn.in_proj_weight"].dtype == torch.float16
    assert sd["visual.proj"].dtype == torch.float16 and sd["visual.proj"].shape == (128, 512)
    assert sd["visual.ln_pre.weight"].dtype == torch.float32
    assert sd["visual.positional_embedding"].shape == (17, 128) and sd["visual.class_embedding"].shape == (128,)
    assert {"token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection",
            "logit_scale", "transformer.resblocks.0.attn.in_proj_weight"} <= set(sd)
    assert all(p.dtype == torch.float32 for p in case.encoder.parameters())
    x = images(64, 64)
    with torch.no_grad():
        theirs = case.module.visual(x)
        ours = case.encoder(x)
    assert_tokens(ours, theirs)
    assert_tokens(theirs, case.reference(x))


def _clip_state_dict(tmp, built):
    """open_clip / `model.state_dict()` saved with torch.save (not TorchScript) is detected by its key names."""
    case = built("clip")
    path = save_to(tmp / "clip_state_dict.pt", case.saved())
    return path, "clip", case.params, case.heads, dict(eps=1e-5, act="quick_gelu")


def _mae_encoder_only(tmp, built):
    """The released mae_pretrain_vit_base.pth is believed to be encoder-only: {'model': encoder} is still MAE."""
    sd = timm_backbone(64, 1, seed=33, pos=mae_sincos(64, 4))
    return save_to(tmp / "mae_pretrain_vit_base.pth", {"model": sd}), "mae", timm_params(sd), 1, {}


def _bare_ijepa(tmp, built):
    sd = timm_backbone(64, 1, cls=False, seed=53)
    return save_to(tmp / "ijepa_encoder.pth", prefixed(sd, "module.")), "ijepa", timm_params(sd, cls=False), 1, {}


@pytest.mark.parametrize("write", [_clip_state_dict, _mae_encoder_only, _bare_ijepa])
def test_other_layouts_of_a_family(tmp_path, built, write):
    path, family, P, heads, kw = write(tmp_path, built)
    enc = load_encoder(str(path))
    assert enc.family == family and enc.arch["cls_token"] is (P["cls"] is not None)
    x = images(64, 64)
    with torch.no_grad():
        assert_tokens(enc(x), explicit_forward(P, x, heads, **kw))


# PEA: the replacement patch table lands where each family's own code puts it

@pytest.mark.parametrize("name", ["dino_bare", "mae", "mocov3", "ijepa", "dinov2_reg", "dinov2_cosettle", "clip",
                                  "blip"])
def test_patch_pos_embed_lands_where_the_family_puts_it(built, name):
    """encoder.patch_pos_embed() is the family's patch positional table: no CLS row (I-JEPA has none to drop),
    CLIP's positional_embedding[1:], BLIP's table after the load-time resize to 14x14 (once, CLS row kept).
    A replacement table: for I-JEPA it is the whole positional embedding; DINOv2: added before the registers are
    inserted (they get none); CLIP: added before ln_pre; everyone else: the CLS row is never replaced.
    CoSettle.encode: z1, z2 plain, z1b with the PEA table from shifted_pos_embed (same generator seed): the
    separate calls of the encoder, and the explicit forward with the patch rows of the table replaced."""
    case = built(name)
    enc = case.encoder
    assert_tokens(enc.patch_pos_embed()[0].float(), case.params["pos"], tol=1e-5)
    if name == "ijepa":
        assert enc.cls_token is None and enc.pos_embed.shape == (1, 16, 128)
    if name == "blip":  # the 6x6 table (standing in for BLIP's 384-px 24x24) becomes the 224-px model's 14x14
        assert enc.grid == (14, 14) and enc.pos_embed.shape == (1, 1 + 196, 64)
        vis = case.saved()["model"]["visual_encoder.pos_embed"]
        assert torch.equal(enc.pos_embed[:, :1], vis[:, :1])
    n, D = case.params["pos"].shape
    g = math.isqrt(n)
    x1, x2 = (images(g * enc.patch_size, g * enc.patch_size, seed=seed) for seed in (5, 6))
    table = torch.randn(1, n, D, generator=_gen(99))
    with torch.no_grad():
        ours = enc(x1, patch_pos_embed=table)
        plain = enc(x1)
    assert_tokens(ours, case.reference(x1, patch_pos=table))
    assert (ours - plain).abs().max() > 1e-2
    # a batch of tables (one per image), and at an input size off the stored grid (DINO interpolation of the table)
    tables = torch.randn(2, n, D, generator=_gen(98))
    x3 = images((g + 1) * enc.patch_size, (g - 1) * enc.patch_size, seed=3)
    with torch.no_grad():
        ours = enc(x3, patch_pos_embed=tables)
    assert_tokens(ours, case.reference(x3, patch_pos=tables))

    z = cosettle.CoSettle(enc).encode(x1, x2, generator=_gen(7))
    pea = cosettle.shifted_pos_embed(enc.patch_pos_embed().detach().float(), 10.0, _gen(7))
    z1, z2, z1b = z.chunk(3, dim=1)
    assert_tokens(z1, case.reference(x1))
    assert_tokens(z2, case.reference(x2))
    assert_tokens(z1b, case.reference(x1, patch_pos=pea))
    with torch.no_grad():
        for mine, part in zip((plain, enc(x2), enc(x1, patch_pos_embed=pea)), (z1, z2, z1b)):
            torch.testing.assert_close(part, mine, rtol=0, atol=1e-5)
    assert (z1b - z1).abs().max() > 1e-2  # the PEA stream really differs


@pytest.mark.parametrize("name, forced", [("dino_bare", "mae"), ("dino_bare", "ibot"), ("mae", "dino"),
                                          ("ibot", "dino"), ("mocov3", "mocov3"), ("ijepa", "ijepa"),
                                          ("dinov2_reg", "dinov2"), ("clip", "clip"), ("blip", "blip")])
def test_forced_family_sets_the_label(built, name, forced):
    case = built(name)
    enc = load_encoder(str(case.path), family=forced)
    assert enc.family == forced
    assert enc.native_stats == (CLIP_STATS if forced in ("clip", "blip") else IMAGENET)
    x = images(*case.sizes[0])
    with torch.no_grad():
        assert_tokens(enc(x), case.reference(x))


def _bad(path, *words, family=None):
    """load_encoder refuses the file with a BadInput: one line naming the file and, in the sentence itself (not
    just in the file name), every word (a tuple: one of them)."""
    with pytest.raises(BadInput) as err:
        load_encoder(str(path), family=family)
    message = str(err.value)
    assert str(path) in message, message
    assert "\n" not in message, message
    rest = message.replace(str(path), "")
    for word in words:
        assert any(w in rest for w in (word if isinstance(word, tuple) else [word])), (word, message)
    return message


ALL_FAMILIES = ("dino", "ibot", "mae", "mocov3", "ijepa", "dinov2", "clip", "blip")


@pytest.mark.parametrize("name, forced, words", [
    ("dino_bare", "clip", ["clip"]), ("dino_bare", "blip", ["blip"]), ("mae", "mocov3", ["mocov3"]),  # no prefix
    ("dino_bare", "ijepa", ["ijepa", "cls_token"]), ("ijepa", "dino", ["dino", "cls_token"]),  # CLS convention
    ("dino_bare", "mocov3", []), ("clip", "dino", []), ("clip", "blip", []), ("ijepa", "clip", []),
    ("dinov2_noreg", "ijepa", []), ("mocov3", "dino", []), ("blip", "mae", []), ("mae", "clip", []),
    ("dino_bare", "nonsense", ["nonsense", *ALL_FAMILIES]),  # an unknown family lists the known ones
])
def test_forcing_the_wrong_family_is_a_clear_error(built, name, forced, words):
    _bad(built(name).path, *words, family=forced)


def _first_half(path):
    raw = Path(path).read_bytes()
    return raw[:len(raw) // 2]


def _torchscript_linear():
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(nn.Linear(4, 2)), buffer)
    return buffer.getvalue()


def _edited(sd, delete=(), within=None, **put):
    """sd without the keys `delete`, with put's ('__' in a name stands for '.'); within: edit sd[within] instead."""
    if within is not None:
        return {**sd, within: _edited(sd[within], delete, **put)}
    sd = OrderedDict(sd)
    for k in delete:
        del sd[k]
    sd.update({k.replace("__", "."): v for k, v in put.items()})
    return sd


def _resnet():
    g = _gen(80)
    return {"state_dict": prefixed(OrderedDict([
        ("conv1.weight", _randn(g, 8, 3, 7, 7)), ("bn1.weight", torch.ones(8)), ("bn1.bias", torch.zeros(8)),
        ("layer1.0.conv1.weight", _randn(g, 8, 8, 3, 3)), ("layer1.0.bn1.weight", torch.ones(8)),
        ("fc.weight", _randn(g, 10, 8)), ("fc.bias", torch.zeros(10))]), "module.")}


def _beit():
    """BEiT: a ViT with q_bias/v_bias (no qkv.bias) and gamma_1/gamma_2."""
    sd = timm_backbone(64, 1, seed=82)
    qkv_bias = sd.pop("blocks.0.attn.qkv.bias")
    return {"model": _edited(sd, blocks__0__attn__q_bias=qkv_bias[:64], blocks__0__attn__v_bias=qkv_bias[128:],
                             blocks__0__gamma_1=torch.ones(64), blocks__0__gamma_2=torch.ones(64))}


def _deit_distilled():
    """DeiT-distilled: an extra dist_token and a positional table of 2 + N rows."""
    sd = timm_backbone(64, 1, seed=83)
    return {"model": _edited(sd, dist_token=torch.zeros(1, 1, 64), head_dist__weight=torch.zeros(10, 64),
                             pos_embed=torch.cat([sd["pos_embed"][:, :1], sd["pos_embed"]], dim=1))}


def _incomplete(container):
    sd = _edited(timm_backbone(64, 2, seed=84), delete=["blocks.1.attn.proj.weight"])
    if container == "teacher":
        sd = prefixed(sd, "backbone.")
    return sd if container is None else {container: sd}


LOADER_BAD = [  # (id, file name, built -> its bytes, an object to torch.save or None, words of the BadInput)
    *[(f"truncated {n}", f"cut_{n}.pth", lambda b, n=n: _first_half(b(n).path), ["not a readable PyTorch checkpoint"])
      for n in ("dino_bare", "dino_full", "mae", "clip")],
    # a text file is 'not a readable PyTorch checkpoint', with no unpickler noise
    ("text file", "notes.pth", lambda b: b"these are not weights\n",
     ["not a readable", "neither a zip archive nor a pickle"]),
    ("missing", "missing.pth", lambda b: None, ["no such file"]),
    ("a tensor", "tensor.pth", lambda b: torch.zeros(3), ["Tensor", "not a checkpoint dict"]),
    ("resnet", "resnet50.pth", lambda b: _resnet(), ["ViT", "conv1.weight", "layer1.0.bn1.weight"]),
    ("convnext", "convnext_tiny_1k_224.pth", lambda b: {"model": {
        "downsample_layers.0.0.weight": torch.zeros(8, 3, 4, 4), "stages.0.0.dwconv.weight": torch.zeros(8, 1, 7, 7),
        "stages.0.0.gamma": torch.ones(8), "norm.weight": torch.ones(8), "head.weight": torch.zeros(10, 8)}},
     ["ViT", "downsample_layers.0.0.weight"]),
    ("swin", "swin_tiny_patch4_window7_224.pth", lambda b: {"model": {
        "patch_embed.proj.weight": torch.zeros(8, 3, 4, 4), "patch_embed.norm.weight": torch.ones(8),
        "layers.0.blocks.0.attn.relative_position_bias_table": torch.zeros(49, 2),
        "layers.0.blocks.0.attn.qkv.weight": torch.zeros(24, 8), "norm.weight": torch.ones(8)}},
     ["ViT", "layers.0.blocks.0.attn.relative_position_bias_table"]),
    ("beit", "beit_base_patch16_224_pt22k.pth", lambda b: _beit(),
     ["unexpected", "blocks.0.attn.q_bias", "blocks.0.attn.v_bias"]),
    # the error names the unknown key, not only a non-square grid
    ("deit distilled", "deit_base_distilled_patch16_224.pth", lambda b: _deit_distilled(), ["dist_token"]),
    ("torchscript, not clip", "linear.pt", lambda b: _torchscript_linear(), ["ViT", "weight"]),
    *[(f"incomplete in {c}", "incomplete.pth", lambda b, c=c: _incomplete(c), ["missing", "blocks.1.attn.proj.weight"])
      for c in (None, "teacher", "state_dict", "model")],
    ("incomplete clip", "clip_incomplete.pt", lambda b: _edited(
        b("clip").saved(), ["visual.transformer.resblocks.1.attn.out_proj.weight"]),
     ["missing", ("resblocks.1.attn.out_proj.weight", "blocks.1.attn.proj.weight")]),
    *[(f"incomplete mocov3 {k}", "moco_incomplete.pth.tar", lambda b, k=k: _edited(
        b("mocov3").saved(), ["module.momentum_encoder." + k], within="state_dict"), ["missing", k])
      for k in ("blocks.1.attn.proj.weight", "norm.bias")],
    ("no middle block", "no_middle_block.pth", lambda b: _edited(
        timm_backbone(64, 3, seed=85), ["blocks.1." + part for part in BLOCK_PARTS]), ["missing", "blocks.1."]),
    ("no first mlp", "no_fc1.pth", lambda b: _edited(timm_backbone(64, 2, seed=86), ["blocks.0.mlp.fc1.weight"]),
     ["blocks.0.mlp.fc1.weight"]),
    *[(f"extra key {n}", f"extra_{n}.pth", lambda b, n=n, c=c, key=key: _edited(
        b(n).saved(), **{key: torch.zeros(3)}, within=c), ["unexpected", "blocks.0.attn.extra"])
      for n, c, key in [("dino_bare", None, "blocks.0.attn.extra"), ("dinov2_reg", None, "blocks.0.attn.extra"),
                        ("clip", None, "visual.transformer.resblocks.0.attn.extra"),
                        ("ijepa", "encoder", "module.blocks.0.attn.extra")]],
    ("wrong shape", "wrong_shape.pth", lambda b: _edited(
        timm_backbone(64, 2, seed=87), blocks__1__attn__proj__weight=torch.zeros(64, 32)),
     ["wrong shape", "blocks.1.attn.proj.weight"]),
    ("non-square table", "non_square.pth", lambda b: (lambda sd: _edited(
        sd, pos_embed=sd["pos_embed"][:, :-3]))(timm_backbone(64, 1, seed=88)), ["square"]),
]


@pytest.mark.parametrize("file, make, words", [row[1:] for row in LOADER_BAD], ids=[row[0] for row in LOADER_BAD])
def test_loader_bad_files(tmp_path, built, file, make, words):
    content = make(built)
    if isinstance(content, bytes):
        (tmp_path / file).write_bytes(content)
    elif content is not None:
        torch.save(content, tmp_path / file)
    message = _bad(tmp_path / file, *words)
    assert "IndexError" not in message


# The authors' released "+ Ours" checkpoints, written the way yafeng19/Co-Settle util/misc.py save_model writes
# them: {'model': the official model's whole state dict, 'optimizer', 'epoch', 'scaler', 'args': Namespace}. The
# encoder values come from the native files of the case builders above, renamed the way the official loaders in
# main_pretrain.py do; the adapter (ST_adapter.py) is added under `adapter.adapter.` (CLIP: `visual.adapter.adapter.`).

OURS_CASE = {"dino": "dino_bare", "ibot": "ibot", "mae": "mae", "mocov3": "mocov3", "ijepa": "ijepa",
             "dinov2": "dinov2_cosettle", "clip": "clip", "blip": "blip"}


def strip(sd, prefix, drop=()):
    return OrderedDict((k[len(prefix):], v) for k, v in sd.items() if k.startswith(prefix)
                       and not k[len(prefix):].startswith(drop))


OFFICIAL_BACKBONE = {  # family: (container, prefix, keys the official model lacks), as main_pretrain.py loads it
    "clip": (None, "", ("input_resolution", "context_length", "vocab_size")),  # build_model deletes these constants
    "dino": (None, "", ()), "ibot": ("state_dict", "", ()),
    "mae": ("model", "", ("decoder", "mask_token")),  # the official MAE class has no decoder
    "mocov3": ("state_dict", "module.momentum_encoder.", ("head.",)),  # the projector is not loaded
    "ijepa": ("encoder", "module.", ()), "dinov2": ("teacher", "backbone.", ()),  # DINOv2: mask_token included
    "blip": ("model", "visual_encoder.", ())}


def official_model(case):
    """The official model's state dict without its adapter: the family's ViT class as main_pretrain.py builds and
    loads it (CLIP: OpenAI's whole model from clip.load, fp16 where convert_weights makes it so)."""
    container, prefix, drop = OFFICIAL_BACKBONE[case.family]
    raw = case.saved()
    sd = strip(raw if container is None else raw[container], prefix, drop)
    if case.family == "mocov3":  # timm's VisionTransformer keeps its 1000-class head
        D = sd["norm.weight"].shape[0]
        sd["head.weight"], sd["head.bias"] = _randn(_gen(80), 1000, D, std=0.02), torch.zeros(1000)
    if case.family == "blip":  # models/blip/blip.py load_checkpoint resizes to 224 px
        sd["pos_embed"] = torch.cat([sd["pos_embed"][:, :1], blip_resize(sd["pos_embed"][0, 1:])[None]], dim=1)
    return sd


def adapter_tensors(D, fusion_net="linear", seed=90):
    """AdapterBlock's parameters for one fusion_net: adapter_linear (or adapter_linear1..3) and adapter_layer_norm1."""
    g = _gen(seed)
    linears = ["adapter_linear"] if fusion_net == "linear" else [f"adapter_linear{i}" for i in
                                                                range(1, {"mlp2": 3, "mlp3": 4}[fusion_net])]
    sd = OrderedDict()
    for name in linears:
        sd[name + ".weight"], sd[name + ".bias"] = _randn(g, D, D, std=D ** -0.5), _randn(g, D, std=0.1)
    sd["adapter_layer_norm1.weight"], sd["adapter_layer_norm1.bias"] = 1 + _randn(g, D, std=0.2), _randn(g, D, std=0.1)
    return sd


def write_official(path, case, fusion_net="linear", extra=(), args=True):
    """An official '+ Ours' checkpoint-4.pth for the case's encoder; returns the adapter as saved."""
    model = official_model(case)
    D = case.arch["embed_dim"]
    adapter = adapter_tensors(D, fusion_net)
    if case.family == "clip":  # convert_weights runs after the adapter exists: its Linear is fp16 too
        adapter = OrderedDict((k, v.half() if "linear" in k else v) for k, v in adapter.items())
    prefix = "visual.adapter.adapter." if case.family == "clip" else "adapter.adapter."
    model.update((prefix + k, v) for k, v in adapter.items())
    model.update((k, torch.zeros(2)) for k in extra)
    params = [nn.Parameter(v.float()) for v in adapter.values()]
    optimizer = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.95), weight_decay=0.05)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    ckpt = {"model": model, "optimizer": optimizer.state_dict(), "epoch": 4,
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                       "_growth_tracker": 0}}
    if args:
        ckpt["args"] = argparse.Namespace(
            batch_size=128, epochs=5, accum_iter=1, model="mae_vit_large_patch16", input_size=224, patch_size=16,
            optimizer="AdamW", weight_decay=0.05, lr=0.0002, blr=0.0001, min_lr=0.0, warmup_epochs=1,
            data_path="./data/k400_valid_files.txt", dataset="Kinetics-400", output_dir=f"./experiments/{case.family}",
            resume=f"./ckpts/ori/{case.path.name}", start_epoch=0, save_fre=4, num_workers=4, pin_mem=True,
            world_size=4, local_rank=-1, dist_on_itp=False, dist_url="env://", use_adapter=True, clip_gap=0.15,
            win_size=2, use_asy_pos_embedding=True, asy_pos_ratio=10.0, fusion_net=fusion_net, temp=0.03,
            lambda_reg=3.0, reg_loss="kl", base_model=case.family, model_type="vitb16", PEA_crop_mode="random",
            config_file="", opts=[], rank=0, gpu=0, distributed=True, dist_backend="nccl")
    torch.save(ckpt, path)
    return adapter


@pytest.fixture(scope="module")
def official(built, tmp_path_factory):
    """family -> (path of its official '+ Ours' file, its Case, the adapter as saved); written once per module."""
    cache = {}

    def get(family):
        if family not in cache:
            case = built(OURS_CASE[family])
            path = tmp_path_factory.mktemp(f"{family}+ours") / "checkpoint-4.pth"
            cache[family] = path, case, write_official(path, case)
        return cache[family]
    return get


@pytest.mark.parametrize("family", list(OURS_CASE))
def test_official_ours_file_gives_encoder_and_adapter_as_projection(official, built, tmp_path, family):
    path, case, adapter = official(family)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        encoder = load_encoder(str(path))
        projection = cosettle.load_projection(str(path), encoder)
    assert encoder.family == family  # args.base_model, not the "mae" the 'model' container suggests
    assert encoder.official == dict(epoch=4, fusion_net="linear", trained_from=f"./ckpts/ori/{case.path.name}")
    assert encoder.native_stats == (CLIP_STATS if family in ("clip", "blip") else IMAGENET)
    assert {k: encoder.arch.get(k) for k in case.arch} == case.arch
    x = images(*case.sizes[0])
    with torch.no_grad():
        tokens = encoder(x)
        assert_tokens(tokens, case.reference(x))  # the frozen encoder of the file is the native one
        D = case.arch["embed_dim"]  # ST_adapter.py AdapterBlock, fusion_net 'linear' (its layers in forward's order)
        reference = nn.Sequential(OrderedDict(adapter_linear=nn.Linear(D, D), adapter_activation=nn.Tanh(),
                                              adapter_layer_norm1=nn.LayerNorm(D)))
        reference.load_state_dict({k: v.float() for k, v in adapter.items()})
        assert torch.equal(projection(tokens), reference(tokens))  # bit for bit
    assert not projection.training and not any(p.requires_grad for p in projection.parameters())
    assert cosettle.fingerprint(encoder) == cosettle.fingerprint(case.encoder)  # so --ckpt next to the base file
    assert cosettle.load_projection(str(path), case.encoder).linear.in_features == case.arch["embed_dim"]
    other = built("dino_full" if family != "dino" else "dinov2_reg").encoder
    with pytest.raises(BadInput, match="not on the one given|but the encoder has width"):
        cosettle.load_projection(str(path), other)
    if family in ("clip", "dinov2", "ijepa"):  # without 'args' too: these keys name the family on their own
        write_official(tmp_path / "no_args.pth", case, args=False)
        encoder = load_encoder(str(tmp_path / "no_args.pth"))
        assert encoder.family == family and encoder.official["fusion_net"] is None
        with torch.no_grad():
            assert_tokens(encoder(x), case.reference(x))


@pytest.mark.parametrize("family", list(OURS_CASE))
def test_official_mlp_adapters_and_stray_keys_are_refused(built, tmp_path, capsys, family):
    case = built(OURS_CASE[family])
    prefix = "visual." if family == "clip" else ""
    cases = {"mlp2": (dict(fusion_net="mlp2"), ["'mlp2'", "'linear'", prefix + "adapter.adapter.adapter_linear1.bias",
                                                 "missing", prefix + "adapter.adapter.adapter_linear.weight"]),
             "mlp3": (dict(fusion_net="mlp3"), ["'mlp3'", prefix + "adapter.adapter.adapter_linear3.weight"]),
             "adapter_extra": (dict(extra=[prefix + "adapter.adapter.scale"]), ["unmapped", "adapter.adapter.scale"]),
             "stray": (dict(extra=["stray.weight"]), ["unexpected", "stray.weight", family])}
    for name, (kw, needles) in cases.items():
        path = tmp_path / f"{name}.pth"
        write_official(path, case, **kw)
        for argv in (["--weights", path], ["--weights", case.path, "--ckpt", path]):
            code, _, err = run(ed.main, argv + ["--davis", tmp_path / "no_davis"], capsys)
            line = check_error(code, err, path, *needles)
            assert "no 'projection' entry" not in line and (family == "mae" or "mae ViT" not in line)


# =============================================================================
# train.py: a short run learns, resume is bit-equal, DDP equals one process, NaN never reaches a checkpoint

TINY_DIM, TINY_DEPTH = 128, 2


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory):
    """small_vit(0) saved as a bare state dict."""
    return save_to(tmp_path_factory.mktemp("weights") / "tiny_vit.pth", small_vit(0).state_dict())


def seeded(seed, make):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return make()


def small_vit(seed):
    """A randomly initialised (ViT's own init) tiny ViT: width 128 = 2 heads of 64, depth 2, patch 16, 14x14 grid."""
    return seeded(seed, lambda: cosettle.ViT(16, TINY_DIM, TINY_DEPTH, TINY_DIM // 64, grid=(14, 14)))


def train_cli(weights, videos, out, *flags, capsys=None):
    """train.py in-process, on the device it picks, eager (no torch.compile) and without loader workers -> run()'s
    (code, stdout, stderr)."""
    return run(train.main, ["--weights", weights, "--videos", videos, "--out", out, "--no-compile", "--workers", "0",
                            *flags], capsys)


def read_ckpt(path):
    """A train.py checkpoint, its tensors on the CPU whatever device wrote them."""
    return torch.load(path, map_location="cpu", weights_only=True)


def read_log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def small_videos(tmp_path_factory):
    """8 synthetic videos of 8 frames, 64x80."""
    root = tmp_path_factory.mktemp("videos") / "small"
    data.write_synthetic_videos(root, n_videos=8, n_frames=8, height=64, width=80, seed=0)
    return root


@pytest.fixture(scope="session")
def trained_run(tiny_weights, small_videos, tmp_path_factory):
    """The one shared training run (batch 4, 1 epoch = 2 steps) for the tests that only need "a checkpoint":
    -> (its --out folder, its stdout, whether train() put back the SIGTERM/SIGINT handlers it found). Tests that
    change the folder work on a copy."""
    out_dir = tmp_path_factory.mktemp("trained") / "run"
    def mine(signum, frame):
        pass
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, mine)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stdout, stderr = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = train_cli(tiny_weights, small_videos, out_dir, "--batch-size", "4", "--epochs", "1")[0]
        restored = signal.getsignal(signal.SIGTERM) is mine and \
            signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        for s, h in before.items():
            signal.signal(s, h)
    assert code == 0, stderr.getvalue()
    return out_dir, stdout.getvalue(), restored


def copy_run(trained_run, tmp_path):
    return Path(shutil.copytree(trained_run[0], tmp_path / "run"))


def test_short_training_run_raises_cycle_accuracy(tiny_weights, tmp_path, capsys):
    """Random tiny ViT, 16 synthetic videos, 100 steps of 4 clips at 224 px. lambda_reg = 0: on a *random* ViT
    the regulariser pins g(z) to z, whose own cycle accuracy is about that of the fresh projection (~0.10), so
    with the default lambda 3 the gain is only ~+0.02; the cycle term alone takes it from ~0.1 to ~0.4."""
    videos_root = tmp_path / "videos"
    data.write_synthetic_videos(videos_root, n_videos=16, n_frames=8, height=96, width=128, seed=0)
    videos = data.find_videos(videos_root)
    cpu = torch.device("cpu")
    torch.manual_seed(0)  # the projection train() starts from (it seeds with --seed before building CoSettle)
    fresh = cosettle.CoSettle(cosettle.load_encoder(str(tiny_weights)))
    before = train.cycle_accuracy(fresh.eval(), videos, cpu, None, 0)
    args = train.parse_args(["--weights", str(tiny_weights), "--videos", str(videos_root), "--out",
                             str(tmp_path / "out"), "--no-compile", "--workers", "0", "--batch-size", "4",
                             "--epochs", "25", "--blr", "1", "--lambda-reg", "0"])
    trained, steps = train.train(args)  # on the device train() picks, then measured on the CPU as `before` is
    assert steps == 25 * (16 // 4)
    trained.cpu()
    assert torch.equal(read_ckpt(tmp_path / "out" / "cosettle.pth")["projection"]["linear.weight"],
                       trained.projection.linear.weight)
    after = train.cycle_accuracy(trained.eval(), videos, cpu, None, 0)
    assert after > before + 0.15 and after > 2 * before, (before, after)


LOG_KEYS = {"step", "epoch", "lr", "clips_per_s", "tflops", "loss", "cycle", "reg", "accuracy", "sim_identity"}


def test_resume_after_sigterm_and_sigint_equals_uninterrupted(tiny_weights, small_videos, tmp_path, monkeypatch,
                                                             capsys):
    """SIGTERM (exit 143) and Ctrl-C (SIGINT, exit 130, so `train.py && eval_davis.py` stops there) each end the
    step in progress and save it; resuming twice gives the uninterrupted run bit for bit."""
    monkeypatch.setattr(train, "LOG_EVERY", 1)
    common = ["--batch-size", "2", "--epochs", "2", "--blr", "1", "--warmup-epochs", "0.5"]  # 4 steps/epoch
    code, out, _ = train_cli(tiny_weights, small_videos, tmp_path / "a", *common, capsys=capsys)
    assert code == 0 and "done: step 8/8" in out

    real_lr_at = train.lr_at
    calls = []

    def signal_at(k, signum):  # deliver the signal while the k-th step of this run is in progress
        def lr_at(*a):
            calls.append(1)
            if len(calls) == k:
                os.kill(os.getpid(), signum)
            return real_lr_at(*a)
        calls.clear()
        monkeypatch.setattr(train, "lr_at", lr_at)

    guard = []
    signal.signal(signal.SIGTERM, lambda *a: guard.append(a))  # if train() did not catch it, pytest must survive
    b = tmp_path / "b"
    signal_at(3, signal.SIGTERM)
    code, out, _ = train_cli(tiny_weights, small_videos, b, *common, capsys=capsys)
    assert code == 143 and "interrupted: step 3/8" in out and not guard  # 128 + SIGTERM
    ckpt = read_ckpt(b / "cosettle.pth")
    assert set(ckpt) == {"projection", "optimizer", "step", "epoch", "args", "world", "videos", "encoder"}
    assert ckpt["step"] == 3 and ckpt["epoch"] == 0
    assert {k: ckpt["encoder"][k] for k in ("path", "size")} == dict(path=os.path.abspath(tiny_weights),
                                                                      size=os.path.getsize(tiny_weights))
    assert re.fullmatch(r"[0-9a-f]{40}", ckpt["encoder"]["fingerprint"])
    assert ckpt["args"]["blr"] == 1.0 and ckpt["args"]["batch_size"] == 2
    assert set(ckpt["projection"]) == {"linear.weight", "linear.bias", "norm.weight", "norm.bias"}
    assert len(ckpt["optimizer"]["state"]) == 4
    proj = cosettle.load_projection(str(b / "cosettle.pth"))
    assert torch.equal(proj.linear.weight, ckpt["projection"]["linear.weight"])

    signal_at(3, signal.SIGINT)  # resume, and press Ctrl-C mid-epoch 1 (global step 6)
    code, out, err = train_cli(tiny_weights, small_videos, b, *common, "--resume", capsys=capsys)
    assert code == 130 and "starting at step 3" in out and "interrupted: step 6/8" in out, (code, err)
    assert read_ckpt(b / "cosettle.pth")["step"] == 6
    monkeypatch.setattr(train, "lr_at", real_lr_at)
    code, out, _ = train_cli(tiny_weights, small_videos, b, *common, "--resume", capsys=capsys)
    assert code == 0 and "starting at step 6" in out and "done: step 8/8" in out

    ca = read_ckpt(tmp_path / "a" / "cosettle.pth")
    cb = read_ckpt(b / "cosettle.pth")
    assert ca["step"] == cb["step"] == 8 and ca["epoch"] == cb["epoch"] == 2
    for k, v in ca["projection"].items():
        assert torch.equal(cb["projection"][k], v), k
    for i, state in ca["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(cb["optimizer"]["state"][i][k], v), (i, k)
    init = seeded(0, lambda: cosettle.Projection(TINY_DIM))
    assert (init.linear.weight - ca["projection"]["linear.weight"]).abs().max() > 1e-2  # it did train

    logs = {name: read_log(tmp_path / name) for name in ("a", "b")}
    assert all(set(r) == LOG_KEYS for recs in logs.values() for r in recs)
    assert [r["step"] for r in logs["a"]] == [r["step"] for r in logs["b"]] == list(range(1, 9))
    for ra, rb in zip(logs["a"], logs["b"]):
        assert all(ra[k] == rb[k] for k in ("epoch", "lr", "loss", "cycle", "reg", "accuracy")), (ra, rb)
    assert all(math.isfinite(r["loss"]) and 0 <= r["accuracy"] <= 1 for r in logs["a"])
    assert not list(b.glob("*.tmp"))


WRAPPER = """import sys
sys.path.insert(0, {repo!r})
import train
train.autocast_dtype = lambda device: None  # fp32 even on AMX CPUs: the comparison is about gradient averaging
train.main(sys.argv[1:])
"""


def torchrun(wrapper, argv, tmp_path, env):
    """2 gloo processes; the free port can be taken between free_port() and torchrun's bind: retry then."""
    for attempt in range(3):
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(wrapper), *argv],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        if res.returncode == 0 or "address already in use" not in res.stderr.lower():
            return res
    return res


def test_ddp_two_processes_equal_one_and_bad_videos_stop_every_rank(tiny_weights, small_videos, tmp_path):
    wrapper = tmp_path / "run_train.py"
    wrapper.write_text(WRAPPER.format(repo=str(REPO)))
    # the CPU path (gloo), pinned: gradient averaging is what is checked, and on a one-GPU machine rank 1 would
    # ask for a GPU 1 that is not there
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    common = ["--weights", str(tiny_weights), "--videos", str(small_videos), "--no-compile", "--workers", "0",
              "--epochs", "1", "--blr", "1", "--warmup-epochs", "0", "--seed", "3"]  # 8 videos: 2 steps of 4
    ddp = torchrun(wrapper, common + ["--batch-size", "2", "--out", str(tmp_path / "ddp")], tmp_path, env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "2 process(es) x 2 clips, 2 steps/epoch" in ddp.stdout
    one = subprocess.run([sys.executable, str(wrapper), *common, "--batch-size", "4", "--out", str(tmp_path / "one")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    assert "1 process(es) x 4 clips, 2 steps/epoch" in one.stdout
    a = read_ckpt(tmp_path / "ddp" / "cosettle.pth")
    b = read_ckpt(tmp_path / "one" / "cosettle.pth")
    assert a["step"] == b["step"] == 2
    for k, v in b["projection"].items():
        torch.testing.assert_close(a["projection"][k], v, rtol=0, atol=1e-5)
    init = seeded(3, lambda: cosettle.Projection(TINY_DIM))
    assert (init.linear.weight - b["projection"]["linear.weight"]).abs().max() > 1e-3  # not vacuous
    ra, rb = read_log(tmp_path / "ddp"), read_log(tmp_path / "one")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [2]
    assert ra[0]["lr"] == pytest.approx(rb[0]["lr"], rel=1e-12)
    for k in ("loss", "cycle", "reg", "accuracy"):  # the all-reduced mean of the global batch, not rank 0's half
        assert ra[0][k] == pytest.approx(rb[0][k], abs=2e-5), (k, ra[0], rb[0])
    # rank 0 walks the video tree and sends its error to rank 1 as well: both exit, nobody waits forever
    (tmp_path / "empty").mkdir()
    bad = torchrun(wrapper, ["--weights", str(tiny_weights), "--videos", str(tmp_path / "empty"), "--no-compile",
                             "--workers", "0", "--out", str(tmp_path / "out")], tmp_path, env)
    assert bad.returncode != 0
    assert bad.stderr.count("holds no folders with frames") == 2, bad.stderr[-3000:]
    assert not (tmp_path / "out" / "cosettle.pth").exists()


def test_shared_run_hint_handlers_and_overwrite(trained_run, tmp_path, capsys):
    """At the official --blr a run this short prints a one-line hint (with a larger rate
    it does not); train() puts back the signal handlers it found; a second run into the same --out is refused and
    changes nothing (the table below), --overwrite replaces it."""
    out_dir, stdout, restored = trained_run
    assert restored
    hints = [line for line in stdout.splitlines() if line.startswith("hint:")]
    assert len(hints) == 1 and "2 steps at --blr 0.0001" in hints[0] and "--blr 0.1" in hints[0]
    assert read_ckpt(out_dir / "cosettle.pth")["step"] == 2
    run_dir = copy_run(trained_run, tmp_path)
    ckpt = read_ckpt(run_dir / "cosettle.pth")
    assert ckpt["world"] == 1 and ckpt["videos"] == 8 and ckpt["args"]["batch_size"] == 4
    args = json.loads(json.dumps(ckpt["args"], default=str))
    code, out, err = train_cli(args["weights"], args["videos"], run_dir, "--batch-size", "8", "--epochs", "2",
                               "--blr", "0.01", "--overwrite", capsys=capsys)
    assert code == 0 and "done: step 2/2" in out and "hint:" not in out, err
    assert read_ckpt(run_dir / "cosettle.pth")["step"] == 2
    assert [r["step"] for r in read_log(run_dir)] == [2]


def test_projection_checked_against_its_encoder(trained_run, tiny_weights):
    ckpt = trained_run[0] / "cosettle.pth"
    assert cosettle.load_projection(str(ckpt), load_encoder(str(tiny_weights))).linear.in_features == TINY_DIM
    with pytest.raises(BadInput, match="not on the one given"):
        cosettle.load_projection(str(ckpt), small_vit(7))


def test_nan_loss_after_resume_keeps_last_good_checkpoint(trained_run, tiny_weights, small_videos, tmp_path, capsys,
                                                          monkeypatch):
    """Step 3 starts from the good weights (finite loss) and its update with lr = inf (no flag gives one: patched
    in) ruins them: the error names step 3 (if the weights are checked after the update) or step 4 (the first
    non-finite loss); step 3 is mid-epoch, so nothing is saved in between."""
    out_dir = copy_run(trained_run, tmp_path)
    ckpt_path = out_dir / "cosettle.pth"
    good = read_ckpt(ckpt_path)
    assert good["step"] == 2
    monkeypatch.setattr(train, "lr_at", lambda *args: math.inf)
    code, _, err = train_cli(tiny_weights, small_videos, out_dir, "--batch-size", "4", "--epochs", "2", "--resume",
                             capsys=capsys)
    check_error(code, err, ckpt_path, "last good state", re.compile(r"step [34]\b"),
                re.compile(r"\b(nan|inf|non-finite)\b"))
    kept = read_ckpt(ckpt_path)
    assert kept["step"] == 2
    for k, v in good["projection"].items():
        assert torch.equal(kept["projection"][k], v)
    assert not list(out_dir.glob("*.tmp"))


def test_nan_update_on_epoch_boundary_is_not_checkpointed(tiny_weights, small_videos, tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "out"
    common = [tiny_weights, small_videos, out_dir, "--batch-size", "8"]  # 8 videos: every step ends an epoch
    code, _, err = train_cli(*common, "--epochs", "1", capsys=capsys)
    assert code == 0, err
    ckpt_path = out_dir / "cosettle.pth"
    good = read_ckpt(ckpt_path)
    monkeypatch.setattr(train, "lr_at", lambda *args: math.inf)  # --blr refuses inf
    code, _, err = train_cli(*common, "--epochs", "3", "--resume", capsys=capsys)
    check_error(code, err, ckpt_path, re.compile(r"step [23]\b"))  # step 2's update (lr inf) ruins the weights
    kept = read_ckpt(ckpt_path)
    assert all(torch.isfinite(v).all() for v in kept["projection"].values()), "non-finite weights were saved"
    assert kept["step"] == good["step"] == 1


def test_short_and_corrupt_videos_warn_and_training_continues(tiny_weights, tmp_path, capsys):
    root = tmp_path / "videos"
    data.write_synthetic_videos(root / "good", n_videos=7, n_frames=6, height=48, width=64, seed=0)
    data.write_synthetic_videos(root / "short", n_videos=2, n_frames=1, height=48, width=64, seed=1)
    bad = data.write_synthetic_videos(root / "zz_corrupt", n_videos=1, n_frames=6, height=48, width=64, seed=2)[0]
    for frame in data.list_frames(bad):
        frame.write_bytes(frame.read_bytes()[:200])  # truncated JPEGs
    out_dir = tmp_path / "out"
    # 8 usable videos (7 good + the corrupt one), batch 4: both steps together visit every video
    code, out, err = train_cli(tiny_weights, root, out_dir, "--batch-size", "4", "--epochs", "1", capsys=capsys)
    assert code == 0, err
    assert "warning: " in err and "cannot decode" in err
    assert "skipped 2 of 10" in err
    assert "8 videos" in out and "done: step 2/2" in out
    ckpt = read_ckpt(out_dir / "cosettle.pth")
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["projection"].values())


def test_train_on_official_ours_file(official, small_videos, tmp_path, capsys):
    """Its frozen encoder gets a new projection (resuming from the file is refused: the table below)."""
    code, out, err = train_cli(official("dino")[0], small_videos, tmp_path / "out", "--batch-size", "4", "--epochs",
                               "1", capsys=capsys)
    assert code == 0, err
    assert "training a new projection on the frozen dino encoder of this official '+ Ours' checkpoint" in out


def test_demo_says_its_learning_rate_first(tmp_path, monkeypatch, capsys):
    """The demo's first line names its --blr and why; the README says the same."""
    monkeypatch.chdir(tmp_path)

    def stop(*a, **k):
        raise BadInput("stopped after the first line")
    monkeypatch.setattr(train, "write_synthetic_videos", stop)
    code, out, err = run(train.main, [], capsys)
    assert code == 2 and "stopped after the first line" in err
    first = out.splitlines()[0]
    assert "--blr 0.1, not the official 1e-4" in first and "out/demo" in first
    readme = (REPO / "README.md").read_text()
    assert "--blr 0.1" in readme and "ffmpeg" in readme and "%05d.jpg" in readme


# =============================================================================
# eval_davis.py, the metric: J&F against hand cases and slow, obviously-correct versions of
# davis2017-evaluation's metrics.py (per-pixel loops)

def slow_seg2bmap(seg):
    H, W = seg.shape
    b = np.zeros((H, W), bool)
    for y in range(H):
        for x in range(W):
            right = seg[y, x + 1] if x + 1 < W else 0
            down = seg[y + 1, x] if y + 1 < H else 0
            diag = seg[y + 1, x + 1] if y + 1 < H and x + 1 < W else 0
            if y == H - 1 and x == W - 1:
                b[y, x] = False
            elif y == H - 1:
                b[y, x] = seg[y, x] != right
            elif x == W - 1:
                b[y, x] = seg[y, x] != down
            else:
                b[y, x] = seg[y, x] != right or seg[y, x] != down or seg[y, x] != diag
    return b


def slow_dilate(b, r):
    H, W = b.shape
    out = np.zeros_like(b)
    for y in range(H):
        for x in range(W):
            out[y, x] = any(b[y + dy, x + dx] for dy in range(-r, r + 1) for dx in range(-r, r + 1)
                            if dy * dy + dx * dx <= r * r and 0 <= y + dy < H and 0 <= x + dx < W)
    return out


def slow_f(fg, gt, r):
    fb, gb = slow_seg2bmap(fg), slow_seg2bmap(gt)
    n_fg, n_gt = fb.sum(), gb.sum()
    if n_fg == 0 and n_gt > 0:
        p, rc = 1, 0
    elif n_fg > 0 and n_gt == 0:
        p, rc = 0, 1
    elif n_fg == 0 and n_gt == 0:
        p, rc = 1, 1
    else:
        p, rc = (fb & slow_dilate(gb, r)).sum() / float(n_fg), (gb & slow_dilate(fb, r)).sum() / float(n_gt)
    return 0 if p + rc == 0 else 2 * p * rc / (p + rc)


def t(a):
    return torch.as_tensor(np.asarray(a, dtype=bool))


def test_seg2bmap_square_and_border_rule():
    seg = np.zeros((5, 5), bool)
    seg[1:3, 1:3] = True
    expected = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 0, 0], [1, 1, 1, 0, 0], [0] * 5, [0] * 5], bool)
    assert (ed.seg2bmap(t(seg)).numpy() == expected).all()
    # the image border is no boundary: a frame-filling object has none, a last-column object only its left edge
    assert not ed.seg2bmap(torch.ones(3, 3, dtype=torch.bool)).any()
    col = np.zeros((3, 3), bool)
    col[:, 2] = True
    assert (ed.seg2bmap(t(col)).numpy() == np.array([[0, 1, 0]] * 3, bool)).all()
    assert (ed.seg2bmap(t(col)).numpy() == slow_seg2bmap(col)).all()


def test_dilate_disk_is_the_disk():
    b = torch.zeros(1, 11, 11, dtype=torch.bool)
    b[0, 5, 5] = True
    y, x = np.mgrid[-5:6, -5:6]
    for r in (0, 1, 2, 3):
        assert (ed.dilate_disk(b, r)[0].numpy() == (x * x + y * y <= r * r)).all()


def test_degenerate_cases():
    empty, dot = np.zeros((1, 20, 20), bool), np.zeros((1, 20, 20), bool)
    dot[0, 7, 9] = True
    assert ed.jaccard(t(empty), t(empty))[0] == 1 and ed.boundary_f(t(empty), t(empty))[0] == 1
    assert ed.jaccard(t(dot), t(empty))[0] == 0 and ed.boundary_f(t(dot), t(empty))[0] == 0  # P=1, R=0
    assert ed.boundary_f(t(empty), t(dot))[0] == 0  # P=0, R=1
    assert ed.jaccard(t(dot), t(dot))[0] == 1 and ed.boundary_f(t(dot), t(dot))[0] == 1
    assert ed.seg2bmap(t(dot[0])).sum() == 4  # the pixel, its left, upper and upper-left neighbours


def test_shifted_square_known_precision_recall():
    """20x20 square shifted 3 px right on 100x100 (tolerance ceil(0.008*141.4) = 2 px): both boundaries are
    80-px rings; 20 + 20 of the horizontal edges and 4 of the leading vertical edge match -> P = R = 44/80."""
    gt = np.zeros((1, 100, 100), bool)
    gt[0, 40:60, 40:60] = True
    res = np.roll(gt, 3, axis=2)
    assert ed.boundary_f(t(gt), t(res))[0] == pytest.approx(44 / 80, abs=1e-12)
    assert ed.jaccard(t(gt), t(res))[0] == pytest.approx(340 / 460, abs=1e-12)


def test_metric_equals_slow_loops_on_random_masks():
    rng = np.random.default_rng(0)
    for case in range(12):
        H, W = rng.integers(8, 28, 2)
        gt, res = np.zeros((2, H, W), bool), np.zeros((2, H, W), bool)
        for m in (gt, res):
            for k in range(2):
                for _ in range(rng.integers(0, 4)):
                    y, x = rng.integers(0, H), rng.integers(0, W)
                    m[k, y:y + rng.integers(1, H), x:x + rng.integers(1, W)] = True
        if case % 3 == 0:
            res[0] ^= rng.random((H, W)) < 0.1  # speckle
        for th in (0.008, 3):
            r = th if th >= 1 else int(np.ceil(th * np.linalg.norm((H, W))))
            ours = ed.boundary_f(t(gt), t(res), bound_th=th)
            assert list(ours) == [slow_f(res[k], gt[k], r) for k in range(2)]  # exactly, not approximately
        inter, union = (gt & res).sum((1, 2)), (gt | res).sum((1, 2))
        assert list(ed.jaccard(t(gt), t(res))) == [i / u if u else 1 for i, u in zip(inter, union)]


def test_db_statistics_by_hand():
    m, r, d = ed.db_statistics(np.array([1, 0.8, 0.6, 0.4, 0.2, 0.0]))
    # bins from round(linspace(1, 6, 5)) - 1 = [0, 1, 3, 4, 5]: first [1, .8], last [.2, 0]
    assert (m, r) == (pytest.approx(0.5), pytest.approx(0.5)) and d == pytest.approx(0.9 - 0.1)


def copy_gt_as_results(davis, res):
    for p in (davis / "Annotations" / "480p").glob("*/*.png"):
        out = res / p.parent.name / p.name
        out.parent.mkdir(parents=True, exist_ok=True)
        ids = np.array(Image.open(p))
        Image.fromarray(np.where(ids == 255, 0, ids)).save(out)


def test_score_perfect_results_and_csv_format(tmp_path):
    davis = make_davis(tmp_path / "d", n_seqs=2, n_frames=5, height=32, width=48)
    res = tmp_path / "res"
    copy_gt_as_results(davis, res)
    glob, rows = ed.score(davis, res, verbose=False)
    assert glob["J&F-Mean"] == 1 and glob["J-Decay"] == 0 and [r[0] for r in rows] == ["synth-000_1", "synth-001_1",
                                                                                          "synth-001_2"]
    assert (res / "global_results-val.csv").read_text() == \
        "J&F-Mean,J-Mean,J-Recall,J-Decay,F-Mean,F-Recall,F-Decay\n1.000,1.000,1.000,0.000,1.000,1.000,0.000\n"
    assert (res / "per-sequence_results-val.csv").read_text().splitlines() == \
        ["Sequence,J-Mean,F-Mean", "synth-000_1,1.000,1.000", "synth-001_1,1.000,1.000", "synth-001_2,1.000,1.000"]
    data.write_csv(tmp_path / "x.csv", ["a", "b"], [["s", float("nan")], ["t", -0.00049]])
    assert (tmp_path / "x.csv").read_text() == "a,b\ns,\nt,-0.000\n"  # pandas: NaN empty, %.3f
    assert ed.main(["--davis", str(davis), "--masks", str(res)]) == 0  # the CLI scores a results folder too


def test_void_pixels_count_as_background(tmp_path):
    davis = make_davis(tmp_path / "d", n_seqs=1, n_frames=4, height=32, width=48)
    p = davis / "Annotations" / "480p" / "synth-000" / "00002.png"
    ids = np.array(Image.open(p))
    ids[:4] = 255
    img = Image.fromarray(ids)
    img.putpalette(davis_palette())
    img.save(p)
    res = tmp_path / "res"
    copy_gt_as_results(davis, res)
    assert ed.score(davis, res, verbose=False)[0]["J&F-Mean"] == 1


# =============================================================================
# eval_davis.py, propagation: DINO's protocol (vs DINO's dense loop) and the paper's (CropMAE's CRW), end to end

def test_protocols_and_resize_rule():
    imagenet_mean = (0.485, 0.456, 0.406)
    assert ed.PROTOCOLS["dino"] == dict(algorithm="dino", size=480, mean=imagenet_mean, std=(0.228, 0.224, 0.225),
                                        topk=5, context=7, radius=12, temperature=0.1)
    assert ed.PROTOCOLS["paper"] == dict(algorithm="crw", size=(480, 880), mean=imagenet_mean,
                                         std=(0.229, 0.224, 0.225), topk=7, context=20, radius=20, temperature=0.7)
    assert ed.VIP == dict(ed.PROTOCOLS["paper"], size=880, topk=10)
    assert ed.JHMDB == dict(ed.PROTOCOLS["paper"], size=(320, 320))
    dino, paper = ed.protocol_params("dino"), ed.protocol_params("paper", topk=3, radius=None)
    assert (paper["topk"], paper["radius"]) == (3, 20)
    assert ed.target_size(480, 854, dino) == (480, 832) and ed.target_size(854, 480, dino) == (832, 480)
    assert ed.target_size(480, 854, paper) == (480, 880) and ed.target_size(854, 480, paper) == (480, 880)
    assert ed.target_size(50, 70, dict(dino, size=64)) == (64, 64)
    # CropMAE vos.py, crop_size [880]: long side 880, int(short * 880 / long) floored to a multiple of 64
    for (H, W), want in {(720, 1280): (448, 880), (1080, 1920): (448, 880), (480, 854): (448, 880),
                         (360, 640): (448, 880), (480, 640): (640, 880), (1280, 720): (880, 448),
                         (500, 500): (880, 832)}.items():
        assert ed.target_size(H, W, ed.VIP) == want, (H, W)
    for bad in (dict(height=3), dict(size=0), dict(size=(480, 0))):
        with pytest.raises(BadInput):
            ed.protocol_params("dino", **bad)


def tiny_vit():
    return build_vit("vit_tiny", patch_size=8, seed=0).eval()


def evaluate(encoder, projection, davis_root, out_dir, protocol="paper", **overrides):
    """J&F of one variant on DAVIS through run(): the 7 global metrics (None when only first-frame annotations)."""
    name = "baseline" if projection is None else "cosettle"
    overrides["device"] = overrides.get("device") or next(encoder.parameters()).device
    return ed.run(ed.encoder_embed(encoder), encoder.patch_size, {"davis": davis_root}, out_dir, {name: projection},
                  protocol, **overrides)[name]["davis"]


def dino_window(h, w, radius, device):
    """DINO's restrict_neighborhood, its loops as written: [N, N] 1 where |di|, |dj| <= radius, else 0."""
    mask = torch.zeros(h, w, h, w, device=device)
    for i in range(h):
        for j in range(w):
            mask[i, j, max(0, i - radius):min(h, i + radius + 1), max(0, j - radius):min(w, j + radius + 1)] = 1
    return mask.reshape(h * w, h * w)


@torch.no_grad()
def dino_loop(x, labels0, embed, patch, params):
    """DINO eval_video_segmentation.py's per-frame loop as written (facebookresearch/dino): one forward per frame,
    dense [context, N, N] affinity exp(cos / T) times the window mask, top-k along the key axis, normalise, label
    transfer, queue of soft predictions, per-channel min-max, argmax -> uint8 labels of frames 1..T-1."""
    f0 = embed(x[:1])[0]
    h, w, _ = f0.shape
    N, K = h * w, labels0.shape[0]
    mask = dino_window(h, w, params["radius"], x.device) if params["radius"] > 0 else 1.0
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
    """Our path on in-memory frames (frames 1..T-1 -> uint8 labels): eval_davis's batched forward, the protocol's
    core, its read-out, one host transfer per batch."""
    out, prop = [], None
    for a in range(0, len(x), batch_size):
        feats = embed(x[a:a + batch_size])
        prop = prop if prop is not None else ed.CORES[params["algorithm"]](feats[0], labels0, params)
        soft = [prop(f) for f in feats[1 if a == 0 else 0:]]
        if soft:
            out.append(ed.read_out(torch.stack(soft), params, patch, x.shape[-2:]).to(torch.uint8).cpu())
    return torch.cat(out)


@pytest.mark.parametrize("repeat", [False, True])
def test_propagation_equals_dino_loop(repeat):
    """Batched ring-buffer propagation == DINO's per-frame dense loop, also with exact ties (repeated frames)."""
    frames, masks = synthetic_video(1, 7, 48, 64, n_objects=2)
    if repeat:
        frames[2:5] = frames[1]
    params = dict(ed.PROTOCOLS["dino"], context=2, radius=3)
    x = torch.stack([ed.normalise(torch.from_numpy(f).permute(2, 0, 1).float(), (48, 64), (0.228, 0.224, 0.225))
                     for f in frames])
    embed = ed.encoder_embed(tiny_vit())
    labels0 = ed.first_labels(masks[0], 6, 8)
    ours = fast_loop(x, labels0, embed, 8, params, batch_size=3)
    ref = dino_loop(x, labels0, embed, 8, params)
    assert ours.shape == (6, 48, 64)
    assert (ours == ref).float().mean() >= 0.999


def oracle_embed(x, patch=4, n=256):
    """What an ideal encoder would give on the synthetic scenes: random Fourier features of (colour, position)
    per patch, so that cosine similarity ~ a Gaussian kernel on colour (scale 0.5) and position (16 px)."""
    g = torch.Generator().manual_seed(0)
    proj, phase = torch.randn(5, n, generator=g), 2 * math.pi * torch.rand(n, generator=g)
    colour = 2 * F.avg_pool2d(x, patch)
    B, _, h, w = colour.shape
    i, j = torch.meshgrid(torch.arange(h) * patch / 16, torch.arange(w) * patch / 16, indexing="ij")
    v = torch.cat([colour, torch.stack([i, j]).expand(B, -1, -1, -1)], 1).permute(0, 2, 3, 1)
    return torch.cos(v @ proj + phase)


def test_oracle_features_propagate_well(tmp_path):
    davis = make_davis(tmp_path / "d", n_seqs=3, n_frames=8, height=64, width=96, seed=1)
    plan = ed.read_davis(davis)
    params = ed.protocol_params("dino", size=(64, 96))
    noise = lambda x: torch.randn(x.shape[0], 16, 24, 64, generator=torch.Generator().manual_seed(0))
    outs = {"oracle": tmp_path / "oracle", "noise": tmp_path / "noise"}
    for name, embed in (("oracle", oracle_embed), ("noise", noise)):
        assert ed.segment(plan, embed, {name: None}, outs, params, 4, "cpu", batch_size=3, verbose=False) == 24
    oracle, noise = (ed.score(davis, outs[k], verbose=False)[0]["J&F-Mean"] for k in ("oracle", "noise"))
    assert oracle > 0.8 and noise < 0.3, (oracle, noise)  # measured: 0.846 and 0.099


def test_compare_odd_sizes_and_overlays(tmp_path):
    davis = make_davis(tmp_path / "d", n_seqs=2, n_frames=4, height=50, width=70)  # not multiples of the patch
    enc = tiny_vit()
    proj = Projection(enc.embed_dim).eval()
    m = ed.compare(enc, proj, davis, tmp_path / "out", protocol="dino", size=64, overlay=True, verbose=False)
    assert set(m) == {"baseline", "cosettle", "difference"}
    m = {k: v["davis"] for k, v in m.items()}
    assert all(0 <= m[k]["J&F-Mean"] <= 1 for k in ("baseline", "cosettle"))
    assert m["difference"]["J-Mean"] == pytest.approx(m["cosettle"]["J-Mean"] - m["baseline"]["J-Mean"])
    out = Image.open(tmp_path / "out" / "cosettle" / "synth-001" / "00003.png")
    assert out.mode == "P" and out.size == (70, 50)  # back to the original size
    overlay = Image.open(tmp_path / "out" / "baseline" / "overlays" / "synth-000" / "00003.png")
    assert overlay.mode == "RGB" and overlay.size == (70, 50)
    one = evaluate(enc, None, davis, tmp_path / "one", protocol="dino", size=64, verbose=False)
    assert one == m["baseline"]  # the same frames, the same numbers


def cal_metric_reference(feats, bs=32):
    """yafeng19/Co-Settle cal_metric.py's compute_intra_video_metric, compute_inter_video_metric,
    compute_effective_rank and compute_cycle_accuracy transcribed on given tokens [V, T, P, D]: the model calls
    become slices, batches of `bs` videos as its DataLoader, randperm on the CPU generator (device='cpu')."""
    batches = feats.split(bs)
    intra, normed = [], {90: [], 95: [], 100: []}
    for f in batches:
        B, T, P, D = f.shape
        valid = f[:, 3:T - 3]
        curr = valid[:, :-1].reshape(B * (T - 7), P, D)
        nxt = valid[:, 1:].reshape(B * (T - 7), P, D)
        mins, _ = torch.min(torch.cdist(curr, nxt, p=2).view(B, T - 7, P, P), dim=-1)
        selected, _ = torch.topk(mins, int(P * 0.5), largest=False, dim=-1)
        video = selected.mean(dim=-1).mean(dim=1)
        intra.append(video)
        patches = f.reshape(B, T * P, D)
        to_center = torch.norm(patches - patches.mean(dim=1).unsqueeze(1), p=2, dim=-1)
        for p in normed:
            radii = to_center.max(dim=1)[0] if p == 100 else torch.quantile(to_center, p / 100.0, dim=1)
            normed[p].append(video / (radii * 2 + 1e-8))
    out = dict(intra=[torch.cat(intra).mean().item()] + [torch.cat(normed[p]).mean().item() for p in normed])
    mid = torch.cat([f[:, f.shape[1] // 2] for f in batches])
    N, P, D = mid.shape
    torch.manual_seed(42)
    sampled = mid[:, torch.randperm(P, device="cpu")[:8]] if P > 8 else mid
    pair = torch.norm(sampled.unsqueeze(1) - sampled.unsqueeze(0), p=2, dim=-1).mean(dim=-1)
    original = pair[torch.triu(torch.ones(N, N, dtype=torch.bool), diagonal=1)].mean().item()
    flat = sampled.reshape(-1, D)
    to_center = torch.norm(flat - flat.mean(dim=0).unsqueeze(0), p=2, dim=-1)
    out["inter"] = [original]
    for p in (90, 95, 100):
        radius = to_center.max().item() if p == 100 else \
            torch.sort(to_center)[0][:int(len(to_center) * p / 100.0)].max().item()
        out["inter"].append(original / (radius * 2 + 1e-8))
    s = torch.linalg.svdvals(mid.reshape(-1, D))
    q = s / s.sum() + 1e-12
    out["rank"] = (torch.exp(-torch.sum(q * torch.log(q))) / min(N * P, D)).item()
    pairs = torch.tensor([[0.25, 0.4], [0.35, 0.5], [0.45, 0.6], [0.55, 0.7], [0.65, 0.8]], dtype=torch.float32)
    accs = []
    for f in batches:
        B, T, P, D = f.shape
        t = (pairs * T).long().clamp(max=T - 1)
        g = f[:, torch.stack([t[:, 0], t[:, 1], t[:, 0]], dim=1).view(-1)].reshape(B, 5, 3, P, D)
        if P == int(P ** 0.5) ** 2 + 1:
            g = g[:, :, :, 1:]  # remove CLS
        S = int(g.shape[3] ** 0.5)
        g = g.reshape(B, 5, 3, S, S, D).permute(0, 1, 2, 5, 3, 4)
        g = F.avg_pool2d(g.flatten(0, 2), kernel_size=2, stride=2).flatten(2).transpose(1, 2).view(B, 5, 3, -1, D)
        A = torch.einsum('bndti,bndtj->bntij', g[:, :, :-1].permute(0, 1, 4, 2, 3), g[:, :, 1:].permute(0, 1, 4, 2, 3))
        walk = F.softmax(A[:, :, 0] / 0.03, dim=-1) @ F.softmax(A[:, :, 1] / 0.03, dim=-1)
        logit = torch.log(walk + 1e-6).view(-1, walk.shape[-1])
        accs.append((logit.argmax(dim=-1) == torch.arange(walk.shape[-1]).repeat(B * 5)).float().mean().item())
    out["cycle"] = float(np.mean(accs))
    return out


@pytest.mark.parametrize("P", [196, 197])  # patch tokens only (MAE, CLIP, + Co-Settle); CLS first (DINO baseline)
def test_tradeoff_metrics_match_cal_metric(P):
    """35 videos: two DataLoader batches, the second partial, so the batch mean of means is exercised."""
    g = torch.Generator().manual_seed(P)
    base = torch.randn(35, 1, P, 16, generator=g)
    feats = base + torch.rand(35, 1, 1, 1, generator=g) * torch.randn(35, 12, P, 16, generator=g)
    feats = feats * torch.logspace(-2, 0, 16)  # anisotropic, so the effective rank is well below 1
    ours = ed.tradeoff_metrics([ed.video_metrics(f) for f in feats])
    ref = cal_metric_reference(feats)
    assert 0.1 < ref["cycle"] < 0.9  # neither all nor none of the walks return
    for k in ("cycle", "rank", "intra", "inter"):
        assert ours[k] == pytest.approx(ref[k], rel=1e-5), k


def test_tradeoff_diameters_and_ratios_by_hand(capsys):
    # one video, T = 8, P = 4 (2x2), D = 1: the tokens are +-0 .. +-15 (centre 0); frames 3 and 4 (the only pair)
    # are [0, 0, 1, -1] and [2, -2, 3, -3]: nearest distances 2, 2, 1, 1, the closest half 1, 1 -> intra 1.
    # 32 sorted distances 0, 0, 1, 1, ..., 15, 15: quantile 0.9 at 27.9 -> 13.9, 0.95 at 29.45 -> 14.45, max 15.
    rest = [s * v for v in range(4, 16) for s in (1, -1)]  # frames 0-2 and 5-7
    f = torch.tensor(rest[:12] + [0, 0, 1, -1, 2, -2, 3, -3] + rest[12:], dtype=torch.float).view(8, 4, 1)
    intra, diameters, cycle, mid = ed.video_metrics(f)
    assert intra.item() == 1 and diameters.tolist() == pytest.approx([27.8, 28.9, 30.0])
    assert cycle.item() == 1 and mid.flatten().tolist() == [2, -2, 3, -3]  # one pooled token always returns
    # two videos: intra 1 and 3 over diameters [2, 4, 8] and [6, 6, 6] -> 2.0; 0.5, 0.375, 0.3125. Middle frames
    # [0, 0, 0, 0] and [1, 2, 3, 10]: inter 16 / 4 = 4; centre 2, sorted distances 0, 1, 1, 2, 2, 2, 2, 8:
    # 90% and 95% keep int(7.2) = int(7.6) = 7 -> radius 2 (a quantile would give 3.8), 100% -> 8.
    videos = [(torch.tensor(1.0), torch.tensor([2.0, 4, 8]), torch.tensor(0.25), torch.zeros(4, 1)),
              (torch.tensor(3.0), torch.tensor([6.0, 6, 6]), torch.tensor(0.75), torch.tensor([[1.0], [2], [3], [10]]))]
    m = ed.tradeoff_metrics(videos)
    assert m["intra"] == pytest.approx([2.0, 0.5, 0.375, 0.3125])
    assert m["inter"] == pytest.approx([4.0, 1.0, 1.0, 0.25]) and m["cycle"] == 0.5
    assert m["rank"] == pytest.approx(1.0)  # one column: one singular value
    ed.print_tradeoff("hand", m)
    out = capsys.readouterr().out
    for line in ("- Cycle Accuracy: 0.5000", "- Normalized by 95% diameter: 0.3750", "- Original: 2.0000",
                 "- 95% normalized: 2.6667", "- 100% normalized: 0.8000"):
        assert line in out
    # cycle accuracy is the mean of the means of batches of 32 videos: 32 videos at 1 and one at 0 -> 0.5, not 32/33
    videos = [(torch.tensor(1.0), torch.ones(3), torch.tensor(float(i < 32)), torch.randn(4, 1)) for i in range(33)]
    assert ed.tradeoff_metrics(videos)["cycle"] == 0.5


def test_tradeoff_cli_skips_and_prints(tiny_weights, tmp_path, capsys):
    good = data.write_synthetic_videos(tmp_path / "v", n_videos=2, n_frames=40, height=36, width=48)
    short = data.write_synthetic_videos(tmp_path / "s", n_videos=1, n_frames=39, height=36, width=48)[0]
    listed = tmp_path / "sample.csv"  # cal_metric.py's --sample_csv_path: one folder a line, in that order
    listed.write_text(f"{good[1]}\n{short}\n{tmp_path / 'gone'}\n\n{good[0]}\n")
    ckpt = save_to(tmp_path / "p.pth", {"projection": Projection(TINY_DIM).state_dict(),
                                        "encoder": {"fingerprint": cosettle.fingerprint(small_vit(0))}})
    code, out, err = run(ed.main, ["--tradeoff", "--videos", listed, "--weights", tiny_weights, "--ckpt", ckpt],
                         capsys)
    assert code == 0, err
    assert f"Skipping {short}: has 39 frames, expected 40" in out and f"Skipping {tmp_path / 'gone'}: path does " \
        "not exist" in out and "Found 2 valid videos with exactly 40 frames" in out
    assert "tradeoff: video 1/2" in out and "tradeoff: video 2/2" in out
    for name in ("baseline", "cosettle"):
        block = out.split(f"Global Video Metric Results ({name}):")[1]
        assert re.search(r"- Effective Rank: \d\.\d{4}\n\nInter-video Distances:\n- Original: \d+\.\d{4}\n"
                         r"- Normalized by 90% diameter: \d\.\d{4}\n", block)
        assert re.search(r"\nInter/Intra ratios:\n- Original: \d+\.\d{4}\n- 90% normalized: ", block)
    listed.write_text(f"{short}\n")
    code, _, err = run(ed.main, ["--tradeoff", "--videos", listed, "--weights", tiny_weights], capsys)
    check_error(code, err, "no video with exactly 40 frames")


def test_first_frame_annotations_only_propagate_without_scoring(tmp_path, capsys):
    """A test-dev style set (only 00000.png per sequence) is propagated in full and not scored."""
    davis = make_davis(tmp_path / "davis", n_seqs=1, n_frames=5, height=32, width=48, seed=3)
    for ann in sorted((davis / "Annotations" / "480p" / "synth-000").glob("*.png"))[1:]:
        ann.unlink()
    encoder = build_vit("vit_tiny", 16, seed=0).eval()
    out = tmp_path / "out"
    assert evaluate(encoder, None, davis, out, "dino", size=(32, 48)) is None
    assert "not scored" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "synth-000").glob("*.png")) == [f"{t:05d}.png" for t in range(5)]
    assert not (out / "global_results-val.csv").exists()
    with pytest.raises(BadInput, match="cannot score"):
        ed.score(davis, out)


def test_patch_14_encoders_propagate_on_the_floored_grid(tmp_path):
    """480 is not a multiple of 14: the input is floored to the patch grid, masks still come back full size."""
    davis = make_davis(tmp_path / "davis", n_seqs=1, n_frames=3, height=30, width=44, seed=5)
    encoder = cosettle.ViT(14, 64, 1, 1, grid=(4, 4)).eval()
    metrics = evaluate(encoder, None, davis, tmp_path / "out", "paper", size=(30, 44), verbose=False)
    assert 0 <= metrics["J&F-Mean"] <= 1
    with Image.open(tmp_path / "out" / "synth-000" / "00002.png") as img:
        assert img.size == (44, 30)


# The paper's pipeline: references written here from alexandre-eymael/CropMAE downstreams/propagation: src/test.py
# test(), src/utils/test_utils.py (context_index_bank, mem_efficient_batched_affinity, dump_predictions),
# src/data/vos.py.

def cropmae_padded_propagation(feats, labels0, k, radius, temp, n=20):
    """CropMAE's test() as written, in float64: the video padded with n real copies of frame 0, key_indices
    [0] + [t .. t+n-1] per target, the radius mask added as -1e10 to the short-term slots, A / temp, top-k
    over all slots jointly, softmax, soft labels fed back. feats [T, D, h, w] L2-normalised, labels0 [C, h, w]."""
    T, D, h, w = feats.shape
    padded = torch.cat([feats[:1].expand(n, -1, -1, -1), feats])  # positions 0..n-1 are frame 0
    lbls = torch.zeros(n + T, labels0.shape[0], h, w, dtype=feats.dtype)
    lbls[:n + 1] = labels0
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dist = (((i.flatten()[:, None] - i.flatten()[None]) ** 2 + (j.flatten()[:, None] - j.flatten()[None]) ** 2)
            .double() ** 0.5)
    mask = torch.where(dist < radius, 0.0, -1e10).double()  # [keys, queries]
    out = [labels0]
    for t in range(1, T):
        idx = [0] + list(range(t, t + n))
        keys = padded[idx].flatten(2)  # [1 + n, D, N]
        q = padded[t + n].flatten(1)  # [D, N]
        A = torch.einsum("sdk,dq->skq", keys, q)
        A[1:] += mask
        A = A.reshape(-1, h * w) / temp
        vals, ids = torch.topk(A, k, dim=0)
        weights = torch.softmax(vals, dim=0)  # [k, N]
        ctx = lbls[idx].flatten(2).permute(1, 0, 2).reshape(labels0.shape[0], -1)  # [C, (1 + n) N]
        pred = (ctx[:, ids] * weights[None]).sum(1).reshape(-1, h, w)
        lbls[t + n] = pred
        out.append(pred)
    return torch.stack(out)


def crw_core(feats, labels0, **params):
    p = dict(ed.PROTOCOLS["paper"], **params)
    prop = ed.CRWPropagation(feats[0].permute(1, 2, 0), labels0, p)
    return torch.stack([labels0] + [prop(f.permute(1, 2, 0)) for f in feats[1:]])


@pytest.mark.parametrize("k,radius", [(7, 20), (10, 2.5), (1, 1), (21, 30)])
def test_crw_propagation_equals_the_padded_reference(k, radius):
    """26 frames cover t <= 20 (frame 0 repeated 22 - t times) and t > 20 (once); small radii mask the
    short-term slots and not frame 0's long-memory slot. Features: a few distinct vectors plus noise, so similar
    cells recur across frames (near-ties closer than float32 resolves are avoided: float64 vs float32)."""
    g = torch.Generator().manual_seed(k)
    base = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1)
    feats = base[torch.randint(0, 6, (26, 4, 5), generator=g)].permute(0, 3, 1, 2) + \
        0.1 * torch.randn(26, 8, 4, 5, generator=g, dtype=torch.float64)
    feats = F.normalize(feats, dim=1)
    labels0 = torch.softmax(3 * torch.randn(3, 4, 5, generator=g, dtype=torch.float64), 0)
    ref = cropmae_padded_propagation(feats, labels0, k, radius, 0.7)
    ours = crw_core(feats.float(), labels0.float(), topk=k, radius=radius)
    assert torch.allclose(ours.double(), ref, atol=1e-5), (ours.double() - ref).abs().max()


def test_crw_frame0_multiplicity_by_hand():
    """One cell, k = 21 (every slot kept), frame 0 at cosine 0 to the rest, frames >= 1 identical (cosine 1):
    frame 0 fills 1 + (21 - t) slots for t <= 20 (21, 20, ..., 2) and 1 slot after, each at weight e^0, the
    real frames e^(1/0.7). The recurrence below is worked from those counts alone."""
    T, e = 24, math.exp(1 / 0.7)
    feats = torch.zeros(T, 2, 1, 1)
    feats[0, 0], feats[1:, 1] = 1, 1
    labels0 = torch.tensor([1.0, 0.0])[:, None, None]
    ours = crw_core(feats, labels0, topk=21, radius=5)[:, 0, 0, 0]
    multiplicity = {1: 21, 2: 20, 20: 2, 21: 1, 22: 1}
    p = [1.0]
    for t in range(1, T):
        m0 = max(1, 22 - t)
        assert m0 == multiplicity.get(t, m0)
        real = list(range(max(1, t - 20), t))  # the real frames among the short-term slots
        p.append((m0 * 1.0 + e * sum(p[s] for s in real)) / (m0 + e * len(real)))
    assert torch.allclose(ours, torch.tensor(p), atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 7, 21])
def test_crw_first_step_is_nearest_neighbour_of_frame_0(k):
    """At t = 1 every slot holds frame 0: the top-k are k copies of the best cell, so the output is its label."""
    g = torch.Generator().manual_seed(k)
    f0, f1 = F.normalize(torch.randn(2, 16, 5, 6, generator=g), dim=1)
    labels0 = torch.rand(4, 5, 6, generator=g)
    out = crw_core(torch.stack([f0, f1]), labels0, topk=k, radius=100)[1]
    best = (f1.flatten(1).T @ f0.flatten(1)).argmax(1)  # [queries] -> best key cell
    assert torch.allclose(out.flatten(1), labels0.flatten(1)[:, best], atol=1e-6)


def test_crw_labels_are_the_2x2_centre_mean_and_resizes_follow_opencv_and_pil(tmp_path):
    rng = np.random.default_rng(0)
    ann = rng.integers(0, 3, (32, 48)).astype(np.uint8)
    Image.fromarray(ann).save(tmp_path / "a.png")
    ids, labels = ed.crw_labels(tmp_path / "a.png", ann, (32, 48), (2, 3))
    assert list(ids) == [0, 1, 2]
    for c in range(3):
        for i in range(2):
            for j in range(3):
                centre = ann[16 * i + 7:16 * i + 9, 16 * j + 7:16 * j + 9] == c
                assert labels[c, i, j].item() == pytest.approx(centre.mean())
    # OpenCV INTER_NEAREST: src = floor(dst * in / out); PIL NEAREST: floor((dst + 0.5) * in / out)
    row = np.arange(7, dtype=np.uint8)[None]
    assert ed.nearest(np.arange(3, dtype=np.uint8)[None], (1, 7)).tolist() == [[0, 0, 0, 1, 1, 2, 2]]
    assert ed.nearest(row, (1, 3)).tolist() == [[0, 2, 4]]
    # 1024 -> 880: dst * 1024 / 880 is exactly 64, 128, 256, 512 at these columns; OpenCV (double) lands on them,
    # torch's float32 'nearest' on the pixel before
    assert ed.nearest_index(1024, 880)[[55, 110, 220, 440]].tolist() == [64, 128, 256, 512]
    torch_nearest = F.interpolate(torch.arange(1024.)[None, None, None], size=(1, 880), mode="nearest")
    assert torch_nearest[0, 0, 0, [55, 110, 220, 440]].tolist() == [63, 127, 255, 511]
    assert np.array(Image.fromarray(row).resize((3, 1), Image.NEAREST)).tolist() == [[1, 3, 5]]
    # palette PNGs: channels in the order cv2.imread's BGR colours sort
    img = Image.fromarray(np.array([[0, 1, 2, 3, 4]], np.uint8), "P")
    img.putpalette(davis_palette())
    img.save(tmp_path / "p.png")
    ids, _ = ed.crw_labels(tmp_path / "p.png", np.array([[0, 1, 2, 3, 4]], np.uint8), (1, 5), (1, 5))
    # BGR: 0 (0,0,0), 1 (0,0,128), 2 (0,128,0), 3 (0,128,128), 4 (128,0,0)
    assert list(ids) == [0, 1, 2, 3, 4]
    img = Image.fromarray(np.array([[0, 8, 1]], np.uint8), "P")  # 8 is (64,0,0): BGR (0,0,64) before 1's
    img.putpalette(davis_palette())
    img.save(tmp_path / "q.png")
    assert list(ed.crw_labels(tmp_path / "q.png", np.array([[0, 8, 1]], np.uint8), (1, 3), (1, 3))[0]) == [0, 8, 1]


def cropmae_davis_masks(davis, seq, embed, size, patch, k=7, radius=20):
    """CropMAE's DAVIS path end to end, from the files: frames resized in float, std 0.229, labels nearest then
    one-hot then bilinear to the grid, the padded propagation above, bilinear to the processing size, argmax,
    the id, OpenCV nearest back to the annotation size."""
    frames = sorted((davis / "JPEGImages" / "480p" / seq).glob("*.jpg"))
    ann = np.array(Image.open(davis / "Annotations" / "480p" / seq / "00000.png"))
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1).double()
                     for f in frames]) / 255
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).double()[:, None, None]) / \
        torch.tensor([0.229, 0.224, 0.225]).double()[:, None, None]
    feats = F.normalize(embed(x.float()).double().permute(0, 3, 1, 2), dim=1)
    cv2_nearest = lambda n_in, n_out: np.minimum(np.floor(np.arange(n_out) * (1.0 / (n_out / n_in))), n_in - 1
                                                 ).astype(int)  # OpenCV resize.cpp resizeNN, in double
    small = ann[cv2_nearest(ann.shape[0], size[0])][:, cv2_nearest(ann.shape[1], size[1])]
    ids = np.unique(small)
    onehot = torch.from_numpy(small[None] == ids[:, None, None]).double()
    labels0 = F.interpolate(onehot[None], size=feats.shape[-2:], mode="bilinear", align_corners=False)[0]
    soft = cropmae_padded_propagation(feats, labels0, k, radius, 0.7)
    up = F.interpolate(soft, size=size, mode="bilinear", align_corners=False).argmax(1).numpy()
    H, W = ann.shape
    back = up[:, cv2_nearest(size[0], H)][:, :, cv2_nearest(size[1], W)]
    return ids[back]


def test_paper_protocol_reproduces_cropmae_masks_end_to_end(tmp_path):
    davis = make_davis(tmp_path / "d", n_seqs=2, n_frames=6, height=40, width=56, seed=2)
    embed = lambda x: oracle_embed(x, patch=8)
    outs = {"oracle": tmp_path / "o"}
    plan = ed.read_davis(davis)
    params = ed.protocol_params("paper", size=(48, 64), radius=3)
    ed.segment(plan, embed, {"oracle": None}, outs, params, 8, "cpu", batch_size=4, verbose=False)
    for seq, frames, _, _ in plan:
        ref = cropmae_davis_masks(davis, seq, embed, (48, 64), 8, radius=3)
        ours = np.stack([np.array(Image.open(outs["oracle"] / seq / f"{f.stem}.png")) for f in frames])
        assert (ours == ref).mean() >= 0.999, (seq, (ours == ref).mean())
    assert ed.score(davis, outs["oracle"], verbose=False)[0]["J&F-Mean"] > 0.5  # measured 0.591 (noise: ~0.1)


# =============================================================================
# eval_davis.py, VIP: the metric by hand, the pipeline end to end

def make_vip(root, n_videos=2, n_frames=6, height=72, width=128, stride=5, seed=0):
    """Write a synthetic VIP_Fine folder and return it: root/lists/val_videos.txt, root/Images/videos<N>/<frame>.jpg
    and root/Annotations/Category_ids/videos<N>/<frame>.png (greyscale part ids 0..19), frames named by their
    12-digit number. Like VIP's annotated key frames, only every `stride`-th frame of the synthetic video is kept,
    so objects move a lot between two of them. Each object is a "person" of three parts (top, middle and bottom
    third of its visible extent: hair / upper-clothes / pants, or hat / coat / skirt)."""
    root = data.prepare_root(root)
    if n_videos < 1 or n_frames < 1 or stride < 1:
        raise BadInput(f"synthetic VIP: need videos, frames and stride >= 1, got {n_videos}, {n_frames}, {stride}.")
    parts = [(2, 4, 8), (1, 6, 11)]
    names = [f"videos{v + 1}" for v in range(n_videos)]
    for v, name in enumerate(names):
        video = data.synthetic_frames((seed, 2, v), (n_frames - 1) * stride + 1, height, width, n_objects=2)
        for t, (frame, mask) in enumerate(video):  # rendered one at a time: memory independent of the length
            if t % stride:
                continue
            ids = np.zeros((height, width), np.uint8)
            for k, classes in enumerate(parts):
                ys = np.nonzero(mask == k + 1)[0]
                if len(ys):
                    third = (np.arange(height)[:, None] - ys.min()) * 3 // (ys.max() - ys.min() + 1)
                    ids = np.where(mask == k + 1, np.take(classes, np.clip(third, 0, 2)), ids)
            stem = f"{t + 1:012d}"
            data.atomic(root / "Images" / name / f"{stem}.jpg",
                   lambda tmp: Image.fromarray(frame).save(tmp, "JPEG", quality=95))
            data.atomic(root / "Annotations" / "Category_ids" / name / f"{stem}.png",
                   lambda tmp: Image.fromarray(ids.astype(np.uint8)).save(tmp, "PNG"))
    data.atomic(root / "lists" / "val_videos.txt", lambda tmp: tmp.write_text("".join(n + "\n" for n in names)))
    return root


def write_vip_pair(root, video, stem, frame, ids):
    (root / "Images" / video).mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / "Category_ids" / video).mkdir(parents=True, exist_ok=True)
    Image.fromarray(frame).save(root / "Images" / video / f"{stem}.jpg")
    Image.fromarray(ids.astype(np.uint8)).save(root / "Annotations" / "Category_ids" / video / f"{stem}.png")


def test_vip_metric_by_hand(tmp_path):
    """gt 0 0 1 1 2 vs pred 0 1 1 1 0: IoU 1/3, 2/3, 0, the 17 absent classes NaN and dropped -> mIoU 1/3; pixel
    accuracy 3/5; class accuracies 1/2, 1, 0 -> 1/2. A prediction at another size is resized with PIL NEAREST."""
    root, res = tmp_path / "vip", tmp_path / "res"
    write_vip_pair(root, "videos1", "000000000001", np.zeros((1, 5, 3), np.uint8), np.array([[0, 0, 1, 1, 2]]))
    (root / "lists").mkdir()
    (root / "lists" / "val_videos.txt").write_text("videos1\n")
    (res / "videos1").mkdir(parents=True)
    Image.fromarray(np.array([[0, 1, 1, 1, 0]], np.uint8)).save(res / "videos1" / "000000000001.png")
    m = ed.score_vip(ed.read_vip(root), res, verbose=False)
    assert m["mIoU"] == pytest.approx(1 / 3) and m["pixel_accuracy"] == pytest.approx(3 / 5)
    assert m["mean_accuracy"] == pytest.approx(0.5) and m["IoU"][:3] == pytest.approx([1 / 3, 2 / 3, 0])
    assert all(math.isnan(v) for v in m["IoU"][3:])
    # twice as wide: PIL NEAREST takes columns 1, 3, 5, 7, 9 = the same 0 1 1 1 0
    Image.fromarray(np.repeat(np.array([[0, 1, 1, 1, 0]], np.uint8), 2, 1)).save(res / "videos1" / "000000000001.png")
    assert ed.score_vip(ed.read_vip(root), res, verbose=False)["mIoU"] == pytest.approx(1 / 3)
    assert ed.main(["--vip", str(root), "--masks", str(res)]) == 0
    summary = json.loads((res / "summary.json").read_text())
    assert summary["vip"]["mIoU"] == pytest.approx(1 / 3) and summary["data"]["vip"]["videos"] == 1
    # a later frame's void (255) pixels are not scored, whatever is predicted there (eval_vip.py fast_hist)
    write_vip_pair(root, "videos1", "000000000026", np.zeros((1, 5, 3), np.uint8), np.array([[1, 255, 255, 2, 2]]))
    Image.fromarray(np.array([[1, 0, 1, 2, 0]], np.uint8)).save(res / "videos1" / "000000000026.png")
    m = ed.score_vip(ed.read_vip(root), res, verbose=False)  # pooled: (0,0) (0,1) (1,1)x3 (2,0)x2 (2,2)
    assert m["IoU"][:3] == pytest.approx([1 / 4, 3 / 4, 1 / 3]) and m["pixel_accuracy"] == pytest.approx(5 / 8)


def test_vip_end_to_end_oracle_compare_and_summary(tmp_path):
    vip = make_vip(tmp_path / "vip", n_videos=2, n_frames=4, height=48, width=64)
    plan = ed.read_vip(vip)
    assert [p[0] for p in plan] == ["videos1", "videos2"] and [f.name for f in plan[0][1]][:2] == \
        ["000000000001.jpg", "000000000006.jpg"]
    # features that identify positions only: every frame is frame 0's grid labels brought back (a copy)
    position = lambda x: torch.eye(48)[None].expand(x.shape[0], -1, -1).reshape(x.shape[0], 6, 8, 48)
    outs = {"pos": tmp_path / "pos"}
    ed.segment(plan, position, {"pos": None}, outs, ed.protocol_params(ed.VIP, size=(48, 64)), 8, "cpu",
               verbose=False, vip=True)
    for video, frames, anns, _ in plan:
        first = np.array(Image.open(outs["pos"] / video / frames[0].with_suffix(".png").name))
        assert (first == np.array(Image.open(anns[0]))).mean() > 0.85  # the 8-px grid round trip: 0.896
        for f in frames[1:]:
            assert (np.array(Image.open(outs["pos"] / video / f.with_suffix(".png").name)) == first).all()
    enc = tiny_vit()
    list_file = tmp_path / "vip_vallist.txt"
    list_file.write_text("".join(f"{vip / 'Images' / v} {vip / 'Annotations' / 'Category_ids' / v}\n"
                                 for v in ("videos1", "videos2")))
    m = ed.compare(enc, Projection(enc.embed_dim).eval(), {"davis": None, "vip": str(list_file)}, tmp_path / "out",
                   size=(48, 64), verbose=False)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert set(summary) == {"baseline", "cosettle", "difference"} and set(summary["baseline"]) == {"davis", "vip",
                                                                                                    "data"}
    assert summary["baseline"]["data"]["vip"]["videos"] == 2 and summary["baseline"]["data"]["vip"]["frames"] == 8
    assert summary["difference"]["vip"]["mIoU"] == pytest.approx(m["cosettle"]["vip"]["mIoU"] -
                                                                 m["baseline"]["vip"]["mIoU"])
    assert 0 <= summary["cosettle"]["davis"]["J&F-Mean"] <= 1
    with Image.open(tmp_path / "out" / "cosettle" / "vip" / "videos2" / "000000000016.png") as img:
        assert img.mode == "L" and img.size == (64, 48)
    assert json.loads((tmp_path / "out" / "baseline" / "summary.json").read_text()) == summary["baseline"]


# =============================================================================
# JHMDB: MAT-files, the dataset layout, Gaussian labels, the top-5 read-out, PCK, the skeleton, the pipeline

E2, E4, E8 = math.exp(-2), math.exp(-4), math.exp(-8)


def test_jhmdb_gaussian_interior():
    """σ = 0.5: peak 1 at the cell, 4-neighbours e^-2, diagonals e^-4, the -2 offsets only up/left (e^-8)."""
    g = data.draw_labelmap(20, 20, 10.0, 7.0)
    assert g[7, 10] == 1.0
    assert np.allclose([g[6, 10], g[8, 10], g[7, 9], g[7, 11]], E2)
    assert np.allclose([g[6, 9], g[6, 11], g[8, 9], g[8, 11]], E4)
    assert np.isclose(g[5, 10], E8) and np.isclose(g[7, 8], E8) and g[9, 10] == 0 and g[7, 12] == 0
    assert np.count_nonzero(g) == 16 and g[5:9, 8:12].sum() == g.sum()  # the 4x4 window, offsets -2..+1
    assert data.draw_labelmap(20, 20, 10.5, 7.49).argmax() == 7 * 20 + 11  # round half up in x, down in y


@pytest.mark.parametrize("x, column", [(0.3, [E2, 1.0, 0, 0]), (-1.2, [1.0, 0, 0, 0]), (-1.6, [0, 0, 0, 0]),
                                       (19.6, [0] * 2 + [E8, E2])])
def test_jhmdb_gaussian_border(x, column):
    """int() truncates toward zero: x = 0.3 peaks at column 1 (window int(-1.2) = -1 .. int(2.8) = 2 exclusive:
    the +1 column is lost), -1.2 at column 0 (only that column), -1.6 draws nothing; past the right edge only the
    -2/-1 columns of the kernel land (x = 19.6 peaks at 20, off the grid)."""
    g = data.draw_labelmap(20, 20, x, 5.0)
    row = g[5, :4] if x < 10 else g[5, 16:]
    assert np.allclose(row, column) and np.isclose(g.sum(), g[3:7].sum())


def test_jhmdb_labels_channels_and_scaling():
    """Background = 1 where no joint map is non-zero; x · 320/W0 / 16, y · 320/H0 / 16 (320x240: x/16, y/12)."""
    pos = np.full((15, 2), -100.0)  # off the grid: nothing drawn
    pos[3] = (160.0, 120.0)  # grid (10, 10)
    lab = ed.jhmdb_labels(pos, 320, 240)
    assert lab.shape == (16, 20, 20) and lab.dtype == np.float32
    assert lab[4, 10, 10] == 1.0 and lab[1:].sum(0)[lab[0] == 1].sum() == 0
    assert lab[0].sum() == 400 - 16 and not lab[[1, 2, 3, 5]].any()


def test_jhmdb_readout_on_hand_maps():
    maps = np.zeros((2, 16, 20, 20))
    maps[0, 1, 2, 3], maps[0, 1, 2, 4] = 3.0, 1.0  # x = (3·3 + 4·1) / 4, y = 2 (zeros weigh nothing)
    maps[0, 2] = data.draw_labelmap(20, 20, 7.0, 11.0)  # symmetric neighbours: exactly the peak
    maps[1, 3, 19, 0] = 0.5  # the last row: row-major ids, x = id % w, y = id // w
    kps = ed.keypoints_from_maps(torch.from_numpy(maps))
    assert kps.shape == (2, 15, 2)
    assert np.allclose(kps[0, 0], (3.25, 2.0)) and np.allclose(kps[0, 1], (7.0, 11.0))
    assert np.allclose(kps[1, 2], (0.0, 19.0))
    assert (kps[0, 2:] == -1).all() and (kps[1, :2] == -1).all()  # empty maps
    assert np.allclose(ed.keypoints_from_maps(maps, topk=1)[0, 0], (3, 2))
    px = ed.keypoints_to_pixels(kps, 320, 240)
    assert np.allclose(px[0, 1], (112.0, 132.0)) and (px[0, 2] == -1).all()


def pck_case(W0=40, H0=20):
    """One video, 3 frames, in pixels: joints 0 and 1 span a 30x40 box (diag 50, reference 30), others inside."""
    gt = np.full((3, 15, 2), 10.0)
    gt[:, 0], gt[:, 1] = (0.0, 0.0), (30.0, 40.0)
    pred = gt.copy()
    return gt, pred, (W0, H0)


def pck_of(gt, pred, size, **kw):
    W0, H0 = size
    grid_pred = np.where(pred >= 0, pred / [W0 / 20, H0 / 20], -1.0)
    return ed.pck([grid_pred], [gt.transpose(2, 1, 0) + 1], [size], **kw)


def test_jhmdb_pck_hand_cases():
    gt, pred, size = pck_case()
    pred[0] += 100  # frame 0 is never scored
    pred[1, 2, 0] += 3.0  # exactly 0.1 · 30: counted (<=)
    pred[2, 2, 0] += 3.3  # 0.11: wrong at 0.1, right at 0.2
    r = pck_of(gt, pred, size)
    assert r['per_joint']['PCK@0.1'][2] == 0.5 and r['per_joint']['PCK@0.2'][2] == 1.0
    assert np.isclose(r['PCK@0.1'], (14 + 0.5) / 15) and r['PCK@0.2'] == 1.0 and r['count'] == [2] * 15
    assert set(r) == {'PCK@0.1', 'PCK@0.2', 'PCK@0.3', 'PCK@0.4', 'PCK@0.5', 'per_joint', 'count'}
    pred[2, 1] = -1  # joint 1 unseen in frame 2: skipped, and the box shrinks to (0,0)-(10,10), reference 8.49
    r = pck_of(gt, pred, size)
    assert r['count'][1] == 1 and r['per_joint']['PCK@0.2'][2] == 0.5  # 3.3 / (0.6 · 10√2) = 0.389
    assert r['per_joint']['PCK@0.3'][2] == 0.5 and r['per_joint']['PCK@0.4'][2] == 1.0
    gt, pred, size = pck_case()  # a joint never scored is NaN, and left out of the mean
    pred[1:, 4] = -1
    r = pck_of(gt, pred, size)
    assert math.isnan(r['per_joint']['PCK@0.1'][4]) and r['PCK@0.1'] == 1.0 and r['count'][4] == 0


def mat_sub(kind, raw):
    """One data sub-element (little-endian): the small format for 1..4 bytes, else tag + data + padding."""
    if 0 < len(raw) <= 4:
        return struct.pack('<I', len(raw) << 16 | kind) + raw.ljust(4, b'\0')
    return struct.pack('<II', kind, len(raw)) + raw + b'\0' * (-len(raw) % 8)


def mat_matrix_bytes(name, value):
    """A whole miMATRIX element for a numeric/bool array or a str (char class, 4)."""
    if isinstance(value, str):
        codes = np.frombuffer(value.encode('utf-16-le'), '<u2')
        cls, dims, parts = 4, (1, len(codes)), [mat_sub(4, codes.tobytes())]
    else:
        value = np.asarray(value)
        logical = value.dtype == np.bool_
        stored = value.astype(np.uint8) if logical else value
        code = stored.dtype.str[1:]  # the MAT-File Format's class (mx) and data type (mi) codes, typed here
        cls = {'f8': 6, 'f4': 7, 'i1': 8, 'u1': 9, 'i2': 10, 'u2': 11, 'i4': 12, 'u4': 13, 'i8': 14, 'u8': 15}[code]
        kind = {'i1': 1, 'u1': 2, 'i2': 3, 'u2': 4, 'i4': 5, 'u4': 6, 'f4': 7, 'f8': 9, 'i8': 12, 'u8': 13}[code]
        dims = value.shape if value.ndim >= 2 else (1, value.size)  # MATLAB arrays have at least 2 dims
        parts = [mat_sub(kind, stored.astype(stored.dtype.newbyteorder('<')).tobytes(order='F'))]
        cls |= 0x200 if logical else 0  # the logical flag
    head = [mat_sub(6, struct.pack('<II', cls, 0)), mat_sub(5, np.asarray(dims, '<i4').tobytes()),
            mat_sub(1, name.encode('ascii'))]
    return mat_sub(14, b''.join(head + parts))  # miMATRIX


def write_mat(path, arrays, compress=True):
    """Write {name: value} as a little-endian MATLAB v5 MAT-file, atomically: numeric or bool arrays (kept in their
    dtype; 1-D becomes 1×n) or str (char); compress=True zlib-packs each variable, as MATLAB does by default."""
    text = b'MATLAB 5.0 MAT-file, Platform: Co-Settle-ref tests, Created by write_mat'
    parts = [text.ljust(116, b' ') + b'\0' * 8 + struct.pack('<H', 0x0100) + b'IM']
    for name, value in arrays.items():
        element = mat_matrix_bytes(name, value)
        if compress:
            packed = zlib.compress(element)
            element = struct.pack('<II', 15, len(packed)) + packed  # miCOMPRESSED
        parts.append(element)
    data.atomic(path, lambda tmp: tmp.write_bytes(b''.join(parts)))


# JHMDB's 15 joints (0 neck, 1 belly, 2 face, 3/4 right/left shoulder, 5/6 hip, 7/8 elbow, 9/10 knee, 11/12 wrist,
# 13/14 ankle) in a standing rest pose, body coordinates in pixels (y down, origin at the belly).
JHMDB_REST = np.array([[0, -52], [0, 0], [0, -78], [-24, -46], [24, -46], [-14, 10], [14, 10], [-34, -10], [34, -10],
                       [-17, 56], [17, 56], [-40, 26], [40, 26], [-19, 102], [19, 102]], dtype=np.float64)
# Limbs drawn as textured capsules (joint a, joint b, half-thickness): torso, head, legs, arms. Each limb's texture
# is fixed in its own frame, so a joint (a capsule end) moves exactly with the texture around it.
JHMDB_LIMBS = [(0, 1, 20), (3, 4, 9), (5, 6, 9), (2, 0, 13), (5, 9, 8), (6, 10, 8), (9, 13, 7), (10, 14, 7),
               (3, 7, 7), (4, 8, 7), (7, 11, 6), (8, 12, 6)]
# (parent, child) chains swung about the parent by an angle: upper limbs, then lower limbs (which add the angle of
# their upper limb).
JHMDB_SWINGS = [(3, 7), (4, 8), (5, 9), (6, 10), (7, 11), (8, 12), (9, 13), (10, 14)]


def jhmdb_pose(rng, n_frames, width, height):
    """Joint positions [T, 15, 2] (x, y, 0-based pixels) of a swinging, walking, slightly rotating person."""
    t = np.arange(n_frames, dtype=np.float64)
    amp = rng.uniform(0.15, 0.45, len(JHMDB_SWINGS)) * [1, 1, 0.5, 0.5, 1, 1, 0.5, 0.5]  # legs swing less
    period, phase = rng.uniform(10, 20), rng.uniform(0, 2 * np.pi)
    angles = amp[:, None] * np.sin(2 * np.pi * t / period + phase + np.pi * np.arange(len(JHMDB_SWINGS))[:, None])
    joints = np.repeat(JHMDB_REST[None], n_frames, axis=0)  # [T, 15, 2]
    for s, (parent, child) in enumerate(JHMDB_SWINGS):
        turn = angles[s] + (angles[s - 4] if s >= 4 else 0.0)  # a lower limb also turns with its upper limb
        offset = JHMDB_REST[child] - JHMDB_REST[parent]
        c, s_ = np.cos(turn), np.sin(turn)
        rotated = np.stack([c * offset[0] - s_ * offset[1], s_ * offset[0] + c * offset[1]], axis=-1)
        joints[:, child] = joints[:, parent] + rotated  # upper limbs come first: a lower limb hangs off the moved one
    theta = rng.uniform(-0.06, 0.06) + rng.uniform(-0.01, 0.01) * t
    scale = 1.0 - 0.03 * rng.uniform() * (1 + np.sin(2 * np.pi * t / rng.uniform(15, 30)))
    centre = np.stack([width / 2 + rng.uniform(-20, 20) + rng.uniform(-20, 20) * np.sin(2 * np.pi * t / 25),
                       height / 2 - 7 + rng.uniform(-2, 2) + 3 * np.sin(2 * np.pi * t / period)], axis=-1)
    c, s_ = np.cos(theta)[:, None], np.sin(theta)[:, None]
    x, y = joints[..., 0], joints[..., 1]
    return centre[:, None] + scale[:, None, None] * np.stack([c * x - s_ * y, s_ * x + c * y], axis=-1)


def draw_person(frame, joints, rng_state):
    """Paint the limbs of one frame's pose onto frame (float [H,W,3]) in place; textures from rng_state."""
    rng = np.random.default_rng(rng_state)  # the same draws every frame: each limb keeps its look
    height, width = frame.shape[:2]
    for a, b, half in JHMDB_LIMBS:
        colour = data.saturated_colour(rng.uniform())
        wavelength, beta, shade = rng.uniform(5, 9), rng.uniform(0, np.pi), rng.uniform(0.4, 0.8)
        pa, pb = joints[a], joints[b]
        # only the capsule's bounding box is computed (cheap); `window` is a view into the frame
        x0, y0 = (np.floor(np.minimum(pa, pb) - half).astype(int)).clip(0)
        x1, y1 = np.ceil(np.maximum(pa, pb) + half + 1).astype(int)
        window = frame[y0:min(y1, height), x0:min(x1, width)]
        y, x = np.mgrid[y0:y0 + window.shape[0], x0:x0 + window.shape[1]].astype(np.float64)
        length = max(np.hypot(*(pb - pa)), 1e-6)
        along_x, along_y = (pb - pa) / length
        u = (x - pa[0]) * along_x + (y - pa[1]) * along_y  # limb frame: u along a -> b, v across
        v = -(x - pa[0]) * along_y + (y - pa[1]) * along_x
        inside = np.hypot(u - np.clip(u, 0, length), v) <= half
        texture = np.sin(2 * np.pi * (np.cos(beta) * u + np.sin(beta) * v) / wavelength)
        ramp = shade + (1 - shade) * np.clip(u / length, 0, 1)  # darker at joint a: the two ends differ
        window[inside] = colour * (ramp * (0.75 + 0.25 * texture))[inside][:, None]


def make_jhmdb(root, actions=('catch', 'pour', 'walk'), n_videos=3, n_frames=12, seed=0):
    """Write a synthetic JHMDB folder in the real layout and return it.

    root/Rename_Images/<action>/<video>/00001.png … (320x240 RGB PNG), root/joint_positions/<action>/<video>/
    joint_positions.mat (pos_img (2, 15, T) 1-based x, y; pos_world (2, 15, T); scale (1, T); viewpoint, a char
    array), root/splits/<action>_test_split{1,2,3}.txt ("<video>.avi 1|2", 2 = test; in split s, video s-1 is the
    training one). A textured person (capsule limbs carrying the joints at their ends) walks and swings its limbs
    over the panning background and moving objects of synthetic_video; its joints' bounding box has a diagonal of
    about 180 px, so PCK@0.1 allows ~11 px.
    """
    root = data.prepare_root(root)
    if n_videos < 1 or n_frames < 2 or not actions:
        raise BadInput(f"synthetic JHMDB: need actions, at least 1 video and 2 frames, got {list(actions)}, "
                       f"{n_videos}, {n_frames}.")
    width, height = 320, 240
    for a, action in enumerate(actions):
        names = [f"synth_{action}_{v:02d}" for v in range(n_videos)]
        for v, name in enumerate(names):
            rng = np.random.default_rng((seed, 3, a, v))
            joints = jhmdb_pose(rng, n_frames, width, height)
            look = rng.integers(2 ** 32)
            folder = root / 'Rename_Images' / action / name
            scenes = data.synthetic_frames((seed, 2, a, v), n_frames, height, width, n_objects=2)
            for t, (scene, _) in enumerate(scenes):
                frame = scene.astype(np.float64)
                draw_person(frame, joints[t], look)
                image = Image.fromarray(np.clip(frame + 0.5, 0, 255).astype(np.uint8))
                data.atomic(folder / f"{t + 1:05d}.png", lambda tmp: image.save(tmp, "PNG"))
            pos_img = joints.transpose(2, 1, 0) + 1.0  # (2, 15, T), MATLAB's 1-based pixels
            write_mat(root / 'joint_positions' / action / name / 'joint_positions.mat',
                      {'pos_img': pos_img, 'pos_world': (pos_img - pos_img[:, 1:2]) / 100.0,
                       'scale': np.ones((1, n_frames)), 'viewpoint': 'E'})
        for split in (1, 2, 3):
            lines = ''.join(f"{name}.avi {1 if v == (split - 1) % n_videos and n_videos > 1 else 2}\n"
                            for v, name in enumerate(names))
            data.atomic(root / 'splits' / f"{action}_test_split{split}.txt", lambda tmp: tmp.write_text(lines))
    return root


def mat_header(order):
    text = b'MATLAB 5.0 MAT-file, hand-built'.ljust(116, b' ') + b'\0' * 8
    return text + struct.pack(order + 'H', 0x0100) + (b'IM' if order == '<' else b'MI')


def test_mat_reader_on_a_hand_built_big_endian_file(tmp_path):
    """Independent of write_mat: big-endian, uncompressed, a double stored as miUINT8 with a small-element
    name, and a char variable that is skipped."""
    def sub(kind, data):
        return struct.pack('>II', kind, len(data)) + data + b'\0' * (-len(data) % 8)

    def small(kind, data):
        return struct.pack('>HH', len(data), kind) + data.ljust(4, b'\0')

    double = sub(14, sub(6, struct.pack('>II', 6, 0)) + sub(5, struct.pack('>ii', 2, 3)) + small(1, b'ab')
                 + sub(2, bytes([1, 2, 3, 4, 5, 6])))
    char = sub(14, sub(6, struct.pack('>II', 4, 0)) + sub(5, struct.pack('>ii', 1, 2)) + small(1, b'vp')
               + small(4, 'EF'.encode('utf-16-be')))
    path = tmp_path / 'hand.mat'
    path.write_bytes(mat_header('>') + char + double)
    arrays = data.read_mat(path)
    assert list(arrays) == ['ab'] and arrays['ab'].dtype == np.float64
    assert arrays['ab'].tolist() == [[1, 3, 5], [2, 4, 6]]  # column-major


@pytest.mark.parametrize("compress", [True, False])
def test_mat_round_trip(tmp_path, compress):
    pos = np.random.default_rng(0).uniform(1, 320, (2, 15, 7))
    arrays = {'pos_img': pos, 'scale': np.float32([[1.5, 2.5]]), 'i': np.arange(-3, 3, dtype=np.int16).reshape(3, 2),
              'u': np.arange(4, dtype=np.uint64).reshape(1, 2, 2), 'b': np.array([[True, False]]),
              'viewpoint': 'E'}
    write_mat(tmp_path / 'r.mat', arrays, compress=compress)
    back = data.read_mat(tmp_path / 'r.mat')
    assert set(back) == {'pos_img', 'scale', 'i', 'u', 'b'}  # char skipped
    for name in back:
        assert back[name].dtype == arrays[name].dtype and back[name].shape == arrays[name].shape
        assert np.array_equal(back[name], arrays[name])


def test_mat_bad_files(tmp_path):
    good = tmp_path / 'good.mat'
    write_mat(good, {'pos_img': np.ones((2, 15, 40))})
    cases = {'trunc.mat': good.read_bytes()[:-20], 'text.mat': b'hello, not a mat file\n' * 10,
             'v73.mat': (b'MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .'.ljust(512, b' ')
                         + b'\x89HDF\r\n\x1a\n' + b'\0' * 64),
             'head.mat': good.read_bytes()[:100]}
    expect = {'trunc.mat': 'truncated', 'text.mat': 'not a MATLAB v5', 'v73.mat': 'v7.3', 'head.mat': 'truncated'}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(BadInput, match=expect[name]) as e:
            data.read_mat(tmp_path / name)
        assert name in str(e.value)
    write_mat(good, {'pos_img': np.ones((2, 15, 40))}, compress=False)
    (tmp_path / 'cut.mat').write_bytes(good.read_bytes()[:300])
    with pytest.raises(BadInput, match="cut.mat: truncated"):
        data.read_mat(tmp_path / 'cut.mat')


@pytest.fixture(scope="module")
def jhmdb_root(tmp_path_factory):
    return make_jhmdb(tmp_path_factory.mktemp("jhmdb") / "JHMDB", actions=('catch', 'walk'), n_videos=2,
                           n_frames=4, seed=1)


def test_make_jhmdb_layout_and_read(jhmdb_root, tmp_path):
    root = jhmdb_root
    frames = sorted((root / 'Rename_Images' / 'catch' / 'synth_catch_01').iterdir())
    assert [f.name for f in frames] == ['00001.png', '00002.png', '00003.png', '00004.png']
    with Image.open(frames[0]) as img:
        assert img.size == (320, 240) and img.mode == 'RGB'
    assert (root / 'splits' / 'catch_test_split1.txt').read_text() == "synth_catch_00.avi 1\nsynth_catch_01.avi 2\n"
    mat = data.read_mat(root / 'joint_positions' / 'catch' / 'synth_catch_01' / 'joint_positions.mat')
    assert mat['pos_img'].shape == (2, 15, 4) and mat['scale'].shape == (1, 4) and 'viewpoint' not in mat
    videos = data.read_jhmdb(root)
    assert [v[0] for v in videos] == ['catch/synth_catch_01', 'walk/synth_walk_01']
    assert [v[0] for v in data.read_jhmdb(root, split=2)] == ['catch/synth_catch_00', 'walk/synth_walk_00']
    name, paths, pos = videos[0]
    assert paths == frames and np.array_equal(pos, mat['pos_img'])
    for order, fmt in (('mat-first', "{mat} {frames}\n"), ('frames-first', "{frames} {mat}\n")):
        lst = tmp_path / f'{order}.txt'
        lst.write_text(''.join(fmt.format(mat=root / 'joint_positions' / n / 'joint_positions.mat',
                                          frames=root / 'Rename_Images' / n) for n, _, _ in videos))
        for forced in (None, order):
            got = data.read_jhmdb(lst, list_order=forced)
            assert [g[0] for g in got] == [v[0] for v in videos] and np.array_equal(got[1][2], videos[1][2])
    assert cli(['--make-jhmdb', str(tmp_path / 'cli'), '--videos', '1', '--frames', '2']) == 0
    assert len(data.read_jhmdb(tmp_path / 'cli')) == 3


def test_jhmdb_oracle_round_trip(jhmdb_root):
    """GT heatmaps read straight back: within the grid round trip (8 px in x, 6 px in y at 320x240), and PCK of
    both these and of the exact GT is 1 (the synthetic person's box diagonal is >= 170 px)."""
    preds, gts, sizes = [], [], []
    for split in (1, 2):
        for name, paths, pos in data.read_jhmdb(jhmdb_root, split=split):
            gt = pos.transpose(2, 1, 0) - 1  # [T, 15, 2]
            assert min(np.linalg.norm(g.max(0) - g.min(0)) for g in gt) >= 170
            maps = np.stack([ed.jhmdb_labels(g, 320, 240) for g in gt])
            kps = ed.keypoints_from_maps(maps)
            err = np.abs(ed.keypoints_to_pixels(kps, 320, 240) - gt)
            assert (err[..., 0] <= 8).all() and (err[..., 1] <= 6).all(), name
            preds.append(kps), gts.append(pos), sizes.append((320, 240))
    assert ed.pck(preds, gts, sizes)['PCK@0.1'] == 1.0
    exact = [(g.transpose(2, 1, 0) - 1) / [16, 12] for g in gts]
    r = ed.pck(exact, gts, sizes)
    assert all(r[f'PCK@{a:g}'] == 1.0 for a in ed.PCK_ALPHAS)


def test_jhmdb_draw_skeleton():
    rgb = np.zeros((40, 40, 3), np.uint8)
    kps = np.full((15, 2), -1.0)
    kps[0], kps[1], kps[2] = (5, 5), (5, 30), (-0.5, 2)  # neck, belly; the face's int(x) = 0: drawn as upstream
    out = ed.draw_skeleton(rgb, kps, width=1)
    assert out.dtype == np.uint8 and out.shape == rgb.shape and not rgb.any()
    assert tuple(out[20, 5]) == ed.JHMDB_COLOURS[1]  # belly -> neck drawn after neck -> belly
    assert tuple(out[3, 2]) == ed.JHMDB_COLOURS[2] or tuple(out[4, 3]) == ed.JHMDB_COLOURS[2]
    kps[2] = (-1, 2)
    assert not ed.draw_skeleton(rgb, kps, width=1)[:, :4].any()  # -1 joints are not drawn


def test_jhmdb_pipeline_oracle_compare_and_outputs(tmp_path, capsys):
    """Features that identify positions only (static keypoints): every frame's keypoints are frame 0's read-out,
    within the 320x320 -> 20x20 grid round trip of the ground truth (<= 8 px in x, 6 px in y at 320x240)."""
    root = make_jhmdb(tmp_path / "jhmdb", n_videos=2, n_frames=5)
    plan = data.read_jhmdb(root)
    position = lambda x: torch.eye(400)[None].expand(x.shape[0], -1, -1).reshape(x.shape[0], 20, 20, 400)
    outs = {"pos": tmp_path / "pos"}
    preds, n = ed.track(plan, position, {"pos": None}, outs, ed.JHMDB, 16, "cpu", batch_size=3, verbose=False)
    assert n == 5 * len(plan)
    for (video, frames, pos), kps in zip(plan, preds["pos"]):
        pixels = np.load(outs["pos"] / f"{video}.npy")
        assert pixels.shape == (5, 15, 2) and (pixels == pixels[:1]).all()
        err = np.abs(pixels[0] - (pos[:, :, 0].T - 1))
        assert (err[:, 0] <= 8).all() and (err[:, 1] <= 6).all(), err.max(0)
    enc = tiny_vit()
    m = ed.compare(enc, Projection(enc.embed_dim).eval(), {"jhmdb": str(root), "davis": None}, tmp_path / "out",
                   size=(48, 64), overlay=True, verbose=True)
    printed = capsys.readouterr().out
    assert "per joint PCK@0.1" in printed and "JHMDB PCK@0.1  measured" in printed
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for name in ("baseline", "cosettle"):
        j = summary[name]["jhmdb"]
        assert set(j) >= {"PCK@0.1", "PCK@0.2", "PCK@0.5", "per_joint"} and 0 <= j["PCK@0.1"] <= j["PCK@0.2"] <= 1
        assert len(j["per_joint"]["PCK@0.1"]) == 15
    assert summary["difference"]["jhmdb"]["PCK@0.2"] == pytest.approx(m["cosettle"]["jhmdb"]["PCK@0.2"] -
                                                                      m["baseline"]["jhmdb"]["PCK@0.2"])
    video = plan[0][0]
    assert np.load(tmp_path / "out" / "cosettle" / "jhmdb" / f"{video}.npy").shape == (5, 15, 2)
    assert (tmp_path / "out" / "baseline" / "jhmdb" / "overlays" / video / "00005.png").is_file()  # the last


# =============================================================================
# eval_davis.run with any encoder: a feature function and its stride


def oracle(task, plan, stride, noise=0.1, seed=0):
    """A feature function that knows the answer: per patch the one-hot of its ground-truth label (DAVIS object,
    VIP part, the pixel at the patch centre; JHMDB: the joint whose true position falls in the patch, else
    background), plus Gaussian noise; frames served in the order run() asks for them (video by video, in order)."""
    truth = []
    for video in plan:
        if task == "jhmdb":
            H0, W0 = np.array(Image.open(video[1][0])).shape[:2]
            pos = video[2] - 1  # 0-based (x, y)
            truth += [(None, pos[:, :, min(t, pos.shape[2] - 1)], H0, W0) for t in range(len(video[1]))]
        else:
            truth += [(np.array(Image.open(a)), None, 0, 0) for a in video[2]]
    frames, g = iter(truth), torch.Generator().manual_seed(seed)

    def features(x):
        B, h, w = x.shape[0], x.shape[2] // stride, x.shape[3] // stride
        labels = []
        for _ in range(B):
            ids, joints, H0, W0 = next(frames)
            if joints is None:
                rows, cols = ((np.arange(h) + 0.5) * ids.shape[0] / h).astype(int), \
                    ((np.arange(w) + 0.5) * ids.shape[1] / w).astype(int)
                lab = ids[rows][:, cols].astype(np.int64)
            else:  # the 4x4 cells around each joint, each its own label: where a cell lies relative to the joint
                lab = np.zeros((h + 4, w + 4), np.int64)  # 2 cells of margin on each side
                for j, (px, py) in enumerate(joints.T):
                    i, k = min(max(int(py * h / H0), 0), h - 1) + 2, min(max(int(px * w / W0), 0), w - 1) + 2
                    window = lab[i - 2:i + 2, k - 2:k + 2]  # a view: written in place
                    window[window == 0] = (1 + 16 * j + np.arange(16).reshape(4, 4))[window == 0]
                lab = lab[2:-2, 2:-2]
            labels.append(F.one_hot(torch.from_numpy(lab), 256).float())
        return (torch.stack(labels) + noise * torch.randn(B, h, w, 256, generator=g)).to(x.device)
    return features


def test_run_with_the_vits_feature_function_gives_the_builtin_results(tmp_path):
    """The project's ViT as a plain feature function (its patch tokens as a grid, written here) through run():
    the same numbers and masks as compare() on the ViT itself, baseline and + Co-Settle from one forward."""
    davis = make_davis(tmp_path / "d", n_seqs=2, n_frames=4, height=48, width=64)
    vip = make_vip(tmp_path / "vip", n_videos=1, n_frames=4, height=48, width=64)
    enc, tasks = tiny_vit(), {"davis": str(davis), "vip": str(vip)}
    proj = Projection(enc.embed_dim).eval()
    built = ed.compare(enc, proj, tasks, tmp_path / "built", size=(48, 64), verbose=False)
    tokens = lambda x: enc(x).reshape(x.shape[0], x.shape[2] // 8, x.shape[3] // 8, -1)
    m = ed.run(tokens, 8, tasks, tmp_path / "fn", {"baseline": None, "cosettle": proj}, size=(48, 64),
               device=next(enc.parameters()).device, verbose=False)
    for name in ("baseline", "cosettle"):
        assert (tmp_path / "built" / name / "summary.json").read_text() == \
            (tmp_path / "fn" / name / "summary.json").read_text()  # NaN (a class never seen) is null there
        assert m[name]["davis"] == built[name]["davis"] and m[name]["vip"]["mIoU"] == built[name]["vip"]["mIoU"]
        for seq in ("synth-000", "synth-001"):
            for a in sorted((tmp_path / "built" / name / "davis" / seq).glob("*.png")):
                assert a.read_bytes() == (tmp_path / "fn" / name / "davis" / seq / a.name).read_bytes()


def test_describe_names_the_set_against_the_papers(tmp_path):
    """summary.json's account of a set: counts, sizes, a fingerprint that follows the annotations, and how it
    differs from the paper's (a partial VIP set named like the real one; a DAVIS copy pre-resized to 880x480)."""
    vip = make_vip(tmp_path / "vip", n_videos=3, n_frames=2, height=24, width=32)
    for old, new in (("videos1", "videos338"), ("videos2", "videos311"), ("videos3", "videos999")):
        for kind in ("Images", "Annotations/Category_ids"):
            (vip / kind / old).rename(vip / kind / new)
    (vip / "lists" / "val_videos.txt").write_text("videos338\nvideos311\nvideos999\n")
    d = data.describe("vip", ed.read_vip(vip))
    assert (d["videos"], d["frames"], d["resolution"], d["paper_set"]) == (3, 6, {"32x24": 3}, False)
    assert d["note"] == "2 of the paper's 50 VIP validation videos; missing: videos102, videos113, videos117, " \
        "videos12, videos129, ...; 1 not among them: videos999"
    shutil.copytree(vip, tmp_path / "copy")
    assert data.describe("vip", ed.read_vip(tmp_path / "copy"))["fingerprint"] == d["fingerprint"]
    label = next((tmp_path / "copy" / "Annotations" / "Category_ids" / "videos311").glob("*.png"))
    Image.fromarray(np.full((24, 32), 3, np.uint8)).save(label)  # another annotation: another size on disk
    assert data.describe("vip", ed.read_vip(tmp_path / "copy"))["fingerprint"] != d["fingerprint"]
    davis = paper_named(make_davis(tmp_path / "davis", n_seqs=2, n_frames=1, height=480, width=880), ["dog", "cows"])
    d = data.describe("davis", ed.read_davis(davis, scoring=False))
    assert d["resolution"] == {"880x480": 2} and d["note"].startswith("2 of the paper's 30 DAVIS-2017 val sequences")
    assert d["note"].endswith("; a copy pre-resized to 880x480: read and scored at 880x480, not at DAVIS's 480p")


def test_oracle_features_give_near_perfect_scores_on_all_three_tasks(tmp_path):
    """Features that know the labels score near the top on every task (what is lost is the 8-px grid's: thin VIP
    parts); measured J&F 0.918, mIoU 0.802 (pixel accuracy 0.976), PCK@0.1 0.930."""
    davis = make_davis(tmp_path / "d", n_seqs=3, n_frames=6, height=96, width=128, seed=2)
    vip = make_vip(tmp_path / "vip", n_videos=2, n_frames=4, height=96, width=128)
    jhmdb = make_jhmdb(tmp_path / "j", actions=("walk",), n_videos=2, n_frames=6)
    m = {}
    for task, path, size in (("davis", davis, (192, 256)), ("vip", vip, (192, 256)), ("jhmdb", jhmdb, None)):
        plan = {"davis": ed.read_davis, "vip": ed.read_vip, "jhmdb": data.read_jhmdb}[task](path)
        m[task] = ed.run(oracle(task, plan, 8), 8, {task: str(path)}, tmp_path / task, size=size, verbose=False)
    assert m["davis"]["model"]["davis"]["J&F-Mean"] > 0.9
    assert m["vip"]["model"]["vip"]["mIoU"] > 0.75 and m["vip"]["model"]["vip"]["pixel_accuracy"] > 0.95
    assert m["jhmdb"]["model"]["jhmdb"]["PCK@0.1"] > 0.9


def test_a_stride_8_conv_model_runs_all_three_tasks_and_wrong_outputs_are_named(tmp_path):
    davis = make_davis(tmp_path / "d", n_seqs=1, n_frames=4, height=48, width=64)
    vip = make_vip(tmp_path / "vip", n_videos=1, n_frames=4, height=48, width=64)
    jhmdb = make_jhmdb(tmp_path / "j", actions=("walk",), n_videos=1, n_frames=4)
    conv = nn.Conv2d(3, 16, 8, stride=8).eval()
    model = lambda x: conv.to(x.device)(x).permute(0, 2, 3, 1)  # [B, H / 8, W / 8, 16]
    tasks = {"davis": str(davis), "vip": str(vip), "jhmdb": str(jhmdb)}
    m = ed.run(model, 8, tasks, tmp_path / "out", size=(48, 64), batch_size=4, verbose=False)["model"]
    assert 0 <= m["davis"]["J&F-Mean"] <= 1 and 0 <= m["vip"]["mIoU"] <= 1 and 0 <= m["jhmdb"]["PCK@0.1"] <= 1
    assert (m["data"]["davis"]["videos"], m["data"]["vip"]["frames"], m["data"]["jhmdb"]["videos"]) == (1, 4, 1)
    assert (tmp_path / "out" / "davis" / "synth-000" / "00003.png").is_file()
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["data"]["jhmdb"]["joints"] == 15
    wrong = [(lambda x: model(x).permute(0, 3, 1, 2), 8, None, "the feature function returned [4, 16, 6, 8] for a "
              "[4, 3, 48, 64] batch; expected [4, 6, 8, D] floats at stride 8"),
             (model, 16, None, "the feature function returned [4, 6, 8, 16] for a [4, 3, 48, 64] batch; expected "
              "[4, 3, 4, D] floats at stride 16"),
             (lambda x: model(x).long(), 8, None, "the feature function returned [4, 6, 8, 16] of torch.int64 for"),
             (lambda x: model(x).numpy(), 8, None, "the feature function returned a ndarray for"),
             (model, 8, {"bad": lambda f: f[:, :1]}, "head 'bad' returned [4, 1, 8, 16] for a [4, 6, 8, 16] input; "
              "expected [4, 6, 8, D] floats")]
    for fn, stride, heads, message in wrong:
        with pytest.raises(BadInput, match=re.escape(message)):
            ed.run(fn, stride, {"davis": str(davis)}, tmp_path / "bad", heads, size=(48, 64), device="cpu",
                   batch_size=4, verbose=False)
        assert not (tmp_path / "bad").exists()  # nothing half-written


# =============================================================================
# the three CLIs: one table of bad inputs per script. Each row: exit 2, one sentence naming the flag or file (for
# argparse, its own last line), nothing written or changed; train.py/eval_davis.py rows that fail before the model
# loads keep the default weights MISSING, so any check that ran after loading would report them instead.

def _davis(tmp, change=None, **kw):
    d = make_davis(tmp / "D", **dict(dict(n_seqs=1, n_frames=3, height=32, width=48), **kw))
    if change:
        change(d)


def _jhmdb_ghost(tmp, jhmdb_root):
    shutil.copytree(jhmdb_root, tmp / "J")
    (tmp / "J" / "splits" / "catch_test_split1.txt").write_text("ghost.avi 2\n")


def _nan_weights():
    sd = timm_backbone(64, 1, grid=14, seed=0)
    sd["norm.weight"][5] = float("nan")
    return sd


def _video_dirs(tmp):
    (tmp / "EMPTY" / "class_a" / "vid").mkdir(parents=True)
    (tmp / "EMPTY" / "class_a" / "vid" / "readme.txt").write_text("no frames here")
    for v in range(3):
        data.write_synthetic_videos(tmp / "SINGLES" / f"v{v}", n_videos=1, n_frames=1, height=32, width=32, seed=v)


MAKE = {  # placeholder -> how to make it under tmp_path (only when a row names it)
    "FILE": lambda tmp, fx: (tmp / "FILE").write_text("not a folder"),
    "DONE": lambda tmp, fx: ((tmp / "DONE").mkdir(), (tmp / "DONE" / "cosettle.pth").write_bytes(b"a finished run")),
    "MP4": lambda tmp, fx: [((tmp / "MP4" / n).parent.mkdir(parents=True, exist_ok=True),
                             (tmp / "MP4" / n).write_bytes(b"\x00\x00\x00\x18ftypmp42"))
                            for n in ("abseiling/vid_a.mp4", "abseiling/vid_b.mp4")],
    "RUN": lambda tmp, fx: copy_run(fx["trained_run"], tmp) and (tmp / "run").rename(tmp / "RUN"),
    "OURSRUN": lambda tmp, fx: ((tmp / "OURSRUN").mkdir(), shutil.copy(fx["official"]("dino")[0],
                                                                        tmp / "OURSRUN" / "cosettle.pth")),
    "OURS": lambda tmp, fx: shutil.copy(fx["official"]("dino")[0], tmp / "OURS"),
    "NAN": lambda tmp, fx: save_to(tmp / "NAN", _nan_weights()),
    "OTHER": lambda tmp, fx: save_to(tmp / "OTHER", timm_backbone(64, 1, grid=14, seed=1)),
    # the same recipe as W, another seed: the same file size
    "TWIN": lambda tmp, fx: save_to(tmp / "TWIN", small_vit(1).state_dict()),
    "FEWER.txt": lambda tmp, fx: (tmp / "FEWER.txt").write_text("\n".join(
        str(v) for v in data.find_videos(fx["small_videos"])[:6])),
    "EMPTY": lambda tmp, fx: _video_dirs(tmp), "SINGLES": lambda tmp, fx: _video_dirs(tmp),
    "RANDOM.pth": lambda tmp, fx: (tmp / "RANDOM.pth").write_bytes(os.urandom(4096)),
    "NOTES.pth": lambda tmp, fx: (tmp / "NOTES.pth").write_bytes(b"these are not weights\n"),
    "CLASSIFIER.pth": lambda tmp, fx: save_to(tmp / "CLASSIFIER.pth", {"model": {"fc.weight": torch.zeros(2, 2),
                                                                               "fc.bias": torch.zeros(2)}}),
    "STATE.pth": lambda tmp, fx: save_to(tmp / "STATE.pth", {"epoch": 3, "best_acc": 0.5}),
    "INCOMPLETE.pth": lambda tmp, fx: save_to(tmp / "INCOMPLETE.pth", _edited(timm_backbone(64, 2, grid=4, seed=0),
                                                                             ["blocks.1.mlp.fc2.weight"])),
    "HOLE": lambda tmp, fx: (make_davis(tmp / "HOLE", n_seqs=2, n_frames=4, height=32, width=48),
                             (tmp / "HOLE" / "Annotations" / "480p" / "synth-001" / "00002.png").unlink()),
    "P64": lambda tmp, fx: save_to(tmp / "P64", {"projection": Projection(64).state_dict()}),
    "VIP": lambda tmp, fx: fx["vip_case"](tmp / "VIP"),
    "J": lambda tmp, fx: _jhmdb_ghost(tmp, fx["jhmdb_root"]),
}


def place(items, tmp_path, fx):
    """Resolve a row's placeholders: W, V (the tiny weights, the small videos), anything in MAKE (made once), and
    any other upper-case name (MISSING, OUT, GONE.pth, NOWHERE, ...): a path under tmp_path that is not made."""
    out = []
    for item in items:
        head = item.split("/")[0] if isinstance(item, str) else None
        if head == "W":
            item = str(fx["tiny_weights"])
        elif head == "V":
            item = str(fx["small_videos"])
        elif head in MAKE or (head and head.split(".")[0].isupper() and head.split(".")[0].isalpha()):
            if head in MAKE and not (tmp_path / head).exists():
                MAKE[head](tmp_path, fx)
            item = str(tmp_path / item)
        out.append(item)
    return out


def snapshot(tmp_path):
    return {p: p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file() and p.parts[len(tmp_path.parts)]
            in ("DONE", "RUN", "OURSRUN", "RES", "D")}


ROOT_WRITES_ANYWHERE = pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                                          reason="root may write into a read-only folder")

TRAIN_BAD = [  # (flags after the defaults, what the error line must hold); defaults: --weights MISSING --videos V
    (["--epochs", "0"], ["argument --epochs: must be > 0, got 0"]),
    (["--epochs", "-2"], ["argument --epochs: must be > 0, got -2"]),
    (["--epochs", "two"], ["argument --epochs: 'two' is not an integer"]),
    (["--temp", "-0.03"], ["argument --temp: must be > 0"]),
    (["--batch-size", "0"], ["argument --batch-size: must be > 0"]),
    (["--batch-size", "-4"], ["argument --batch-size: must be > 0"]),
    (["--workers", "-1"], ["argument --workers: must be >= 0"]),
    (["--blr", "0"], ["argument --blr: must be > 0"]),
    (["--blr", "nan"], ["argument --blr: must be a finite number, got nan"]),
    (["--blr", "inf"], ["argument --blr: must be a finite number, got inf"]),
    (["--warmup-epochs", "inf"], ["argument --warmup-epochs: must be a finite number, got inf"]),
    (["--temp", "inf"], ["argument --temp: must be a finite number"]),
    (["--lambda-reg", "nan"], ["argument --lambda-reg: must be a finite number"]),
    (["--pea-ratio", "inf"], ["argument --pea-ratio: must be a finite number"]),
    (["--clip-gap", "nan"], ["--clip-gap nan: must be between 0 and 1"]),
    (["--lambda-reg", "-1"], ["argument --lambda-reg: must be >= 0"]),
    (["--pea-ratio", "-0.5"], ["argument --pea-ratio: must be >= 0"]),
    (["--warmup-epochs", "-1"], ["argument --warmup-epochs: must be >= 0"]),
    (["--seed", "-1"], ["argument --seed: must be >= 0"]),
    (["--out", "FILE"], ["is a file, not a folder"]),
    (["--out", "FILE/run"], ["cannot be created"]),
    pytest.param(["--out", "/proc/co-settle-run"], ["no permission to write in /proc"], marks=ROOT_WRITES_ANYWHERE),
    (["--out", "DONE"], ["a run is already saved there; pass --resume to continue it, another --out, or --overwrite"]),
    (["--videos", "MP4"], ["holds 2 video files but no folders of frames; extract the frames first"]),
    # the weights
    (["--weights", "GONE.pth"], ["GONE.pth", "no such file"]),
    (["--weights", "RANDOM.pth"], ["RANDOM.pth", "not a readable PyTorch checkpoint"]),
    (["--weights", "NOTES.pth"], ["NOTES.pth", "not a readable PyTorch checkpoint"]),
    (["--weights", "CLASSIFIER.pth"], ["CLASSIFIER.pth", "ViT", "fc.bias", "fc.weight"]),
    (["--weights", "STATE.pth"], ["STATE.pth", "ViT", "epoch", "best_acc"]),
    (["--weights", "INCOMPLETE.pth"], ["INCOMPLETE.pth", "missing", "blocks.1.mlp.fc2.weight"]),
    # a run that stops at step 1 leaves no --out folder and no empty log
    (["--weights", "NAN", "--batch-size", "2"], ["loss is nan at step 1", "OUT/cosettle.pth", "none was saved yet"]),
    # the videos
    (["--weights", "W", "--videos", "EMPTY"], ["EMPTY", "holds no folders with frames"]),
    (["--weights", "W", "--videos", "SINGLES"], ["SINGLES", "no video folder with at least 2 frames", "skipping 3"]),
    (["--weights", "W", "--videos", "NOWHERE"], ["NOWHERE", "no such file"]),
    (["--weights", "W", "NO-VIDEOS"], ["--videos"]),
    # resuming (the shared run: batch 4, seed 0, 8 videos) and finished runs
    (["--weights", "W", "--resume"], ["OUT/cosettle.pth", "no checkpoint"]),
    (["--weights", "OTHER", "--out", "RUN", "--resume", "--epochs", "2"], ["RUN/cosettle.pth", "W", "OTHER"]),
    (["--weights", "TWIN", "--out", "RUN", "--resume", "--epochs", "2"], ["RUN/cosettle.pth", "W", "TWIN"]),
    *[(["--weights", "W", "--out", "RUN", "--resume", "--epochs", "2", *change], ["RUN/cosettle.pth", "global batch 4"])
      for change in (["--batch-size", "2"], ["--batch-size", "4", "--seed", "1"],
                     ["--batch-size", "4", "--videos", "FEWER.txt"])],
    (["--weights", "OURS", "--out", "OURSRUN", "--resume"],
     ["OURSRUN/cosettle.pth", "official Co-Settle '+ Ours'", "no optimiser state"]),
    (["--weights", "W", "--out", "RUN", "--epochs", "2"], ["RUN/cosettle.pth", "--resume", "--overwrite"]),
    # no flag is silently ignored
    (["--bench"], ["--bench does not use --videos, --out, --workers"]),
    (["--bench-data"], ["--bench-data does not use --weights, --out, --batch-size, --no-compile"]),
]


@pytest.fixture
def fx(request, tiny_weights, small_videos):
    """What the placeholders are made from; the costlier fixtures only when asked for."""
    get = request.getfixturevalue
    return {"tiny_weights": tiny_weights, "small_videos": small_videos, "official": lambda f: get("official")(f),
            "trained_run": None, "jhmdb_root": None, "vip_case": vip_case, "get": get}


@pytest.mark.parametrize("flags, needles", TRAIN_BAD)
def test_train_bad_input_table(flags, needles, fx, tmp_path, capsys):
    if "RUN" in flags:
        fx["trained_run"] = fx["get"]("trained_run")
    defaults = ["--weights", "MISSING"] + ([] if "NO-VIDEOS" in flags else ["--videos", "V"])
    argv = place(defaults + ["--out", "OUT", "--no-compile", "--workers", "0", "--batch-size", "4"]
                 + [f for f in flags if f != "NO-VIDEOS"], tmp_path, fx)
    before = snapshot(tmp_path)
    code, out, err = run(train.main, argv, capsys)
    singles = "SINGLES" in flags
    check_error(code, err, *place(needles, tmp_path, fx), argparse_error=needles[0].startswith(("argument ", "--")),
                warnings_ok=singles)
    if singles:
        assert "warning:" in err and "skipped 3 of 3" in err
    assert str(tmp_path / "MISSING") not in err  # checked before the model is loaded, or other weights given
    assert not (tmp_path / "OUT").exists()  # nothing created
    assert snapshot(tmp_path) == before  # nothing changed


def vip_case(root, case="count"):
    write_vip_pair(root, "videos1", "000000000001", np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8)))
    write_vip_pair(root, "videos1", "000000000026", np.zeros((8, 8, 3), np.uint8), np.ones((8, 8)))
    (root / "lists").mkdir()
    (root / "lists" / "val_videos.txt").write_text("videos1\n")
    labels = root / "Annotations" / "Category_ids" / "videos1"
    if case == "no frames":
        shutil.rmtree(root / "Images" / "videos1")
    elif case == "no labels":
        shutil.rmtree(labels)
    elif case == "count":
        (labels / "000000000026.png").unlink()
    elif case == "size":
        Image.fromarray(np.zeros((8, 9), np.uint8)).save(labels / "000000000026.png")
    elif case == "id":
        Image.fromarray(np.full((8, 8), 20, np.uint8)).save(labels / "000000000026.png")
    elif case == "void first":  # 255 is void, ignored by the metric after frame 0, but frame 0 is propagated
        Image.fromarray(np.full((8, 8), 255, np.uint8)).save(labels / "000000000001.png")
    else:
        (root / "lists" / "val_videos.txt").write_text("\n")


def _results(tmp, fault):
    """A DAVIS set of 2 sequences and its ground truth copied as results (RES), then one fault."""
    davis = make_davis(tmp / "D", n_seqs=2, n_frames=4, height=32, width=48)
    copy_gt_as_results(davis, tmp / "RES")
    bad = tmp / "RES" / "synth-001" / "00002.png"
    if fault == "id":
        ids = np.array(Image.open(bad))
        ids[0, 0] = 7
        Image.fromarray(ids).save(bad)
    else:
        bad.unlink()
        (tmp / "RES" / "synth-000" / "00001.png").unlink()


def _jhmdb_list(text, change=None):
    """A JHMDB copy (J) and a list file (LIST) whose text names MAT, FRAMES (its synth_catch_01) or other paths."""
    def setup(tmp, jhmdb_root):
        root = tmp / "J"
        shutil.copytree(jhmdb_root, root)
        mat = root / 'joint_positions' / 'catch' / 'synth_catch_01' / 'joint_positions.mat'
        frames = root / 'Rename_Images' / 'catch' / 'synth_catch_01'
        (tmp / 'EMPTYDIR').mkdir()
        if change:
            change(root, mat, frames)
        (tmp / "LIST").write_text(text.format(mat=mat, frames=frames, tmp=tmp))
    return setup


def _ann(name):
    return lambda d: d / "Annotations" / "480p" / "synth-000" / name


SPLIT = ["--jhmdb-split", "3"]
EVAL_BAD = [  # (setup(tmp, jhmdb_root) or None, flags after --out OUT, what the error line must hold)
    (None, ["--batch-size", "0"], ["argument --batch-size: must be > 0, got 0"]),
    (None, ["--topk", "0"], ["argument --topk: must be > 0"]),
    (None, ["--context", "-1"], ["argument --context: must be >= 0"]),
    (None, ["--radius", "-2"], ["argument --radius: must be >= 0"]),
    (None, ["--temperature", "0"], ["argument --temperature: must be > 0"]),
    (None, ["--temperature", "inf"], ["argument --temperature: must be a finite number, got inf"]),
    (None, ["--weights", "MISSING", "--out", "FILE"], ["--out"]),
    (None, ["--weights", "MISSING", "--out", "FILE/results"], ["cannot be created"]),
    (None, ["--davis", "HOLE"], ["1 of 6 annotations after the first frames are missing "
                                 "(Annotations/480p/synth-001/00002.png)"]),
    (None, ["--davis", "HOLE", "--masks", "FILE"], ["Annotations/480p/synth-001/00002.png"]),
    (None, ["--compare"], ["--ckpt"]),
    # no flag is silently ignored
    (None, ["--davis", "HOLE", "--masks", "FILE", "--out", "OUT"], ["--masks does not use --out"]),
    (None, ["--bench", "--davis", "HOLE"], ["--bench does not use --davis"]),
    (None, ["--tradeoff", "--videos", "FILE", "--protocol", "dino"], ["--tradeoff does not use --protocol"]),
    (None, ["--videos", "FILE"], ["evaluating DAVIS does not use --videos"]),
    (None, ["--vip", "FILE", "--protocol", "dino"], ["evaluating vip does not use --protocol"]),
    (None, ["--vip-size", "480x880"], ["evaluating DAVIS does not use --vip-size"]),
    # DAVIS folders
    (lambda tmp, j: _davis(tmp, lambda d: (d / "ImageSets" / "2017" / "val.txt").write_text("synth-000\nghost\n")),
     ["--davis", "D"], ["ghost"]),
    (lambda tmp, j: _davis(tmp, lambda d: _ann("00000.png")(d).unlink()), ["--davis", "D"], ["00000.png", "missing"]),
    (lambda tmp, j: _davis(tmp, lambda d: Image.new("RGB", (48, 32)).save(_ann("00000.png")(d))), ["--davis", "D"],
     ["RGB"]),
    (lambda tmp, j: _davis(tmp, lambda d: Image.new("P", (40, 32)).save(_ann("00000.png")(d))), ["--davis", "D"],
     [("40x32", "48x32")]),
    (lambda tmp, j: _davis(tmp, lambda d: shutil.rmtree(d / "ImageSets")), ["--davis", "D"], ["val.txt"]),
    (lambda tmp, j: _davis(tmp), ["--davis", "D", "--ckpt", "P64"], ["width 64"]),
    # one missing annotation, even the last one, is refused before anything is written
    (lambda tmp, j: _davis(tmp, lambda d: _ann("00003.png")(d).unlink(), n_frames=4),
     ["--davis", "D", "--weights", "W", "--protocol", "dino", "--batch-size", "4"],
     ["Annotations/480p/synth-000/00003.png"]),
    # results folders (--masks)
    (lambda tmp, j: _results(tmp, "id"), ["--davis", "D", "--masks", "RES"], ["synth-001/00002.png", "[7]"]),
    (lambda tmp, j: _results(tmp, "missing"), ["--davis", "D", "--masks", "RES"],
     ["2 result frames missing", "synth-000/00001.png", "synth-001/00002.png"]),
    # VIP sets
    *[(lambda tmp, j, c=c: vip_case(tmp / "VIP", c), ["--vip", "VIP"], [says]) for c, says in [
        ("no frames", "no frames"), ("no labels", "no labels"), ("count", "1 labels for 2 frames"), ("size", "9x8"),
        ("id", "part id 20"), ("void first", "part id 255"), ("empty", "lists no videos")]],
    # JHMDB sets: a split naming a video that is not there, and list files
    (lambda tmp, j: _jhmdb_ghost(tmp, j), ["--jhmdb", "J"], ["ghost"]),
    (lambda tmp, j: _jhmdb_list("")(tmp, j) or (tmp / "J" / "splits" / "aaa_test_split1.txt").write_text(
        "ghost.avi 2\n"), ["--jhmdb", "J"], ["aaa_test_split1.txt: names video ghost"]),  # read first (sorted)
    (_jhmdb_list(""), ["--jhmdb", "EMPTYDIR", *SPLIT], [re.compile(r"no splits/\*_test_split3.txt")]),
    (_jhmdb_list("{mat} {tmp}/EMPTYDIR\n"), ["--jhmdb", "LIST"], ["EMPTYDIR is missing or holds no .png"]),
    (_jhmdb_list(""), ["--jhmdb", "LIST"], ["lists no test videos"]),
    (_jhmdb_list("{mat} {frames} extra\n"), ["--jhmdb", "LIST"], ["line 1 is not"]),
    (_jhmdb_list("{frames}/a.txt {frames}\n"), ["--jhmdb", "LIST"], ["names no .mat"]),
    (_jhmdb_list("{tmp}/none.mat {frames}\n"), ["--jhmdb", "LIST"], ["none.mat is missing"]),
    (_jhmdb_list("{mat} {frames}\n", lambda r, m, f: (f / '00004.png').unlink()), ["--jhmdb", "LIST"],
     [re.compile("annotates 4 frames but .* holds only 3")]),
    (_jhmdb_list("{mat} {frames}\n", lambda r, m, f: write_mat(m, {'pos_world': np.ones((2, 15, 3)),
                                                                         'viewpoint': 'E'})),
     ["--jhmdb", "LIST"], ["joint_positions.mat: has no numeric pos_img"]),
]


@pytest.mark.parametrize("setup, flags, needles", EVAL_BAD)
def test_eval_bad_input_table(setup, flags, needles, fx, tmp_path, capsys, request):
    if setup is not None:
        setup(tmp_path, request.getfixturevalue("jhmdb_root"))
    modes = ("--masks", "--bench", "--tradeoff")  # they write no --out: it is refused there
    argv = place(([] if any(m in flags for m in modes) else ["--out", "OUT"]) + flags, tmp_path, fx)
    before = snapshot(tmp_path)
    code, _, err = run(ed.main, argv, capsys)
    check_error(code, err, *needles, argparse_error=str(needles[0]).startswith(("argument ", "--", "evaluating ")))
    assert "MISSING" not in err  # --out is checked before the encoder loads
    assert not (tmp_path / "OUT").exists()
    assert snapshot(tmp_path) == before and not list(tmp_path.glob("RES/*.csv"))  # nothing half-written


DATA_BAD = [
    (["--make-davis", "d", "--seqs", "0"], "argument --seqs: must be > 0"),
    (["--make-videos", "v", "--videos", "0"], "argument --videos: must be > 0"),
    (["--make-videos", "v", "--frames", "0"], "argument --frames: must be > 0"),
    (["--make-videos", "v", "--frames", "-3"], "argument --frames: must be > 0"),
    (["--make-davis", "d", "--height", "15"], "argument --height: must be >= 16"),
    (["--make-davis", "d", "--width", "8"], "argument --width: must be >= 16"),
    (["--make-davis", "d", "--seed", "-1"], "argument --seed: must be >= 0"),
    (["--make-videos", "v", "--seqs", "4"], "--make-videos does not use --seqs"),  # no flag silently ignored
    (["--make-davis", "d", "--videos", "2"], "--make-davis does not use --videos"),
]


@pytest.mark.parametrize("flags, says", DATA_BAD)
def test_data_bad_input_table(flags, says, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(data.main, flags, capsys)
    check_error(code, err, says, argparse_error=True)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("script, argv, needles", [
    ("train.py", ["--weights", "garbage.pth", "--videos", "V", "--out", "out", "--no-compile", "--workers", "0"],
     ["garbage.pth", "not a readable PyTorch checkpoint"]),
    ("data.py", ["--make-davis", "FILE"], ["FILE", "not a folder"]),
])
def test_scripts_exit_2_with_one_line_as_processes(script, argv, needles, fx, tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"\x00\x01garbage" * 100)
    argv = [str(tmp_path / a) if a in ("garbage.pth", "out") else a for a in place(argv, tmp_path, fx)]
    res = subprocess.run([sys.executable, str(REPO / script), *argv], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    check_error(res.returncode, res.stderr, *[str(tmp_path / n) if n in ("garbage.pth", "FILE") else n
                                              for n in needles])
    assert not (tmp_path / "out").exists()


def test_davis_annotation_rules(tiny_weights, tmp_path, capsys):
    """A complete set is scored; first-frame-only sets are propagated and say why they are not
    scored (exit 0). (One missing annotation is refused: the table above.)"""
    davis = make_davis(tmp_path / "davis", n_seqs=1, n_frames=4, height=32, width=48)
    anns = sorted((davis / "Annotations" / "480p" / "synth-000").glob("*.png"))
    argv = ["--davis", davis, "--weights", tiny_weights, "--protocol", "dino", "--batch-size", "4"]
    assert run(ed.main, argv + ["--out", tmp_path / "out"], capsys)[0] == 0
    assert "J&F-Mean" in (tmp_path / "out" / "global_results-val.csv").read_text()
    for ann in anns[1:]:
        ann.unlink()
    code, out, _ = run(ed.main, argv + ["--out", tmp_path / "out3"], capsys)
    assert code == 0 and "annotations for the first frames only" in out and "not scored" in out
    assert len(list((tmp_path / "out3" / "synth-000").glob("*.png"))) == 4
    assert not (tmp_path / "out3" / "global_results-val.csv").exists()


def paper_named(davis, names):
    """A synthetic DAVIS folder (make_davis) whose sequences carry `names` (the real DAVIS-2017 val names)."""
    for kind in ("JPEGImages", "Annotations"):
        for s, name in enumerate(names):
            (davis / kind / "480p" / f"synth-{s:03d}").rename(davis / kind / "480p" / name)
    (davis / "ImageSets" / "2017" / "val.txt").write_text("".join(n + "\n" for n in names))
    return davis


def test_official_ours_compare_prints_the_paper_row(official, tmp_path, capsys):
    """--weights <+ Ours file> --compare: the frozen encoder and encoder + its adapter, beside the paper's pair
    when measured on the paper's 30 sequences with its pipeline; otherwise measured, and said why not beside it."""
    names = ("bike-packing blackswan bmx-trees breakdance camel car-roundabout car-shadow cows dance-twirl dog "
             "dogs-jump drift-chicane drift-straight goat gold-fish horsejump-high india judo kite-surf lab-coat "
             "libby loading mbike-trick motocross-jump paragliding-launch parkour pigs scooter-black shooting "
             "soapbox").split()
    assert len(names) == 30  # DAVIS-2017 val, as T-CoRe's davis_vallist_480_880.txt lists it
    davis = paper_named(make_davis(tmp_path / "davis", n_seqs=30, n_frames=3, height=32, width=48), names)
    path = official("dino")[0]
    assert ed.main(["--weights", str(path), "--compare", "--davis", str(davis), "--out", str(tmp_path / "dino")]) \
        == 0
    out, err = capsys.readouterr()
    assert "error" not in err and "warning" not in err, err
    base, ours = ed.PUBLISHED["dino"]["baseline"]["davis"], ed.PUBLISHED["dino"]["cosettle"]["davis"]
    assert f"paper (dino, ViT-B/16) {base:.1f} -> {ours:.1f}" in out and "not beside" not in out
    assert "of the paper's 30" not in out  # no line about the set
    assert (tmp_path / "dino" / "cosettle" / "global_results-val.csv").is_file()
    d = json.loads((tmp_path / "dino" / "summary.json").read_text())["cosettle"]["data"]["davis"]
    assert (d["videos"], d["frames"], d["paper_set"], d["note"], d["resolution"]) == (30, 90, True, None, {"48x32": 30})
    assert d["objects"] == sum(1 + s % 3 for s in range(30)) and d["settings_differ"] == []
    # two of the 30 sequences, DINO's protocol: measured, and said why not beside the paper's numbers
    part = paper_named(make_davis(tmp_path / "part", n_seqs=2, n_frames=3, height=32, width=48), names[5:7])
    path = official("clip")[0]
    assert ed.main(["--weights", str(path), "--compare", "--davis", str(part), "--protocol", "dino", "--out",
                    str(tmp_path / "clip")]) == 0
    out = capsys.readouterr().out
    missing = "2 of the paper's 30 DAVIS-2017 val sequences; missing: bike-packing, blackswan, bmx-trees, " \
        "breakdance, camel, ..."
    assert f"davis: {missing}\n" in out and "paper (clip" not in out
    assert f"not beside the paper's: {missing}; settings other than the paper's (algorithm, size, std, topk, " \
        "context, radius, temperature)" in out
    assert json.loads((tmp_path / "clip" / "summary.json").read_text())["baseline"]["data"]["davis"]["note"] == missing
    baseline_only = ed.main(["--weights", str(path), "--davis", str(part), "--protocol", "dino",
                             "--out", str(tmp_path / "frozen")])
    assert baseline_only == 0 and (tmp_path / "frozen" / "global_results-val.csv").is_file()
    assert f"davis: {missing}\n" in capsys.readouterr().out


def test_table_evaluates_every_family_found_and_prints_table_1(official, tmp_path, capsys, monkeypatch):
    """--table over the authors' files as downloaded (ckpts/ours/<family>+ours/..., base files beside them): seven
    of the eight families, frozen and + Co-Settle each, the eighth named as not found; the table beside the
    published one; a second run with all eight runs only the new one, and the CLI refuses flags --table does not
    use."""
    root = tmp_path / "ckpts"
    for i, family in enumerate(f for f in ed.PUBLISHED if f != "blip"):
        folder = root / "ours" / f"{family}+ours"
        folder.mkdir(parents=True)
        shutil.copy(official(family)[0], folder / ("checkpoint.pth" if i % 2 else "checkpoint-4.pth"))
    (root / "base").mkdir()
    shutil.copy(official("dino")[1].path, root / "base" / "dino_vitbase16_pretrain.pth")
    davis = make_davis(tmp_path / "davis", n_seqs=1, n_frames=3, height=64, width=96)
    cells = ed.table_1(root, {"davis": str(davis)}, tmp_path / "out", size=(64, 96), verbose=False)
    out = capsys.readouterr().out
    assert "not found: blip" in out and set(cells) == set(ed.PUBLISHED)
    for family in ed.PUBLISHED:
        if family == "blip":
            assert cells[family] == {"baseline": {"vip": None, "davis": None, "jhmdb": None},
                                     "cosettle": {"vip": None, "davis": None, "jhmdb": None}, "unlike": {}}
            continue
        summary = json.loads((tmp_path / "out" / family / "summary.json").read_text())
        for v, label in (("baseline", family), ("cosettle", f"{family} + Co-Settle")):
            jf, paper = summary[v]["davis"]["J&F-Mean"], ed.PUBLISHED[family][v]
            assert cells[family][v] == {"vip": None, "davis": jf, "jhmdb": None}
            assert f"| {label} | {paper['vip']:.1f} | – | {paper['davis']:.1f} | {100 * jf:.1f}* | " \
                f"{paper['jhmdb']:.1f} | – |\n" in out
    assert "* DAVIS J&F: none of the paper's 30 DAVIS-2017 val sequences; instead synth-000; settings other " \
        "than the paper's (size)" in out
    assert "| blip | 37.6 | – | 58.8 | – | 35.1 | – |" in out
    saved = json.loads((tmp_path / "out" / "table.json").read_text())
    assert saved["not_found"] == ["blip"] and saved["measured"]["dino"]["cosettle"]["davis"] == \
        cells["dino"]["cosettle"]["davis"]
    (root / "ours" / "blip+ours").mkdir()  # the eighth family arrives: it alone runs, the seven are read back
    shutil.copy(official("blip")[0], root / "ours" / "blip+ours" / "checkpoint-4.pth")
    compare, ran = ed.compare, []
    monkeypatch.setattr(ed, "compare", lambda enc, *a, **k: ran.append(enc.family) or compare(enc, *a, **k))
    assert ed.main(["--table", str(root), "--davis", str(davis), "--out", str(tmp_path / "out")]) == 0
    again, table = capsys.readouterr().out, json.loads((tmp_path / "out" / "table.json").read_text())
    assert ran == ["blip"] and again.count("results already in") == 7 and "not found" not in again
    assert table["not_found"] == [] and table["measured"]["blip"]["cosettle"]["davis"] is not None
    assert {f: c for f, c in table["measured"].items() if f != "blip"} == \
        {f: c for f, c in saved["measured"].items() if f != "blip"}
    with pytest.raises(SystemExit):
        ed.main(["--table", str(root), "--weights", "x.pth", "--davis", str(davis)])
    assert "--table does not use --weights" in capsys.readouterr().err
    shutil.copy(official("dino")[0], root / "ours" / "dino+ours" / "checkpoint-3.pth")
    with pytest.raises(BadInput, match=r"dino\+ours: 2 checkpoint\*\.pth files; expected one"):
        ed.table_1(root, {"davis": str(davis)}, tmp_path / "out")


def test_published_table_and_paper_row():
    assert set(ed.PUBLISHED) == set(cosettle.FAMILIES)
    for family, row in ed.PUBLISHED.items():
        for task in ed.HEADLINE:  # the paper reports a gain for every backbone and task
            assert 20 < row["baseline"][task] < row["cosettle"][task] < 70, (family, task)
    line = ed.paper_row("dino", "davis", (0.6304, 0.6412))
    assert "measured 63.0 -> 64.1" in line and "paper (dino, ViT-B/16) 63.2 -> 64.2" in line
    assert "no published numbers" in ed.paper_row("vit", "davis", (0.1, 0.2))


def test_cosettle_py_alone_loads_builds_and_trains(tmp_path):
    """cosettle.py copied alone into an empty folder, the repository off sys.path: it reads a DINO-format checkpoint,
    builds CoSettle and computes the loss, forward and backward."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(REPO / "cosettle.py", alone)
    sd = build_vit("vit_tiny", 16, seed=0).state_dict()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in sd.items()}}, alone / "dino.pth")  # DINO's layout
    script = ("import importlib.util, sys, torch, cosettle\n"
              "assert all(importlib.util.find_spec(m) is None for m in ('data', 'train', 'eval_davis'))\n"
              "model = cosettle.CoSettle(cosettle.load_encoder('dino.pth'))\n"
              "x = torch.randn(2, 3, 224, 224)\n"
              "out = model(x, x + 0.1 * torch.randn_like(x))\n"
              "out['loss'].backward()\n"
              "assert model.encoder.family == 'dino' and model.projection.linear.weight.grad.abs().sum() > 0\n"
              "print(round(out['loss'].item(), 4))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=alone, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert math.isfinite(float(done.stdout.split()[-1]))


# =============================================================================
# python test_cosettle.py --bench-loss | --bench-step | --bench-dino | --bench-loader | --make-vip DIR | --make-jhmdb
# DIR: the README's comparisons of the project with the references above (cosettle.timeit), the synthetic VIP/JHMDB sets

def bench_loss(batch):
    """Loss head forward+backward on [B, 3 x 196, 768]: the official eager formulation vs ours fused."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    h = torch.randn(batch, 3 * 196, 768, generator=g).to(device).requires_grad_()
    z = torch.randn(batch, 3 * 196, 768, generator=g).to(device)

    def step(fn):
        def one():
            h.grad = None
            out = fn(h, z)
            (out[0] if isinstance(out, tuple) else out).backward()
        return one
    cycle = lambda loss: lambda h, z: loss(*F.normalize(h, dim=-1).chunk(3, dim=1))
    for title, official, ours in [("cycle loss (Eq. 2)", cycle(official_cycle_loss), cycle(cosettle.cycle_loss)),
                                  ("total loss (Eq. 4)", official_objective, cosettle.objective)]:
        fused = cosettle.fuse(ours, h.shape, device)
        t = [cosettle.timeit(step(fn), device=device)[0] for fn in (official, fused)]
        print(f"{title}, B={batch}, {device}: official eager {t[0] * 1e3:.1f} ms, ours fused {t[1] * 1e3:.1f} ms "
              f"(x{t[0] / t[1]:.1f})")


def bench_loader(n=256):
    """Clips/s in one process over 64 synthetic videos of 16 JPEG frames at 340x256 (n clips after n warm-up ones):
    the loader before (normalising_loader: resize and normalise in the worker) against FramePairs (decode only)."""
    with tempfile.TemporaryDirectory() as tmp:
        ds = data.FramePairs(data.write_synthetic_videos(tmp, 64, 16, 256, 340), 224, cosettle.CLIP_GAP)
        rates = []
        for name, item in (("before, resize + normalise in the worker", lambda k: normalising_loader(ds, k)),
                           ("FramePairs, decode only", ds.__getitem__)):
            rates.append(n / cosettle.timeit(lambda: [item(k % 64) for k in range(n)], warmup=1, iters=1)[0])
            print(f"{name:42s} {rates[-1]:7.1f} clips/s ({1e3 / rates[-1]:.2f} ms a clip)")
        print(f"x{rates[1] / rates[0]:.2f} a process")


def bench_step(weights, batch):
    """A whole training step: train.py --bench's, then the official one (three separate fp32 forwards, SDPA's math
    backend, i.e. softmax(q k^T) v spelled out, the eager official loss) on the same encoder and clips."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    args = train.parse_args(["--bench", "--batch-size", str(batch)] + (["--weights", weights] if weights else []))
    ours = train.bench(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = cosettle.CoSettle(train.encoder_from_args(args, rank=1)[0]).to(device).train()  # rank 1: loads quietly
    optimizer = train.make_optimizer(model.projection, 1e-4)
    x1, x2 = (torch.randn(batch, 3, 224, 224, device=device) for _ in range(2))

    def official_step():
        with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            pea = cosettle.shifted_pos_embed(model.encoder.patch_pos_embed())
            z = torch.cat([model.encoder(x1), model.encoder(x2), model.encoder(x1, pea)], dim=1)
        loss = official_objective(model.projection(z), z)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    t = cosettle.timeit(official_step, warmup=2, iters=5, device=device.type)[0]
    print(f"official step: {batch / t:.1f} clips/s; ours x{ours * t / batch:.2f}")


def bench_dino(weights, n_frames=10):
    """DAVIS, dino protocol, 854x480 synthetic frames: DINO's per-frame loop vs our batched path, s/frame."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    encoder = (load_encoder(weights) if weights else build_vit("vit_small", 16, seed=0)).to(device)
    embed, patch, params = ed.encoder_embed(encoder), encoder.patch_size, ed.PROTOCOLS["dino"]
    th, tw = ed.grid_size(480, 854, params, patch, "bench")
    video, masks = synthetic_video(0, n_frames, th, tw, n_objects=2)
    x = torch.stack([ed.normalise(torch.from_numpy(f).permute(2, 0, 1).float(), (th, tw), params["mean"],
                                  params["std"]) for f in video]).to(device)
    labels0 = ed.first_labels(masks[0], th // patch, tw // patch).to(device)
    embed(x[:2])  # warm-up
    (ours_t, _, ours), (ref_t, _, ref) = (cosettle.timeit(lambda: loop(x, labels0, embed, patch, params), 0, 1,
                                                          device.type) for loop in (fast_loop, dino_loop))
    print(f"DAVIS dino protocol, {tw}x{th}, {n_frames} frames, {device}: ours {ours_t / (n_frames - 1):.3f} s/frame, "
          f"DINO's loop {ref_t / (n_frames - 1):.3f} (x{ref_t / ours_t:.2f}), the same label on "
          f"{100 * (ours == ref).float().mean().item():.3f}% of pixels")


def cli(argv=None):
    p = argparse.ArgumentParser(description="The README's comparisons with the references in this file, and "
                                "synthetic VIP / JHMDB sets. (The tests: python -m pytest test_cosettle.py.)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--bench-loss", action="store_true", help="the official eager loss vs ours fused")
    what.add_argument("--bench-step", action="store_true", help="the official training step vs ours")
    what.add_argument("--bench-dino", action="store_true", help="DINO's per-frame propagation loop vs ours")
    what.add_argument("--bench-loader", action="store_true", help="the loader before vs FramePairs, one process")
    what.add_argument("--make-vip", metavar="DIR", help="write a synthetic VIP_Fine folder")
    what.add_argument("--make-jhmdb", metavar="DIR", help="write a synthetic JHMDB folder (320x240, .mat, splits)")
    p.add_argument("--weights", help="encoder checkpoint for --bench-step / --bench-dino (default a random ViT-S/16)")
    p.add_argument("--batch-size", type=cosettle.positive(), help="--bench-step clips (default 8), --bench-loss B (64)")
    p.add_argument("--videos", type=cosettle.positive(), help="VIP videos (default 2), JHMDB videos per action (3)")
    p.add_argument("--frames", type=cosettle.positive(), help="frames per video (default 6 VIP, 12 JHMDB)")
    args = p.parse_args(argv)
    mode = next(k for k in ("bench_loss", "bench_step", "bench_dino", "bench_loader", "make_vip", "make_jhmdb")
                if getattr(args, k))
    used = {"bench_loss": {"batch_size"}, "bench_step": {"weights", "batch_size"}, "bench_dino": {"weights"},
            "bench_loader": set(),
            "make_vip": {"videos", "frames"}, "make_jhmdb": {"videos", "frames"}}[mode]
    cosettle.refuse_unused(p, args, "--" + mode.replace("_", "-"), used | {mode})
    sizes = {k: v for k, v in (("n_videos", args.videos), ("n_frames", args.frames)) if v is not None}
    try:
        if mode == "bench_loss":
            bench_loss(args.batch_size or 64)
        elif mode == "bench_step":
            bench_step(args.weights, args.batch_size or 8)
        elif mode == "bench_dino":
            bench_dino(args.weights)
        elif mode == "bench_loader":
            bench_loader()
        else:
            print(f"wrote {(make_vip if args.make_vip else make_jhmdb)(args.make_vip or args.make_jhmdb, **sizes)}")
    except BadInput as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
