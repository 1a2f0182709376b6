"""RNN family: cells equal NumPy, bidirectional and TBPTT equivalences, sharding, resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import run_cli
from flax import linen as nn

from lmjax.data import pipelines
from lmjax.models import rnn
from lmjax.parallel import RULES, make_mesh
from lmjax.train import trainer
from lmjax.train.checkpoint import Checkpointer
from lmjax.train.config import TrainConfig
from lmjax.train.state import create_state
from lmjax.train.tasks import StreamLMTask


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def numpy_layer(cell, params, xs, h0, c0=None, resets=None):
    """The documented equations (PyTorch's nn.LSTM / nn.GRU / Elman), one step at a time."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    w_i, w_h, b_i, b_h = p["w_i"], p["w_h"], p["b_i"], p["b_h"]  # (in, gates, hidden)
    h, c, outs = h0.astype(np.float64), None if c0 is None else c0.astype(np.float64), []
    for t in range(xs.shape[1]):
        if resets is not None:
            h = np.where(resets[:, t, None], 0.0, h)
            c = None if c is None else np.where(resets[:, t, None], 0.0, c)
        gx = [xs[:, t] @ w_i[:, g] + b_i[g] for g in range(w_i.shape[1])]
        gh = [h @ w_h[:, g] + b_h[g] for g in range(w_h.shape[1])]
        if cell == "lstm":
            i, f = _sigmoid(gx[0] + gh[0]), _sigmoid(gx[1] + gh[1])
            g, o = np.tanh(gx[2] + gh[2]), _sigmoid(gx[3] + gh[3])
            c = f * c + i * g
            h = o * np.tanh(c)
        elif cell == "gru":
            r, z = _sigmoid(gx[0] + gh[0]), _sigmoid(gx[1] + gh[1])
            n = np.tanh(gx[2] + r * gh[2])
            h = (1 - z) * n + z * h
        else:
            h = np.tanh(gx[0] + gh[0])
        outs.append(h)
    return np.stack(outs, 1), h, c


@pytest.mark.parametrize(("cell", "kernel"), [("lstm", "xla"), ("lstm", "auto"), ("gru", "xla"),
                                           ("gru", "auto"), ("rnn", "xla")])
def test_cell_equals_numpy_equations(cell, kernel):
    """XLA's scan, and with kernel='auto' the LSTM and GRU CPU kernels, against NumPy."""
    rng = np.random.default_rng(0)
    batch, time, features, hidden = 3, 7, 5, 6
    xs = rng.normal(size=(batch, time, features)).astype(np.float32)
    resets = rng.random((batch, time)) < 0.2
    layer = rnn.RecurrentLayer(cell, hidden, unroll=3, kernel=kernel)
    h0 = rng.normal(size=(batch, hidden)).astype(np.float32)
    carry = (h0, rng.normal(size=(batch, hidden)).astype(np.float32)) if cell == "lstm" else h0
    params = nn.unbox(layer.init(jax.random.key(1), xs, carry))["params"]
    # Non-zero biases so every term of the equations is exercised.
    params = {k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
    outs, final = layer.apply({"params": params}, xs, carry, jnp.asarray(resets))
    c0 = carry[1] if cell == "lstm" else None
    want_outs, want_h, want_c = numpy_layer(cell, params, xs, h0, c0, resets)
    np.testing.assert_allclose(outs, want_outs, atol=1e-5, rtol=0)
    got_h = final[0] if cell == "lstm" else final
    np.testing.assert_allclose(got_h, want_h, atol=1e-5, rtol=0)
    if cell == "lstm":
        np.testing.assert_allclose(final[1], want_c, atol=1e-5, rtol=0)


def test_bidirectional_backward_half_equals_forward_on_reversed_input():
    rng = np.random.default_rng(1)
    batch, time, features, hidden = 3, 9, 4, 5
    xs = rng.normal(size=(batch, time, features)).astype(np.float32)
    lengths = np.array([9, 5, 1])
    mask = np.arange(time)[None, :] < lengths[:, None]  # padding at the end of each row
    bi = rnn.BiLayer("lstm", hidden)
    params = nn.unbox(bi.init(jax.random.key(0), xs, mask))["params"]
    out = np.asarray(bi.apply({"params": params}, xs, mask))  # (batch, time, 2 hidden)
    forward = rnn.RecurrentLayer("lstm", hidden)
    for row, length in enumerate(lengths):
        reversed_x = xs[row : row + 1, :length][:, ::-1]
        fwd_on_rev, _ = forward.apply({"params": params["backward"]}, reversed_x)
        np.testing.assert_allclose(out[row, :length, hidden:],
                                   np.asarray(fwd_on_rev)[0, ::-1], atol=1e-6)
        fwd, _ = forward.apply({"params": params["forward"]}, xs[row : row + 1, :length])
        np.testing.assert_allclose(out[row, :length, :hidden], np.asarray(fwd)[0], atol=1e-6)


def test_embedding_lookup_path_equals_projecting_embedded_tokens():
    """Layer 0 of an LM without embedding dropout looks its input projections up in
    embedding @ w_i + b_i: outputs and gradients equal projecting the embedded tokens."""
    rng = np.random.default_rng(4)
    tokens = jnp.asarray(rng.integers(0, 11, size=(3, 9)), jnp.int32)
    embedding = jnp.asarray(rng.normal(size=(11, 5)), jnp.float32)
    layer = rnn.RecurrentLayer("lstm", 6)
    params = nn.unbox(layer.init(jax.random.key(0), embedding[tokens]))["params"]
    params = {k: v + 0.1 * rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}

    def loss(params, embedding, lookup):
        xs, kw = (tokens, {"embedding": embedding}) if lookup else (embedding[tokens], {})
        outs, (h, c) = layer.apply({"params": params}, xs, **kw)
        return jnp.sum(outs * jnp.cos(outs)) + jnp.sum(h * c)

    (want, want_grads), (got, got_grads) = (
        jax.value_and_grad(loss, argnums=(0, 1))(params, embedding, lookup)
        for lookup in (False, True))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_truncated_bptt_chunks_equal_one_pass(cell):
    config = rnn.RNNConfig(cell=cell, vocab_size=11, embed_dim=8, hidden_dim=12, num_layers=2,
                           block_size=6, unroll=2)
    model = rnn.RNNLM(config)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, 11, size=(4, 24)).astype(np.int32)
    resets = np.zeros((4, 24), np.bool_)
    resets[1, 10] = resets[3, 0] = True  # documents start mid-chunk and at a chunk start
    params = model.init(jax.random.key(0), tokens[:, :6])["params"]
    whole, final = model.apply({"params": params}, tokens, None, resets)
    carry, pieces = None, []
    for k in range(4):
        chunk = slice(6 * k, 6 * (k + 1))
        logits, carry = model.apply({"params": params}, tokens[:, chunk], carry, resets[:, chunk])
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, 1), whole, atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(carry), jax.tree.leaves(final), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_stream_chunks_continue_rows_and_reset_at_stream_start():
    tokens = np.arange(1000, dtype=np.int32)
    source = pipelines.StreamChunks(tokens, 10, rows=4, doc_starts=np.array([0, 523]))
    first, second = source[0], source[1]
    np.testing.assert_array_equal(first["inputs"][:, 0], [0, 250, 500, 750])
    np.testing.assert_array_equal(second["inputs"][:, 0], first["targets"][:, -1])
    assert first["resets"][:, 0].all() and not second["resets"][:, 0].any()
    assert source[2]["resets"][2].tolist() == [i == 3 for i in range(10)]  # token 523
    it = pipelines.stream_iterator(tokens, 10, 4)
    for _ in range(len(source) + 1):  # past the end of an epoch: back to chunk 0
        batch = next(it)
    np.testing.assert_array_equal(batch["inputs"], source[0]["inputs"])


SMALL = rnn.RNNConfig(cell="lstm", vocab_size=65, embed_dim=16, hidden_dim=32, num_layers=2,
                      block_size=16, dropout=0.1, unroll=4)
TRAIN = TrainConfig(num_steps=6, batch_size=8, warmup_steps=1, optimizer="rmsprop",
                    learning_rate=2e-3, beta2=0.95, grad_clip=5.0)


def stream_losses(mesh, steps: int = 6, per_call: int = 1):
    """Losses of `steps` training steps, run `per_call` to a compiled call, and the state."""
    text = pipelines.load_lm_data("tiny_shakespeare")
    data = pipelines.LMData(text.tokenizer, text.train[:20000], text.eval)
    task = StreamLMTask(SMALL, data)
    rules = RULES.get("fsdp_tensor")
    setup = trainer.build(task, TRAIN, mesh, rules)
    batches = task.train_iterator(TRAIN.batch_size, 0)
    losses = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = create_state(task, setup.tx, TRAIN.batch_size, 0, mesh, rules)
        for _ in range(steps // per_call):
            state, metrics = trainer.advance(setup, state, batches, per_call)
            losses.append(metrics["loss"])
    return np.concatenate([np.reshape(x, -1) for x in jax.device_get(losses)]), state


def test_lstm_sharded_equals_one_device():
    one, _ = stream_losses(make_mesh(1, 1, 1, devices=jax.devices()[:1]))
    sharded, state = stream_losses(make_mesh(4, 1, 2))
    assert np.all(np.isfinite(one)) and one[-1] < one[0]
    np.testing.assert_allclose(sharded, one, rtol=1e-5)
    scanned, _ = stream_losses(make_mesh(4, 1, 2), per_call=3)  # Setup.steps_fn, sharded
    np.testing.assert_allclose(scanned, sharded, rtol=1e-6)
    kernel = state.params["layer0"]["w_h"]
    assert kernel.sharding.spec[2] == "tensor"  # hidden units split over the tensor axis
    assert state.carry["layer0"][0].sharding.spec[0] == ("data", "fsdp")


def _records(workdir, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def char_lstm_args(workdir, steps: int, *params: str) -> list[str]:
    params = ("RNNConfig.hidden_dim=32", "RNNConfig.embed_dim=16", "RNNConfig.block_size=20",
              "train.batch_size=8", f"train.num_steps={steps}", "train.decay_steps=12",
              "train.log_every=1", "train.eval_every=6", "train.checkpoint_every=6",
              "train.eval_batches=4", "RNNConfig.dropout=0.1") + params
    return ["train", f"--workdir={workdir}", "--gin_file=configs/experiments/char_lstm.gin",
            *[f"--gin_param={p}" for p in params]]


def test_resumed_char_lstm_equals_uninterrupted(tmp_path):
    straight = tmp_path / "straight"
    result = run_cli(*char_lstm_args(straight, 12))
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = tmp_path / "resumed"
    assert run_cli(*char_lstm_args(resumed, 6)).returncode == 0
    result = run_cli(*char_lstm_args(resumed, 12))
    assert result.returncode == 0, result.stderr[-3000:]
    want, got = _records(straight, "train"), _records(resumed, "train")
    assert [r["step"] for r in got] == list(range(1, 13))
    for a, b in zip(got, want, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)
    assert abs(_records(resumed, "eval")[-1]["loss"] - _records(straight, "eval")[-1]["loss"]) \
        <= 1e-6
    # The checkpoint holds the carried state (non-zero: a zero state would be a reset).
    saved = Checkpointer(str(resumed / "checkpoints"), read_only=True)
    state = saved.manager.restore(6, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    saved.close()
    h, c = state["state"]["carry"]["layer1"]
    assert h.shape == (8, 32) and np.abs(h).max() > 0.01 and np.abs(c).max() > 0.01


def test_steps_per_call_equals_one_step_per_call(tmp_path):
    """Up to three steps per compiled call (cut short at the log, eval and checkpoint
    steps) train as one per call: the carried state, dropout keys and data order go on."""
    runs = {}
    for k in (1, 3):
        workdir = tmp_path / f"k{k}"
        result = run_cli(*char_lstm_args(workdir, 12, "train.log_every=4",
                                         f"train.steps_per_call={k}"))
        assert result.returncode == 0, result.stderr[-3000:]
        runs[k] = workdir
    want, got = _records(runs[1], "train"), _records(runs[3], "train")
    assert [r["step"] for r in got] == [4, 8, 12]
    for a, b in zip(got, want, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) \
            <= 1e-6, (a, b)
    assert abs(_records(runs[3], "eval")[-1]["loss"] - _records(runs[1], "eval")[-1]["loss"]) \
        <= 1e-6


def test_resume_with_another_batch_size_names_the_carried_state(tmp_path):
    workdir = tmp_path / "run"
    assert run_cli(*char_lstm_args(workdir, 6)).returncode == 0
    result = run_cli(*char_lstm_args(workdir, 12, "train.batch_size=4"))
    assert result.returncode == 1
    assert "carried state layer0/0 has shape (8, 32) in the checkpoint but (4, 32)" in \
        result.stderr, result.stderr[-2000:]
