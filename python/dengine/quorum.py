"""Quorum arithmetic for majority and joint configurations, computed in Rust.

A :class:`JointConfig` holds the voters of the current configuration (``incoming``) and, during a
membership change, of the previous one (``outgoing``). Learners are never voters, so their acks
and votes never count.

* ``committed_index(acked)`` is the highest index acknowledged by a majority of each half (the
  minimum of the two majorities during a joint change).
* ``vote_result(votes)`` is ``VoteResult.WON`` once each half has a majority of yes votes,
  ``LOST`` once either half can no longer reach one, ``PENDING`` otherwise.
"""

from dengine._core import JointConfig, VoteResult

__all__ = ["JointConfig", "VoteResult"]
