"""The outer loop around a trainer's update (PPO, RLOO, GRPO, DPO): resume from the newest complete
checkpoint, one line of metrics.jsonl per update, checkpoint-U/ every `save_every` updates and
final/ at the end. What an update does is the caller's `update(u)`; how a checkpoint is written is
its `save(path, state)` and `load(path)`; how the run starts in its directory (refused, resumed,
overwritten) is `run` (training/run_dir.py).
"""
from __future__ import annotations

import json
import sys

from tqdm import tqdm

from minihuatuo.training.run_dir import RunDir


def run_updates(run: RunDir, total: int, update, save, load, max_updates: int = 0, save_every: int = 0,
                postfix=None) -> list[dict]:
    """Updates u = start .. min(total, max_updates) − 1 of a run of `total` (max_updates 0 = all),
    where start is the trainer state's `run.key` in `run.checkpoint` (the newest complete one, on
    --resume), else 0. Returns the metrics dict of each update run here. The checkpoint state is
    {key: updates done}; `postfix(metrics)` gives the progress bar's fields."""
    name, out, key, d = run.name, run.out, run.key, run.d
    start = load(run.checkpoint)[key] if run.checkpoint is not None else 0
    stop = min(total, max_updates) if max_updates else total
    metrics = run.begin(start)
    history = []
    if run.checkpoint is not None and start >= stop:  # resumed at the end (of this --max-updates)
        if d.main:
            metrics.close()
            print(f"{name}: {run.checkpoint} has {start} of {stop} {key}s done: nothing to do", file=sys.stderr)
        return history
    bar = tqdm(range(start, stop), desc=name, disable=not d.main, file=sys.stderr)
    for u in bar:
        m = update(u)
        history.append(m)
        if d.main:
            if postfix is not None:
                bar.set_postfix(postfix(m))
            metrics.write(json.dumps(m) + "\n")
            metrics.flush()
        if save_every and (u + 1) % save_every == 0 and u + 1 < total:
            save(out / f"checkpoint-{u + 1}", {key: u + 1})
    save(out / "final", {key: stop})
    if d.main:
        metrics.close()
    return history
