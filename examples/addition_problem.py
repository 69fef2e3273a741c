"""Path-SGD and SGD on the addition problem, in a plain PyTorch loop: the numbers of docs/recurrent.md.

A ReLU RNN of 100 units (``pl_pathsgd.models.RecurrentRegressor``) reads T (value, marker) pairs and
must output the sum of the two marked values; 10,000 training and 2,000 test sequences, batches of 50.
Each run is ``optimizer:init:lr[:momentum]``; the test MSE is printed six times per run (always
predicting 1 scores 1/6 = 0.167; carrying only the second marked value, 1/12 = 0.083).

    python examples/addition_problem.py --seq-len 10 --steps 4000 pathsgd:default:1e-5 sgd:default:0.1
    python examples/addition_problem.py --seq-len 10 --steps 4000 --seeds 0,1,2,3,4 pathsgd:default:3e-6
"""

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from pl_pathsgd import PathSGD
from pl_pathsgd.data.addition import addition_problem
from pl_pathsgd.models import RecurrentRegressor

TRAIN, TEST, BATCH, HIDDEN = 10_000, 2_000, 50, 100


def parse_run(spec: str) -> tuple[str, str, float, float]:
    parts = spec.split(":")
    if len(parts) not in (3, 4) or parts[0] not in ("pathsgd", "sgd") or parts[1] not in ("default", "identity"):
        raise SystemExit(f"run {spec!r}: write optimizer:init:lr[:momentum], e.g. pathsgd:default:1e-5")
    return parts[0], parts[1], float(parts[2]), float(parts[3]) if len(parts) == 4 else 0.0


def train(spec: str, seq_len: int, steps: int, seed: int) -> tuple[list[tuple[int, float]], float]:
    """The test MSE six times over ``steps`` (stopped at the first non-finite loss), and the seconds taken."""
    name, init, lr, momentum = parse_run(spec)
    train_x, train_y = addition_problem(TRAIN, seq_len, np.random.default_rng([seed, 0]))
    test_x, test_y = addition_problem(TEST, seq_len, np.random.default_rng([seed, 2]))
    torch.manual_seed(seed)
    model = RecurrentRegressor(2, HIDDEN, 1, init=init)
    if name == "pathsgd":
        optimizer = PathSGD(model.parameters(), lr=lr, momentum=momentum, model=model, input_shape=(seq_len, 2))
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    order = torch.Generator().manual_seed(seed)
    history, start, position, permutation = [], time.perf_counter(), TRAIN, None
    for step in range(1, steps + 1):
        if position + BATCH > TRAIN:
            permutation, position = torch.randperm(TRAIN, generator=order), 0
        batch = permutation[position:position + BATCH]
        position += BATCH
        loss = F.mse_loss(model(train_x[batch]), train_y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if not math.isfinite(loss.item()):
            history.append((step, math.nan))
            break
        if step % max(1, steps // 6) == 0:
            with torch.no_grad():
                history.append((step, F.mse_loss(model(test_x), test_y).item()))
    return history, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="optimizer:init:lr[:momentum], e.g. pathsgd:default:1e-5")
    parser.add_argument("--seq-len", type=int, default=10)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--seeds", default="0", help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    for spec in args.runs:
        parse_run(spec)
    if args.seq_len < 2 or args.steps < 1:
        raise SystemExit(f"--seq-len {args.seq_len} --steps {args.steps}: a sequence needs at least 2 steps "
                         "(one marked in each half) and a run at least 1 step")
    try:
        seeds = [int(seed) for seed in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds {args.seeds!r}: write comma-separated integers, e.g. 0,1,2") from None
    torch.set_num_threads(args.threads)
    print(f"T = {args.seq_len}, {args.steps} steps; test MSE (constant prediction 0.167, one value 0.083)")
    for spec in args.runs:
        for seed in seeds:
            history, seconds = train(spec, args.seq_len, args.steps, seed)
            curve = "  ".join(f"{step}: {mse:.4f}" for step, mse in history)
            print(f"{spec:<24} seed {seed}  {curve}  ({seconds:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
