"""The jax_distributed transport: push and pull through the coordination service's KV store.

Keys (one namespace per shard k, `ps/s{k}/`):
- `status`: JSON of the shard's Status plus a `tick` that grows with every change;
- `tick/{n}`: the same JSON, set once per change, so waiting workers block on the next
  tick instead of polling; old ticks are deleted;
- `params/{v}`: the shard's parameters after update v (float32, in plan order); the last
  KEEP_VERSIONS are kept, older ones deleted;
- `count` and `inbox/{slot}`: a worker takes a slot with `key_value_increment` and
  writes its gradient there; the shard reads slots in order. A slot is deleted only once
  a checkpoint covers it, so a restarted shard replays every acknowledged gradient.
"""

import dataclasses
import json
import struct
import time

import numpy as np

from lmjax.ps.policies import Push, Status
from lmjax.ps.sharding import ShardPlan

KEEP_VERSIONS = 4
KEEP_TICKS = 32
WAIT_MS = 500  # a blocked call wakes this often to notice the end of the run


def kv_client():
    """The distributed runtime client of this process (after jax.distributed.initialize)."""
    from jax._src.distributed import global_state

    if global_state.client is None:
        raise RuntimeError("jax.distributed is not initialized in this process")
    return global_state.client


def is_timeout(err: Exception) -> bool:
    return "DEADLINE_EXCEEDED" in str(err)


def is_missing(err: Exception) -> bool:
    return "NOT_FOUND" in str(err)


def try_get(client, name: str) -> bytes | None:
    """The value under `name`, or None if it is not (or no longer) there."""
    try:
        return client.key_value_try_get_bytes(name)
    except Exception as err:  # noqa: BLE001  (errors come as JaxRuntimeError)
        if is_missing(err):
            return None
        raise


def key(shard: int, *parts) -> str:
    return "/".join(["ps", f"s{shard}", *map(str, parts)])


def encode_arrays(names, arrays: dict) -> bytes:
    return b"".join(np.ascontiguousarray(arrays[n], dtype=np.float32).tobytes() for n in names)


def decode_arrays(names, shapes: dict, buffer, offset: int = 0) -> dict:
    flat = np.frombuffer(buffer, dtype=np.float32, offset=offset)
    out, start = {}, 0
    for name in names:
        size = int(np.prod(shapes[name]))
        out[name] = flat[start:start + size].reshape(shapes[name])
        start += size
    return out


def encode_push(push: Push, plan: ShardPlan, shard: int) -> bytes:
    header = {k: v for k, v in dataclasses.asdict(push).items() if k not in ("grads", "slot")}
    head = json.dumps(header).encode()
    return struct.pack("<I", len(head)) + head + encode_arrays(plan.names[shard], push.grads)


def decode_push(payload: bytes, plan: ShardPlan, shard: int, slot: int) -> Push:
    (size,) = struct.unpack_from("<I", payload)
    header = json.loads(payload[4:4 + size])
    grads = decode_arrays(plan.names[shard], plan.shapes, payload, 4 + size)
    return Push(grads=grads, slot=slot, **header)


def status_json(status: Status, tick: int) -> str:
    return json.dumps({**dataclasses.asdict(status), "tick": tick})


def parse_status(text: str) -> tuple[Status, int]:
    fields = json.loads(text)
    tick = fields.pop("tick")
    fields["clocks"] = tuple(fields["clocks"])
    return Status(**fields), tick


class ShardClient:
    """A worker's view of one shard: read status, wait for a change, pull, push."""

    def __init__(self, client, plan: ShardPlan, shard: int):
        self.client, self.plan, self.shard = client, plan, shard

    def status(self) -> tuple[Status, int]:
        text = self.client.blocking_key_value_get(key(self.shard, "status"), 600_000)
        return parse_status(text)

    def wait_change(self, tick: int) -> None:
        """Returns once tick `tick + 1` exists or WAIT_MS passed."""
        try:
            self.client.blocking_key_value_get(key(self.shard, "tick", tick + 1), WAIT_MS)
        except Exception as err:  # noqa: BLE001  (timeouts come as JaxRuntimeError)
            if not is_timeout(err):
                raise

    def pull(self, version: int) -> dict | None:
        """The shard's parameters at `version`, or None if that version was deleted."""
        data = try_get(self.client, key(self.shard, "params", version))
        if data is None:
            return None
        return decode_arrays(self.plan.names[self.shard], self.plan.shapes, data)

    def push(self, push: Push) -> int:
        payload = encode_push(push, self.plan, self.shard)
        slot = self.client.key_value_increment(key(self.shard, "count"), 1)
        self.client.key_value_set_bytes(key(self.shard, "inbox", slot), payload)
        return len(payload)


class ShardPublisher:
    """A server shard's side: publish parameters and status, read the inbox in order."""

    def __init__(self, client, plan: ShardPlan, shard: int):
        self.client, self.plan, self.shard = client, plan, shard
        self.tick = self._last_tick()
        self.published = -1

    def _last_tick(self) -> int:
        """A restarted shard continues the tick numbering workers are waiting on."""
        try:
            return parse_status(self.client.key_value_try_get(key(self.shard, "status")))[1]
        except Exception as err:  # noqa: BLE001
            if is_missing(err):
                return 0
            raise

    def publish(self, status: Status, params: dict | None) -> None:
        if params is not None and status.version != self.published:
            data = encode_arrays(self.plan.names[self.shard], params)
            self.client.key_value_set_bytes(key(self.shard, "params", status.version), data,
                                            allow_overwrite=True)
            self._delete(key(self.shard, "params", status.version - KEEP_VERSIONS))
            self.published = status.version
        self.tick += 1
        text = status_json(status, self.tick)
        self.client.key_value_set(key(self.shard, "status"), text, allow_overwrite=True)
        self.client.key_value_set(key(self.shard, "tick", self.tick), text, allow_overwrite=True)
        self._delete(key(self.shard, "tick", self.tick - KEEP_TICKS))

    def _delete(self, name: str) -> None:
        self.client.key_value_delete(name)

    def slots_written(self) -> int:
        try:
            return int(self.client.key_value_try_get(key(self.shard, "count")))
        except Exception as err:  # noqa: BLE001
            if is_missing(err):
                return 0
            raise

    def read(self, slot: int, timeout_ms: int = WAIT_MS) -> Push | None:
        """The gradient in inbox `slot`, or None if it is not there within the timeout."""
        try:
            payload = self.client.blocking_key_value_get_bytes(key(self.shard, "inbox", slot),
                                                               timeout_ms)
        except Exception as err:  # noqa: BLE001
            if is_timeout(err):
                return None
            raise
        return decode_push(payload, self.plan, self.shard, slot)

    def try_read(self, slot: int) -> Push | None:
        """The gradient in inbox `slot` if it is already there."""
        payload = try_get(self.client, key(self.shard, "inbox", slot))
        if payload is None:
            return None
        return decode_push(payload, self.plan, self.shard, slot)

    def forget(self, slots) -> None:
        for slot in slots:
            self._delete(key(self.shard, "inbox", slot))


def now() -> float:
    return time.time()
