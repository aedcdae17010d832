"""Decode steps at fixed shapes, so that a CUDA graph can replay them.

A CUDA graph replays the kernels it captured with the addresses and shapes it captured,
so a step it replays must not depend on anything the host decides per step. Here a
decode step of B sequences is run at a bucketed batch size ``S >= B`` (``BUCKETS``): the
B real rows are copied into static input buffers and the other ``S - B`` rows are
padding, written to a spare KV-cache slot (``pad_slot``, whose block table points at the
scratch block) at position 0. Attention reads the cache's whole ``window`` (the capacity
of a block table) through the block tables, which stay at one address and are updated
in place between replays, under a mask built on the device from the positions; nothing
in the step reads a value back to the host, provided the routed experts do not
(``ExpertStack`` on CUDA takes ``grouped_mm``, with offsets on the device, in bfloat16
on compute capability >= 8.0).

``StaticDecode.run`` is the same computation eagerly, on any device: the CPU tests check
it against the ordinary decode path. ``DecodeGraphs`` captures one ``StaticDecode`` per
bucket on CUDA and replays it. State: written and unit-tested on CPU (the fixed-shape
step equals the ordinary one); the capture has not yet run on a GPU, so nothing here is
measured (benchmarks/RESULTS.md says so).

Shapes: B = real sequences, S = bucket (padded batch), W = window (block-table capacity),
V = vocabulary.
"""

from __future__ import annotations

import torch

from raymoe.workers.model.batch import ForwardBatch
from raymoe.workers.model.decoder import MoEForCausalLM
from raymoe.workers.model.kv_cache import KVCache

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)


def bucket_for(num_seqs: int, largest: int) -> int:
    """The smallest bucket that holds ``num_seqs`` rows (at most ``largest``, itself a bucket or not)."""
    if not 1 <= num_seqs <= largest:
        raise ValueError(f"a decode step of {num_seqs} sequences does not fit buckets up to {largest}")
    return next((b for b in BUCKETS if b >= num_seqs and b <= largest), largest)


class StaticDecode:
    """One decode step at ``bucket`` rows over a cache whose capacity is ``window``."""

    def __init__(self, model: MoEForCausalLM, cache: KVCache, bucket: int, pad_slot: int):
        device = cache.device
        self.model, self.cache, self.bucket, self.pad_slot = model, cache, bucket, pad_slot
        self.window = cache.capacity
        self.input_ids = torch.zeros(bucket, dtype=torch.long, device=device)
        self.positions = torch.zeros(bucket, dtype=torch.long, device=device)
        self.slots = torch.full((bucket,), pad_slot, dtype=torch.long, device=device)
        index = torch.arange(bucket, device=device)
        # Every field a layer reads is a static buffer or a constant of the bucket: min_len 0 makes
        # attention build its mask (on the device, from positions) instead of testing lengths on the host.
        self.batch = ForwardBatch(input_ids=self.input_ids, positions=self.positions, seq_index=index,
                                  query_index=torch.zeros_like(index), slots=self.slots,
                                  lengths=self.positions + 1, last_token=index, max_new=1,
                                  max_len=self.window, min_len=0, decode=True)

    def load(self, tokens: list[int], positions: list[int], slots: list[int]) -> None:
        """Copy a step's B rows into the static buffers; the rest become padding rows."""
        n = len(tokens)
        if not 1 <= n <= self.bucket:
            raise ValueError(f"{n} rows do not fit a bucket of {self.bucket}")
        if max(positions) >= self.window:
            raise ValueError(f"position {max(positions)} is outside the static window of {self.window}")
        rows = torch.tensor([tokens, positions, slots], dtype=torch.long)
        for buffer, values, pad in zip((self.input_ids, self.positions, self.slots), rows, (0, 0, self.pad_slot)):
            buffer[:n].copy_(values)
            buffer[n:].fill_(pad)
        self.batch.lengths.copy_(self.positions + 1)
        self.batch._memo.clear()  # RoPE tables and the mask follow the new positions

    def run(self) -> torch.Tensor:
        """The step, eagerly: logits ``[S, V]`` (rows past B are padding)."""
        return self.model(self.batch, self.cache)


class DecodeGraphs:
    """One captured ``StaticDecode`` per bucket up to ``max_seqs`` (CUDA only).

    The cache gets one slot more than the sequences use (the padding rows' slot, left
    pointing at the scratch block).
    """

    def __init__(self, model: MoEForCausalLM, cache: KVCache, max_seqs: int):
        if not str(cache.device).startswith("cuda"):
            raise ValueError("CUDA graphs need the model and the KV cache on a CUDA device")
        if cache.num_slots <= max_seqs:
            raise ValueError(f"the KV cache needs a spare slot for padding rows: {cache.num_slots} slots "
                             f"for {max_seqs} sequences")
        self.model, self.cache, self.max_seqs = model, cache, max_seqs
        self.steps: dict[int, StaticDecode] = {}
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _capture(self, bucket: int) -> None:
        step = StaticDecode(self.model, self.cache, bucket, pad_slot=self.cache.num_slots - 1)
        step.load([0], [0], [step.pad_slot])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up outside the graph (allocator, lazy kernels)
                step.run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            self.outputs[bucket] = step.run()
        self.steps[bucket], self.graphs[bucket] = step, graph

    def run(self, tokens: list[int], positions: list[int], slots: list[int]) -> torch.Tensor:
        """Replay the step of the bucket that holds these B rows: logits ``[B, V]``."""
        bucket = bucket_for(len(tokens), self.max_seqs)
        if bucket not in self.graphs:
            self._capture(bucket)
        self.steps[bucket].load(tokens, positions, slots)
        self.graphs[bucket].replay()
        return self.outputs[bucket][: len(tokens)]
