"""Recurrent LM training step at char-rnn's default size: lmjax vs Flax and PyTorch.

2 LSTM (or GRU) layers of 128, 50 characters x 50 streams per step, 65 symbols, RMSprop
(lr 2e-3, decay 0.95) with global-norm clipping at 5. Prints ms/step and tokens/s for

* lmjax: the real training step of `configs/experiments/char_lstm.gin` (trainer.build
  with the truncated-BPTT task: carried state, hoisted input projections, fused gates,
  `RNNConfig.kernel = 'auto'`, so the recurrence runs in the compiled CPU kernels of
  lmjax/kernels/rnn_cpu.cc where they can run), run as the training loop runs it:
  `train.steps_per_call` of the config (25) steps per compiled call, each call's time
  divided by its steps;
* lmjax-1: the same step, one per call (what the loop does with steps_per_call = 1);
* lmjax-xla: the same, one per call, with `RNNConfig.kernel = 'xla'`: the recurrence as
  lmjax's `lax.scan`, differentiated by JAX;
* flax: a plain stack of `nn.RNN(nn.OptimizedLSTMCell(128))` (`nn.GRUCell` for the GRU),
  same sizes and optimiser;
* torch: `nn.LSTM(128, 128, num_layers=2)` or `nn.GRU` (skipped with a message if torch
  is missing).

All are timed in the same process, interleaved over several rounds, so a busy machine
affects them alike. `vs torch` is the median over rounds of each round's ratio (PyTorch's
median step time over this implementation's, the two measured a few seconds apart), with
the lowest and highest round beside it: on a shared machine whose speed drifts from
minute to minute, the spread says how far one figure can be trusted.

For the LSTM it also prints the rates of lmjax's and PyTorch's steps in GFLOP/s (their
products counted from the sizes) beside a float32 jnp.dot of the same size timed in the
same rounds: how close each step runs to what a matrix product reaches on this machine.

    python experiments/char_lm/bench_rnn.py [--steps=50] [--rounds=5] [--cell=lstm|gru]
"""

import argparse
import json
import os
import statistics
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from lmjax.data.pipelines import load_lm_data
from lmjax.models import rnn
from lmjax.parallel import RULES, make_mesh
from lmjax.train import trainer
from lmjax.train.config import TrainConfig
from lmjax.train.state import create_state
from lmjax.train.tasks import StreamLMTask

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HIDDEN, LAYERS, LENGTH, BATCH, VOCAB = 128, 2, 50, 50, 65
LR, DECAY, CLIP = 2e-3, 0.95, 5.0


def lmjax_runner(data, cell: str, unroll: int, kernel: str = "auto", steps_per_call: int = 1):
    """A function running `steps_per_call` training steps of lmjax's own trainer in one
    call (`trainer.advance`, as the training loop runs them with train.steps_per_call),
    and the last loss; `kernel` is RNNConfig.kernel."""
    config = rnn.RNNConfig(cell=cell, vocab_size=VOCAB, embed_dim=HIDDEN, hidden_dim=HIDDEN,
                           num_layers=LAYERS, block_size=LENGTH, unroll=unroll, kernel=kernel)
    train = TrainConfig(num_steps=10**6, batch_size=BATCH, optimizer="rmsprop",
                        learning_rate=LR, min_lr=LR, warmup_steps=0, beta2=DECAY,
                        grad_clip=CLIP, steps_per_call=steps_per_call)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rules = RULES.get("fsdp_tensor")
    task = StreamLMTask(config, data)
    setup = trainer.build(task, train, mesh, rules)
    batches = task.train_iterator(BATCH, 0)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        box = {"state": create_state(task, setup.tx, BATCH, 0, mesh, rules)}

    def step():
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            box["state"], metrics = trainer.advance(setup, box["state"], batches, steps_per_call)
        return float(jax.block_until_ready(metrics["loss"]).reshape(-1)[-1])

    return step


class FlaxRNN(nn.Module):
    """The plain Flax way: embedding, nn.RNN over OptimizedLSTMCell (or GRUCell) layers,
    dense head."""

    cell: str

    @nn.compact
    def __call__(self, tokens, carries):
        x = nn.Embed(VOCAB, HIDDEN)(tokens)
        new = []
        for i in range(LAYERS):
            cell = nn.OptimizedLSTMCell(HIDDEN) if self.cell == "lstm" else nn.GRUCell(HIDDEN)
            carry, x = nn.RNN(cell, return_carry=True)(x, initial_carry=carries[i])
            new.append(carry)
        return nn.Dense(VOCAB)(x), new


def flax_runner(data, cell: str):
    model = FlaxRNN(cell)
    zero = jnp.zeros((BATCH, HIDDEN))
    zeros = [(zero, zero) if cell == "lstm" else zero for _ in range(LAYERS)]
    tokens = jnp.zeros((BATCH, LENGTH), jnp.int32)
    params = model.init(jax.random.key(0), tokens, zeros)["params"]
    tx = optax.chain(optax.clip_by_global_norm(CLIP), optax.rmsprop(LR, decay=DECAY, eps=1e-8))

    @jax.jit
    def train_step(params, opt_state, carries, inputs, targets):
        def loss_fn(p):
            logits, new = model.apply({"params": p}, inputs, carries)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
            return loss, new

        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, new, loss

    batches = _stream(data)
    box = {"params": params, "opt": tx.init(params), "carry": zeros}

    def step():
        inputs, targets = next(batches)
        box["params"], box["opt"], box["carry"], loss = train_step(
            box["params"], box["opt"], box["carry"], inputs, targets)
        return float(jax.block_until_ready(loss))

    return step


def _stream(data):
    """The same contiguous streams as lmjax's iterator, as (inputs, targets) arrays."""
    rows = data.train[: len(data.train) // BATCH * BATCH].reshape(BATCH, -1)
    chunk = 0
    while True:
        lo = chunk * LENGTH
        if lo + LENGTH + 1 > rows.shape[1]:
            chunk, lo = 0, 0
        window = rows[:, lo : lo + LENGTH + 1]
        chunk += 1
        yield window[:, :-1].astype(np.int64), window[:, 1:].astype(np.int64)


def torch_runner(data, cell: str):
    import torch

    torch.manual_seed(0)
    recurrent = torch.nn.LSTM if cell == "lstm" else torch.nn.GRU

    class TorchRNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
            self.rnn = recurrent(HIDDEN, HIDDEN, num_layers=LAYERS, batch_first=True)
            self.head = torch.nn.Linear(HIDDEN, VOCAB)

        def forward(self, tokens, state):
            out, state = self.rnn(self.embed(tokens), state)
            return self.head(out), state

    model = TorchRNN()
    opt = torch.optim.RMSprop(model.parameters(), lr=LR, alpha=DECAY, eps=1e-8)
    zeros = torch.zeros(LAYERS, BATCH, HIDDEN)
    box = {"state": (zeros, zeros.clone()) if cell == "lstm" else zeros}
    batches = _stream(data)

    def detach(state):
        return tuple(s.detach() for s in state) if cell == "lstm" else state.detach()

    def step():
        inputs, targets = (torch.from_numpy(a) for a in next(batches))
        logits, state = model(inputs, box["state"])
        box["state"] = detach(state)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        return float(loss.detach())

    return step


def product_flops(rows: int = BATCH * LENGTH) -> float:
    """A product of `rows` rows x 128 inputs x 512 gates, x 2: one of the step's large
    products at the default 2500 rows."""
    return 2 * rows * HIDDEN * 4 * HIDDEN


def lstm_step_flops(lookup: bool = True) -> float:
    """Multiply-adds x 2 of the products in an LSTM training step (elementwise work
    aside): each layer's recurrence h @ W_h forward and dz @ W_h^T backward and its weight
    gradient; each layer's input projection, its input gradient and its weight gradient;
    the head forward and its two gradients. With `lookup` (lmjax), layer 0 looks its
    projections up in a 65-row table instead, whose three products are 65 rows long."""
    product, table = product_flops(), product_flops(VOCAB)
    head = 2 * BATCH * LENGTH * HIDDEN * VOCAB
    projections = (LAYERS - 1) * 3 * product + 3 * (table if lookup else product)
    return LAYERS * 3 * product + projections + 3 * head


def gemm_runner():
    """A float32 jnp.dot the size of the step's products (2500 x 512 by 512 x 128): what
    this machine's XLA does at that size, the roof for the step's rate."""
    key = jax.random.key(0)
    a = jax.random.normal(key, (BATCH * LENGTH, 4 * HIDDEN))
    b = jax.random.normal(key, (4 * HIDDEN, HIDDEN))
    dot = jax.jit(jnp.dot)
    return lambda: jax.block_until_ready(dot(a, b))


def config_steps_per_call(cell: str) -> int:
    """train.steps_per_call of configs/experiments/char_{cell}.gin: how the training loop
    runs the steps timed in the `lmjax` row."""
    from lmjax import configs  # noqa: F401  (registers the configurables)

    gin.add_config_file_search_path(REPO)
    gin.parse_config_file(os.path.join(REPO, "configs", "experiments", f"char_{cell}.gin"))
    value = gin.query_parameter("train.steps_per_call")
    gin.clear_config()
    return value


def time_steps(step, steps: int, per_call: int = 1) -> float:
    """Median seconds per step over about `steps` steps, run `per_call` to a call (each
    call waits for its result; at least 3 calls)."""
    times = []
    for _ in range(max(3, round(steps / per_call))):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) / per_call)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--unroll", type=int, default=1, help="lmjax scan unroll")
    parser.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    args = parser.parse_args()
    load = os.getloadavg()[0]  # other work on the machine (the bench adds its own)
    data = load_lm_data("tiny_shakespeare")
    per_call = {"lmjax": config_steps_per_call(args.cell), "lmjax-1": 1}
    runners = {"lmjax": lmjax_runner(data, args.cell, args.unroll,
                                     steps_per_call=per_call["lmjax"]),
               "lmjax-1": lmjax_runner(data, args.cell, args.unroll),
               "lmjax-xla": lmjax_runner(data, args.cell, args.unroll, kernel="xla"),
               "flax": flax_runner(data, args.cell)}
    try:
        import torch

        runners["torch"] = torch_runner(data, args.cell)
        threads = torch.get_num_threads()
    except ImportError:
        print("torch is not installed: skipping the PyTorch row (pip install torch)")
        threads = None
    first_loss = {name: run() for name, run in runners.items()}  # compiles
    for run in runners.values():
        for _ in range(args.warmup):
            run()
    gemm = gemm_runner()
    time_steps(gemm, args.warmup)
    medians = {name: [] for name in runners}
    gemm_times = []
    for _ in range(args.rounds):  # interleaved, so load on a shared machine hits all alike
        for name, run in runners.items():
            medians[name].append(time_steps(run, args.steps, per_call.get(name, 1)))
        gemm_times.append(time_steps(gemm, 4 * args.steps))
    print(f"char-rnn step: {LAYERS} x {HIDDEN} {args.cell.upper()}, batch {BATCH} x {LENGTH}, "
          f"vocab {VOCAB}, RMSprop, clip {CLIP}; {jax.devices()[0].platform}, torch threads "
          f"{threads}; 1-min load average at start {load:.2f}")
    result = {}
    for name, values in medians.items():
        ms = statistics.median(values) * 1e3
        result[name] = {"ms_per_step": ms, "tokens_per_sec": BATCH * LENGTH / ms * 1e3,
                        "first_loss": first_loss[name]}
    print(f"{'impl':9} {'ms/step':>8} {'tokens/s':>10} {'vs torch':>9}  {'rounds':>11}")
    for name, r in result.items():
        ratios = [t / v for t, v in zip(medians["torch"], medians[name], strict=True)] \
            if "torch" in medians else [float("nan")]
        r["vs_torch"] = statistics.median(ratios)
        r["vs_torch_range"] = [min(ratios), max(ratios)]
        print(f"{name:9} {r['ms_per_step']:8.2f} {r['tokens_per_sec']:10,.0f} "
              f"{r['vs_torch']:8.2f}x  {min(ratios):.2f}-{max(ratios):.2f}x")
    gemm_rate = product_flops() / statistics.median(gemm_times) / 1e9
    result["gemm_gflops"] = gemm_rate
    if args.cell == "lstm":  # each step's products per second, against the jnp.dot's
        for name, flops in [("lmjax", lstm_step_flops()), ("torch", lstm_step_flops(False))]:
            if name in result:
                rate = flops / result[name]["ms_per_step"] / 1e6
                result[name]["gflops"] = rate
                print(f"{name}'s step: {flops / 1e9:.2f} GFLOP of products, {rate:.0f} GFLOP/s "
                      f"at its median, {rate / gemm_rate:.0%} of the float32 GEMM's rate")
        print(f"GEMM: {gemm_rate:.0f} GFLOP/s in the same rounds (jnp.dot of "
              f"{BATCH * LENGTH}x{4 * HIDDEN} by {4 * HIDDEN}x{HIDDEN})")
    print("bench_rnn: " + json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
