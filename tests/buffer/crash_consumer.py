"""A stand-in trainer for the crash test: reads batches, "trains", commits each step to a file, then acks.

Run as a subprocess so that the test can SIGKILL it. Each committed step is one fsynced JSON line with the
entry ids and sample ids it used; a step is committed once its line is complete.
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from rlplat.buffer import ExperienceStream, RedisConfig


def load_committed(path: Path) -> list[dict]:
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line is an uncommitted step
    return steps


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--run-dir", required=True)
    p.add_argument("--total", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--train-s", type=float, default=0.05)
    p.add_argument("--crash-after-commit", type=int, default=-1)
    args = p.parse_args()

    committed_path = Path(args.run_dir) / "committed.jsonl"
    committed = load_committed(committed_path)
    done = sum(len(s["sample_ids"]) for s in committed)
    stream = ExperienceStream.connect(RedisConfig(url=args.url, consumer="trainer-0"), args.run_dir)
    if committed:
        # A crash between commit and ack leaves the last committed step's entries pending; they are done.
        stream.ack(committed[-1]["entry_ids"])
    todo = stream.recover_pending()
    print(f"RECOVERED {len(todo)} {' '.join(e.id for e in todo)}", flush=True)

    step = len(committed)
    deadline = time.monotonic() + 60
    while done < args.total:
        if time.monotonic() > deadline:
            print("TIMEOUT", flush=True)
            return 3
        if len(todo) < args.batch:
            todo += stream.read(args.batch - len(todo), block_ms=100)
        if len(todo) < args.batch and done + len(todo) < args.total:
            continue
        batch, todo = todo[: args.batch], todo[args.batch :]
        print(f"READ {step}", flush=True)
        time.sleep(args.train_s)  # the optimizer step
        record = {
            "step": step,
            "entry_ids": [e.id for e in batch],
            "sample_ids": [e.sample["uid"] for e in batch],
        }
        with open(committed_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if step == args.crash_after_commit:
            os.kill(os.getpid(), signal.SIGKILL)
        stream.ack(record["entry_ids"])
        print(f"COMMIT {step}", flush=True)
        done += len(batch)
        step += 1
    stream.close()
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
