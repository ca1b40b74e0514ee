"""kgrank LightGCN and the kgrank KG model against stock PyG LightGCN on Amazon Beauty.

Leave-last-out split of the Beauty 5-core (22,363 users, 12,101 items), full ranking of all
items with the history masked, judged by :func:`kgrank.eval.protocol.evaluate` (bootstrap 95%
CIs). The models are trained in the same run with the same dim, layers, epochs, batch size, lr,
L2 weight and optimizer (Adam, fused kernel) and the SAME BPR triples: the PyG loop draws from
:class:`kgrank.graph.sampling.BPRSampler` with the same seed, in the same order, as
:func:`kgrank.graph.train.train_graph_model` does, and uses PyG's ``recommendation_loss`` with
``lambda_reg = reg / 2`` on the batch's ego embeddings, which is exactly kgrank's objective.

- ``pyg``: ``torch_geometric.nn.models.LightGCN`` as its example uses it (``edge_index`` of the
  undirected training graph, ``model(edge_index, edge_label_index)``, its xavier init);
- ``kgrank-lightgcn``: :class:`kgrank.graph.lightgcn.LightGCN` (CSR propagation, the paper's
  N(0, 0.1^2) init);
- ``kgrank-kg``: :class:`kgrank.graph.kg.KGModel` on the graph of
  :func:`kgrank.graph.build.build_graph` (categories, brands, price bands, attributes,
  bought-next / bought-together item relations); ``--kg-weight 4`` was chosen on VALIDATION
  NDCG@10 (6-epoch runs, grid 0.5 / 1 / 2 / 3 / 4 / 8 / 16, attention on; off was no better);
- ``kgrank-lightgcn, PyG's init``: kgrank's LightGCN started from PyG's initial weights. Same
  weights, triples and objective as ``pyg``, so it must track ``pyg``: an equivalence check that
  isolates the implementation from the initialisation.

Every model is validated every ``--eval-every`` epochs (NDCG@10 on the validation item) and its
best epoch is kept; all are then propagated over train + validation interactions (the same
test-time graph for all) and evaluated once on test. Reported: NDCG@10 / HR@10 with CIs,
NDCG@10 on test users whose test item has <= 5 training interactions, mean epoch seconds
(sampling + steps) and, because the machine is shared, a step-time ratio measured with the
models' steps interleaved on the same batch.

    .venv/bin/python benchmarks/graph_vs_pyg.py --threads 1   # CPU defaults, ~10 minutes
    .venv/bin/python benchmarks/graph_vs_pyg.py --epochs 200 --device cuda
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
from common import dataset, machine
from torch_geometric.nn.models import LightGCN as PyGLightGCN

from kgrank.config import EvalConfig, GraphBuildConfig, GraphTrainConfig, SplitConfig
from kgrank.data.split import Split, make_split
from kgrank.eval.metrics import bootstrap_many
from kgrank.eval.protocol import EvalResult, Scorer, evaluate
from kgrank.graph.build import build_graph
from kgrank.graph.graph import KnowledgeGraph
from kgrank.graph.sampling import BPRSampler
from kgrank.graph.train import (
    EpochRecord,
    ModelName,
    bpr_loss,
    build_model,
    inference_graph,
    make_optimizer,
    train_graph_model,
)

RARE = 5  # "rare" test items: at most this many training interactions


@dataclass
class Trained:
    name: str
    test: EvalResult
    history: list[EpochRecord]
    best_epoch: int

    @property
    def epoch_seconds(self) -> float:
        return float(np.mean([r.seconds for r in self.history]))


def edge_index(kg: KnowledgeGraph, device: torch.device) -> torch.Tensor:
    """Undirected user-item ``edge_index`` over nodes users-then-items, one edge per pair."""
    keys = np.unique(kg.ui_user * kg.n_items + kg.ui_item)
    u, i = np.divmod(keys, kg.n_items)
    src = np.concatenate([u, kg.n_users + i])
    dst = np.concatenate([kg.n_users + i, u])
    return torch.from_numpy(np.stack([src, dst])).to(device)


def pyg_scorer(model: PyGLightGCN, ei: torch.Tensor, n_users: int) -> Scorer:
    with torch.no_grad():
        emb = model.get_embedding(ei)
    user, item_t = emb[:n_users], emb[n_users:].T.contiguous()

    def score(users: np.ndarray) -> torch.Tensor:
        return (user[torch.from_numpy(users).to(user.device)] @ item_t).cpu()

    return score


def pyg_step(model: PyGLightGCN, opt: torch.optim.Optimizer, ei: torch.Tensor, n_users: int,
             u: torch.Tensor, i: torch.Tensor, j: torch.Tensor, reg: float) -> float:
    """One step of PyG's example loop, on kgrank's triples and objective."""
    label = torch.stack([torch.cat([u, u]), torch.cat([i, j]) + n_users])
    pos, neg = model(ei, label).chunk(2)
    loss = model.recommendation_loss(pos, neg, node_id=torch.cat([u, n_users + i, n_users + j]),
                                     lambda_reg=reg / 2)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def train_pyg(kg: KnowledgeGraph, split: Split, cfg: GraphTrainConfig,
              valid_cfg: EvalConfig) -> tuple[PyGLightGCN, list[EpochRecord], int]:
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = PyGLightGCN(kg.n_users + kg.n_items, cfg.dim, cfg.layers).to(device)
    opt = make_optimizer(model, cfg.lr)  # the same (fused) Adam as kgrank's models
    ei = edge_index(kg, device)
    tr = split.train
    sampler = BPRSampler(tr["user_idx"].to_numpy(), tr["item_idx"].to_numpy(), split.n_users,
                         split.n_items)
    rng = np.random.default_rng(cfg.seed)  # same draws as train_graph_model
    history: list[EpochRecord] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    for epoch in range(1, cfg.epochs + 1):
        start = time.perf_counter()
        users, pos, neg = (torch.from_numpy(a).to(device) for a in sampler.sample(rng))
        total = 0.0
        for lo in range(0, len(users), cfg.batch_size):
            sl = slice(lo, lo + cfg.batch_size)
            total += pyg_step(model, opt, ei, kg.n_users, users[sl], pos[sl], neg[sl],
                              cfg.reg) * len(users[sl])
        rec = EpochRecord(epoch, total / len(users), None, time.perf_counter() - start)
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            res = evaluate(pyg_scorer(model, ei, kg.n_users), split, "valid", valid_cfg,
                           name="pyg", progress=False)
            rec.valid = res.metrics[cfg.eval_metric]
            if best is None or rec.valid > best[0]:
                best = (rec.valid, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        history.append(rec)
        print(f"pyg epoch {epoch}: loss {rec.loss:.4f}"
              + ("" if rec.valid is None else f" valid {cfg.eval_metric} {rec.valid:.4f}")
              + f" ({rec.seconds:.1f} s)", flush=True)
    assert best is not None
    model.load_state_dict(best[2])
    return model, history, best[1]


def interleaved_step_ms(kg: KnowledgeGraph, split: Split, cfg: GraphTrainConfig,
                        repeats: int) -> dict[str, float]:
    """Median ms per training step, the models' steps alternating on the same batches."""
    device = torch.device(cfg.device)
    tr = split.train
    sampler = BPRSampler(tr["user_idx"].to_numpy(), tr["item_idx"].to_numpy(), split.n_users,
                         split.n_items)
    u, i, j = (torch.from_numpy(a).to(device)
               for a in sampler.sample(np.random.default_rng(123), cfg.batch_size))
    ours = build_model("lightgcn", kg, cfg)
    g = ours.graph(kg, cfg.weighted)
    ours_opt = make_optimizer(ours, cfg.lr)
    pyg = PyGLightGCN(kg.n_users + kg.n_items, cfg.dim, cfg.layers).to(device)
    pyg_opt = make_optimizer(pyg, cfg.lr)
    ei = edge_index(kg, device)

    def ours_step() -> None:
        loss = bpr_loss(ours, g, u, i, j, cfg.reg)
        ours_opt.zero_grad(set_to_none=True)
        loss.backward()
        ours_opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times: dict[str, list[float]] = {"kgrank": [], "pyg": []}
    for rep in range(repeats + 1):
        for name, step in (("kgrank", ours_step),
                           ("pyg", lambda: pyg_step(pyg, pyg_opt, ei, kg.n_users, u, i, j,
                                                    cfg.reg))):
            sync()
            start = time.perf_counter()
            step()
            sync()
            if rep:  # the first round warms up
                times[name].append(time.perf_counter() - start)
    return {k: 1000 * float(np.median(v)) for k, v in times.items()}


def rare_ndcg(res: EvalResult, split: Split) -> tuple[float, float, float, int]:
    """NDCG@10 (mean, CI) over test users whose test item has <= RARE training interactions."""
    counts = np.bincount(split.train["item_idx"].to_numpy(), minlength=split.n_items)
    targets = split.test.groupby("user_idx")["item_idx"].first()
    users = np.unique(split.test["user_idx"].to_numpy())  # evaluate()'s user order
    rare = counts[targets.reindex(users).to_numpy()] <= RARE
    values = res.per_user["ndcg@10"][rare]
    mean, low, high = bootstrap_many(values[None, :], n_boot=1000, seed=0)
    return float(mean[0]), float(low[0]), float(high[0]), int(rare.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--reg", type=float, default=1e-4)
    ap.add_argument("--eval-every", type=int, default=2)
    ap.add_argument("--kg-weight", type=float, default=4.0)
    ap.add_argument("--no-attention", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timing-repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads (0: torch's default); the same for every model")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    ds = dataset("amazon-5core", "amazon-beauty-2014-5core", "beauty")
    split = make_split(ds, SplitConfig())
    kg = build_graph(ds, split, GraphBuildConfig())
    base = GraphTrainConfig(dim=args.dim, layers=args.layers, lr=args.lr,
                            batch_size=args.batch_size, reg=args.reg, epochs=args.epochs,
                            eval_every=args.eval_every, patience=args.epochs,
                            eval_metric="ndcg@10", seed=args.seed, device=args.device)
    kg_cfg = base.model_copy(update={"kg_weight": args.kg_weight,
                                     "attention": not args.no_attention})
    eval_cfg = EvalConfig(ks=[10], main_metric="ndcg@10", bootstrap=1000)
    valid_cfg = eval_cfg.model_copy(update={"bootstrap": 0})
    print(f"{machine()}; device {args.device}")
    print(f"Beauty: {ds.n_users:,} users, {ds.n_items:,} items, {len(split.train):,} train; "
          f"graph: {kg.n_entities:,} entities, {len(kg.kg_head):,} triples, "
          f"{kg.n_relations} relations; {args.epochs} epochs")

    test_kg = inference_graph(kg, split)
    torch.manual_seed(args.seed)  # PyG's initial weights, for the equivalence row
    pyg_init = PyGLightGCN(kg.n_users + kg.n_items, args.dim, args.layers).embedding.weight
    same_init = {"user_emb": pyg_init[: kg.n_users].detach(),
                 "item_emb": pyg_init[kg.n_users :].detach()}
    # kgrank's LightGCN trains FIRST, in a fresh process: large allocations are slowest then
    # (glibc serves them by mmap until freed blocks raise its threshold), so the order is
    # conservative for kgrank's epoch times; the interleaved step timing is the fair one.
    models: list[tuple[str, ModelName | None, GraphTrainConfig, dict[str, torch.Tensor] | None]]
    models = [("kgrank-lightgcn", "lightgcn", base, None), ("pyg", None, base, None),
              ("kgrank-kg", "kg", kg_cfg, None),
              ("kgrank-lightgcn, PyG's init", "lightgcn", base, same_init)]
    runs: list[Trained] = []
    for label, name, cfg, init in models:
        if name is None:
            model, hist, best = train_pyg(kg, split, base, valid_cfg)
            ei_test = edge_index(test_kg, torch.device(args.device))
            test = evaluate(pyg_scorer(model, ei_test, kg.n_users), split, "test", eval_cfg,
                            name="pyg", progress=False)
            runs.append(Trained(label, test, hist, best))
            continue
        res = train_graph_model(name, kg, split, cfg, eval_cfg, None, progress=False,
                                initial_state=init)
        for r in res.history:
            print(f"{label} epoch {r.epoch}: loss {r.loss:.4f}"
                  + ("" if r.valid is None else f" valid ndcg@10 {r.valid:.4f}")
                  + f" ({r.seconds:.1f} s)", flush=True)
        test = evaluate(res.score, split, "test", eval_cfg, name=name, progress=False)
        runs.append(Trained(label, test, res.history, res.best_epoch))
    step_ms = interleaved_step_ms(kg, split, base, args.timing_repeats)

    print(f"\nTest, full ranking over {ds.n_items:,} items, {runs[0].test.n_users:,} users; "
          f"rare = test item with <= {RARE} training interactions; best epoch on validation "
          f"NDCG@10.\n")
    print("| model | NDCG@10 | HR@10 | NDCG@10 rare items | best epoch | epoch s |")
    print("|---|---|---|---|---|---|")
    rare: dict[str, float] = {}
    for run in runs:
        m, ci = run.test.metrics, run.test.ci
        r_mean, r_low, r_high, n_rare = rare_ndcg(run.test, split)
        rare[run.name] = r_mean
        print(f"| {run.name} | {m['ndcg@10']:.4f} [{ci['ndcg@10'][0]:.4f}, {ci['ndcg@10'][1]:.4f}]"
              f" | {m['hr@10']:.4f} [{ci['hr@10'][0]:.4f}, {ci['hr@10'][1]:.4f}]"
              f" | {r_mean:.4f} [{r_low:.4f}, {r_high:.4f}] (n={n_rare:,})"
              f" | {run.best_epoch} | {run.epoch_seconds:.1f} |")
    ours, pyg, kgm, _ = runs
    epoch_ratio = ours.epoch_seconds / pyg.epoch_seconds
    step_ratio = step_ms["kgrank"] / step_ms["pyg"]
    print(f"\nLightGCN time, kgrank / PyG: epochs {epoch_ratio:.2f}x "
          f"({ours.epoch_seconds:.1f} s vs {pyg.epoch_seconds:.1f} s, kgrank first, one after the "
          f"other); "
          f"steps interleaved on the same batch {step_ratio:.2f}x "
          f"({step_ms['kgrank']:.0f} ms vs {step_ms['pyg']:.0f} ms, median of "
          f"{args.timing_repeats}). KG model epoch {kgm.epoch_seconds:.1f} s. "
          f"Total {time.perf_counter() - t0:.0f} s.")
    fields = [f"epochs={args.epochs}"]
    for run, key in zip(runs, ["lightgcn", "pyg", "kg", "lightgcn_pyginit"], strict=True):
        fields += [f"{key}_ndcg10={run.test.metrics['ndcg@10']:.4f}",
                   f"{key}_hr10={run.test.metrics['hr@10']:.4f}",
                   f"{key}_ndcg10_rare={rare[run.name]:.4f}",
                   f"{key}_epoch_s={run.epoch_seconds:.1f}"]
    fields += [f"epoch_ratio={epoch_ratio:.2f}", f"step_ratio={step_ratio:.2f}"]
    print("RESULT graph_vs_pyg " + " ".join(fields))


if __name__ == "__main__":
    main()
