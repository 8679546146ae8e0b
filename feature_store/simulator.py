"""The default project's simulator for `loopmesh run`: the synthetic click-through population
(``loopmesh.devstack.worlds.CtrWorld``), whose labelling rule drifts once. A project of your own
gives ``world(seed)`` here (``docs/architecture.md``, "Simulated worlds")."""

from loopmesh.devstack.worlds import CtrWorld


def world(seed: int) -> CtrWorld:
    return CtrWorld(model_name="ctr", seed=seed)
