"""The message contract between the strategy and the ClientApp: message types and record keys.

Plain strings, Flower-free, imported by ``strategies/``, ``rabo_flwr/client_app.py`` and the tests.
"""

# Phase kinds (rabo_flwr/algorithms): a phase named "<kind>" or "<kind>.<n>" (the n-th round of that kind in
# an iteration, e.g. FedNest's Neumann rounds "ihgp.1", "ihgp.2") travels as message type train.<kind>
# (Flower's message action must be an identifier), with its full name in the config under PHASE.
INNER, OUTER, LOCAL = "inner", "outer", "local"
INNER_GRAD, IHGP_GRAD, IHGP, HYPERGRAD = "inner_grad", "ihgp_grad", "ihgp", "hypergrad"
PHASES = (INNER, OUTER, LOCAL, INNER_GRAD, IHGP_GRAD, IHGP, HYPERGRAD)

# A node's profile: its partition and the capacity it announces (0: the scenario's profile decides).
PROFILE_QUERY = "query.profile"
PROFILE = "profile"

# A train message holds one ArrayRecord per side sent, keyed by the side ("x", "y"), and CONFIG;
# under FIARSE's extraction also THRESHOLDS (per weight tensor, the threshold of its gradient scaling);
# under segment submodels (algorithm.submodel) x and y whole and PLAN (per channel group, the kept indices).
THRESHOLDS = "thresholds"
PLAN = "plan"
CONFIG = "config"
ITERATION = "iteration"
PARTITION = "partition"
CAPACITY = "capacity"
PHASE = "phase"
SUBMODEL = "submodel"  # the digest of the client's plan (submodel.plan_key): its kept state is read on it only

# The ClientApp keeps each partition's ClientState in its context.state under CLIENT_STATE.<partition>
# (tensors, an ArrayRecord) and CLIENT_STATE.<partition>.submodel (a ConfigRecord).
CLIENT_STATE = "client_state"

# A reply holds one ArrayRecord per side updated, keyed by update_key(side), and METRICS.
METRICS = "metrics"

# The node config keys a SuperNode is started with (--node-config).
NODE_PARTITION = "partition-id"
NODE_CAPACITY = "capacity"


def phase_kind(phase: str) -> str:
    """The kind of a phase: its name up to the first dot ("ihgp.3" -> "ihgp")."""
    return phase.partition(".")[0]


def train_message(phase: str) -> str:
    """The message type of a phase: train.<kind>."""
    return f"train.{phase_kind(phase)}"


UPDATE = "update."


def update_key(side: str) -> str:
    """The reply's record holding the update of ``side``."""
    return f"{UPDATE}{side}"
