"""Progressive delivery at runtime: the controller that moves rollouts through their steps
(the pure state machine is sidecar.core.rollout)."""
