"""Reading a frozen TF GraphDef: `TFGraph` (nodes by name, Const values as numpy arrays) and node helpers.

Parsed with TensorBoard's protobuf classes (`tensorboard.compat.proto`), Consts decoded with
`tensorboard.util.tensor_util.make_ndarray`; TensorFlow is not needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from backbone.errors import DataError

FE = "FeatureExtractor/MobilenetV2"  # the TF OD API scope of the MobileNetV2 feature extractor
VARIABLE_SUFFIXES = ("weights", "biases", "depthwise_weights", "gamma", "beta", "moving_mean", "moving_variance")


class TFGraph:
    """A frozen GraphDef: nodes by name, Const values as numpy arrays (decoded on demand)."""

    def __init__(self, graph_def: Any, source: str = "<graph>") -> None:
        self.graph_def = graph_def
        self.source = source
        self.nodes = {n.name: n for n in graph_def.node}
        self.order = {n.name: i for i, n in enumerate(graph_def.node)}
        self._values: dict[str, np.ndarray] = {}
        self.consumers: dict[str, list[str]] = {}
        for n in graph_def.node:
            for inp in n.input:
                self.consumers.setdefault(_node_name(inp), []).append(n.name)

    @classmethod
    def load(cls, path: str | Path) -> "TFGraph":
        """Parse a frozen `.pb` GraphDef (DataError if it is not one)."""
        from tensorboard.compat.proto.graph_pb2 import GraphDef

        path = Path(path).expanduser()
        if not path.is_file():
            raise DataError(path, "frozen graph not found", "pass the path of a TF OD API frozen_inference_graph.pb")
        graph_def = GraphDef()
        try:
            graph_def.ParseFromString(path.read_bytes())
        except Exception as e:  # noqa: BLE001 -- protobuf raises DecodeError and friends
            raise DataError(path, f"not a binary TensorFlow GraphDef ({type(e).__name__})",
                            "pass a frozen_inference_graph.pb (a SavedModel or checkpoint is not supported)") from None
        if not graph_def.node:
            raise DataError(path, "GraphDef has no nodes", "pass a frozen_inference_graph.pb")
        return cls(graph_def, str(path))

    def is_const(self, name: str) -> bool:
        node = self.nodes.get(name)
        return node is not None and node.op == "Const"

    def value(self, name: str) -> np.ndarray:
        """The Const node's value (follows Identity nodes)."""
        name = self.resolve(name)
        if name not in self._values:
            from tensorboard.util.tensor_util import make_ndarray

            node = self.nodes[name]
            if node.op != "Const":
                raise KeyError(f"{name} is a {node.op}, not a Const")
            self._values[name] = make_ndarray(node.attr["value"].tensor)
        return self._values[name]

    def get(self, name: str) -> np.ndarray | None:
        """value(name) or None when there is no such Const."""
        try:
            return self.value(name)
        except KeyError:
            return None

    def resolve(self, name: str) -> str:
        """Node name of an input reference (drops ':k' / '^'), through Identity nodes."""
        name = _node_name(name)
        seen = 0
        while name in self.nodes and self.nodes[name].op == "Identity" and seen < 100:
            name = _node_name(self.nodes[name].input[0])
            seen += 1
        if name not in self.nodes:
            raise KeyError(name)
        return name

    def find_ops(self, ops: Sequence[str], prefix: str = "") -> list[Any]:
        return [n for n in self.graph_def.node if n.op in ops and n.name.startswith(prefix)]

    def variables(self) -> dict[str, np.ndarray]:
        """Former variables: float Consts read through `<name>/read` or named like weights / BN params."""
        out = {}
        for n in self.graph_def.node:
            if n.op != "Const":
                continue
            read = any(c == f"{n.name}/read" for c in self.consumers.get(n.name, []))
            if not (read or n.name.rsplit("/", 1)[-1] in VARIABLE_SUFFIXES):
                continue
            if n.attr["dtype"].type not in (1, 2, 19):  # float, double, half
                continue
            out[n.name] = self.value(n.name)
        return out


def _node_name(ref: str) -> str:
    return ref.lstrip("^").split(":")[0]


def _const_input(graph: TFGraph, ref: str) -> np.ndarray | None:
    """Value of an input: a Const, or the Const operand of a Minimum (max_output_size = min(k, n))."""
    try:
        name = graph.resolve(ref)
    except KeyError:
        return None
    node = graph.nodes[name]
    if node.op == "Const":
        return graph.value(name)
    if node.op == "Minimum":
        for inp in node.input:
            try:
                if graph.is_const(graph.resolve(inp)):
                    return graph.value(inp)
            except KeyError:
                continue
    return None
