"""What the coordinator can check of a secure sum it cannot read the parts of.

Each honest client masks int8 values in ``[-127, 127]`` and tail counts in ``[0, 127]``
(``TAIL_COUNT_MAX``), so the unmasked sum of ``n`` clients lies in ``[-127 n, 127 n]`` per
value and ``[0, 127 n]`` per tail level. The ring has room for somewhat more (it is sized in
whole bits), and a client that skips its own range check can use it: a sum outside these
bounds proves a lie, and the round is refused (the model stays unchanged). A liar that stays
inside them is not detected; its effect on a coordinate is bounded by ``127 n`` minus what the
honest clients add there.
"""

from __future__ import annotations

import numpy as np

from fleetfl.compression.quantize import TAIL_COUNT_MAX

INT8_MAX = 127


def secure_sum_problem(values: np.ndarray, tail: np.ndarray, clients: int) -> str | None:
    """Why the unmasked sum of ``clients`` clients cannot be honest, or ``None``."""
    bound = INT8_MAX * clients
    if values.size and int(np.abs(values).max()) > bound:
        return (f"an update value sums to {int(np.abs(values).max())}, beyond what "
                f"{clients} clients in [-{INT8_MAX}, {INT8_MAX}] can give ({bound})")
    if tail.size and (int(tail.min()) < 0 or int(tail.max()) > TAIL_COUNT_MAX * clients):
        return (f"tail counts sum to [{int(tail.min())}, {int(tail.max())}], outside "
                f"[0, {TAIL_COUNT_MAX * clients}]")
    return None
