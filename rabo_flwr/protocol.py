"""The message contract between the strategy and the ClientApp: message types and record keys.

Plain strings, Flower-free, imported by ``strategies/``, ``rabo_flwr/client_app.py`` and the tests.
"""

# Phases an algorithm may have (rabo_flwr/algorithms); a phase's message type is train.<phase>.
INNER, OUTER, LOCAL = "inner", "outer", "local"
PHASES = (INNER, OUTER, LOCAL)

# A node's profile: its partition and the capacity it announces (0: the scenario's profile decides).
PROFILE_QUERY = "query.profile"
PROFILE = "profile"

# A train message holds one ArrayRecord per side sent, keyed by the side ("x", "y"), and CONFIG;
# under FIARSE's extraction also THRESHOLDS (per weight tensor, the threshold of its gradient scaling).
THRESHOLDS = "thresholds"
CONFIG = "config"
ITERATION = "iteration"
PARTITION = "partition"
CAPACITY = "capacity"

# A reply holds one ArrayRecord per side updated, keyed by update_key(side), and METRICS.
METRICS = "metrics"

# The node config keys a SuperNode is started with (--node-config).
NODE_PARTITION = "partition-id"
NODE_CAPACITY = "capacity"


def train_message(phase: str) -> str:
    """The message type of a phase."""
    return f"train.{phase}"


def update_key(side: str) -> str:
    """The reply's record holding the update of ``side``."""
    return f"update.{side}"
