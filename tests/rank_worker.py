"""A `tunesmith` rank with a fault planted, for the distributed tests: run by torchrun in place of
`python -m tunesmith`. PLANT (environment) says what to do, on which rank, at which optimizer step:

  stall:RANK:STEP    the rank stops answering (sleeps) when it reaches STEP: the others' collective times out
  crash:RANK:STEP    the rank exits with code 9 at STEP, as a killed process would (checkpoints before it stay)
  record:FOLDER      every rank writes, at each step, its batch's rows (input_ids without padding), the class of
                     the model it trains (DistributedDataParallel?) and the sum of its trainable weights to
                     FOLDER/rank-R.jsonl
"""

import json
import os
import sys
import time
from pathlib import Path


def plant() -> None:
    from transformers import Trainer

    kind, *rest = os.environ["PLANT"].split(":", 1)
    rank = int(os.environ.get("RANK", "0"))
    real = Trainer.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step + 1
        if kind in ("stall", "crash"):
            who, when = (int(x) for x in rest[0].split(":"))
            if who == rank and step == when:
                if kind == "stall":
                    time.sleep(3600)
                os._exit(9)
        if kind == "record":
            with open(Path(rest[0]) / f"rank-{rank}.jsonl", "a") as fh:
                rows = inputs["input_ids"].tolist()
                mask = inputs.get("attention_mask")
                if mask is not None:
                    rows = [[t for t, m in zip(r, mk) if m] for r, mk in zip(rows, mask.tolist())]
                weights = sum(float(p.double().sum()) for p in model.parameters() if p.requires_grad)
                fh.write(json.dumps({"step": step, "rows": rows, "model": type(model).__name__,
                                     "weights": weights}) + "\n")
        return real(self, model, inputs, num_items_in_batch)

    Trainer.training_step = training_step


if __name__ == "__main__":
    if os.environ.get("PLANT"):
        plant()
    from tunesmith.cli import main

    sys.exit(main(sys.argv[1:]))
