"""How large Wanda++'s gradient term is against Wanda's ||X||, per linear (issue 25).

S = (alpha * G + ||X_j||_2) * |W_ij|. When alpha * G is small next to ||X||, the score is
Wanda's; when it is large, the mask follows the gradient. This measures, on the demo model and
C4 calibration windows, the median over weights of alpha * G_ij / ||X_j||_2 for each linear of
some blocks, and how many of Wanda's 2:4 choices the gradient term changes. G is computed as the
``wanda++`` pruner does (RMS over samples of |d ||f(X_n)||_2 / dW|, the block's own output,
one backward per sample), here from one whole-model forward: a block's output depends on its
own weights only through the block, so its gradient is the block's regional gradient.

    python bench/wandapp_scale.py --nsamples 8 --seqlen 512 --blocks 0 10 20 29
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_core import machine  # noqa: E402


def main() -> None:
    from wanda_pipeline.data import calibration_windows
    from wanda_pipeline.models import find_blocks, load_model
    from wanda_pipeline.pruners.wandapp import rgs_metric
    from wanda_pipeline.sparsity import select_mask

    p = argparse.ArgumentParser()
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--alpha", type=float, default=100.0)
    p.add_argument("--blocks", type=int, nargs="*", default=[0, 10, 20, 29])
    p.add_argument("--tag", default="wandapp_scale")
    args = p.parse_args()
    torch.manual_seed(0)
    model, tokenizer, _ = load_model("smollm2-135m")
    _, layers = find_blocks(model)
    windows = calibration_windows("c4", tokenizer, args.nsamples, args.seqlen, seed=0).tokens
    rows = []
    for b in args.blocks:
        linears = {n: m for n, m in layers[b].named_modules() if isinstance(m, torch.nn.Linear)}
        sq = {n: torch.zeros(m.in_features) for n, m in linears.items()}
        grad_sq = {n: torch.zeros_like(m.weight) for n, m in linears.items()}
        def keep(acc: torch.Tensor):
            def hook(mod, inputs, output) -> None:  # returns None: the module's output stays as it is
                acc.add_(inputs[0].detach()[0].float().pow(2).sum(0))
            return hook

        hooks = [m.register_forward_hook(keep(sq[n])) for n, m in linears.items()]
        for w in windows:
            for m in model.parameters():
                m.requires_grad_(False)
            for m in linears.values():
                m.weight.requires_grad_(True)
            out = model(w.reshape(1, -1), output_hidden_states=True)
            loss = out.hidden_states[b + 1][0].float().norm()
            grads = torch.autograd.grad(loss, [m.weight for m in linears.values()])
            for n, g in zip(linears, grads, strict=True):
                grad_sq[n].add_(g.float() ** 2)
        for h in hooks:
            h.remove()
        for n, m in linears.items():
            x = torch.sqrt(sq[n] / len(windows))
            g = torch.sqrt(grad_sq[n] / len(windows))
            ratio = (args.alpha * g / x.clamp_min(1e-12).reshape(1, -1)).flatten()
            wanda = select_mask(rgs_metric(m.weight.detach(), sq[n] / len(windows), None, 0.0), 0.5, "2:4", "output")
            rgs = select_mask(rgs_metric(m.weight.detach(), sq[n] / len(windows), g, args.alpha), 0.5, "2:4",
                              "output")
            rows.append({"block": b, "linear": n, "median_ratio": float(ratio.median()),
                         "p90_ratio": float(ratio.quantile(0.9)) if ratio.numel() < 2**24 else None,
                         "mask_changed": float((wanda != rgs).float().mean())})
            print(json.dumps(rows[-1]), flush=True)
    record = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "settings": vars(args), "rows": rows}
    out = Path(__file__).parent / "results"
    (out / f"{args.tag}.json").write_text(json.dumps(record, indent=2))
    lines = [f"# Wanda++ gradient term against ||X|| ({record['started']})", "", f"Command: `{record['command']}`", "",
             f"SmolLM2-135M fp32, C4 {args.nsamples} x {args.seqlen}, seed 0, alpha {args.alpha}. "
             "Ratio: alpha * G_ij / ||X_j||_2 over the weights of one linear (1: the two terms weigh the same). "
             "Mask changed: share of "
             "weights whose 2:4 keep/prune choice differs from Wanda's.", "",
             "| block | linear | median ratio | 90th percentile | mask changed |", "|---|---|---|---|---|"]
    lines += [f"| {r['block']} | {r['linear']} | {r['median_ratio']:.3f} | "
              f"{'-' if r['p90_ratio'] is None else format(r['p90_ratio'], '.3f')} | {r['mask_changed']:.1%} |"
              for r in rows]
    (out / f"{args.tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
