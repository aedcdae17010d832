"""raymoe's distributed runtime as a system of the comparison: a ``cluster.coordinator.Deployment``
(disaggregated: front-end + R expert ranks; coherent: R ranks), driven step by step from
this process exactly as a serving loop drives it."""

from __future__ import annotations

import ray

from raymoe.benchmarks.baselines.measure import PHASES, RunResult, drive, throughput


class DeploymentSystem:
    def __init__(self, model_path: str, layout: str, ranks: int, max_seqs: int, policy: str = "linear",
                 plan=None, threads: int = 1, cpus_per_actor: float = 0.1):
        from raymoe.cluster.config import parse_config
        from raymoe.cluster.coordinator import Deployment

        config = parse_config({"model": str(model_path), "layout": layout, "expert_ranks": ranks,
                               "placement": {"policy": policy}, "batching": {"max_seqs": max_seqs},
                               "resources": {"cpus_per_actor": cpus_per_actor, "threads_per_actor": threads}})
        self.deployment = Deployment(config, plan)
        policy = plan.policy if plan is not None else policy
        self.name = f"raymoe {layout} {ranks}r" + ("" if policy == "linear" else f" {policy}")
        self.layout, self.ranks, self.policy = layout, ranks, policy
        self.processes = ranks + (layout == "disaggregated")

    def run(self, prompts: list[list[int]], new_tokens: int) -> RunResult:
        dep = self.deployment
        dep.stats.per_step.clear()
        gen = drive(dep, prompts, new_tokens)
        prefill, decode_tok_s = throughput(prompts, gen.step_seconds)
        decode = dep.stats.per_step[1:]
        num_layers = len(decode[0].layers) if decode else 1
        moved = sum(L.dispatch_bytes + L.combine_bytes + L.merge_bytes + L.metadata_bytes
                    for s in decode for L in s.layers) + sum(s.coherence_bytes for s in decode)
        collectives = sum(L.token_collectives + L.metadata_collectives for s in decode for L in s.layers) + sum(
            s.coherence_collectives for s in decode)
        tokens = sum(s.tokens for s in decode)
        pairs = [[sum(v) for v in zip(*(s.layers[i].pairs_per_rank for s in decode))] for i in range(num_layers)]
        return RunResult(
            self.name, len(prompts), self.processes, prefill, decode_tok_s, len(decode),
            {p: sum(s.seconds[p] for s in decode) for p in PHASES},
            bytes_per_token=moved / max(tokens, 1),
            collectives_per_layer=collectives / max(len(decode) * num_layers, 1),
            rank_pairs=pairs, outputs=gen.outputs,
            extra={"layout": self.layout, "policy": self.policy, "ranks": self.ranks, "backend": dep.backend,
                   "messages_per_step": sum(s.messages for s in decode) / max(len(decode), 1)})

    def pids(self) -> list[int]:
        """Process ids of the deployment's actors that run on this node."""
        here = ray.util.get_node_ip_address()
        where = ray.get([a.where.remote() for a in self.deployment.actors])
        return [w["pid"] for w in where if w["node_ip"] == here]

    def close(self) -> None:
        self.deployment.shutdown()
