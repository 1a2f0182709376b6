"""Parameter-server emulation: server shards, workers, consistency policies, transports.

The same server, worker and policy code runs in one process on a discrete-event virtual
clock (`inproc`, lmjax/ps/inproc.py) and as real OS processes talking through the
key-value store of `jax.distributed`'s coordination service (`jax_distributed`,
lmjax/ps/kv.py and lmjax/ps/launch.py).
"""
