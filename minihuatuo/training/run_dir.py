"""A trainer's output directory (--out) and how a run starts in it:

    OUT/metrics.jsonl     one line per step / update, each logged once
    OUT/checkpoint-N/     every save_every steps (training/checkpoints.py: the layout)
    OUT/final/            at the end

    fresh        OUT holds no run (no final/, no checkpoint-N/, no non-empty metrics.jsonl); a run
                 there is refused: two runs are never mixed in one directory
    --resume     continue from the newest complete checkpoint (checkpoint-N/ or final/, the one with
                 the most steps done); a checkpoint whose manifest is missing or does not match its
                 files is skipped with a warning. metrics.jsonl is cut back to the checkpoint's step:
                 lines logged after it (before a kill) are logged again by the rerun, once
    --overwrite  start again: the previous run's files (metrics.jsonl, checkpoint-N/, final/) are
                 removed first, and said so; other files in OUT are kept

Leftover temporary directories of an atomic write that a kill interrupted (.checkpoint-N.tmp-*,
.final.tmp-*; engine/checkpoint.py `atomic_dir`) are removed when a run starts, and said so.
Rank 0 decides and every rank gets its decision (the same error, the same checkpoint).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from minihuatuo.engine.checkpoint import SAVE_DTYPES, CheckpointError, read_json
from minihuatuo.training.checkpoints import checkpoint_problem, trainer_dir
from minihuatuo.training.distributed import Dist

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_LEFTOVER = re.compile(r"\.(checkpoint-\d+|final)\.(tmp|old)-.+")


def add_output_args(p, unit: str = "step") -> None:
    """--resume | --overwrite and --save-dtype, the same on every trainer command."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true",
                   help=f"continue from the newest complete checkpoint in --out (checkpoint-N/ or final/; N = {unit}s "
                        "done); an incomplete or damaged one is skipped with a warning")
    g.add_argument("--overwrite", action="store_true",
                   help="--out holds a previous run: remove its metrics.jsonl, checkpoint-N/ and final/ and start "
                        "again (without --resume or --overwrite such a run is refused)")
    p.add_argument("--save-dtype", default="float32", choices=list(SAVE_DTYPES),
                   help="dtype of the exported model weights in checkpoint-N/ and final/ (training stays fp32; "
                        "trainer/ then keeps the fp32 weights for an exact resume)")


class RunDir:
    """The start of a run in `out`: refusal or plan (here, before the models are loaded), then
    `begin(done)` once the checkpoint is loaded. `key` is the counter of the metrics lines and of
    the trainer state ("step" or "update"); `name` prefixes every message."""

    def __init__(self, name: str, out, key: str, d: Dist, resume: bool = False, overwrite: bool = False):
        if resume and overwrite:
            raise ValueError("--resume and --overwrite exclude each other: continue the run in --out, or replace it")
        self.name, self.out, self.key, self.d = name, Path(out), key, d
        self.resume, self.overwrite = resume, overwrite
        self.checkpoint: Path | None = None
        self._remove: list[Path] = []
        problem = ckpt = None
        if d.main:
            try:
                ckpt = self._plan()
            except (ValueError, OSError) as e:  # CheckpointError is a ValueError
                problem = str(e)
        if d.world > 1:
            box = [problem, None if ckpt is None else str(ckpt)]
            dist.broadcast_object_list(box, src=0)
            problem, ckpt = box
        if problem is not None:
            raise ValueError(problem)
        self.checkpoint = None if ckpt is None else Path(ckpt)

    # -------------------------------------------------------------------- rank 0

    def _say(self, msg: str) -> None:
        print(f"{self.name}: {msg}", file=sys.stderr)

    def previous_run(self) -> list[Path]:
        """The files of a run already in `out`: metrics.jsonl (when not empty), checkpoint-N/, final/."""
        out = self.out
        if not out.is_dir():
            return []
        found = [p for p in sorted(out.iterdir()) if p.is_dir() and (_CHECKPOINT.fullmatch(p.name) or p.name == "final")]
        metrics = out / "metrics.jsonl"
        if metrics.is_file() and metrics.stat().st_size > 0:
            found.insert(0, metrics)
        return found

    def _plan(self) -> Path | None:
        out = self.out
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out}: exists and is not a directory")
        previous = self.previous_run()
        if previous and not (self.resume or self.overwrite):
            names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in previous)
            raise ValueError(f"--out {out} already holds a run ({names}); pass --resume to continue it or "
                             "--overwrite to remove it and start again")
        self._clean_leftovers()
        if self.overwrite:
            self._remove = self.previous_run()
            return None
        return self._newest_complete() if self.resume else None

    def _clean_leftovers(self) -> None:
        """Temporary directories of atomic writes a kill interrupted: .X.tmp-* (never complete) are
        removed; .X.old-* (the previous X, renamed aside just before the new one took its place) is
        put back when X is missing, else removed."""
        if not self.out.is_dir():
            return
        for p in sorted(self.out.iterdir()):
            m = _LEFTOVER.fullmatch(p.name)
            if not (m and p.is_dir()):
                continue
            target = self.out / m.group(1)
            if m.group(2) == "old" and not target.exists():
                os.replace(p, target)
                self._say(f"restored {target} from {p.name} (a kill interrupted its replacement)")
            else:
                shutil.rmtree(p)
                self._say(f"removed {p} (an unfinished checkpoint write left by a killed run)")

    def _done(self, ckpt: Path) -> int:
        state = read_json(trainer_dir(ckpt) / "trainer_state.json")
        if not isinstance(state.get(self.key), int):
            raise CheckpointError(f"{ckpt}: trainer_state.json has no {self.key!r} count")
        return state[self.key]

    def _newest_complete(self) -> Path | None:
        """The complete checkpoint with the most steps done (final/ wins a tie: it is written later);
        each incomplete one newer than it is skipped with a warning. None when `out` has none at all;
        an error when it has checkpoints and none is complete."""
        if not self.out.is_dir():
            return None
        candidates = []  # (steps done, final first on a tie, path, problem)
        for p in self.out.iterdir():
            if not p.is_dir():
                continue
            m = _CHECKPOINT.fullmatch(p.name)
            if m is None and p.name != "final":
                continue
            problem = checkpoint_problem(p)
            done = int(m.group(1)) if m else float("inf")  # final/: its count is read below
            if problem is None:
                try:
                    done = self._done(p)
                except (OSError, ValueError) as e:
                    problem = str(e).replace(f"{p}: ", "").replace(f"{p}/", "")
            candidates.append((done, m is None, p, problem))
        skipped = []
        for done, _, p, problem in sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True):
            if problem is None:
                return p
            self._say(f"warning: skipping {p}: {problem}; falling back to an older checkpoint")
            skipped.append(p.name)
        if skipped:
            raise ValueError(f"--resume: {self.out} has no complete checkpoint (skipped: {', '.join(skipped)}); "
                             "pass --overwrite to start the run again")
        return None

    # -------------------------------------------------------------------- the start

    def begin(self, done: int):
        """Just before the first step, `done` steps restored from `self.checkpoint` (0 without one):
        remove what --overwrite replaces, cut metrics.jsonl back to `done` on a resume, and return it
        open for appending on rank 0 (None on the other ranks)."""
        if not self.d.main:
            return None
        if self._remove:
            names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in self._remove)
            for p in self._remove:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            self._say(f"--overwrite: removed the previous run in {self.out}: {names}")
        self.out.mkdir(parents=True, exist_ok=True)
        metrics = self.out / "metrics.jsonl"
        if not self.resume:
            return open(metrics, "w", encoding="utf-8")
        if self.checkpoint is not None:
            self._say(f"resumed from {self.checkpoint} at {self.key} {done}")
        else:
            self._say(f"--resume: no checkpoint in {self.out}; starting from the beginning")
        dropped = truncate_metrics(metrics, self.key, done)
        if dropped:
            self._say(f"{metrics.name}: dropped {dropped} line(s) logged after {self.key} {done} "
                      "(before the run stopped; they are logged again as the run continues)")
        return open(metrics, "a", encoding="utf-8")


def truncate_metrics(path: Path, key: str, done: int) -> int:
    """Keep the lines of `path` whose `key` is at most `done` (and lines without it); drop the rest
    and any line a kill cut short. Returns the number of lines dropped; the file is replaced atomically."""
    if not path.is_file():
        return 0
    keep, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        value = rec.get(key) if isinstance(rec, dict) else None
        if isinstance(value, (int, float)) and value > done:
            dropped += 1
            continue
        keep.append(line + "\n")
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)
    return dropped
