"""Run Wav2Lip only on the rows of the crop the server pastes.

The paste mask (``pipeline.lipsync.wav2lip.face_geometry``) is exactly 0 above the nose:
everything Wav2Lip draws in the upper third of its 96x96 crop is thrown away. Most of the
generator's work is in its last decoder stages (48x48 and 96x96 and the output block: half of
its 3.97 GMAC per frame), and those are plain convolutions, so ``lower_rows_model`` rewrites the
ONNX graph to run them from row ``START_24`` of the 24x24 stage down, and the 24x24 stage
itself from row ``2 * START_12``:

* the 12x12 decoder feature (the 512-channel concatenation feeding the transposed convolution
  to 24x24) is sliced from row ``START_12``, and the encoder's 24x24 skip feature that joins
  that stage's output from row ``2 * START_12``;
* the 24x24 decoder feature (the 320-channel concatenation) is cut to start at row
  ``START_24``;
* the encoder's skip features that join it at 48x48 and 96x96 are sliced to match (from rows
  ``2 * START_24`` and ``4 * START_24``).

The model then outputs rows ``LOWER_ROWS.first`` .. 95 of the crop ((B, 3, 64, 96)). The rows
near that new top edge differ from the whole model's (the convolutions see zero padding where
the cut-off rows were); from ``LOWER_ROWS.exact_from`` down they are the same computation on the
same numbers (``tests/test_wav2lip_rows.py`` checks both bounds). The renderer pastes only
rows the mask reaches, and the mask is faded to 0 above ``exact_from`` plus the resize's reach
(``face_geometry(..., exact_from=...)``).

Measured (``bench.wav2lip_rows``, one thread, this 2-core machine): 15-23 % less model time per
frame on every backend (OpenVINO bf16 at batch 2: 21.5 -> 17.0 ms over 14 rounds), of which
the 12x12 cut gives 5-9 % (``bench/results/wav2lip_rows*.json``). The graph is found by the
shapes of Wav2Lip's decoder concatenations; an ONNX file without them runs whole
(``lower_rows_model`` returns None).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.lipsync.backends import derived_model_path
from pipeline.lipsync.wav2lip_io import FACE_SIZE

logger = logging.getLogger(__name__)

START_24 = 8  # first row of the 24x24 decoder feature the 48x48 stage reads
# first row of the 12x12 decoder feature the 24x24 stage reads: that stage's transposed
# convolution (stride 2) gives rows from 2 * START_12 computed exactly, and each of its two 3x3
# convolutions makes one more row at the top inexact, so 2 * START_12 + 2 <= START_24
START_12 = 3
VERSION = 2  # of the rewrite: part of the cached file's name


@dataclass(frozen=True, slots=True)
class OutputRows:
    """Which rows of the 96x96 crop a model outputs: ``first`` .. 95, of which rows from
    ``exact_from`` on equal the whole generator's output."""

    first: int
    exact_from: int

    @property
    def height(self) -> int:
        return FACE_SIZE - self.first


WHOLE_CROP = OutputRows(first=0, exact_from=0)
# one 3x3 convolution re-reads one row above; a stride-2 transposed convolution doubles the
# distance: 2 convolutions at 48x48, the transposed one to 96x96, 2 convolutions there and the
# output block's 3x3 leave the first 7 rows of the cut inexact
LOWER_ROWS = OutputRows(first=4 * START_24, exact_from=4 * START_24 + 7)

# Wav2Lip's decoder concatenations: (channels, size) of the output -> channels of the encoder
# skip feature joining it
_CONCAT_12 = (512, 12)
_CONCAT_24 = (320, 24)
_SKIPS = {(320, 24): 64, (160, 48): 32, (80, 96): 16}


def lower_rows_path(model: Path, cache_dir: Path) -> Path:
    key = f"{START_12}|{START_24}|v{VERSION}"
    return derived_model_path(model, cache_dir, f"rows{LOWER_ROWS.first}", key)


def lower_rows_model(model: Path, cache_dir: Path) -> Path | None:
    """The copy of ``model`` that outputs ``LOWER_ROWS`` (cached in ``cache_dir``), or None
    when the graph does not have Wav2Lip's decoder (then run ``model`` whole). Blocking."""
    out = lower_rows_path(model, cache_dir)
    if out.is_file():
        return out
    import onnx

    proto = onnx.load(str(model))
    if not slice_graph(proto):
        logger.warning(
            "%s: Wav2Lip's decoder concatenations (at 12x12, 24x24, 48x48, 96x96) were not "
            "found; running the whole crop",
            model.name,
        )
        return None
    onnx.checker.check_model(proto)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=cache_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        tmp.chmod(0o644)
        onnx.save(proto, str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("%s: lower-rows copy written to %s", model.name, out)
    return out


def slice_graph(proto: Any, start_12: int = START_12) -> bool:
    """Rewrite ``proto`` (an ``onnx.ModelProto``) in place; False (unchanged) when its decoder
    concatenations are not found exactly once each. ``start_12``: the 12x12 cut (a test
    moves it one row further to show ``START_12`` is the last exact one)."""
    from onnx import helper, numpy_helper, shape_inference

    if not 0 <= 2 * start_12 <= START_24:
        raise ValueError(f"start_12 must be 0..{START_24 // 2}, got {start_12}")
    graph = proto.graph
    inferred = shape_inference.infer_shapes(proto).graph
    shapes: dict[str, tuple[int, ...]] = {}
    for info in [*inferred.value_info, *inferred.input, *inferred.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)

    def concats(channels: int, size: int) -> list[Any]:
        return [
            n
            for n in graph.node
            if n.op_type == "Concat" and shapes.get(n.output[0], ())[1:] == (channels, size, size)
        ]

    c12 = concats(*_CONCAT_12)
    skip_concats = {key: concats(*key) for key in _SKIPS}  # the 24x24 one among them
    if len(c12) != 1 or any(len(found) != 1 for found in skip_concats.values()):
        return False
    c24 = skip_concats[_CONCAT_24]
    # the rows each skip feature starts from: the rows its stage computes
    starts = {24: 2 * start_12, 48: 2 * START_24, 96: 4 * START_24}
    skip_inputs: list[tuple[Any, int, int]] = []  # (concat node, input index, start row)
    for (channels, size), (node,) in skip_concats.items():
        skip = _SKIPS[(channels, size)]
        idx = [i for i, name in enumerate(node.input) if shapes.get(name, ())[1:2] == (skip,)]
        if len(idx) != 1:
            return False
        skip_inputs.append((node, idx[0], starts[size]))

    def const(name: str, value: int) -> str:
        graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
        return name

    axes, end = const("lower_rows_axes", 2), const("lower_rows_end", 1 << 30)
    added: list[Any] = []

    def rows_from(tensor: str, start: int) -> str:
        sliced = f"{tensor}_rows{start}"
        begin = const(f"lower_rows_start_{start}_{len(added)}", start)
        added.append(
            helper.make_node("Slice", [tensor, begin, end, axes], [sliced], name=f"rows_{sliced}")
        )
        return sliced

    def cut_output(node: Any, start: int) -> None:
        src = node.output[0]
        cut = rows_from(src, start)
        for other in graph.node:
            for i, name in enumerate(other.input):
                if name == src:
                    other.input[i] = cut

    # the 24x24 concatenation now holds rows 2 * start_12 .. 23: cut it at START_24
    cut_output(c12[0], start_12)
    cut_output(c24[0], START_24 - 2 * start_12)
    for node, i, start in skip_inputs:
        node.input[i] = rows_from(node.input[i], start)
    # topological order: each Slice right after the node making its input
    made_by = {a.input[0]: a for a in added}
    ordered = []
    for node in [*graph.node]:
        ordered.append(node)
        ordered.extend(made_by[o] for o in node.output if o in made_by)
    del graph.node[:]
    graph.node.extend(ordered)
    del graph.value_info[:]  # shapes below the cut changed; runtimes infer them again
    out_dims = graph.output[0].type.tensor_type.shape.dim
    if len(out_dims) == 4:
        out_dims[2].Clear()
        out_dims[2].dim_value = LOWER_ROWS.height
    return True
