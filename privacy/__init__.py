"""Privacy: secure aggregation (SecAgg+ on the Message API) and DP.

The public API of secure aggregation (see ``docs/secagg.md``):

* :class:`SecAggServer` / :class:`SecAggClient`: the coordinator's and a client's state machine
  for one round, one method per stage; :class:`SecAggResult` the exact sum and who is in it.
* The messages they exchange (:class:`Setup`, :class:`AdvertiseKeys`, ...), each with
  ``to_bytes``/``from_bytes`` and ``to_config``/``from_config`` (a Flower ``ConfigRecord``).
* :class:`SecAggParams` (the ``[secagg]`` knobs), :class:`SecAggStats` (bytes and seconds).
* Errors: :class:`SecAggAbort` (round fails cleanly, no model update), :class:`SecAggRejected`
  (one message refused, naming its sender), :class:`SecAggStateError`, :class:`MessageError`.
* Building blocks: :mod:`.crypto`, :mod:`.shamir`, :mod:`.ring`, :mod:`.graph`.
"""

from fleetfl.privacy.graph import choose_parameters
from fleetfl.privacy.messages import (
    MESSAGE_TYPES,
    AdvertiseKeys,
    KeysAhead,
    MaskedInput,
    MaskedInputRequest,
    Message,
    Setup,
    ShareKeys,
    ShareKeysRequest,
    UnmaskRequest,
    UnmaskShares,
)
from fleetfl.privacy.ring import bits_for_sum
from fleetfl.privacy.secagg import (
    PROTOCOL_VERSION,
    SERVER_ID,
    MessageError,
    SecAggAbort,
    SecAggError,
    SecAggParams,
    SecAggRejected,
    SecAggStateError,
    SecAggStats,
    Stage,
)
from fleetfl.privacy.secagg_client import SecAggClient
from fleetfl.privacy.secagg_server import SecAggResult, SecAggServer

__all__ = [
    "MESSAGE_TYPES",
    "PROTOCOL_VERSION",
    "SERVER_ID",
    "AdvertiseKeys",
    "KeysAhead",
    "MaskedInput",
    "MaskedInputRequest",
    "Message",
    "MessageError",
    "SecAggAbort",
    "SecAggClient",
    "SecAggError",
    "SecAggParams",
    "SecAggRejected",
    "SecAggResult",
    "SecAggServer",
    "SecAggStateError",
    "SecAggStats",
    "Setup",
    "ShareKeys",
    "ShareKeysRequest",
    "Stage",
    "UnmaskRequest",
    "UnmaskShares",
    "bits_for_sum",
    "choose_parameters",
]
