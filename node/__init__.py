"""Ferry node package: the node agent (ferry-node), its VMM workers, live migration."""

FERRY_VERSION = "0.1.0"
