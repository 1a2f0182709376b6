"""A plain PyTorch reference for the baby config, timed on the same machine as lmjax.

    pip install torch==2.13.0   # CPU build; not an lmjax dependency
    python experiments/shakespeare_char/torch_reference.py [--steps=2000]

The same architecture (nanoGPT's: pre-LayerNorm blocks, learned positions, tied
embeddings, exact GELU) and recipe (AdamW, betas (0.9, 0.99), weight decay 0.1 on
matrices, clip 1.0, warmup 100 then cosine 1e-3 -> 1e-4, batch 12 x 64, eval every 250
steps over 20 batches of train and val, as nanoGPT's CPU command line does), written
plainly in PyTorch eager mode. It prints the median step time, the wall time of the
whole run and the final val loss, so lmjax's figures have a reference from the same run
on the same machine.
"""

import argparse
import math
import os
import statistics
import time

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

LAYERS, HEADS, WIDTH, BLOCK, BATCH = 4, 4, 128, 64, 12


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
        self.qkv, self.proj = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, WIDTH)
        self.up, self.down = nn.Linear(WIDTH, 4 * WIDTH), nn.Linear(4 * WIDTH, WIDTH)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, HEADS, c // HEADS).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, WIDTH), nn.Embedding(BLOCK, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.ln_f = nn.LayerNorm(WIDTH)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                residual = name.endswith(("proj.weight", "down.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * LAYERS) if residual else 0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def lr_at(it: int, steps: int) -> float:
    if it < 100:
        return 1e-3 * (it + 1) / 101
    ratio = min((it - 100) / max(steps - 100, 1), 1.0)
    return 1e-4 + 0.5 * (1 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)


def batch(data: np.ndarray, gen: np.random.Generator):
    ix = gen.integers(0, len(data) - BLOCK, BATCH)
    x = torch.from_numpy(np.stack([data[i : i + BLOCK] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1 : i + 1 + BLOCK] for i in ix]).astype(np.int64))
    return x, y


@torch.no_grad()
def evaluate(model, data, gen, iters: int = 20) -> float:
    model.eval()
    loss = sum(model(*batch(data, gen)).item() for _ in range(iters)) / iters
    model.train()
    return loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    start = time.perf_counter()
    with open(os.path.join(os.environ["LMJAX_DATA_DIR"], "tinyshakespeare", "input.txt")) as f:
        text = f.read()
    chars = sorted(set(text))
    ids = np.array([chars.index(c) for c in chars])[np.searchsorted(chars, list(text))]
    split = int(len(ids) * 0.9)
    train, val = ids[:split], ids[split:]
    torch.manual_seed(1337)
    gen = np.random.default_rng(1337)
    model = GPT(len(chars))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": other, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))
    times = []
    for it in range(args.steps + 1):
        if it % 250 == 0 or it == args.steps:
            val_loss = evaluate(model, val, gen)
            evaluate(model, train, gen)  # nanoGPT also estimates the train loss
        if it == args.steps:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(it, args.steps)
        t = time.perf_counter()
        loss = model(*batch(train, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        times.append(time.perf_counter() - t)
    wall = time.perf_counter() - start
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"median step {1e3 * statistics.median(times):.1f} ms, wall {wall:.1f} s for "
          f"{args.steps} steps with evals, final val loss {val_loss:.4f}")


if __name__ == "__main__":
    main()
