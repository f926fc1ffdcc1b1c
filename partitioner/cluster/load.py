"""The CLI's ``--cluster``: a preset name, a path to a .toml file, or ``local-cpu[:N]``."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ClusterError
from .local import LOCAL_CPU
from .presets import PRESETS
from .checks import show
from .values import Cluster

__all__ = ["load_cluster"]


def load_cluster(
    spec: str, nodes: int | None = None, devices_per_node: int | None = None
) -> Cluster:
    """The CLI's ``--cluster``: a preset name, a path to a .toml file, or ``local-cpu[:N]``.

    ``nodes`` and ``devices_per_node`` (``--nodes``, ``--gpus-per-node``) reshape the result;
    for ``local-cpu``, ``devices_per_node`` is the number of processes, like ``:N``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ClusterError(
            f"cluster = {show(spec)}: expected a preset name ({', '.join(PRESETS)}), "
            f"a path to a .toml file, or 'local-cpu:N'"
        )
    if spec == LOCAL_CPU or spec.startswith(LOCAL_CPU + ":"):
        return _load_local(spec, nodes, devices_per_node)
    if spec in PRESETS:
        cluster = Cluster.preset(spec)
    elif spec.endswith(".toml") or "/" in spec or os.sep in spec or Path(spec).is_file():
        cluster = Cluster.from_toml(spec)
    else:
        cluster = Cluster.preset(spec)  # raises, listing the presets and suggesting one
    if nodes is None and devices_per_node is None:
        return cluster
    return cluster.with_nodes(cluster.nodes if nodes is None else nodes, devices_per_node)


def _load_local(spec: str, nodes: int | None, devices_per_node: int | None) -> Cluster:
    count: int | None = None
    if ":" in spec:
        text = spec.split(":", 1)[1]
        if not text.isdigit() or int(text) < 1:
            raise ClusterError(
                f"cluster = {spec!r}: expected 'local-cpu:N' with N a whole number of "
                f"processes >= 1"
            )
        count = int(text)
    if count is not None and devices_per_node is not None and devices_per_node != count:
        raise ClusterError(
            f"devices_per_node = {devices_per_node} contradicts cluster = {spec!r}; "
            f"give one of them"
        )
    if nodes is not None and nodes != 1:
        raise ClusterError(
            f"nodes = {show(nodes)}: local-cpu is this one machine, so nodes must be 1"
        )
    return Cluster.local(count or devices_per_node or 1)

