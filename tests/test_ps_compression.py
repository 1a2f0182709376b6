"""Parameter-server push compression: codecs, error feedback, and runs that use them."""

import dataclasses
import math

import numpy as np
import optax
import pytest

from lmjax.models import GPTConfig
from lmjax.ps import codecs, kv, sharding
from lmjax.ps.config import PSConfig
from lmjax.ps.inproc import run_inproc
from lmjax.ps.policies import Push

TINY = GPTConfig(vocab_size=65, num_layers=2, num_heads=2, embed_dim=32, block_size=32)
MICRO = GPTConfig(vocab_size=65, num_layers=1, num_heads=1, embed_dim=16, block_size=8)
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def data():
    from lmjax.data.pipelines import load_lm_data

    return load_lm_data("tiny_shakespeare")


def codec(name: str, **changes) -> codecs.Codec:
    return codecs.make_codec(PSConfig(compression=name, **changes))


def gradient(size: int, seed: int = 0) -> np.ndarray:
    """Heavy-tailed like real gradients: a few entries much larger than the rest."""
    rng = np.random.default_rng(seed)
    return (rng.standard_t(3, size) * 1e-3).astype(np.float32)


def roundtrip(c: codecs.Codec, x: np.ndarray, seed: int = 0) -> np.ndarray:
    return c.decode(c.encode(x, np.random.default_rng(seed)), x.size)


# 1. Each codec within its stated bound.

@pytest.mark.parametrize("name", codecs.CODECS.names())
@pytest.mark.parametrize("size", [1, 7, 8, 1000, 4099])
def test_payload_matches_the_layout_and_survives_the_wire(name, size):
    """The arrays encode returns have the layout's dtypes and lengths (what the key-value
    transport reads back without a header), and bytes -> payload -> decode is lossless."""
    c, x = codec(name, compression_fraction=0.05), gradient(size)
    payload = c.encode(x, np.random.default_rng(0))
    assert [(a.dtype, a.size) for a in payload] == list(c.layout(size))
    wire = codecs.to_bytes(payload)
    assert len(wire) == codecs.payload_bytes(payload)
    back, end = codecs.from_bytes(c, size, wire, 0)
    assert end == len(wire)
    np.testing.assert_array_equal(c.decode(back, size), c.decode(payload, size))
    assert c.decode(payload, size).dtype == np.float32


def test_none_is_exact():
    x = gradient(1000)
    np.testing.assert_array_equal(roundtrip(codec("none"), x), x)


def test_topk_keeps_the_largest_entries_exactly():
    x = gradient(4099)
    c = codec("topk", compression_fraction=0.01)
    got = roundtrip(c, x)
    kept = np.nonzero(got)[0]
    assert len(kept) == math.ceil(0.01 * x.size)
    np.testing.assert_array_equal(got[kept], x[kept])  # the kept entries, bit for bit
    assert np.abs(x[kept]).min() >= np.abs(np.delete(x, kept)).max()  # and the largest


def test_bf16_is_within_half_a_unit_of_its_8_bit_significand():
    x = gradient(4099)
    got = roundtrip(codec("bf16"), x)
    assert np.all(np.abs(got - x) <= 2.0**-8 * np.abs(x))


def test_sign_error_is_the_l1_identity():
    """scale = mean|x| makes ||x - scale sign(x)||^2 = ||x||^2 - ||x||_1^2 / n, the least
    error any scaled sign vector has."""
    x = gradient(4099).astype(np.float64)
    got = roundtrip(codec("sign"), x.astype(np.float32)).astype(np.float64)
    np.testing.assert_array_equal(np.sign(got), np.where(x >= 0, 1, -1))
    want = np.sum(x**2) - np.sum(np.abs(x)) ** 2 / x.size
    np.testing.assert_allclose(np.sum((got - x) ** 2), want, rtol=1e-5)


def test_qsgd_error_is_at_most_one_level():
    x = gradient(4099)
    levels = 4
    got = roundtrip(codec("qsgd", qsgd_levels=levels), x)
    norm = np.linalg.norm(x.astype(np.float64))
    assert np.all(np.abs(got - x) <= norm / levels * (1 + 1e-6))
    assert codec("qsgd", qsgd_levels=127).layout(10)[1][0] == np.int8
    assert codec("qsgd", qsgd_levels=128).layout(10)[1][0] == np.int16


def randk_variance(x: np.ndarray, fraction: float) -> np.ndarray:
    """Each entry is x n / k with probability k / n, else 0."""
    ratio = x.size / math.ceil(fraction * x.size)
    return x.astype(np.float64) ** 2 * (ratio - 1)


def qsgd_variance(x: np.ndarray, levels: int) -> np.ndarray:
    """Each entry is norm / s times floor(r) or floor(r) + 1, r = s |x| / norm, the upper
    with probability p = r - floor(r): variance (norm / s)^2 p (1 - p)."""
    norm = np.linalg.norm(x.astype(np.float64))
    r = np.abs(x) / norm * levels
    p = r - np.floor(r)
    return (norm / levels) ** 2 * p * (1 - p)


def mean_z_scores(c: codecs.Codec, x: np.ndarray, variance: np.ndarray, draws: int):
    """(x_bar - x) / sqrt(variance / draws) per entry, x_bar the mean of `draws` decodes."""
    rng = np.random.default_rng(1)
    total = np.zeros(x.size, np.float64)
    for _ in range(draws):
        total += c.decode(c.encode(x, rng), x.size)
    return (total / draws - x) / np.sqrt(variance / draws)


@pytest.mark.parametrize("name,variance", [
    ("randk", lambda x: randk_variance(x, 0.1)),
    ("qsgd", lambda x: qsgd_variance(x, 4)),
])
def test_random_codecs_are_unbiased(name, variance):
    """Over 4000 draws each entry's mean is within 5 standard errors of the entry, the
    standard error from the codec's exact variance (64 entries: a true mean fails this
    with probability about 4e-5); their z-scores' squares average to about 1 (chi-square
    with 64 degrees of freedom: 1 +- 5 sqrt(2 / 64)). Top-k, which is biased, fails it."""
    x = gradient(64, seed=2)
    c = codec(name, compression_fraction=0.1, qsgd_levels=4)
    z = mean_z_scores(c, x, variance(x), draws=4000)
    assert np.abs(z).max() < 5, z
    assert abs(np.mean(z**2) - 1) < 5 * math.sqrt(2 / x.size)
    biased = mean_z_scores(codec("topk", compression_fraction=0.1), x, variance(x), 4000)
    assert np.abs(biased).max() > 5


def test_top1_percent_is_at_least_20x_smaller():
    x = gradient(256 * 1024)  # one 256 x 1024 weight matrix
    dense = codecs.payload_bytes(codec("none").encode(x, None))
    for name in ("topk", "randk"):
        sent = codecs.payload_bytes(codec(name, compression_fraction=0.01).encode(
            x, np.random.default_rng(0)))
        assert dense / sent >= 20, (name, dense / sent)
    ratios = {name: dense / codecs.payload_bytes(codec(name).encode(x, np.random.default_rng(0)))
              for name in ("bf16", "qsgd", "sign")}
    assert ratios["bf16"] == 2 and ratios["qsgd"] > 3.99 and ratios["sign"] > 31.9


# 2. Error feedback.

@pytest.mark.parametrize("name", ["topk", "randk", "sign", "qsgd", "bf16"])
def test_error_feedback_residual_is_the_sum_of_what_was_dropped(name):
    """After T pushes, residual = sum of gradients - sum of what was sent (float32
    rounding aside: each step adds at most a few ulps of the running values)."""
    config = PSConfig(compression=name, error_feedback=True, compression_fraction=0.05)
    compressor, c = codecs.Compressor(config), codecs.make_codec(config)
    shapes = {"a": (30, 20), "b": (7,)}
    grads_sum = {k: np.zeros(math.prod(s)) for k, s in shapes.items()}
    sent_sum = {k: np.zeros(math.prod(s)) for k, s in shapes.items()}
    steps = 40
    for t in range(steps):
        grads = {k: gradient(math.prod(s), seed=t * 7 + i).reshape(s)
                 for i, (k, s) in enumerate(shapes.items())}
        payloads = compressor.encode(grads, np.random.default_rng(t))
        sent = codecs.decode_grads(c, payloads, shapes)
        for k in shapes:
            grads_sum[k] += grads[k].ravel()
            sent_sum[k] += sent[k].ravel()
    for k in shapes:
        scale = max(np.abs(grads_sum[k]).max(), np.abs(sent_sum[k]).max())
        np.testing.assert_allclose(compressor.residual[k], grads_sum[k] - sent_sum[k],
                                   rtol=0, atol=4 * steps * EPS32 * scale)
    if name == "topk":  # error feedback sends every entry eventually: the residual stays
        assert np.abs(compressor.residual["a"]).max() < np.abs(grads_sum["a"]).max()


def test_without_error_feedback_nothing_is_kept():
    compressor = codecs.Compressor(PSConfig(compression="topk"))
    compressor.encode({"a": gradient(100)}, np.random.default_rng(0))
    assert compressor.residual == {}


# 3. Pushes over the key-value transport's wire format.

@pytest.mark.parametrize("name", codecs.CODECS.names())
def test_a_push_crosses_the_key_value_wire_intact(name):
    plan = sharding.ShardPlan((("a", "b"), ("c",)), {"a": (30, 20), "b": (7,), "c": (5, 3)})
    config = PSConfig(compression=name, compression_fraction=0.1)
    c = codecs.make_codec(config)
    grads = {k: gradient(math.prod(s), seed=i).reshape(s)
             for i, (k, s) in enumerate(plan.shapes.items())}
    part = plan.split(grads)[0]
    payloads = codecs.Compressor(config).encode(part, np.random.default_rng(0))
    push = Push(1, 5, 3, 2, 0.5, payloads, pushed_bytes=10, pulled_bytes=20)
    wire = kv.encode_push(push, plan, 0)
    back = kv.decode_push(wire, plan, 0, slot=9, codec=c)
    assert (back.worker, back.clock, back.version, back.slot) == (1, 5, 3, 9)
    got = codecs.decode_grads(c, back.grads, plan.shapes)
    want = codecs.decode_grads(c, payloads, plan.shapes)
    for k in part:
        np.testing.assert_array_equal(got[k], want[k])
    body = sum(codecs.payload_bytes(p) for p in payloads.values())
    assert len(wire) - body < 200  # only the small JSON header besides the payloads
    if name != "none":
        with pytest.raises(ValueError, match="disagree on ps.compression"):
            kv.decode_push(wire, plan, 0, slot=9, codec=codecs.make_codec(PSConfig()))


# 4. Runs.

@pytest.mark.parametrize("changes", [{}, {"compression": "topk", "compression_fraction": 1.0}])
def test_bsp_without_loss_still_equals_single_process_training(data, changes):
    """No compression, or top-k keeping every entry: BSP equals one process with the
    combined batch (the reference of tests/test_ps.py)."""
    from test_ps import reference_params, relative

    config = PSConfig(model=TINY, policy="bsp", num_workers=4, num_servers=2, num_updates=4,
                      batch_size=2, optimizer="sgd", learning_rate=0.1, **changes)
    result = run_inproc(workdir=None, data=data, config=config)
    want, want_losses = reference_params(data, TINY, 4 * 2, 4, optax.sgd(0.1))
    losses = [r["loss"] for r in result.records if r["split"] == "train"]
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    for name in want:
        assert relative(result.params[name], want[name]) <= 1e-5, name


def worker_bytes(result) -> int:
    return sum(r["pushed_bytes"] for r in result.records if r["split"] == "worker")


def test_topk_with_error_feedback_trains_and_moves_20x_fewer_bytes(data):
    config = PSConfig(model=TINY, policy="async", num_workers=4, num_servers=2,
                      num_updates=80, batch_size=4, optimizer="adam", learning_rate=3e-3,
                      compression="topk", error_feedback=True)
    result = run_inproc(workdir=None, data=data, config=config)
    losses = [r["loss"] for r in result.records if r["split"] == "train"]
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.3, losses
    pushes = sum(r["gradients"] for r in result.records if r["split"] == "worker")
    dense = sum(int(np.asarray(v).nbytes) for v in result.params.values())
    assert pushes * dense / worker_bytes(result) >= 20


def test_random_codecs_are_reproducible(data):
    config = PSConfig(model=TINY, policy="async", num_workers=4, num_servers=2,
                      num_updates=6, batch_size=2, optimizer="sgd", learning_rate=0.1,
                      compression="randk", compression_fraction=0.1, error_feedback=True,
                      seed=3)
    first = run_inproc(workdir=None, data=data, config=config)
    assert run_inproc(workdir=None, data=data, config=config).records == first.records
    other = run_inproc(workdir=None, data=data, config=dataclasses.replace(config, seed=4))
    assert other.records != first.records


@pytest.mark.parametrize("changes,message", [
    ({"compression": "gzip"}, "unknown ps.compression 'gzip'"),
    ({"compression": "topk", "compression_fraction": 0.0}, "compression_fraction must be"),
    ({"compression": "qsgd", "qsgd_levels": 0}, "qsgd_levels must be"),
    ({"error_feedback": True}, "does nothing with ps.compression='none'"),
])
def test_compression_settings_are_checked(changes, message):
    from lmjax.ps.run import check

    with pytest.raises(ValueError, match=message):
        check(PSConfig(model=MICRO, **changes))


@pytest.mark.slow
def test_jax_distributed_compressed_sync_equals_inproc(tmp_path):
    """Random-k with error feedback over real processes: the payloads cross the key-value
    store and the codec's draws depend on (seed, worker, clock, shard) only, so the run
    equals its in-process twin."""
    from test_ps_processes import SYNC, records, run_ps

    changes = {"compression": "randk", "compression_fraction": 0.05, "error_feedback": True}
    params = [f"ps.{k}={v!r}" for k, v in changes.items()]
    out = run_ps(tmp_path, SYNC, "ps.num_updates=8", *params)
    assert out.returncode == 0, out.stderr[-3000:]
    from lmjax.data.pipelines import load_lm_data

    config = PSConfig(model=TINY, policy="bsp", num_workers=2, num_updates=8, batch_size=8,
                      optimizer="adam", learning_rate=1e-3, seed=0, **changes)
    twin = run_inproc(workdir=None, data=load_lm_data("tiny_shakespeare"), config=config)
    want = [r["loss"] for r in twin.records if r["split"] == "train"]
    np.testing.assert_allclose([r["loss"] for r in records(tmp_path)], want, rtol=1e-5)
    pushed = sum(r["pushed_bytes"] for r in records(tmp_path, "worker"))
    assert pushed == worker_bytes(twin)
