"""Train the tiny Mixtral-family MoE that ships with raymoe (``models/tiny-moe``).

    python -m raymoe.benchmarks.train_tiny_moe --out models/tiny-moe --max-minutes 14

End to end on 2 CPU cores, stopped by wall time: a byte-level BPE tokenizer and a small
MoE, both trained on the Python standard library's own source (present on every
machine), built from raymoe's ``raymoe.workers.model`` modules; then held-out evaluation, a
routing trace, inter-layer expert affinity, greedy samples, the Hugging Face export and
a model card (README.md).

Shapes: B = sequences per step, S = sequence length, T = B * S tokens, V = vocabulary,
E = experts, L = MoE layers, A = top-k.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from raymoe.workers.model.batch import ForwardBatch
from raymoe.workers.model.decoder import MoEForCausalLM
from raymoe.workers.model.export import save_checkpoint
from raymoe.workers.model.families import parse_config
from raymoe.workers.model.router import Routing
from raymoe.workers.trace import TraceRecorder

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
# Held-out modules: present in every CPython >= 3.9, about 95 KB of source together.
VAL_FILES = ("textwrap.py", "shlex.py", "heapq.py", "fractions.py", "graphlib.py")
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
PROMPTS = (
    "import os\nimport sys\n\n\ndef ",
    "class Queue:\n    def __init__(self, ",
    "def is_prime(n):\n    \"\"\"",
    "        for i in range(len(",
    "        if not isinstance(",
    "try:\n    import ",
)


def _threads(value: str) -> str:
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise argparse.ArgumentTypeError(f"{value!r}: expected 'auto' or a positive integer")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("models/tiny-moe"), help="output directory")
    p.add_argument("--max-minutes", type=float, default=14.0, help="wall-time budget, end to end")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: by time only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", default="auto", type=_threads,
                   help="torch threads: a number, or 'auto' (1 or 2, whichever steps faster right now: on "
                        "a shared machine two threads can be several times slower than one)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-size", type=int, default=64, help="intermediate size of one expert")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="Switch load-balancing loss weight")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=48)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data


@dataclass
class Corpus:
    root: Path
    train_files: list[Path]
    val_files: list[Path]
    train_texts: list[str]
    val_texts: list[str]


def stdlib_corpus() -> Corpus:
    """The stdlib's ``*.py`` files in sorted order, test suites and site-packages left out;
    the modules of ``VAL_FILES`` held out. Files that are not UTF-8 are skipped."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
    corpus = Corpus(root, [], [], [], [])
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        held_out = path.parent == root and path.name in VAL_FILES
        (corpus.val_files if held_out else corpus.train_files).append(path)
        (corpus.val_texts if held_out else corpus.train_texts).append(text)
    if not corpus.val_files or not corpus.train_files:
        raise SystemExit(f"{root}: found {len(corpus.train_files)} training and {len(corpus.val_files)} "
                         f"validation files; expected the CPython standard library there")
    return corpus


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenizer, lossless decode) with ``<s> </s> <pad>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def save_tokenizer(tok: Tokenizer, out: Path, max_len: int) -> None:
    """``tokenizer.json`` plus the ``tokenizer_config.json`` that ``raymoe.workers.tokenizer`` reads."""
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "pad_token": PAD, "add_bos_token": True, "add_eos_token": False, "model_max_length": max_len}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def encode_documents(tok: Tokenizer, texts: list[str]) -> torch.Tensor:
    """Every text as ``<s> ids </s>``, concatenated: int64 ``[N]``."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    stream: list[int] = []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        stream += [bos, *enc.ids, eos]
    return torch.tensor(stream, dtype=torch.long)


# ----------------------------------------------------------------------------- model


def mixtral_config(args: argparse.Namespace, tok: Tokenizer) -> dict:
    """A Hugging Face Mixtral ``config.json`` for the tiny model."""
    return {
        "model_type": "mixtral", "vocab_size": tok.get_vocab_size(), "hidden_size": args.hidden_size,
        "intermediate_size": args.expert_size, "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads,
        "num_local_experts": args.experts, "num_experts_per_tok": args.top_k,
        "max_position_embeddings": 1024, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS), "tie_word_embeddings": False,
    }


def init_weights(model: MoEForCausalLM, seed: int, std: float = 0.02) -> None:
    """Normal(0, std) matrices, residual outputs scaled by 1/sqrt(2 layers), unit norms."""
    gen = torch.Generator().manual_seed(seed)
    out_std = std / math.sqrt(2 * model.config.num_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)  # RMSNorm weights
            else:
                residual = name.endswith("o_proj.weight") or name.endswith("experts.down")
                param.copy_(torch.randn(param.shape, generator=gen) * (out_std if residual else std))


def param_counts(model: MoEForCausalLM) -> tuple[int, int]:
    """(total parameters, parameters active per token)."""
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    per_expert = 3 * c.hidden_size * c.moe_intermediate_size
    inactive = len(c.moe_layer_ids) * (c.num_experts - c.top_k) * per_expert
    return total, total - inactive


def load_balancing_loss(routings: list[Routing], num_experts: int) -> torch.Tensor:
    """Switch Transformer auxiliary loss, mean over MoE layers: ``E * sum_e f_e * P_e``.

    f_e: share of the (token, slot) assignments that went to expert e (no gradient);
    P_e: mean router probability of e. 1.0 when routing is uniform.
    """
    losses = []
    for r in routings:
        probs = r.logits.softmax(dim=-1)  # [T, E]
        share = torch.bincount(r.topk_ids.reshape(-1), minlength=num_experts).float() / r.topk_ids.numel()
        losses.append(num_experts * (share * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def forward_loss(model: MoEForCausalLM, windows: torch.Tensor, on_route=None) -> torch.Tensor:
    """Mean next-token cross-entropy of ``windows [B, S+1]`` (inputs ``[:, :-1]``)."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    batch = ForwardBatch.build(inputs.tolist(), [0] * len(inputs))
    logits = model(batch, cache=None, on_route=on_route, all_logits=True)  # [T, V], sequence-major
    return F.cross_entropy(logits, targets.reshape(-1))


# ----------------------------------------------------------------------------- training


@dataclass
class TrainLog:
    rows: list[dict] = field(default_factory=list)  # step, tokens, train, val, aux, lr, seconds
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    steps_by_threads: dict[int, int] = field(default_factory=dict)
    best_threads: int = 1


def val_chunks(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping windows ``[n, S+1]`` covering the held-out stream (the tail is dropped)."""
    n = (len(tokens) - 1) // seq_len
    starts = torch.arange(n) * seq_len
    return torch.stack([tokens[s: s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: MoEForCausalLM, chunks: torch.Tensor, batch_size: int,
             recorder: TraceRecorder | None = None) -> float:
    """Mean cross-entropy over ``chunks [n, S+1]``; ``recorder`` gets one step per batch
    (chunk index = sequence id, every token a prompt token)."""
    model.eval()
    total = 0.0
    for start in range(0, len(chunks), batch_size):
        part = chunks[start: start + batch_size]
        observer = recorder.observer if recorder else None
        total += forward_loss(model, part, observer).item() * len(part)
        if recorder:
            b, s = part.shape[0], part.shape[1] - 1
            seq_ids = torch.arange(start, start + b).repeat_interleave(s).tolist()
            recorder.end_step(seq_ids, torch.arange(s).repeat(b), [True] * (b * s))
    model.train()
    return total / len(chunks)


def lr_at(args: argparse.Namespace, step: int, progress: float) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine to ``min_lr_ratio * lr`` as
    ``progress`` (share of the step or time budget used) goes from 0 to 1."""
    warm = min(1.0, (step + 1) / args.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * warm * (args.min_lr_ratio + (1.0 - args.min_lr_ratio) * cosine)


class ThreadTuner:
    """Chooses 1 or ``most`` torch threads by measured step time, re-checked every ``period``
    steps: steps ``k*period + [0, probe)`` run with 1 thread, the next ``probe`` with ``most``,
    the rest with the faster. A fixed count (``most == fewest``) never changes."""

    def __init__(self, threads: str, period: int = 100, probe: int = 3):
        self.most = 2 if threads == "auto" else int(threads)
        self.fewest = 1 if threads == "auto" else self.most
        self.period, self.probe = period, probe
        self.best, self.times = self.most, {self.fewest: [], self.most: []}

    def before_step(self, step: int) -> None:
        phase = step % self.period
        want = self.fewest if phase < self.probe else self.most if phase < 2 * self.probe else self.best
        if torch.get_num_threads() != want:
            torch.set_num_threads(want)

    def after_step(self, step: int, seconds: float) -> None:
        phase = step % self.period
        if phase < 2 * self.probe:
            self.times[torch.get_num_threads()].append(seconds)
        if phase == 2 * self.probe - 1:
            self.best = min(self.times, key=lambda n: float(np.median(self.times[n])))
            self.times = {n: [] for n in self.times}


def make_optimizer(model: MoEForCausalLM, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on RMSNorm weights)."""
    decay = [p for p in model.parameters() if p.dim() > 1]
    rest = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))


def train_step(model: MoEForCausalLM, opt: torch.optim.Optimizer, windows: torch.Tensor, lr: float,
               aux_coef: float) -> tuple[float, float]:
    """One AdamW step on ``windows [B, S+1]``; returns (lm loss, load-balancing loss)."""
    for group in opt.param_groups:
        group["lr"] = lr
    routings: list[Routing] = []
    lm = forward_loss(model, windows, lambda _, routing: routings.append(routing))
    aux = load_balancing_loss(routings, model.config.num_experts)
    (lm + aux_coef * aux).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return lm.item(), aux.item()


def train(model: MoEForCausalLM, args: argparse.Namespace, train_tokens: torch.Tensor,
          val: torch.Tensor, deadline: float) -> TrainLog:
    """Random windows of ``train_tokens`` until ``deadline`` (or ``max_steps``). The cosine
    schedule runs over ``max_steps`` when given, else over the time left, so a run stopped
    by time still anneals."""
    opt, gen = make_optimizer(model, args), torch.Generator().manual_seed(args.seed + 1)
    val_probe = val[: 2 * args.batch_size]  # periodic evaluation: a fixed prefix of the held-out set
    log, start, recent, aux, lr = TrainLog(), time.time(), [], float("nan"), args.lr
    tuner = ThreadTuner(args.threads)
    bar = tqdm(total=args.max_steps or None, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)

    def record() -> None:
        row = dict(step=log.steps, tokens=log.tokens, train=float(np.mean(recent)),
                   val=evaluate(model, val_probe, args.batch_size), aux=aux, lr=lr, seconds=time.time() - start)
        log.rows.append(row)
        recent.clear()
        tqdm.write(f"step {row['step']:5d}  tokens {row['tokens']:9d}  train {row['train']:.4f}  "
                   f"val(probe) {row['val']:.4f}  aux {aux:.4f}  lr {lr:.2e}  {row['seconds']:6.0f}s")
        sys.stdout.flush()

    while True:
        by_time = (time.time() - start) / max(deadline - start, 1e-9)
        by_steps = log.steps / args.max_steps if args.max_steps else 0.0
        if by_time >= 1.0 or by_steps >= 1.0:
            break
        lr = lr_at(args, log.steps, by_steps if args.max_steps else by_time)
        offsets = torch.randint(0, len(train_tokens) - args.seq_len - 1, (args.batch_size,), generator=gen)
        windows = torch.stack([train_tokens[o: o + args.seq_len + 1] for o in offsets.tolist()])
        tuner.before_step(log.steps)
        step_start = time.time()
        lm, aux = train_step(model, opt, windows, lr, args.aux_loss_coef)
        tuner.after_step(log.steps, time.time() - step_start)
        threads = torch.get_num_threads()
        log.steps_by_threads[threads] = log.steps_by_threads.get(threads, 0) + 1
        log.steps, log.tokens = log.steps + 1, log.tokens + windows[:, :-1].numel()
        recent.append(lm)
        bar.update(1)
        bar.set_postfix(loss=f"{lm:.3f}", aux=f"{aux:.3f}", lr=f"{lr:.1e}", threads=torch.get_num_threads())
        if log.steps % args.eval_every == 0 or log.steps == 1:
            record()
    bar.close()
    if recent:
        record()
    log.seconds, log.best_threads = time.time() - start, tuner.best
    return log


# ----------------------------------------------------------------------------- affinity


class Affinity(NamedTuple):
    """Per pair of consecutive MoE layers (l, l+1), from top-1 experts:
    ``A_l[i, j] = P(j at l+1 | i at l)``.

    weighted: sum_i P(i) max_j A_l[i, j] (share of tokens whose next expert is the most
    likely one given the current); plain: mean over used rows i of max_j A_l[i, j];
    null: max_j P(j at l+1), both statistics if layer l+1 ignored layer l; shuffled:
    the weighted statistic after shuffling tokens at layer l+1 (finite-sample null).
    """

    weighted: np.ndarray  # [L-1]
    plain: np.ndarray  # [L-1]
    null: np.ndarray  # [L-1]
    shuffled: np.ndarray  # [L-1]


def affinity(topk_ids: np.ndarray, num_experts: int, seed: int = 0) -> Affinity:
    """``topk_ids [T, L, A]`` (router order, best first) -> Affinity."""
    top1 = topk_ids[:, :, 0].astype(np.int64)  # [T, L]
    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {k: [] for k in Affinity._fields}

    def counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # [E, E] token counts i -> j
        return np.bincount(a * num_experts + b, minlength=num_experts**2).reshape(num_experts, num_experts)

    for l in range(top1.shape[1] - 1):
        c = counts(top1[:, l], top1[:, l + 1])
        rows = c.sum(1)
        used = rows > 0
        out["weighted"].append(c.max(1).sum() / c.sum())
        out["plain"].append(float((c.max(1)[used] / rows[used]).mean()))
        out["null"].append(c.sum(0).max() / c.sum())
        shuffled = counts(top1[:, l], rng.permutation(top1[:, l + 1]))
        out["shuffled"].append(shuffled.max(1).sum() / shuffled.sum())
    return Affinity(*(np.asarray(out[k], dtype=np.float64) for k in Affinity._fields))


def load_imbalance(topk_ids: np.ndarray, num_experts: int) -> np.ndarray:
    """max / mean expert load per MoE layer (all top-k slots): ``[L]``."""
    loads = np.stack([np.bincount(topk_ids[:, l].ravel(), minlength=num_experts) for l in range(topk_ids.shape[1])])
    return loads.max(1) / loads.mean(1)


# ----------------------------------------------------------------------------- report


def generate_samples(out: Path, model: MoEForCausalLM, max_new_tokens: int) -> tuple[list[tuple[str, str]], float]:
    """Greedy completions of ``PROMPTS`` from the exported checkpoint (``ReferenceEngine``),
    and the largest |logit| difference between the export and the in-memory model."""
    from raymoe.workers.reference import ReferenceEngine
    from raymoe.workers.sampling import SamplingParams

    engine = ReferenceEngine.from_pretrained(out, max_seqs=len(PROMPTS))
    probe = ForwardBatch.build([list(range(3, 67)), list(range(100, 140))], [0, 0])
    with torch.no_grad():
        diff = (engine.model(probe, all_logits=True) - model(probe, all_logits=True)).abs().max().item()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # decoding multiplies a few rows at a time: one thread is fastest
    completions = engine.generate(list(PROMPTS), SamplingParams(max_new_tokens=max_new_tokens))
    torch.set_num_threads(threads)
    return [(prompt, c.text) for prompt, c in zip(PROMPTS, completions)], diff


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def _card_training(r: dict) -> list[str]:
    curve = r["curve"]
    keep = sorted({0, *np.linspace(0, len(curve) - 1, 12).round().astype(int).tolist(), len(curve) - 1})
    rows = [[str(c["step"]), f"{c['tokens']:,}", "" if c["train"] is None else f"{c['train']:.3f}",
             f"{c['val']:.3f}", f"{c['lr']:.1e}", f"{c['seconds']:.0f}"] for c in (curve[i] for i in keep)]
    return [
        "## Training", "",
        f"- {r['steps']} AdamW steps (betas 0.9/0.95, weight decay {r['args']['weight_decay']} on matrices, "
        f"clip 1.0) of {r['args']['batch_size']} x {r['args']['seq_len']} tokens: {r['train_tokens_seen']:,} "
        f"tokens ({r['epochs']:.2f} epochs), random windows of the training stream, seed {r['args']['seed']}.",
        f"- Peak lr {r['args']['lr']}, {r['args']['warmup_steps']} warm-up steps, cosine to "
        f"{r['args']['min_lr_ratio']} x peak over the time budget (stopped by wall time).",
        f"- Loss: next-token cross-entropy + {r['args']['aux_loss_coef']} x Switch load-balancing loss "
        f"(E * sum_e f_e P_e per MoE layer, 1.0 = uniform), from the router logits seen through `on_route`.",
        f"- torch threads: {r['threads']} (steps per thread count: {r['steps_by_threads']}); wall time {r['wall_seconds'] / 60:.1f} min end to end "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in r['phases'].items())}).",
        f"- **Final train loss {r['final_train']:.3f}** (mean of the last logged steps), "
        f"**val loss {r['final_val']:.3f}** (all {r['val_tokens']:,} held-out tokens; "
        f"perplexity {math.exp(r['final_val']):.1f}); val loss at initialisation {r['initial_val']:.3f}.",
        "", "Loss curve (train: mean over the steps since the previous row; val: the first "
        f"{2 * r['args']['batch_size']} held-out windows, {2 * r['args']['batch_size'] * r['args']['seq_len']:,} "
        "tokens):", "",
        *_table(["step", "tokens", "train", "val", "lr", "seconds"], rows), "",
    ]


def _card_affinity(r: dict) -> list[str]:
    a = r["affinity"]
    rows = [[f"{l} -> {l + 1}", f"{a['weighted'][l]:.3f}", f"{a['plain'][l]:.3f}", f"{a['null'][l]:.3f}",
             f"{a['shuffled'][l]:.3f}"] for l in range(len(a["weighted"]))]
    mean = {k: float(np.mean(v)) for k, v in a.items()}
    rows.append(["mean", *(f"**{mean[k]:.3f}**" for k in ("weighted", "plain", "null", "shuffled"))])
    imbalance = ", ".join(f"{x:.2f}" for x in r["imbalance"])
    return [
        "## Inter-layer expert affinity (held-out text)", "",
        f"Top-1 experts of the {r['val_tokens']:,} held-out tokens, `A_l[i, j] = P(top-1 expert j at layer "
        "l+1 | top-1 expert i at layer l)`. *weighted*: sum_i P(i) max_j A_l[i, j] (the share of tokens "
        "whose next expert is the most likely one given the current); *plain*: mean over experts i with "
        "tokens of max_j A_l[i, j]; *null*: max_j P(j at l+1), what both would be if layer l+1 ignored "
        "layer l; *shuffled*: weighted after shuffling the tokens of layer l+1 (the null plus its "
        "finite-sample bias).", "",
        *_table(["MoE layers", "weighted", "plain", "null", "shuffled"], rows), "",
        f"Expert load imbalance (max / mean over all top-{r['top_k']} slots) per MoE layer: {imbalance}.",
        "", "The routing trace of this text is `trace_val.npz` (format: docs/formats.md; one sequence per "
        f"{r['args']['seq_len']}-token window, every token marked as prompt).", "",
    ]


def model_card(r: dict) -> str:
    """The README.md of the checkpoint directory, from the report ``r``."""
    c, a = r["config"], r["args"]
    samples = [f"```python\n{prompt}{text}\n```" for prompt, text in r["samples"]]
    return "\n".join([
        "# tiny-moe", "",
        "A tiny Mixtral-family mixture-of-experts language model of Python source, trained from scratch "
        "on CPU in minutes by `benchmarks/train_tiny_moe.py` with raymoe's own model code "
        "(`raymoe.workers.model`). It exists to exercise raymoe end to end (loading, serving, routing traces, "
        "placement) with real, trained routing; it is not a useful code model.", "",
        "## Architecture", "",
        f"- Mixtral (`model_type: mixtral`): {c['num_hidden_layers']} decoder layers, all MoE; hidden "
        f"{c['hidden_size']}; {c['num_attention_heads']} query heads / {c['num_key_value_heads']} KV heads "
        f"of dim {c['hidden_size'] // c['num_attention_heads']}; RoPE theta {c['rope_parameters']['rope_theta']:g}; "
        f"{c['num_local_experts']} experts of width {c['intermediate_size']}, top-{c['num_experts_per_tok']} "
        f"(softmax, renormalised); vocabulary {c['vocab_size']}; untied embeddings; "
        f"max_position_embeddings {c['max_position_embeddings']} (trained on {a['seq_len']}-token windows).",
        f"- Parameters: {r['params_total']:,} total, {r['params_active']:,} active per token.",
        f"- `model.safetensors`: float32, {r['weights_bytes'] / 1e6:.1f} MB, Hugging Face Mixtral tensor "
        "names (per-expert `model.layers.{l}.block_sparse_moe.experts.{e}.w1/w3/w2.weight`), written by "
        "`raymoe.workers.model.export.save_checkpoint`; `load_model` of it gives the trained model's logits "
        f"(max |diff| {r['export_diff']:.1e}) and transformers' `MixtralForCausalLM` matches them within "
        "1e-5 (`tests/unit/test_tiny_model.py`).", "",
        "## Data", "",
        f"The CPython {r['python']} standard library's `*.py` files under `{r['stdlib']}` in sorted path "
        f"order, without test suites and site-packages (directories named {sorted(SKIP_DIRS)}), "
        f"UTF-8 files only: {r['train_files']} training files ({r['train_chars'] / 1e6:.1f} M characters, "
        f"{r['train_tokens']:,} tokens). Held out for validation: {', '.join(VAL_FILES)} "
        f"({r['val_tokens']:,} tokens). Every file is one document, `<s> ... </s>`.", "",
        "## Tokenizer", "",
        f"Byte-level BPE (`tokenizers`, GPT-2 pre-tokenizer, lossless decoding), {c['vocab_size']} tokens "
        f"trained on the training files, special tokens `<s>` (id {c['bos_token_id']}, prepended by "
        f"`add_bos_token`), `</s>` (id {c['eos_token_id']}, end of a file) and `<pad>`; "
        f"{r['train_chars'] / r['train_tokens']:.2f} characters per token.", "",
        *_card_training(r), *_card_affinity(r),
        f"## Sample generations (greedy, {a['max_new_tokens']} new tokens, `ReferenceEngine`)", "",
        *samples, "",
        "## Reproduce", "", f"```\n{r['command']}\n```", "",
        "Stopping is by wall time, so another machine (or another load on this one) runs a different "
        f"number of steps; `--max-steps N` fixes the step count and the schedule. torch {r['torch']}; "
        "`--threads 2` pins two threads instead of choosing per measured step time. Files: `config.json`, `model.safetensors`, `tokenizer.json`, "
        "`tokenizer_config.json`, `trace_val.npz`, `metrics.json` (every number above), this README.", "",
    ])


# ----------------------------------------------------------------------------- main


def run_training(args: argparse.Namespace, t0: float, report: dict) -> tuple[MoEForCausalLM, torch.Tensor]:
    """Steps 1-3: corpus and tokenizer, model, training. Returns the model and the held-out windows."""
    # Step 1: corpus and tokenizer.
    corpus = stdlib_corpus()
    tok = train_tokenizer(corpus.train_texts, args.vocab_size)
    save_tokenizer(tok, args.out, 1024)
    train_tokens, val_tokens = encode_documents(tok, corpus.train_texts), encode_documents(tok, corpus.val_texts)
    val = val_chunks(val_tokens, args.seq_len)
    report.update(stdlib=str(corpus.root), train_files=len(corpus.train_files),
                  train_chars=sum(map(len, corpus.train_texts)), train_tokens=len(train_tokens),
                  val_tokens=val[:, :-1].numel())
    report["phases"]["tokenizer+data"] = time.time() - t0
    print(f"corpus: {len(corpus.train_files)} training files, {len(train_tokens):,} tokens; held out "
          f"{len(corpus.val_files)} files, {report['val_tokens']:,} tokens in {len(val)} windows", flush=True)
    # Step 2: the model, from a Mixtral config.json through raymoe's own parser.
    report["config"] = mixtral_config(args, tok)
    model = MoEForCausalLM(parse_config(report["config"]))
    init_weights(model, args.seed)
    report["params_total"], report["params_active"] = param_counts(model)
    print(f"model: {report['params_total']:,} parameters, {report['params_active']:,} active per token", flush=True)
    # Step 3: train until the budget minus what evaluation and export will need.
    start = time.time()
    report["initial_val"] = evaluate(model, val, args.batch_size)
    initial_probe = evaluate(model, val[: 2 * args.batch_size], args.batch_size)
    reserve = 30.0 + 2.0 * (time.time() - start)  # the final pass over the held-out set, export, samples
    log = train(model, args, train_tokens, val, t0 + 60.0 * args.max_minutes - reserve)
    report["phases"]["training"] = time.time() - start
    torch.set_num_threads(log.best_threads)
    report.update(steps=log.steps, train_tokens_seen=log.tokens, epochs=log.tokens / len(train_tokens),
                  curve=[dict(step=0, tokens=0, train=None, val=initial_probe, aux=None, lr=0.0, seconds=0.0)]
                  + log.rows, final_train=log.rows[-1]["train"] if log.rows else None,
                  steps_by_threads=log.steps_by_threads)
    return model, val


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(1 if args.threads == "auto" else int(args.threads))
    torch.manual_seed(args.seed)
    report: dict = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "phases": {}, "threads": args.threads, "top_k": args.top_k, "torch": torch.__version__,
                    "python": sys.version.split()[0],
                    "command": "python -m raymoe.benchmarks.train_tiny_moe " + " ".join(sys.argv[1:] if argv is None else argv)}
    model, val = run_training(args, t0, report)
    # Step 4: held-out loss and routing trace in one pass; export.
    start = time.time()
    config = model.config
    recorder = TraceRecorder(config.moe_layer_ids, config.num_experts)
    report["final_val"] = evaluate(model, val, args.batch_size, recorder)
    save_checkpoint(model, args.out, extra_config={"initializer_range": 0.02,
                                                   "router_aux_loss_coef": args.aux_loss_coef})
    recorder.save(args.out / "trace_val.npz")
    report["weights_bytes"] = (args.out / "model.safetensors").stat().st_size
    report["trace_bytes"] = (args.out / "trace_val.npz").stat().st_size
    # Step 5: affinity and load statistics of the held-out routing.
    ids = recorder.topk_ids
    report["affinity"] = {k: v.tolist() for k, v in affinity(ids, config.num_experts, args.seed)._asdict().items()}
    report["imbalance"] = load_imbalance(ids, config.num_experts).tolist()
    # Step 6: greedy samples from the exported checkpoint.
    report["samples"], report["export_diff"] = generate_samples(args.out, model, args.max_new_tokens)
    report["phases"]["evaluation+export"] = time.time() - start
    report["wall_seconds"] = time.time() - t0
    (args.out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "README.md").write_text(model_card(report))
    mean = {k: float(np.mean(v)) for k, v in report["affinity"].items()}
    print(f"final: train {report['final_train']:.4f}  val {report['final_val']:.4f}  steps {report['steps']}  "
          f"wall {report['wall_seconds'] / 60:.1f} min  weights {report['weights_bytes'] / 1e6:.1f} MB  "
          f"trace {report['trace_bytes'] / 1e6:.2f} MB")
    print("affinity (mean over layer pairs): " + "  ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    for prompt, text in report["samples"]:
        print(f"--- {prompt!r}\n{prompt}{text}")
    return report


if __name__ == "__main__":
    main()
