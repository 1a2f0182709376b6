"""The jax_distributed transport: push and pull through the coordination service's KV store.

Every value a server, worker or the supervisor puts is sealed with an HMAC-SHA256 tag under
a per-run secret (`SignedStore`); a value whose tag does not match is refused, never used.

Keys (one namespace per shard k, `ps/s{k}/`):
- `status`: JSON of the shard's Status plus a `tick` that grows with every change and the
  `cursor` (the next inbox slot the shard reads);
- `tick/{n}`: the same JSON, set once per change, so waiting workers block on the next
  tick instead of polling; old ticks are deleted;
- `params/{v}`: the shard's parameters after update v (float32, in plan order); the last
  KEEP_VERSIONS are kept, older ones deleted;
- `claim/{slot}` and `inbox/{slot}`: a worker takes the lowest free slot by creating its
  claim (an atomic create that names the worker and its incarnation), then writes its
  gradient to the inbox slot; the shard reads slots in order. A slot claimed by a worker
  the supervisor reported dead is skipped at once. An inbox slot is deleted only once a
  checkpoint covers it, so a restarted shard replays every acknowledged gradient; claims
  (tens of bytes each) stay for the run, so no slot number is ever taken twice.
"""

import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import struct
import time

import numpy as np

from lmjax.ps import codecs
from lmjax.ps.policies import Push, Status
from lmjax.ps.sharding import ShardPlan

log = logging.getLogger(__name__)

KEEP_VERSIONS = 4
KEEP_TICKS = 32
WAIT_MS = 500  # a blocked call wakes this often to notice the end of the run
SECRET_FILE = "ps_secret"  # in the workdir, mode 0600: the run's HMAC key
TAG_BYTES = 32  # HMAC-SHA256
REFUSED_RETRY_SECONDS = 0.05  # a blocked read that met a forged value looks again after this


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


def write_secret(workdir: str) -> bytes:
    """A fresh random secret for this run in WORKDIR/ps_secret, readable by its owner only.

    The role processes read it from there (never through the store, which anyone who can
    reach the coordinator's port can read)."""
    secret = secrets.token_bytes(32)
    path = os.path.join(workdir, SECRET_FILE)
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secret)
    os.replace(tmp, path)
    return secret


def read_secret(workdir: str) -> bytes:
    path = os.path.join(workdir, SECRET_FILE)
    if not os.path.exists(path):
        raise RuntimeError(f"{path} is missing: the run's secret is written there by `lmjax "
                           "ps` (on a cluster, put 32 random bytes there, mode 0600)")
    if os.stat(path).st_mode & 0o077:
        raise RuntimeError(f"{path} is readable by other users; run chmod 600 on it")
    with open(path, "rb") as f:
        return f.read()


class SignedStore:
    """The run's key-value store with an HMAC-SHA256 tag on every value.

    A stored value is `tag + value` with tag = HMAC(secret, key NUL value): binding the key
    stops a valid value from being replayed under another key. A value whose tag does not
    match is refused: reads return None as if the key were missing, an error naming the key
    is logged, and `refused` holds the key (each key logged and counted once).
    """

    def __init__(self, client, secret: bytes):
        self.client, self.secret = client, secret
        self.refused: set[str] = set()

    def tag(self, name: str, value: bytes) -> bytes:
        mac = hmac.new(self.secret, name.encode() + b"\0", hashlib.sha256)
        mac.update(value)
        return mac.digest()

    def seal(self, name: str, value: bytes | str) -> bytes:
        value = value.encode() if isinstance(value, str) else value
        return self.tag(name, value) + value

    def unseal(self, name: str, blob: bytes) -> bytes | None:
        value = blob[TAG_BYTES:]
        if len(blob) >= TAG_BYTES and hmac.compare_digest(blob[:TAG_BYTES],
                                                          self.tag(name, value)):
            return value
        if name not in self.refused:
            self.refused.add(name)
            log.error("refused the value of %s: its HMAC does not match the run's secret "
                      "(written by a process outside the run)", name)
        return None

    def set(self, name: str, value: bytes | str) -> None:
        self.client.key_value_set_bytes(name, self.seal(name, value), allow_overwrite=True)

    def create(self, name: str, value: bytes | str) -> bool:
        """Sets `name` only if it does not exist yet (atomically); False if it did."""
        try:
            self.client.key_value_set_bytes(name, self.seal(name, value), allow_overwrite=False)
        except Exception as err:  # noqa: BLE001
            if "ALREADY_EXISTS" in str(err):
                return False
            raise
        return True

    def lookup(self, name: str) -> tuple[bool, bytes | None]:
        """(whether `name` exists, its value or None if refused)."""
        blob = try_get(self.client, name)
        return (False, None) if blob is None else (True, self.unseal(name, blob))

    def try_get(self, name: str) -> bytes | None:
        return self.lookup(name)[1]

    def get(self, name: str, timeout_ms: int) -> bytes | None:
        """Blocks until `name` holds a valid value; None after `timeout_ms`. A forged value
        is passed over: the real writer overwrites it."""
        deadline = time.time() + timeout_ms / 1000
        while (left := int((deadline - time.time()) * 1000)) > 0:
            try:
                blob = self.client.blocking_key_value_get_bytes(name, left)
            except Exception as err:  # noqa: BLE001
                if is_timeout(err):
                    return None
                raise
            value = self.unseal(name, blob)
            if value is not None:
                return value
            time.sleep(REFUSED_RETRY_SECONDS)
        return None

    def wait(self, name: str, timeout_ms: int) -> bytes:
        value = self.get(name, timeout_ms)
        if value is None:
            raise TimeoutError(f"no valid value under {name} within {timeout_ms / 1000:.0f} s")
        return value

    def dir_get(self, prefix: str) -> list[tuple[str, bytes]]:
        """The valid (key, value) pairs under `prefix`."""
        pairs = [(name, self.unseal(name, blob))
                 for name, blob in self.client.key_value_dir_get_bytes(prefix)]
        return [(name, value) for name, value in pairs if value is not None]

    def delete(self, name: str) -> None:
        self.client.key_value_delete(name)


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
    """A JSON header, then each parameter's payload arrays (plan order) as raw bytes."""
    header = {f.name: getattr(push, f.name) for f in dataclasses.fields(push)
              if f.name not in ("grads", "slot")}
    head = json.dumps(header).encode()
    body = b"".join(codecs.to_bytes(push.grads[n]) for n in plan.names[shard])
    return struct.pack("<I", len(head)) + head + body


def decode_push(payload: bytes, plan: ShardPlan, shard: int, slot: int,
                codec: codecs.Codec) -> Push:
    """encode_push's Push; each payload's array lengths follow from the codec and shape."""
    (size,) = struct.unpack_from("<I", payload)
    header = json.loads(payload[4:4 + size])
    sizes = [math.prod(plan.shapes[name]) for name in plan.names[shard]]
    expected = sum(d.itemsize * n for s in sizes for d, n in codec.layout(s))
    if len(payload) - 4 - size != expected:
        raise ValueError(f"a push to shard {shard} carries {len(payload) - 4 - size} bytes of "
                         f"gradients where the server's codec expects {expected}: the workers "
                         "and servers disagree on ps.compression")
    grads, offset = {}, 4 + size
    for name, count in zip(plan.names[shard], sizes, strict=True):
        grads[name], offset = codecs.from_bytes(codec, count, payload, offset)
    return Push(grads=grads, slot=slot, **header)


def status_json(status: Status, tick: int, cursor: int) -> str:
    return json.dumps({**dataclasses.asdict(status), "tick": tick, "cursor": cursor})


def parse_status(text: bytes | str) -> tuple[Status, int, int]:
    """(Status, tick, cursor) from status_json's text."""
    fields = json.loads(text)
    tick, cursor = fields.pop("tick"), fields.pop("cursor")
    fields["clocks"] = tuple(fields["clocks"])
    return Status(**fields), tick, cursor


class ShardClient:
    """A worker's view of one shard: read status, wait for a change, pull, push.

    `owner` is (worker, incarnation): the claims of this process's inbox slots name it,
    so a shard can tell the slot of a worker that died between claiming and writing."""

    def __init__(self, store: SignedStore, plan: ShardPlan, shard: int,
                 owner: tuple[int, int] = (0, 0)):
        self.store, self.plan, self.shard = store, plan, shard
        self.owner = json.dumps({"worker": owner[0], "incarnation": owner[1]})
        self.next_slot = 1  # no free slot lies below it

    def status(self) -> tuple[Status, int]:
        status, tick, cursor = parse_status(self.store.wait(key(self.shard, "status"), 600_000))
        self.next_slot = max(self.next_slot, cursor)  # the shard read every slot below
        return status, tick

    def wait_change(self, tick: int) -> None:
        """Returns once tick `tick + 1` exists or WAIT_MS passed."""
        self.store.get(key(self.shard, "tick", tick + 1), WAIT_MS)

    def pull(self, version: int) -> dict | None:
        """The shard's parameters at `version`, or None if that version was deleted."""
        data = self.store.try_get(key(self.shard, "params", version))
        if data is None:
            return None
        return decode_arrays(self.plan.names[self.shard], self.plan.shapes, data)

    def push(self, push: Push) -> int:
        payload = encode_push(push, self.plan, self.shard)
        self.store.set(key(self.shard, "inbox", self.claim()), payload)
        return len(payload)

    def claim(self) -> int:
        """Takes the lowest free inbox slot: creating a claim is atomic, so no two workers
        take one slot, and every taken slot names its taker."""
        slot = self.next_slot
        while not self.store.create(key(self.shard, "claim", slot), self.owner):
            slot += 1
        self.next_slot = slot + 1
        return slot


class ShardPublisher:
    """A server shard's side: publish parameters and status, read the inbox in order."""

    def __init__(self, store: SignedStore, plan: ShardPlan, shard: int,
                 codec: codecs.Codec | None = None):
        """`codec`: ps.compression's, which the workers encoded with (None: 'none')."""
        self.store, self.plan, self.shard = store, plan, shard
        self.codec = codec or codecs.Dense()
        self.tick = self._last_tick()
        self.published = -1
        self.cursor = 1  # the next inbox slot to read; published so workers claim from it

    def _last_tick(self) -> int:
        """A restarted shard continues the tick numbering workers are waiting on."""
        text = self.store.try_get(key(self.shard, "status"))
        return 0 if text is None else parse_status(text)[1]

    def publish(self, status: Status, params: dict | None) -> None:
        if params is not None and status.version != self.published:
            data = encode_arrays(self.plan.names[self.shard], params)
            self.store.set(key(self.shard, "params", status.version), data)
            self.store.delete(key(self.shard, "params", status.version - KEEP_VERSIONS))
            self.published = status.version
        self.tick += 1
        text = status_json(status, self.tick, self.cursor)
        self.store.set(key(self.shard, "status"), text)
        self.store.set(key(self.shard, "tick", self.tick), text)
        self.store.delete(key(self.shard, "tick", self.tick - KEEP_TICKS))

    def read(self, slot: int, timeout_ms: int = WAIT_MS) -> Push | None:
        """The gradient in inbox `slot`, or None if it is not there within the timeout."""
        payload = self.store.get(key(self.shard, "inbox", slot), timeout_ms)
        return None if payload is None else self._decode(payload, slot)

    def try_read(self, slot: int) -> Push | None:
        """The gradient in inbox `slot` if it is already there."""
        payload = self.store.try_get(key(self.shard, "inbox", slot))
        return None if payload is None else self._decode(payload, slot)

    def _decode(self, payload: bytes, slot: int) -> Push:
        return decode_push(payload, self.plan, self.shard, slot, self.codec)

    def claim(self, slot: int) -> tuple[bool, dict | None]:
        """(whether `slot` was claimed, its claim {"worker", "incarnation"} or None if the
        claim was forged)."""
        taken, text = self.store.lookup(key(self.shard, "claim", slot))
        return taken, None if text is None else json.loads(text)

    def forget(self, slots) -> None:
        for slot in slots:
            self.store.delete(key(self.shard, "inbox", slot))


def dead_key(worker: int) -> str:
    """The supervisor's notice that a worker died: {"incarnation", "restarting"}."""
    return f"ps/dead/worker{worker}"


def fault_key(index: int, what: str) -> str:
    """`ps.faults[index]`: "reached" (set by the server at the named update), "done" (set
    by the supervisor once it killed the role)."""
    return f"ps/fault/{index}/{what}"
