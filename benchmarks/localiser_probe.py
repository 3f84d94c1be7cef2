"""Diagnostic: does a larger dedicated localiser on the cached LiteMedSAM embedding find the right structure?

    uv run python benchmarks/localiser_probe.py --dataset_dir ../shared/datasets/usgra_nerve --cache_dir bundle/cache \
        --epochs 30 --output benchmarks/results/localiser_probe.json

Trains, on views 0-1 of every training frame of the bundle's feature cache (seed 0), one network with two heads
over a shared trunk: the 256-channel 64 x 64 embedding plus two coordinate channels, five dilated 3 x 3 convolutions
(dilation 1-16) and one global self-attention layer over a 16 x 16 pooling of the trunk. Heads: a per-class mask
(Dice + focal) and a CenterNet-style per-class centre heatmap with box width / height at the centre. Every 5 epochs
it prints, on the validation split only (rows with the class present, Dice at 256 x 256): the mask head's own Dice,
the frozen decoder prompted with the box of the mask head's substantial regions (the PPN's rule) or with the box
at the heatmap's peak, the decoder with the true box, and each box's IoU with the true one.
"""
import argparse, time, math, json
import torch, torch.nn as nn, torch.nn.functional as F
torch.set_num_threads(2)
from sam2rad_monai.backbones import build_backbone
from sam2rad_monai.model import Sam2Rad, Prompts
from sam2rad_monai.ppn import region_boxes
from sam2rad_monai.data import build_datalist
from sam2rad_monai.engine.cache import FeatureCache
from monai.losses import DiceFocalLoss
ap = argparse.ArgumentParser()
ap.add_argument("--epochs", type=int, default=30)
ap.add_argument("--views", default="0,1")
ap.add_argument("--ch", type=int, default=96)
ap.add_argument("--ctx", type=int, default=1)
ap.add_argument("--coord", type=int, default=1)
ap.add_argument("--dataset_dir", default="../shared/datasets/usgra_nerve")
ap.add_argument("--cache_dir", default="bundle/cache")
ap.add_argument("--output", default=None)
args = ap.parse_args()
torch.manual_seed(0)
bb = build_backbone("litemedsam"); m = Sam2Rad(bb, 2).eval()
dl = build_datalist(args.dataset_dir, seed=0)
cache = FeatureCache(args.cache_dir, bb, 2, seed=0)
views = [int(v) for v in args.views.split(",")]
def mem(items, vs):
    out = []
    for it in items:
        for v in vs:
            e = cache.load(it, v); out.append((e["features"]["embed"], e["label"], e["boxes"], e["present"]))
    return out
TR = mem(dl["train"], views); VA = mem(dl["val"], [0]); print(len(TR), len(VA), flush=True)
G = 64
class Loc(nn.Module):
    def __init__(s, ch, ctx, coord):
        super().__init__()
        s.coord = coord
        s.inp = nn.Sequential(nn.Conv2d(256 + 2 * coord, ch, 1), nn.GroupNorm(8, ch), nn.GELU())
        layers = []
        for d in (1, 2, 4, 8, 16):
            layers += [nn.Conv2d(ch, ch, 3, padding=d, dilation=d), nn.GroupNorm(8, ch), nn.GELU()]
        s.trunk = nn.Sequential(*layers)
        s.ctx = nn.TransformerEncoderLayer(ch, 4, 2 * ch, dropout=0.1, batch_first=True, norm_first=True) if ctx else None
        s.seg = nn.Conv2d(ch, 2, 1); s.hm = nn.Conv2d(ch, 2, 1); s.wh = nn.Conv2d(ch, 4, 1)
        nn.init.constant_(s.hm.bias, -4.0)
    def forward(s, x):
        b = x.shape[0]
        if s.coord:
            yy, xx = torch.meshgrid(torch.linspace(-1, 1, G), torch.linspace(-1, 1, G), indexing="ij")
            x = torch.cat([x, torch.stack([xx, yy])[None].expand(b, -1, -1, -1)], 1)
        h = s.trunk(s.inp(x))
        if s.ctx is not None:
            lo = F.avg_pool2d(h, 4)  # 16x16 tokens, global attention for "which structure"
            t = s.ctx(lo.flatten(2).transpose(1, 2)).transpose(1, 2).reshape_as(lo)
            h = h + F.interpolate(t - lo, size=h.shape[-2:], mode="bilinear")
        return s.seg(h), s.hm(h), s.wh(h).sigmoid()
net = Loc(args.ch, args.ctx, args.coord)
print(sum(p.numel() for p in net.parameters()), flush=True)
E = args.epochs; bs = 8
opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=0.05)
sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=E * math.ceil(len(TR) / bs))
dfl = DiceFocalLoss(sigmoid=True)
def masks(lab): return torch.stack([lab == 1, lab == 2], 1).float()
def targets(boxes, pres):
    # boxes (B, C, 4) inclusive input pixels at 256 -> centre heatmap on the 64 grid + normalised w, h
    B, C, _ = boxes.shape
    x1, y1, x2, y2 = (boxes + torch.tensor([0, 0, 1, 1])).unbind(-1)
    cx, cy = (x1 + x2) / 2 / 4, (y1 + y2) / 2 / 4  # grid units
    w, h = (x2 - x1) / 256, (y2 - y1) / 256
    sig = (torch.stack([w, h], -1).amin(-1) * G / 6).clamp(min=1.0)
    yy, xx = torch.meshgrid(torch.arange(G) + 0.5, torch.arange(G) + 0.5, indexing="ij")
    hm = torch.exp(-((xx - cx[..., None, None]) ** 2 + (yy - cy[..., None, None]) ** 2) / (2 * sig[..., None, None] ** 2))
    hm = hm * pres[..., None, None]
    ci = cx.floor().clamp(0, G - 1).long(); cj = cy.floor().clamp(0, G - 1).long()
    return hm, torch.stack([w, h], -1), ci, cj
def focal_hm(logit, gt):
    p = logit.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = gt.eq(gt.amax((-1, -2), keepdim=True)) & (gt > 0.99)
    pl = -((1 - p) ** 2 * torch.log(p))[pos].sum()
    nl = -((1 - gt) ** 4 * p ** 2 * torch.log(1 - p))[~pos].sum()
    return (pl + nl) / pos.sum().clamp(min=1)
def batches(data, shuffle):
    idx = torch.randperm(len(data)) if shuffle else torch.arange(len(data))
    for s in range(0, len(data), bs):
        b = [data[i] for i in idx[s:s + bs]]
        yield (torch.stack([x[0] for x in b]).float(), torch.stack([x[1] for x in b]), torch.stack([x[2] for x in b]), torch.stack([x[3] for x in b]))
def decode(hm, wh):
    # hm (C, G, G) logits, wh (4, G, G) -> boxes (C, 4) input pixels (inclusive), score (C,)
    out, sc = [], []
    for c in range(2):
        v, i = hm[c].flatten().max(0); j, k = divmod(int(i), G)
        w, h = wh[2 * c:2 * c + 2, j, k] * 256
        cx, cy = (k + 0.5) * 4, (j + 0.5) * 4
        out.append([cx - w / 2, cy - h / 2, cx + w / 2 - 1, cy + h / 2 - 1]); sc.append(v.sigmoid())
    return torch.tensor(out).clamp(0, 255), torch.stack(sc)
def dice(q, t): return (2 * (q & t).sum((1, 2)) / (q.sum((1, 2)) + t.sum((1, 2))).clamp(min=1))
def evaluate():
    net.eval(); R = {k: [] for k in ("seg", "dec_seg", "dec_ctr", "dec_gt", "iou_ctr", "iou_seg")}; P = []; S = []
    from torchvision.ops import box_iou
    with torch.no_grad():
        for x, lab, gtb, pres in VA:
            seg, hm, wh = net(x[None].float())
            lo = F.interpolate(seg, size=(256, 256), mode="bilinear")[0]
            t = masks(lab[None])[0] > 0.5; p = lo > 0
            R["seg"].append(dice(p, t))
            sb = region_boxes(p) * 256 - torch.tensor([0, 0, 1, 1])
            cb, score = decode(hm[0], wh[0])
            for name, b in (("dec_seg", sb), ("dec_ctr", cb), ("dec_gt", gtb)):
                q = m({"embed": x[None].float()}, Prompts(boxes=b[None].float()), mode="manual")["logits"][0] > 0
                R[name].append(dice(q, t))
            R["iou_ctr"].append(box_iou(cb + torch.tensor([0, 0, 1, 1]), gtb + torch.tensor([0, 0, 1, 1])).diag())
            R["iou_seg"].append(box_iou(sb + torch.tensor([0, 0, 1, 1]), gtb + torch.tensor([0, 0, 1, 1])).diag())
            P.append(pres); S.append(score)
    P = torch.stack(P).bool(); S = torch.stack(S)
    res = {k: [round(float(torch.stack(v)[:, c][P[:, c]].mean()), 3) for c in range(2)] for k, v in R.items()}
    res["score_present_min"] = [round(float(S[:, c][P[:, c]].min()), 3) for c in range(2)]
    res["score_absent"] = [S[:, c][~P[:, c]].tolist() for c in range(2)]
    return res
history = []
t0 = time.time()
for ep in range(E):
    net.train(); tot = 0
    for x, lab, gtb, pres in batches(TR, True):
        seg, hm, wh = net(x)
        y = masks(lab)
        l_seg = dfl(F.interpolate(seg, size=(256, 256), mode="bilinear"), y)
        ghm, gwh, ci, cj = targets(gtb, pres)
        l_hm = focal_hm(hm, ghm)
        B = x.shape[0]; whp = wh.view(B, 2, 2, G, G)
        pred = whp[torch.arange(B)[:, None], torch.arange(2)[None], :, cj, ci]  # (B, C, 2)
        l_wh = ((pred - gwh).abs().sum(-1) * pres).sum() / pres.sum().clamp(min=1) * 5
        l = l_seg + l_hm + l_wh
        opt.zero_grad(); l.backward(); opt.step(); sched.step(); tot += l.item()
    print(ep, f"{time.time()-t0:.0f}s loss {tot:.2f}", flush=True)
    if ep % 5 == 4 or ep == E - 1:
        history.append({"epoch": ep + 1, "seconds": round(time.time() - t0), **evaluate()})
        print(json.dumps(history[-1]), flush=True)
if args.output:
    with open(args.output, "w") as f:
        json.dump({"args": vars(args), "split": "val", "rows": "class present", "history": history}, f, indent=1)
