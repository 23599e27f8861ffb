"""The node properties a job can name as ``${...}``: in constraint targets, which the server
checks against a node's API JSON, and in task interpolation, which the client fills in.

The one list of these names for both. Definitions only; touches nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

# ``${node.*}`` names and the field of the node's API JSON each one reads.
NODE_FIELDS: Final[Mapping[str, str]] = {
    "node.unique.id": "ID",
    "node.unique.name": "Name",
    "node.datacenter": "Datacenter",
    "node.class": "NodeClass",
    "node.pool": "NodePool",
}
# A node has no region field: it is the agent's, which the fingerprint records as an attribute.
NODE_REGION: Final = "node.region"
REGION_ATTRIBUTE: Final = "nomad.region"
# ``${attr.<name>}`` and ``${meta.<key>}``: one of the node's attributes or metadata.
ATTR_PREFIX: Final = "attr."
META_PREFIX: Final = "meta."
