"""The KV-cache block pool: which blocks are free, who holds each, and which hold a cached
prefix that a later request may reuse (prefix caching).

Pure bookkeeping (no tensors): the scheduler hands block ids out; every KV cache (the
front-end's, each coherent rank's, the reference engine's) stores a block's rows at the
same place, so one table serves them all (``workers/model/kv_cache.py``).

A block is in exactly one state:

- *held*: ``refs[b] >= 1`` sequences have it in their block tables;
- *evictable*: no one holds it but it keeps a cached prefix block's rows (LRU order);
- *empty*: no one holds it and it caches nothing.

``allocate`` takes an empty block first, else evicts the least recently used evictable one.

Prefix keys are exact, not hashes: a full block's key is ``(parent, tokens)``, where
``tokens`` are its ``block_size`` token ids and ``parent`` is the serial number the
previous block's key got when it was registered (-1 for a sequence's first block). A key
therefore names the whole prefix up to its block; two different prefixes never share a
key, so no hash collision can hand a request another prompt's rows. A key whose block is
evicted is forgotten; a later registration of the same content gets a new serial, and
the keys of blocks chained under the old serial become unreachable (they are evicted in
their turn).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict

Key = tuple[int, tuple[int, ...]]


class BlockPool:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError(f"a block pool needs at least one block, not {num_blocks}")
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self._empty = list(range(num_blocks - 1, -1, -1))  # pop() gives the lowest id first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self._blocks: dict[Key, tuple[int, int]] = {}  # key -> (block, serial)
        self._keys: dict[int, Key] = {}  # block -> its key, for cached blocks
        self._serials = itertools.count()
        self.evicted = 0  # cached blocks reused for other content

    @property
    def num_free(self) -> int:
        """Blocks ``allocate`` can hand out now (empty + evictable)."""
        return len(self._empty) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self) -> int | None:
        """A block for one holder, or None when every block is held."""
        if self._empty:
            block = self._empty.pop()
        elif self._evictable:
            block, _ = self._evictable.popitem(last=False)
            key = self._keys.pop(block)
            del self._blocks[key]
            self.evicted += 1
        else:
            return None
        self.refs[block] = 1
        return block

    def free(self, block: int) -> None:
        """One holder lets ``block`` go."""
        if self.refs[block] < 1:
            raise ValueError(f"block {block} is not held")
        self.refs[block] -= 1
        if self.refs[block] == 0:
            if block in self._keys:
                self._evictable[block] = None  # most recently used last
            else:
                self._empty.append(block)

    def lookup(self, key: Key) -> tuple[int, int] | None:
        """The cached block of ``key`` and its serial, now also held by the caller; None on a miss."""
        found = self._blocks.get(key)
        if found is None:
            return None
        block = found[0]
        if self.refs[block] == 0:
            del self._evictable[block]
        self.refs[block] += 1
        return found

    def register(self, block: int, key: Key) -> int:
        """``block`` (held, its rows written) now caches ``key``; returns the key's serial,
        the parent of the next block's key. If another block already caches this key the
        block stays private and that key's serial is returned."""
        found = self._blocks.get(key)
        if found is not None:
            return found[1]
        if block in self._keys:  # a block caches one key; its content cannot change while held
            raise ValueError(f"block {block} already caches a prefix")
        serial = next(self._serials)
        self._blocks[key] = (block, serial)
        self._keys[block] = key
        return serial

    def clear_cache(self) -> None:
        """Forget every cached prefix (the KV caches were lost): evictable blocks become empty."""
        self._empty.extend(sorted(self._evictable, reverse=True))
        self._evictable.clear()
        self._blocks.clear()
        self._keys.clear()

    def check(self) -> None:
        """Raise if the pool's states disagree (for the tests)."""
        empty, evictable = set(self._empty), set(self._evictable)
        held = {b for b, r in enumerate(self.refs) if r > 0}
        assert len(empty) == len(self._empty), "a block is empty twice"
        assert not (empty & evictable) and not (empty & held) and not (evictable & held), "a block in two states"
        assert empty | evictable | held == set(range(self.num_blocks)), "a block is lost"
        assert evictable <= set(self._keys) and not (empty & set(self._keys)), "an evictable block caches nothing"
        assert {b for b, _ in self._blocks.values()} == set(self._keys), "keys and blocks disagree"
