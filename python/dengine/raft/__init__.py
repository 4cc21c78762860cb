"""The Raft protocol core: a pure state machine driven by the node runtime and by the simulator."""

from dengine.raft.config import RaftConfig
from dengine.raft.core import Raft
from dengine.raft.messages import Message, MsgType, ReadState, Ready, Role, SnapshotInfo, SoftState

__all__ = [
    "Message",
    "MsgType",
    "Raft",
    "RaftConfig",
    "ReadState",
    "Ready",
    "Role",
    "SnapshotInfo",
    "SoftState",
]
