"""Parameter-server hardening: bounded pushes per parameter version."""

import collections

import pytest

from lmjax.models import GPTConfig
from lmjax.ps.config import PSConfig

MICRO = GPTConfig(vocab_size=65, num_layers=1, num_heads=1, embed_dim=16, block_size=8)

# At most ps.max_pushes_per_version gradients from one version.

def pushes_per_version(data, bound: int):
    """Softsync with one slow worker: an update needs 4 gradients, the 3 fast workers
    give 3 a step, so without a bound a fast worker pushes twice from some versions."""
    from lmjax.ps.inproc import Simulation

    config = PSConfig(model=MICRO, policy="softsync", softsync_n=1, num_workers=4,
                      num_updates=12, batch_size=1, optimizer="sgd", learning_rate=0.1,
                      slowdown=(1.0, 1.0, 1.0, 4.0), max_pushes_per_version=bound)
    sim = Simulation(config, data)
    seen = collections.Counter()
    receive = sim.servers[0].receive

    def counting(push, now):
        seen[push.worker, push.version] += 1
        return receive(push, now)

    sim.servers[0].receive = counting
    result = sim.run()
    throttled = [r["throttled"] for r in result.records if r["split"] == "worker"]
    return max(seen.values()), throttled


def test_a_worker_waits_for_a_new_version_after_the_bound():
    from lmjax.data.pipelines import load_lm_data

    data = load_lm_data("tiny_shakespeare")
    most, throttled = pushes_per_version(data, bound=1)
    assert most == 1
    assert all(t > 0 for t in throttled[:3]) and throttled[3] == 0
    most, throttled = pushes_per_version(data, bound=8)
    assert most > 1 and throttled == [0, 0, 0, 0]  # the bound is what held them back


def test_the_bound_must_allow_the_pushes_between_two_pulls():
    from lmjax.ps.run import check

    with pytest.raises(ValueError, match="max_pushes_per_version=2 is below the 3 pushes"):
        check(PSConfig(model=MICRO, policy="async", n_fetch=3, max_pushes_per_version=2))


