"""A stage for the tests of how stages end (tests/test_shutdown.py, tests/test_preemption.py).

Under a launcher, process $FAIL_RANK stops with a TokenJourneyError: `FAIL_WHEN=early` while the others
wait for it in a collective, `late` after the collective, while the others have finished and wait to
leave together; `FAIL_RANK=-1`: nobody fails. `SLEEP_S=N` instead prints "ready" and sleeps N seconds
in code that looks at no stop flag (as loading a model does), for a signal to interrupt.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from token_journey.distributed import join_processes
from token_journey.errors import TokenJourneyError
from token_journey.stage import stage


@stage
def main(cfg) -> None:
    if "SLEEP_S" in os.environ:
        print("ready", flush=True)
        time.sleep(float(os.environ["SLEEP_S"]))
        return
    procs = join_processes(torch.device("cpu"))
    fails = procs.index == int(os.environ["FAIL_RANK"])
    if fails and os.environ["FAIL_WHEN"] == "early":
        raise TokenJourneyError("a planted failure before the collective")
    total = torch.tensor([1.0])
    dist.all_reduce(total)
    if fails:
        time.sleep(1.0)  # the others are in the exit handshake by now
        raise TokenJourneyError("a planted failure after the collective")
    print(f"process {procs.index} summed {total.item():.0f}")


if __name__ == "__main__":
    main()
