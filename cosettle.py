"""Co-Settle in one file: the method first (PEA, the projection, the cycle loss of Eq. 2, the separability loss of
Eq. 3, their sum of Eq. 4, the fused kernel, the model), then the frozen ViT, then the checkpoint loader. It imports
nothing from this project: copied alone, it loads a checkpoint, builds the model and computes the loss.

Liu et al., "From Static to Dynamic: Exploring Self-supervised Image-to-Video Representation Transfer Learning",
CVPR 2026 (arXiv 2603.26597). Equation and table numbers are the paper's. Where the paper's text and the official
code (github.com/yafeng19/Co-Settle) differ we follow the code, which produced the published numbers, and say so.

    python cosettle.py --bench      # the loss head, eager and fused (compiled), forward + backward
"""
import argparse
import contextlib
import hashlib
import logging
import math
import os
import re
import time
import warnings
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

# The recipe of the published runs: the flags yafeng19/Co-Settle scripts/train.sh passes to main_pretrain.py (whose
# own argparse defaults differ where noted); every default below is one of these.
TEMP = 0.03         # tau, --temp 0.03 (main_pretrain.py's default 0.1): temperature of both softmaxes of Eq. 2
LAMBDA_REG = 3.0    # lambda, --lambda_reg 3 (default 1): weight of the separability regulariser (Eq. 4)
PEA_RATIO = 10.0    # alpha, --asy_pos_ratio 10 (default 0.5): PEA upsamples the positional table (1 + alpha) times
CLIP_GAP = 0.15     # --clip_gap 0.15 (also the default): the two training frames are int(0.15 n) apart in n frames
SIZE = 224          # main_pretrain.py --input_size 224 (train.sh leaves it): training crops
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_STATS = (IMAGENET_MEAN, IMAGENET_STD)


class BadInput(Exception):
    """Input the program cannot use: one sentence naming the file (or setting) and the problem. Scripts exit 2."""

# -----------------------------------------------------------------------------
# The method: PEA, the projection g, the cycle loss (Eq. 2), the separability loss (Eq. 3), Eq. 4, the fused kernel


def shifted_pos_embed(pos_embed, ratio=PEA_RATIO, generator=None):
    """Asymmetric positional embedding, PEA: bicubic-upsample the side x side patch embedding [1, side*side, D] by
    (1 + ratio), crop a random side x side window (one offset per call). At the official ratio 10 it spans ~1.2
    original cells: the PEA copy has almost no absolute position, so the cycle cannot close by matching positions (the
    shortcut that collapses J&F). Another encoder needs ViT's `patch_pos_embed()` and forward's `patch_pos_embed=`."""
    _, n, D = pos_embed.shape
    side = math.isqrt(n)
    assert side * side == n, "PEA expects a square grid"
    up = int((1 + ratio) * side)
    x = pos_embed.reshape(1, side, side, D).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(up, up), mode="bicubic", align_corners=False)
    i, j = torch.randint(0, up - side + 1, (2,), generator=generator).tolist()
    return x[:, :, i:i + side, j:j + side].permute(0, 2, 3, 1).reshape(1, n, D)


class Projection(nn.Module):
    """The trainable projection g: LayerNorm(tanh(Linear(z))), eps 1e-5; 0.59M parameters at D = 768.
    The paper text says "linear + LayerNorm"; the official code has the tanh, and so do we."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=1e-5)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, z):
        return self.norm(torch.tanh(self.linear(z)))


def pool_tokens(p):
    """2x2 average pooling of [B, side*side, D] tokens on their grid -> [B, side*side/4, D] (not re-normalised)."""
    B, n, D = p.shape
    s = math.isqrt(n)
    if s * s != n or s % 2:
        raise ValueError(f"cycle loss: {n} tokens per frame are not an even square grid (side x side patch tokens, "
                         f"side even, e.g. 196 = 14 x 14; drop CLS and register tokens first)")
    return p.view(B, s // 2, 2, s // 2, 2, D).mean(dim=(2, 4)).reshape(B, n // 4, D)


def cycle_loss(p1, p2, p1b, temp=TEMP):
    """Temporal cycle-consistency, paper Eq. 2 -> (loss, cycle accuracy, sim_identity).
    p1, p2, p1b: projected patch tokens [B, N, D], L2-normalised by the caller, of frame t1, frame t2 and frame t1
    under PEA, N = side x side with side even (else ValueError). On 2x2-pooled tokens q: A = softmax(q1 q2^T / temp)
    (t1 -> t2), A~ = softmax(q2 q1b^T / temp) (t2 -> t1 under PEA), M = A A~, and the loss is the cross-entropy of
    log(M + 1e-6) against the identity, mean over the B n rows, as the official code computes it. Accuracy
    (argmax_j M_ij == i) and sim_identity (cosine of M and the identity) are what the official code logs.
    (-mean log(M_ii + 1e-6) + log(1 + n 1e-6) is the same loss without the n^3 product: Eq. 4 fused, fwd+bwd, B 64,
    3 x 196 x 768, 2-core Xeon: 245 ms that way, 286 ms this way, a few % of a training step; the paper's form stays.)
    """
    q1, q2, q1b = pool_tokens(p1), pool_tokens(p2), pool_tokens(p1b)
    B, n, _ = q1.shape
    A = torch.softmax(q1 @ q2.transpose(1, 2) / temp, dim=-1)
    A_back = torch.softmax(q2 @ q1b.transpose(1, 2) / temp, dim=-1)
    M = A @ A_back
    identity = torch.arange(n, device=M.device)
    loss = F.cross_entropy(torch.log(M + 1e-6).flatten(0, 1), identity.repeat(B))
    M = M.detach()
    accuracy = (M.argmax(-1) == identity).float().mean()
    sim_identity = M.diagonal(dim1=1, dim2=2).sum() / (M.norm() * math.sqrt(B * n))
    return loss, accuracy, sim_identity


def separability_loss(p, z):
    """Separability regulariser, paper Eq. 3, on L2-normalised tokens [B, ..., D]. The official code's
    F.kl_div(log_softmax(p), softmax(z), reduction='batchmean'), softmax over features, summed over every token and
    feature, divided by B: KL(softmax(z) || softmax(p)), the reverse of the paper's direction; we follow the code."""
    log_q, log_t = torch.log_softmax(p, dim=-1), torch.log_softmax(z, dim=-1)
    return (log_t.exp() * (log_t - log_q)).sum() / p.shape[0]


def objective(h, z, temp=TEMP, lambda_reg=LAMBDA_REG):
    """The total loss of Eq. 4, L = L_cyc + lambda L_reg, from the projection output h = g(z) and the frozen
    tokens z, both [B, 3N, D] with the three streams (t1, t2, t1 with PEA) side by side on the token axis.
    -> (loss, cycle loss, separability loss, cycle accuracy, sim_identity). This is what gets fused."""
    p, z = F.normalize(h.float(), dim=-1), F.normalize(z.float(), dim=-1)
    cyc, accuracy, sim = cycle_loss(*p.chunk(3, dim=1), temp)
    reg = separability_loss(p, z)
    return cyc + lambda_reg * reg, cyc.detach(), reg.detach(), accuracy, sim


def fuse(fn, shape=(1, 3 * 16, 8), device="cpu", *args):
    """The fused kernel: torch.compile over fn. The elementwise and reduction work around the matmuls (normalisation,
    pooling, both softmaxes, the log, the KL, their backward) becomes a few generated kernels (Eq. 4 on a CPU: 8, per
    TORCH_LOGS=output_code), not a dozen eager passes; the bmms stay cuBLAS/MKL calls. Compiled here, forward and
    backward, in fp32, on the shape and extra `args` (temp, lambda: constants) it will see, so a missing compiler fails
    now and the run does not recompile (but once for bf16 h: CPU autocast, unlike CUDA's, leaves g's LayerNorm bf16)."""
    fused = torch.compile(fn, dynamic=False)
    probe = torch.randn(shape, device=device, requires_grad=True)
    with quiet_compile():
        out = fused(probe, probe.detach(), *args)
        (out[0] if isinstance(out, tuple) else out).backward()
    return fused


class CoSettle(nn.Module):
    """Frozen encoder f + trainable projection g (Eq. 4), the three streams encoded in one batched forward."""

    def __init__(self, encoder, temp=TEMP, lambda_reg=LAMBDA_REG, pea_ratio=PEA_RATIO, loss_fn=objective):
        super().__init__()
        self.encoder = freeze(encoder)
        self.projection = Projection(encoder.embed_dim)
        self.temp, self.lambda_reg, self.pea_ratio, self.loss_fn = temp, lambda_reg, pea_ratio, loss_fn

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()  # frozen means frozen: nothing in f changes with the mode
        return self

    @torch.no_grad()
    def encode(self, x1, x2, generator=None):
        """z = [z1, z2, z1b] (frame t1, frame t2, frame t1 under PEA) as one [B, 3N, D] tensor, from ONE forward
        of the 3B images [x1, x2, x1], the last third with the PEA positional embedding."""
        B = x1.shape[0]
        pos = self.encoder.patch_pos_embed()
        pea = shifted_pos_embed(pos.float(), self.pea_ratio, generator).to(pos.dtype)
        pos = torch.cat([pos.expand(2 * B, -1, -1), pea.expand(B, -1, -1)])
        z = self.encoder(torch.cat([x1, x2, x1]), patch_pos_embed=pos)
        return torch.cat(z.chunk(3), dim=1)

    def forward(self, x1, x2, generator=None, projection=None):
        """-> dict(loss, cycle, reg, accuracy, sim_identity). `projection` lets DDP pass its wrapper."""
        z = self.encode(x1, x2, generator)
        h = (self.projection if projection is None else projection)(z)
        # logits / 0.03 need fp32, whatever the encoder ran in: the loss upcasts h and z itself (fused, not two fp32
        # copies, when compiled) and autocast stays off inside it
        with torch.autocast(h.device.type, enabled=False):
            loss, cyc, reg, accuracy, sim = self.loss_fn(h, z, self.temp, self.lambda_reg)
        return dict(loss=loss, cycle=cyc, reg=reg, accuracy=accuracy, sim_identity=sim)


# -----------------------------------------------------------------------------
# The ViT (DINO's vision_transformer.py, written to be read in one sitting)


class Attention(nn.Module):
    def __init__(self, dim, heads, qkv_bias=True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)  # q, k, v packed, heads contiguous (CLIP's in_proj too)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernel where available
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def quick_gelu(x):  # CLIP's activation
    return x * torch.sigmoid(1.702 * x)


class MLP(nn.Module):
    def __init__(self, dim, hidden, act):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = act

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, heads, mlp_dim, qkv_bias, eps, act, layerscale):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads, qkv_bias)
        self.ls1 = LayerScale(dim) if layerscale else nn.Identity()  # DINOv2
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = MLP(dim, mlp_dim, act)
        self.ls2 = LayerScale(dim) if layerscale else nn.Identity()

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """Pre-norm ViT returning the last block's patch tokens after the final LayerNorm (CLS and registers dropped): the
    frozen encoder f of all eight families, which differ in switches: cls_token (I-JEPA has none), registers and
    layerscale (DINOv2), ln_pre, no patch_bias, QuickGELU act and eps 1e-5 (CLIP). `grid` is the (rows, cols) of the
    stored positional table, interpolated as DINO does to any input size divisible by the patch."""

    def __init__(self, patch_size=16, embed_dim=384, depth=12, heads=6, mlp_dim=None, grid=(14, 14), qkv_bias=True,
                 eps=1e-6, cls_token=True, registers=0, layerscale=False, ln_pre=False, patch_bias=True, act="gelu"):
        super().__init__()
        mlp_dim = mlp_dim or 4 * embed_dim
        self.arch = dict(patch_size=patch_size, embed_dim=embed_dim, depth=depth, heads=heads, mlp_dim=mlp_dim,
                         grid=tuple(grid), qkv_bias=qkv_bias, eps=eps, cls_token=cls_token, registers=registers,
                         layerscale=layerscale, ln_pre=ln_pre, patch_bias=patch_bias, act=act)
        self.patch_size, self.embed_dim, self.grid = patch_size, embed_dim, tuple(grid)
        # load_encoder sets the real ones; official: what an official "+ Ours" file says about its run (official_parts)
        self.family, self.native_stats, self.official = "vit", IMAGENET_STATS, None
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, patch_size, bias=patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if cls_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, int(cls_token) + grid[0] * grid[1], embed_dim))
        self.register_tokens = nn.Parameter(torch.zeros(1, registers, embed_dim)) if registers else None
        self.norm_pre = nn.LayerNorm(embed_dim, eps=eps) if ln_pre else nn.Identity()
        act_fn = {"gelu": F.gelu, "quick_gelu": quick_gelu}[act]
        self.blocks = nn.ModuleList(Block(embed_dim, heads, mlp_dim, qkv_bias, eps, act_fn, layerscale)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=eps)
        for m in self.modules():  # DINO's init (LayerNorm's default, ones and zeros, is DINO's too)
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.pos_embed, self.cls_token, self.register_tokens):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def patch_pos_embed(self):
        """The stored patch positional embedding [1, rows*cols, D], CLS row excluded."""
        return self.pos_embed[:, 1:] if self.cls_token is not None else self.pos_embed

    def interpolate(self, patch_pos, rows, cols):
        """Bicubic resize of [b, grid, D] to rows x cols, exactly as DINO's interpolate_pos_encoding: it passes
        scale_factor (rows + 0.1) / grid, not a size, and the scale factor fixes where bicubic samples, so this is
        what makes our tokens equal DINO's at e.g. 480x832. (CLIP/BLIP/DINOv2-reg resize with size= and antialias;
        we use DINO's rule for every family, as the DINO evaluation protocol does.)"""
        gr, gc = self.grid
        if (rows, cols) == (gr, gc):
            return patch_pos
        b, _, D = patch_pos.shape
        x = patch_pos.reshape(b, gr, gc, D).permute(0, 3, 1, 2)
        x = F.interpolate(x.float(), scale_factor=((rows + 0.1) / gr, (cols + 0.1) / gc), mode="bicubic")
        assert x.shape[-2:] == (rows, cols), f"positional embedding resized to {tuple(x.shape[-2:])}"
        return x.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(b, rows * cols, D)

    def forward(self, x, patch_pos_embed=None):
        """x: [B, 3, H, W] -> patch tokens [B, H/p * W/p, D]. patch_pos_embed ([1 or B, rows*cols, D], stored grid)
        replaces the patch positional rows: the PEA stream. The CLS row is never replaced, registers go in after the
        positional embedding (DINOv2) and ln_pre after both (CLIP), so PEA lands where each family's code puts it."""
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not divisible by the patch size {p}")
        pos = self.patch_pos_embed() if patch_pos_embed is None else patch_pos_embed
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.interpolate(pos, H // p, W // p)
        prefix = []
        if self.cls_token is not None:
            prefix.append((self.cls_token + self.pos_embed[:, :1]).expand(B, -1, -1))
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(B, -1, -1))
        x = self.norm_pre(torch.cat(prefix + [x], dim=1))
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, x.shape[1] - (H // p) * (W // p):])  # LayerNorm is per token: drop prefix first


ARCHS = {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}


def build_vit(arch="vit_small", patch_size=16, seed=0):
    """A randomly initialised ViT (seeded) with a 224-px positional table, for demos, benchmarks and tests."""
    dim, depth, heads = ARCHS[arch]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return ViT(patch_size, dim, depth, heads, grid=(SIZE // patch_size,) * 2)


def freeze(module):
    return module.requires_grad_(False).eval()


# -----------------------------------------------------------------------------
# Loading published checkpoints of the eight families, each in its authors' own format
#
# Each family is a row: where its backbone sits in the file, how its key names map onto ours, how its architecture
# differs. DINO, iBOT, MAE, MoCo v3 and BLIP share DINO's names once the prefix is stripped; their family label comes
# from the container (it sets the native statistics and MoCo's ViT-S head count).

CLIP_STATS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))  # CLIP and BLIP
CLIP_RENAMES = [("conv1.", "patch_embed.proj."), ("class_embedding", "cls_token"), ("ln_pre.", "norm_pre."),
                ("positional_embedding", "pos_embed"), ("transformer.resblocks.", "blocks."), (".ln_1.", ".norm1."),
                (".ln_2.", ".norm2."), (".attn.in_proj_", ".attn.qkv."), (".attn.out_proj.", ".attn.proj."),
                (".mlp.c_fc.", ".mlp.fc1."), (".mlp.c_proj.", ".mlp.fc2."), ("ln_post.", "norm.")]
FAMILIES = {  # name: (backbone prefix kept and stripped, key renames, architecture switches, native statistics)
    "dino": ("", [], {}, IMAGENET_STATS),
    "ibot": ("", [], {}, IMAGENET_STATS),
    "mae": ("", [], {}, IMAGENET_STATS),
    # Co-Settle trains on the momentum encoder (upstream's DeiT conversion takes base_encoder); we follow the code.
    "mocov3": ("momentum_encoder.", [], {}, IMAGENET_STATS),
    # No CLS token. The official code skips the final norm on z1, z2 (and in its metric script), not on the PEA
    # stream; we apply it on all three, as I-JEPA's own forward does, so I-JEPA numbers may differ from the paper's.
    "ijepa": ("", [], dict(cls_token=False), IMAGENET_STATS),
    "dinov2": ("", [], {}, IMAGENET_STATS),
    "clip": ("visual.", CLIP_RENAMES, dict(eps=1e-5, act="quick_gelu", ln_pre=True, patch_bias=False), CLIP_STATS),
    "blip": ("visual_encoder.", [], {}, CLIP_STATS),
}
DROPPED = ("head.", "dino_head.", "ibot_head.", "fc_norm.", "decoder", "mask_token", "masked_embed", "proj")
CONTAINERS = ("teacher", "model", "state_dict", "encoder", "student")  # searched in this order


def read_checkpoint(path):
    """torch.load(weights_only=True), or the state dict of a TorchScript archive (CLIP's ViT-B-16.pt); every failure
    becomes one sentence about the file."""
    if not os.path.isfile(path):
        raise BadInput(f"{path}: no such file")
    zipped = zipfile.is_zipfile(path)
    with open(path, "rb") as f:
        pickled = f.read(1) == b"\x80"  # the PROTO opcode that starts torch.save's legacy (non-zip) format
    if not (zipped or pickled):  # say so, rather than what the unpickler makes of text ("pop from empty list")
        raise BadInput(f"{path}: not a readable PyTorch checkpoint (neither a zip archive nor a pickle, the two "
                       f"formats torch.save writes)")
    try:
        if zipped:
            with zipfile.ZipFile(path) as z:
                scripted = any("/code/" in n for n in z.namelist())
            if scripted:
                return torch.jit.load(path, map_location="cpu").state_dict()  # weights_only cannot read TorchScript
        with torch.serialization.safe_globals([argparse.Namespace]):  # DINO/iBOT/MAE training runs pickle args
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and truncation errors all mean the same thing to the user
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
        raise BadInput(f"{path}: not a readable PyTorch checkpoint ({reason})")


def detect_family(ckpt):
    """(family, state dict) from the file's structure and key names."""
    container = next((k for k in CONTAINERS if isinstance(ckpt.get(k), dict)), None)
    sd = ckpt[container] if container else ckpt
    keys = " ".join(sd)
    if "conv1.weight" in keys and "class_embedding" in keys:
        return "clip", sd
    if "visual_encoder." in keys:
        return "blip", sd
    if "momentum_encoder." in keys or "base_encoder." in keys:
        return "mocov3", sd
    if "register_tokens" in keys or ".ls1.gamma" in keys or ".ls2.gamma" in keys:
        return "dinov2", sd
    if container == "encoder" or ("pos_embed" in keys and "cls_token" not in keys):
        return "ijepa", sd
    if "decoder" in keys or container == "model":
        return "mae", sd
    return ("ibot" if container == "state_dict" else "dino"), sd


def backbone_state_dict(sd, family, path, keep=None):
    """Our key names for the family's backbone: prefixes stripped, renames applied, heads/decoders dropped.
    keep: the prefix the backbone sits under, when not the family's native one (official "+ Ours" files)."""
    native_keep, renames = FAMILIES[family][:2]
    keep = native_keep if keep is None else keep
    if family == "mocov3" and keep == native_keep and not any("momentum_encoder." in k for k in sd):
        keep = "base_encoder."  # a file holding only the online encoder (upstream's DeiT conversion input)
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        k = re.sub(r"^((module|backbone)\.)+", "", k)
        if keep:
            if not k.startswith(keep):
                continue  # the text tower, the other encoder, the predictor...
            k = k[len(keep):]
        k = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)  # DINOv2's chunked blocks.<chunk>.<i>
        for old, new in renames + [(".gamma_1", ".ls1.gamma"), (".gamma_2", ".ls2.gamma")]:  # iBOT LayerScale
            k = k.replace(old, new)
        if not k.startswith(DROPPED):
            out[k] = v.float()  # CLIP ships fp16
    if "patch_embed.proj.weight" not in out or "pos_embed" not in out:
        raise BadInput(f"{path}: no {family} ViT in this checkpoint{f' (nothing under {keep!r})' if keep else ''} "
                       f"(keys: {', '.join(sorted(sd)[:8])}{', ...' if len(sd) > 8 else ''})")
    if family == "clip":  # CLIP stores [D] and [1+N, D]
        out["cls_token"], out["pos_embed"] = out["cls_token"].view(1, 1, -1), out["pos_embed"][None]
    return out


HEADS = {64: 1, 128: 2, 192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1536: 24}  # width: heads (ViT-Ti..g)


def infer_arch(sd, family="dino", path="checkpoint"):
    """ViT hyper-parameters read off the tensors: patch from the patch conv, width, depth, grid, registers,
    heads from the standard width table (MoCo v3's ViT-S has 12 heads), plus the family's switches."""
    dim, _, patch, _ = sd["patch_embed.proj.weight"].shape
    switches = FAMILIES[family][2]
    has_cls = switches.get("cls_token", True)
    n = sd["pos_embed"].shape[1] - has_cls
    side = math.isqrt(n)
    if side * side != n:  # usually a token we do not know (DeiT's dist_token) or the wrong --family
        ours = ("patch_embed.", "pos_embed", "cls_token", "register_tokens", "norm_pre.", "norm.", "blocks.")
        odd = [k for k in sd if not k.startswith(ours) or (k == "cls_token" and not has_cls)]
        odd += ["missing cls_token"] if has_cls and "cls_token" not in sd else []
        raise BadInput(f"{path}: not a {family} ViT: positional embedding of {n} patch rows (after {int(has_cls)} "
                       f"CLS row) is not a square grid" + (f"; check {', '.join(sorted(odd)[:6])}" if odd else ""))
    if "blocks.0.mlp.fc1.weight" not in sd:
        raise BadInput(f"{path}: {family} ViT without transformer blocks (no blocks.0.mlp.fc1.weight)")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    if dim not in HEADS:
        raise BadInput(f"{path}: width {dim} is not a standard ViT width ({', '.join(map(str, HEADS))}); the number "
                       f"of heads cannot be read off the weights")
    heads = 12 if (family, dim) == ("mocov3", 384) else HEADS[dim]
    registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    return dict(patch_size=patch, embed_dim=dim, depth=depth, heads=heads, grid=(side, side),
                mlp_dim=sd["blocks.0.mlp.fc1.weight"].shape[0], qkv_bias="blocks.0.attn.qkv.bias" in sd,
                registers=registers, layerscale="blocks.0.ls1.gamma" in sd, **switches)


def resize_pos_embed(sd, rows):
    """BLIP ships a 384-px (24x24) table for a 224-px model: resize it bicubically to `rows` (the model's grid) once,
    at load, as BLIP's own loader does; PEA and later interpolation start from there."""
    pos = sd["pos_embed"]
    side = math.isqrt(pos.shape[1] - 1)  # after BLIP's CLS row
    if (side, side) == rows:  # already 224 px: an official "+ Ours" BLIP file (BLIP's loader resized it) or a 224 one
        return
    grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=rows, mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(1, 2)
    sd["pos_embed"] = torch.cat([pos[:, :1], grid], dim=1)


def listed(**groups):
    """'missing a, b; unexpected c': at most six names per group, empty groups left out."""
    return "; ".join(f"{label.replace('_', ' ')} {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                     for label, keys in groups.items() if keys)


# -----------------------------------------------------------------------------
# The authors' released "+ Ours" checkpoints (yafeng19/Co-Settle README "Checkpoints")
#
# yafeng19/Co-Settle util/misc.py save_model writes {'model': the whole model's state dict, 'optimizer', 'epoch',
# 'scaler', 'args': main_pretrain.py's argparse.Namespace}. The model is the family's own ViT class with the adapter
# inside it (ST_adapter.py, as `adapter.adapter`), so encoder keys carry no prefix, except CLIP's: the whole OpenAI
# CLIP model is saved, its ViT and adapter under 'visual.' next to the text tower (models/clip/model.py). The
# 'linear' adapter, Linear -> Tanh -> LayerNorm(eps 1e-5), is our Projection renamed; 'mlp2' and 'mlp3' are not.

OFFICIAL_PREFIX = {"clip": "visual."}  # where the official model keeps its ViT and adapter; the other seven: top level
CLIP_TEXT = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection", "logit_scale")
ADAPTER = {f"adapter.adapter.adapter_{official}.{p}": f"{ours}.{p}"  # official name: Projection's name
           for official, ours in (("linear", "linear"), ("layer_norm1", "norm")) for p in ("weight", "bias")}


def is_official(ckpt):
    """An official "+ Ours" file: a 'model' state dict with the adapter in it."""
    model = ckpt.get("model") if isinstance(ckpt, dict) else None
    return isinstance(model, dict) and any(re.match(r"(visual\.)?adapter\.", k) for k in model)


def official_parts(ckpt, path, family=None):
    """An official "+ Ours" file -> (family, encoder keys, adapter in Projection's names, what it says of its run).
    The family is args.base_model, else detected from the keys (for DINO, iBOT, MoCo v3 and BLIP files, a guess).
    A key not the encoder's, the adapter's or CLIP's text tower's is refused by name, as is a non-'linear' adapter."""
    args = ckpt.get("args")
    named = getattr(args, "base_model", None)
    family = family or (named if named in FAMILIES else detect_family(ckpt)[0])
    prefix = OFFICIAL_PREFIX.get(family, "")
    encoder, adapter, unused = {}, {}, []
    for k, v in ckpt["model"].items():
        name = k[len(prefix):] if k.startswith(prefix) else None
        if name in ADAPTER:
            adapter[ADAPTER[name]] = v
        elif name is not None and not name.startswith("adapter."):
            encoder[k] = v  # backbone_state_dict maps it, load_encoder refuses what it does not use
        elif not (name is None and family == "clip" and k.startswith(CLIP_TEXT)):
            unused.append(k)
    fusion_net = getattr(args, "fusion_net", None)
    odd = [k for k in unused if k.startswith(prefix + "adapter.")]
    missing = [prefix + k for k, ours in ADAPTER.items() if ours not in adapter]
    if odd or missing:
        raise BadInput(f"{path}: its adapter (fusion_net {fusion_net!r}) is not the published 'linear' one, which "
                       f"alone maps onto the projection ({listed(unmapped=sorted(odd), missing=missing)})")
    if unused:
        raise BadInput(f"{path}: {listed(unexpected=sorted(unused))}: neither the {family} encoder, its adapter nor "
                       f"CLIP's text tower")
    run = dict(epoch=ckpt.get("epoch"), fusion_net=fusion_net, trained_from=getattr(args, "resume", None))
    return family, encoder, adapter, run


def load_encoder(path, family=None, verbose=False):
    """The frozen ViT of a published checkpoint of any of the eight families (detected, or forced with `family`).
    Every backbone key must be used and every model key present, else an error naming them. The encoder carries
    `.family`, `.native_stats` (mean, std of its pre-training) and, from an official "+ Ours" file, `.official`."""
    return encoder_from(read_checkpoint(path), path, family, verbose)


def encoder_from(ckpt, path, family=None, verbose=False):
    """load_encoder on a checkpoint already read."""
    if not isinstance(ckpt, dict):
        raise BadInput(f"{path}: holds a {type(ckpt).__name__}, not a checkpoint dict")
    if family is not None and family not in FAMILIES:
        raise BadInput(f"{path}: unknown family {family!r}; known: {', '.join(FAMILIES)}")
    official, keep = None, None
    if is_official(ckpt):
        family, sd, _, official = official_parts(ckpt, path, family)
        keep = OFFICIAL_PREFIX.get(family, "")
    else:
        detected, sd = detect_family(ckpt)
        family = family or detected
    sd = backbone_state_dict(sd, family, path, keep)
    arch = infer_arch(sd, family, path)
    if family == "blip":
        arch["grid"] = (224 // arch["patch_size"],) * 2
        resize_pos_embed(sd, arch["grid"])
    with torch.device("meta"):  # shapes only: every value comes from the file (assign=True below)
        model = ViT(**arch)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    wrong = sorted(k for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        raise BadInput(f"{path}: not a complete {family} ViT "
                       f"({listed(missing=missing, unexpected=unexpected, wrong_shape=wrong)})")
    model.load_state_dict(sd, strict=True, assign=True)
    model.family, model.native_stats, model.official = family, FAMILIES[family][3], official
    if verbose:
        print(f"{path}: {family} ViT, patch {arch['patch_size']}, width {arch['embed_dim']}, depth {arch['depth']}, "
              f"{arch['heads']} heads, grid {arch['grid']}, {arch['registers']} registers")
        if official:
            print(f"{path}: an official Co-Settle '+ Ours' checkpoint (epoch {official['epoch']}, trained from "
                  f"{official['trained_from']}); its frozen encoder is the one above, its adapter the projection")
    return freeze(model)


def fingerprint(encoder):
    """A hash of the encoder's weights (names and values, in order): identifies it in a train.py checkpoint."""
    digest = hashlib.sha1()
    for name, p in encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()


def load_projection(path, encoder=None):
    """The trained projection, from a train.py checkpoint or an official "+ Ours" file (its adapter). With `encoder`,
    checked to have been trained on it (a DINO projection on iBOT features would run, silently meaningless)."""
    ckpt = read_checkpoint(path)
    if is_official(ckpt):
        own = encoder_from(ckpt, path)  # every key of the file is checked, and this is the encoder it was trained on
        sd, trained_on = official_parts(ckpt, path, own.family)[2], dict(path=path, fingerprint=fingerprint(own))
        width = own.embed_dim
    elif isinstance(ckpt, dict) and "projection" in ckpt:
        sd, trained_on = ckpt["projection"], ckpt.get("encoder", {})
        width = sd["linear.weight"].shape[0]
    else:
        raise BadInput(f"{path}: not a Co-Settle checkpoint: neither train.py's (no 'projection' entry) nor an "
                       f"official '+ Ours' one (no adapter in its 'model')")
    projection = Projection(width)
    wrong = sorted(k for k, v in projection.state_dict().items() if k not in sd or sd[k].shape != v.shape)
    if wrong:
        raise BadInput(f"{path}: {', '.join(wrong)} missing or not the shape of a width-{width} projection")
    if encoder is not None:
        if width != encoder.embed_dim:
            raise BadInput(f"{path}: projection of width {width}, but the encoder has width {encoder.embed_dim}")
        if "fingerprint" not in trained_on:
            raise BadInput(f"{path}: records no encoder it was trained on (train.py checkpoints hold its path and "
                           f"fingerprint), so it cannot be checked against the one given")
        if trained_on["fingerprint"] != fingerprint(encoder):
            raise BadInput(f"{path}: trained on encoder {trained_on.get('path', '(not recorded)')}, "
                           f"not on the one given")
    projection.load_state_dict(sd, strict=True)  # copies into float32: CLIP's official adapter Linear is fp16
    return freeze(projection)


# -----------------------------------------------------------------------------
# Utilities the scripts share: compiling quietly, timing, argparse checks


@contextlib.contextmanager
def quiet_compile():
    """Silence, while fuse() compiles and nothing else, two torch messages no user can act on: inductor calling a
    helper torch deprecates (FutureWarning), and on a CUDA build without a GPU, torch.utils.cpp_extension's
    "No CUDA runtime is found, using CUDA_HOME=..." as inductor imports it to compile for the CPU."""
    cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")

    def keep(record):
        return not record.getMessage().startswith("No CUDA runtime is found")
    cpp_extension_log.addFilter(keep)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\._prims_common\.check` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        cpp_extension_log.removeFilter(keep)


def timeit(fn, warmup=3, iters=10, device="cpu"):
    """The timer of the --bench modes -> (mean wall-clock s, mean CPU s, last result) of fn() after `warmup` calls
    (CUDA synchronised; CPU seconds do not move when other processes load the machine)."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(iters):
        out = fn()
    sync()
    return (time.perf_counter() - wall) / iters, (time.process_time() - cpu) / iters, out


def _number(kind, ok, rule):
    """An argparse `type` (at_least, positive): a finite `kind` (int or float) for which ok(value) holds. Anything
    else is argparse's one-line error, "argument --flag: ...", exit 2."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value):  # float("inf") and float("nan") parse; no flag of ours means either
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value
    return parse


def at_least(lo, kind=int, below=None):
    rule = f">= {lo}" if below is None else f">= {lo} and < {below}"
    return _number(kind, lambda v: v >= lo and (below is None or v < below), rule)


def positive(kind=int):
    return _number(kind, lambda v: v > 0, "> 0")


def refuse_unused(parser, args, mode, used):
    """No silently ignored flags: a flag set away from its default that `mode` does not read is argparse's error."""
    unused = [k for k, v in vars(args).items() if k not in used and v != parser.get_default(k)]
    if unused:
        parser.error(f"{mode} does not use {', '.join('--' + k.replace('_', '-') for k in unused)}")


# -----------------------------------------------------------------------------
# python cosettle.py --bench


def bench(batch=64, tokens=196, dim=768, iters=10):
    """Forward+backward of the loss head on [B, 3N, D], eager and fused: the cycle loss alone, then Eq. 4.
    (`python test_cosettle.py --bench-loss` times the official eager formulation against it.)"""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    g = torch.Generator().manual_seed(0)
    h = torch.randn(batch, 3 * tokens, dim, generator=g).to(device).requires_grad_()
    z = torch.randn(batch, 3 * tokens, dim, generator=g).to(device)

    def step(fn):
        def run():
            h.grad = None
            fn(h, z)[0].backward()
        return run

    print(f"loss head forward+backward, B={batch}, h and z of 3x{tokens}x{dim}, {name}, torch {torch.__version__}")
    for title, fn in [("cycle loss (Eq. 2)", lambda h, z: cycle_loss(*F.normalize(h, dim=-1).chunk(3, dim=1))),
                      ("total loss (Eq. 4)", objective)]:
        t0 = time.perf_counter()
        fused = fuse(fn, h.shape, device)
        compile_s = time.perf_counter() - t0
        eager_t, fused_t = (timeit(step(f), iters=iters, device=device)[0] for f in (fn, fused))
        print(f"{title}: eager {eager_t * 1e3:.1f} ms, fused {fused_t * 1e3:.1f} ms (x{eager_t / fused_t:.1f}; "
              f"compile {compile_s:.0f} s, once)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bench", action="store_true", help="time the loss head, eager and fused")
    parser.add_argument("--batch-size", type=positive(), default=64)
    args = parser.parse_args()
    if args.bench:
        bench(batch=args.batch_size)
    else:
        parser.print_help()
