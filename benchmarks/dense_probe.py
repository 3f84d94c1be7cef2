"""Diagnostic: how fast can localisation be learned from cached LiteMedSAM features alone?

    uv run python benchmarks/dense_probe.py --dataset_dir ../shared/datasets/usgra_nerve --cache_dir bundle/cache \
        --epochs 25

Trains a 3-convolution per-class mask head on the cached 64 x 64 embedding (views 0-1 of every training frame,
the bundle's feature cache, seed 0) and every 5 epochs prints validation Dice of (a) the head's own masks, (b) the
frozen decoder prompted with the box read off the head's mask, (c) the frozen decoder with the ground-truth box.
"""
import argparse, time
import torch, torch.nn as nn, torch.nn.functional as F
from sam2rad_monai.backbones import build_backbone
from sam2rad_monai.model import Sam2Rad, Prompts
from sam2rad_monai.data import build_datalist
from sam2rad_monai.engine.cache import FeatureCache, CachedFeatureDataset
from monai.losses import DiceFocalLoss
ap = argparse.ArgumentParser()
ap.add_argument("--dataset_dir", default="../shared/datasets/usgra_nerve")
ap.add_argument("--cache_dir", default="bundle/cache")
ap.add_argument("--epochs", type=int, default=25)
args = ap.parse_args()
torch.manual_seed(0)
bb = build_backbone("litemedsam"); m = Sam2Rad(bb, 2).eval()
dl = build_datalist(args.dataset_dir, seed=0)
cache = FeatureCache(args.cache_dir, bb, 2, seed=0)
tr = CachedFeatureDataset(dl["train"], cache, 2); va = CachedFeatureDataset(dl["val"], cache, 1, random_view=False)
# load all into memory once
def mem(ds, views):
    out = []
    for i, it in enumerate(ds.data):
        for v in views:
            e = cache.load(it, v); out.append((e["features"]["embed"], e["label"], e["boxes"], e["present"]))
    return out
TR = mem(tr, [0, 1]); VA = mem(va, [0]); print(len(TR), len(VA), flush=True)
head = nn.Sequential(nn.Conv2d(256, 256, 1), nn.GroupNorm(1, 256), nn.Conv2d(256, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=2, dilation=2), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=4, dilation=4), nn.ReLU(), nn.Conv2d(128, 2, 1))
opt = torch.optim.AdamW(head.parameters(), 1e-3, weight_decay=0.01)
E = args.epochs; sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=E * (len(TR) // 8 + 1))
loss_fn = DiceFocalLoss(sigmoid=True)
def masks(lab): return torch.stack([lab == 1, lab == 2], 1).float()
def batches(data, bs, shuffle):
    idx = torch.randperm(len(data)) if shuffle else torch.arange(len(data))
    for s in range(0, len(data), bs):
        b = [data[i] for i in idx[s:s + bs]]
        yield torch.stack([x[0] for x in b]).float(), torch.stack([x[1] for x in b]), torch.stack([x[2] for x in b]), torch.stack([x[3] for x in b])
t0 = time.time()
for ep in range(E):
    head.train()
    for x, lab, _, _ in batches(TR, 8, True):
        y = F.interpolate(masks(lab), size=(256, 256))
        lo = F.interpolate(head(x), size=(256, 256), mode="bilinear")
        l = loss_fn(lo, y); opt.zero_grad(); l.backward(); opt.step(); sched.step()
    if ep % 5 == 4 or ep == E - 1:
        head.eval(); ds = torch.zeros(2); dd = torch.zeros(2); dg = torch.zeros(2); n = 0
        with torch.no_grad():
            for i, (x, lab, gtb, pres) in enumerate(VA):
                lo = F.interpolate(head(x[None].float()), size=(256, 256), mode="bilinear")[0]
                t = masks(lab[None])[0] > 0.5; p = lo > 0
                ds += 2 * (p & t).sum((1, 2)) / (p.sum((1, 2)) + t.sum((1, 2))).clamp(min=1)
                boxes = []
                for c in range(2):
                    ys, xs = torch.nonzero(p[c], as_tuple=True)
                    boxes.append([xs.min(), ys.min(), xs.max(), ys.max()] if len(xs) else [0, 0, 255, 255])
                out = m({"embed": x[None]}, Prompts(boxes=torch.tensor(boxes, dtype=torch.float)[None]), mode="manual")
                q = out["logits"][0] > 0
                dd += 2 * (q & t).sum((1, 2)) / (q.sum((1, 2)) + t.sum((1, 2))).clamp(min=1)
                out = m({"embed": x[None]}, Prompts(boxes=gtb[None]), mode="manual"); q = out["logits"][0] > 0
                dg += 2 * (q & t).sum((1, 2)) / (q.sum((1, 2)) + t.sum((1, 2))).clamp(min=1); n += 1
        print(ep, f"{time.time()-t0:.0f}s", "dense", (ds / n).tolist(), "dec(derived box)", (dd / n).tolist(), "dec(gt box)", (dg / n).tolist(), flush=True)
