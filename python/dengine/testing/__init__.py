"""Tools to test replicated state machines: the deterministic simulated cluster that dengine itself
is tested with, and a linearizability checker for recorded client histories."""
