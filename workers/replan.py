"""Live plan change: move expert weights between ranks to match a new placement plan.

``plan_moves`` (pure) says, for every slot of the new plan, which expert rank supplies
its weights: the rank itself when it already holds that expert, else one of the ranks
holding it under the old plan (spread so that no holder sends every copy).
``move_experts`` then runs, on every actor of the deployment together, ONE
``all_to_all_single`` per MoE layer carrying the weights and builds each rank's new
``ExpertStack``. Nothing is read from the checkpoint: weights travel over the
deployment's process group, so a plan change works where only the old holders have them.

Shapes: D = hidden, I = expert width; one expert's weights are ``gate_up [2I, D]`` and
``down [D, I]``, sent flattened as ``3 * I * D`` values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.workers.dispatch.collectives import Collectives
from raymoe.workers.expert_map import LayerMap
from raymoe.workers.model.experts import ExpertStack


def plan_moves(old: LayerMap, new: LayerMap) -> tuple[tuple[int, ...], ...]:
    """Per expert rank, per slot it holds under ``new`` (slot order): the expert rank that
    supplies the weights (itself when it already holds the expert under ``old``)."""
    if old.num_ranks != new.num_ranks:
        raise ValueError(f"plans for {old.num_ranks} and {new.num_ranks} expert ranks; a live plan change keeps "
                         "the number of ranks")
    holders: dict[int, list[int]] = {}
    for rank, experts in enumerate(old.rank_experts):
        for expert in experts:
            holders.setdefault(expert, []).append(rank)
    sends = [0] * old.num_ranks
    sources = []
    for rank, experts in enumerate(new.rank_experts):
        row = []
        for expert in experts:
            if expert in old.rank_experts[rank]:
                row.append(rank)
                continue
            if expert not in holders:
                raise ValueError(f"expert {expert} is held by no rank under the old plan")
            src = min(holders[expert], key=lambda r: (sends[r], r))
            sends[src] += 1
            row.append(src)
        sources.append(tuple(row))
    return tuple(sources)


@dataclass
class MoveStats:
    experts_sent: int = 0  # expert copies this actor sent
    bytes_sent: int = 0  # counted by the collectives (purpose "replan")
    collectives: int = 0


def move_layer(stack: ExpertStack | None, old: LayerMap, new: LayerMap, me: int | None, base: int,
               collectives: Collectives, shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
               stats: MoveStats) -> ExpertStack | None:
    """This actor's part of one layer's move; its new stack (None for an actor holding
    no experts, ``me=None``). Expert rank r is process-group rank ``base + r``.
    ``shape`` = (D, I). All actors of the group must call this together."""
    sources = plan_moves(old, new)
    world = collectives.world
    hidden, inter = shape
    per = 3 * inter * hidden
    send_parts, send_counts, recv_counts = [], [0] * world, [0] * world
    if me is not None:
        held = old.rank_experts[me]
        for dst, experts in enumerate(new.rank_experts):
            for expert, src in zip(experts, sources[dst]):
                if src == me and dst != me:
                    row = held.index(expert)
                    send_parts += [stack.gate_up[row].reshape(-1), stack.down[row].reshape(-1)]
                    send_counts[base + dst] += 1
        for src in sources[me]:
            if src != me:
                recv_counts[base + src] += 1
    send = torch.cat(send_parts) if send_parts else torch.empty(0, dtype=dtype, device=device)
    recv = collectives.all_to_all("replan", send, [c * per for c in send_counts], [c * per for c in recv_counts])
    stats.experts_sent += sum(send_counts)
    if me is None:
        return None
    offsets = {src: sum(recv_counts[:base + src]) for src in set(sources[me])}
    experts = new.rank_experts[me]
    new_stack = ExpertStack(len(experts), hidden, inter).to(device=device, dtype=dtype)
    with torch.no_grad():
        for slot, (expert, src) in enumerate(zip(experts, sources[me])):
            if src == me:
                row = old.rank_experts[me].index(expert)
                new_stack.gate_up[slot] = stack.gate_up[row]
                new_stack.down[slot] = stack.down[row]
                continue
            flat = recv[offsets[src] * per:(offsets[src] + 1) * per]
            offsets[src] += 1
            new_stack.gate_up[slot] = flat[: 2 * inter * hidden].view(2 * inter, hidden)
            new_stack.down[slot] = flat[2 * inter * hidden:].view(hidden, inter)
    return new_stack.eval()


def move_experts(stacks: list[ExpertStack] | None, old: list[LayerMap], new: list[LayerMap], me: int | None,
                 base: int, collectives: Collectives, shape: tuple[int, int], dtype: torch.dtype,
                 device: torch.device) -> tuple[list[ExpertStack] | None, MoveStats]:
    """Every MoE layer's move, in layer order (all actors must call this together)."""
    stats = MoveStats()
    before = collectives.snapshot()
    moved = [move_layer(stacks[i] if stacks is not None else None, o, n, me, base, collectives, shape, dtype,
                        device, stats) for i, (o, n) in enumerate(zip(old, new))]
    moved_now = collectives.snapshot() - before
    stats.bytes_sent, stats.collectives = moved_now.bytes["replan"], moved_now.calls["replan"]
    return (moved if me is not None else None), stats
