"""Piper's vocoder (HiFi-GAN) rewritten so ONNX Runtime runs it on its blocked-layout kernels.

The vocoder is a stack of 1-D convolutions over time. ONNX Runtime's fast convolution path on
x86 (MLAS's NCHWc kernels: channels in blocks of 8 or 16, fused activations and sums) is taken
only for 2-D convolutions; a 1-D one goes through im2col and a GEMM. So :func:`as_2d` lays
every tensor of the vocoder out as ``[N, C, 1, T]`` instead of ``[N, C, T]``:

* a ``Conv`` with kernel ``k`` becomes a ``1 x k`` 2-D convolution (its weights reshaped);
* a ``ConvTranspose`` (HiFi-GAN's upsampling: stride ``s``, kernel ``K``) becomes its
  polyphase form, one ordinary ``Conv`` with ``s`` times the output channels (each phase
  ``r`` has the taps ``r, r + s, ...`` of the kernel), whose phases are then interleaved
  along time (``Reshape``, ``Transpose``, ``Reshape``) and trimmed to the transposed
  convolution's output (``Slice``): the same sums, on the fast kernels;
* a division by a constant scalar becomes a multiplication by its reciprocal (the blocked
  layout has kernels for ``Mul``, not ``Div``);
* element-wise operators (``Add``, ``Mul``, ``LeakyRelu``, ``Tanh``, ...) are unchanged.

Any other operator gets its inputs back in the 1-D layout (a ``Squeeze``) and stays as it
was, so the graph's outputs are what they were. The sums are the same up to the order of
float additions: Piper's joe voice decodes to within 2e-7 of the 1-D graph (samples in
-1..1), 1.3 times faster on one thread (``bench/RESULTS.md``). :func:`same_output` is the
check a caller runs before using the rewritten graph (``pipeline.tts``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["TOLERANCE", "as_2d", "input_channels", "same_output"]

logger = logging.getLogger(__name__)

ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "LeakyRelu", "Relu", "Tanh", "Sigmoid"})
TOLERANCE = 1e-4  # largest sample difference (of -1..1) the rewritten vocoder may make
INT64_MAX = 2**63 - 1
AXIS = 2  # where the extra axis of length 1 goes: [N, C, 1, T]


def as_2d(model: Any) -> Any | None:
    """``model`` (an ONNX ``ModelProto`` of 1-D convolutions over ``[N, C, T]``) in the
    ``[N, C, 1, T]`` layout described above, or None when nothing in it would run on 2-D
    kernels (no convolution it can rewrite, or an opset before 13, whose Squeeze and
    Unsqueeze take no axes input)."""
    import onnx
    from onnx import helper

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        return None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    weights = {t.name: t for t in graph.initializer}
    names = _Names({t.name for t in graph.initializer}
                   | {x for n in graph.node for x in (*n.input, *n.output)}
                   | {i.name for i in graph.input})

    def const(values: list[int]) -> str:
        name = names.new("vocoder_2d_const")
        graph.initializer.append(helper.make_tensor(
            name, onnx.TensorProto.INT64, [len(values)], values))
        return name

    axis = const([AXIS])
    wide: dict[str, str] = {}  # 1-D tensor name -> its [N, C, 1, T] twin
    narrow: dict[str, str] = {}  # [N, C, 1, T] twin -> the name its 1-D form has
    nodes: list[Any] = []
    rewritten = 0

    def to_wide(name: str) -> str:
        """``name``'s [N, C, 1, T] twin; an Unsqueeze makes it for a 1-D tensor (only a
        convolution asks for that, once it knows it will be rewritten)."""
        if name not in wide:
            twin = names.new(f"{name}_2d")
            nodes.append(helper.make_node("Unsqueeze", [name, axis], [twin]))
            narrow[twin] = name  # the 1-D form is there already
            wide[name] = twin
        return wide[name]

    def to_narrow(twin: str, original: str) -> str:
        if twin not in narrow:
            nodes.append(helper.make_node("Squeeze", [twin, axis], [original]))
            narrow[twin] = original
        return narrow[twin]

    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        inputs = list(node.input)
        acts = [x for x in inputs if x and x not in weights]
        convolution = node.op_type in ("Conv", "ConvTranspose")  # takes a 1-D input too
        if acts and (convolution or all(x in wide for x in acts)):
            made = _rewrite(node, attrs, inputs, weights, to_wide, names, const, graph)
            if made is not None:
                nodes.extend(made[0])
                wide.update(made[1])
                rewritten += made[2]
                continue
        # anything else sees the 1-D layout it was made for
        node.input[:] = [to_narrow(wide[x], x) if x in wide else x for x in inputs]
        nodes.append(node)
    for output in graph.output:  # the graph's outputs keep their names and 1-D layout
        if output.name in wide:
            to_narrow(wide[output.name], output.name)
    if not rewritten:
        return None
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    # the 1-D weights the rewritten nodes no longer read (ONNX Runtime warns of each)
    used = {x for n in graph.node for x in n.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return out


class _Names:
    """Fresh tensor names that collide with none in the graph."""

    def __init__(self, taken: set[str]) -> None:
        self._taken = set(taken)

    def new(self, base: str) -> str:
        name, i = base, 0
        while name in self._taken:
            i += 1
            name = f"{base}_{i}"
        self._taken.add(name)
        return name


def _rewrite(node: Any, attrs: dict[str, Any], inputs: list[str], weights: dict[str, Any],
             to_wide: Callable[[str], str], names: _Names, const: Any,
             graph: Any) -> tuple[list[Any], dict[str, str], int] | None:
    """The nodes that compute ``node`` on [N, C, 1, T] tensors, the twins of its outputs,
    and whether a convolution was rewritten (1) or not (0); None: not rewritable. Its
    activations (not ``weights``) are taken to 2-D by ``to_wide`` only once it is known
    to be rewritable."""
    from onnx import helper, numpy_helper

    def twin_of(name: str) -> str:
        return name if name in weights else to_wide(name)

    op = node.op_type
    if op == "Conv":
        w = weights.get(inputs[1]) if len(inputs) > 1 else None
        if w is None or len(w.dims) != 3 or attrs.get("auto_pad", b"NOTSET") != b"NOTSET":
            return None
        name = names.new(f"{inputs[1]}_2d")
        arr = numpy_helper.to_array(w)
        graph.initializer.append(numpy_helper.from_array(arr[:, :, None, :], name))
        new_attrs = {k: _widen(k, v) for k, v in attrs.items()}
        out = names.new(f"{node.output[0]}_2d")
        ins = [twin_of(inputs[0]), name, *inputs[2:]]
        return [helper.make_node("Conv", ins, [out], name=node.name, **new_attrs)], \
            {node.output[0]: out}, 1
    if op == "ConvTranspose":
        return _polyphase(node, attrs, inputs, weights, to_wide, names, const, graph)
    if op == "Div" and len(inputs) == 2 and inputs[1] in weights:
        c = numpy_helper.to_array(weights[inputs[1]])
        if c.size != 1 or not np.issubdtype(c.dtype, np.floating) or float(c.reshape(-1)[0]) == 0:
            return None
        inv = names.new(f"{inputs[1]}_reciprocal")
        graph.initializer.append(numpy_helper.from_array((1 / c).astype(c.dtype), inv))
        out = names.new(f"{node.output[0]}_2d")
        return [helper.make_node("Mul", [twin_of(inputs[0]), inv], [out], name=node.name)], \
            {node.output[0]: out}, 0
    if op in ELEMENTWISE and len(node.output) == 1:
        for x in inputs:  # constants must broadcast the same in both layouts: scalars only
            if x in weights and int(np.prod(weights[x].dims)) != 1:
                return None
        out = names.new(f"{node.output[0]}_2d")
        new = helper.make_node(op, [twin_of(x) for x in inputs], [out], name=node.name)
        new.attribute.extend(node.attribute)
        return [new], {node.output[0]: out}, 0
    return None


def _widen(key: str, value: Any) -> Any:
    """A 1-D convolution attribute for the 1 x k 2-D convolution."""
    if key in ("kernel_shape", "strides", "dilations"):
        return [1, *value]
    if key == "output_padding":
        return [0, *value]
    if key == "pads":
        return [0, value[0], 0, value[1]]
    return value


def _polyphase(node: Any, attrs: dict[str, Any], inputs: list[str], weights: dict[str, Any],
               to_wide: Callable[[str], str], names: _Names, const: Any,
               graph: Any) -> tuple[list[Any], dict[str, str], int] | None:
    """A 1-D ConvTranspose (group 1, dilation 1) as one Conv over its input giving every
    output phase, the phases interleaved along time and trimmed.

    Output sample t of the transposed convolution (stride s, kernel K, padding p) sums the
    taps k of the kernel with u = t + p = j*s + k over input samples j: with r = u mod s
    and q = u div s, it is the sum over m of x[q - m] w[r + m*s], an ordinary convolution
    per phase r with M = ceil(K / s) taps. Those are computed for q = 0 ..; sample t is
    then number u = t + p of the interleaved phases."""
    from onnx import helper, numpy_helper

    w_init = weights.get(inputs[1]) if len(inputs) > 1 else None
    if (w_init is None or len(w_init.dims) != 3 or attrs.get("group", 1) != 1
            or list(attrs.get("dilations", [1])) != [1] or "output_shape" in attrs
            or attrs.get("auto_pad", b"NOTSET") != b"NOTSET"):
        return None
    w = numpy_helper.to_array(w_init)  # [C_in, C_out, K]
    c_in, c_out, k_size = w.shape
    s = int(list(attrs.get("strides", [1]))[0])
    p_left, p_right = (list(attrs.get("pads", [0, 0])) + [0, 0])[:2]
    extra = int(list(attrs.get("output_padding", [0]))[0])
    has_bias = len(inputs) > 2 and bool(inputs[2])
    if p_left != p_right or s < 1 or (has_bias and inputs[2] not in weights):
        return None
    p, taps = int(p_left), -(-k_size // s)
    phases = np.zeros((s * c_out, c_in, 1, taps), dtype=w.dtype)
    for r in range(s):
        for i in range(taps):
            k = r + (taps - 1 - i) * s
            if k < k_size:
                phases[r * c_out:(r + 1) * c_out, :, 0, i] = w[:, :, k].T
    # q runs from 0 to the last phase index needed: taps - 1 samples of padding before
    # the input, and after it as many as the last output sample needs
    pad_right = (k_size + extra - p - 1) // s
    if pad_right < 0:
        return None
    cut_end = pad_right * s + s + p - k_size - extra  # interleaved samples past the output
    w_name = names.new(f"{inputs[1]}_phases")
    graph.initializer.append(numpy_helper.from_array(phases, w_name))
    conv_in = [to_wide(inputs[0]), w_name]
    if has_bias:
        bias = numpy_helper.to_array(weights[inputs[2]])
        b_name = names.new(f"{inputs[2]}_phases")
        graph.initializer.append(numpy_helper.from_array(np.tile(bias, s), b_name))
        conv_in.append(b_name)
    y, split, moved, joined = (names.new(f"{node.output[0]}_{part}")
                               for part in ("phases", "split", "moved", "joined"))
    out = names.new(f"{node.output[0]}_2d")
    end = -cut_end if cut_end > 0 else INT64_MAX
    made = [
        helper.make_node("Conv", conv_in, [y], name=node.name, kernel_shape=[1, taps],
                         pads=[0, taps - 1, 0, pad_right], strides=[1, 1]),
        helper.make_node("Reshape", [y, const([0, s, c_out, -1])], [split]),  # [N, s, C, Q]
        helper.make_node("Transpose", [split], [moved], perm=[0, 2, 3, 1]),  # [N, C, Q, s]
        helper.make_node("Reshape", [moved, const([0, c_out, 1, -1])], [joined]),
        helper.make_node("Slice", [joined, const([p]), const([end]), const([3])], [out]),
    ]
    return made, {node.output[0]: out}, 1


def input_channels(model: Any) -> int | None:
    """The channels C of the graph's ``[N, C, T]`` input, read from the first convolution
    that takes it (the split-off vocoder's input carries no shape); None if none does."""
    from onnx import helper

    source = model.graph.input[0].name
    weights = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[0] == source and node.input[1] in weights:
            group = next((int(helper.get_attribute_value(a)) for a in node.attribute
                          if a.name == "group"), 1)
            return int(weights[node.input[1]].dims[1]) * group
    return None


def same_output(a: Any, b: Any, *, channels: int, frames: int = 24, seed: int = 0,
                tolerance: float = TOLERANCE) -> bool:
    """Whether sessions ``a`` and ``b`` (one input ``[1, channels, frames]``) give the same
    samples, within ``tolerance``, for a random latent."""
    z = np.random.default_rng(seed).normal(0.0, 1.0, (1, channels, frames)).astype(np.float32)
    name_a, name_b = a.get_inputs()[0].name, b.get_inputs()[0].name
    out_a = np.asarray(a.run(None, {name_a: z})[0])
    out_b = np.asarray(b.run(None, {name_b: z})[0])
    if out_a.shape != out_b.shape:
        logger.info("the 2-D vocoder gives %s, not %s", out_b.shape, out_a.shape)
        return False
    diff = float(np.max(np.abs(out_a - out_b))) if out_a.size else 0.0
    if diff > tolerance:
        logger.info("the 2-D vocoder differs by %.3g (> %.3g)", diff, tolerance)
    return diff <= tolerance
