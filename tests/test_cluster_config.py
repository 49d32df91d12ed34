"""ray_cluster.yaml must pass Ray's own launcher schema and install this package on every node."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import fillout_defaults, validate_config

CONFIG = Path(__file__).parents[1] / "ray_cluster.yaml"


def test_cluster_config_is_valid_for_the_launcher():
    config = yaml.safe_load(CONFIG.read_text())
    validate_config(fillout_defaults(config))
    nodes = config["available_node_types"]
    assert nodes[config["head_node_type"]]["resources"].get("GPU", 0) == 0
    assert any(n["resources"].get("GPU", 0) >= 1 and n["max_workers"] > n["min_workers"] for n in nodes.values())
    assert any("pip install" in c and "glimpse-batch" in c for c in config["setup_commands"])
