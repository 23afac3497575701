"""Piper's VITS model in two parts, so a sentence can be heard before its end is decoded.

The text side (phonemes to the latent ``z`` and the phoneme durations: encoder, duration
predictor, flow) and the vocoder (``/dec/``: HiFi-GAN, ``z`` to 256 samples a frame) run as two
ONNX Runtime sessions. Run one after the other they give the whole model's samples; the
vocoder can also decode ``z`` in parts (it sees only ``VOCODER_CONTEXT`` frames either side),
so a sentence's start plays while the rest is decoded (``pipeline.tts``)."""

from __future__ import annotations

import logging
from typing import Any

import av
import numpy as np

__all__ = ["VOCODER_CONTEXT", "Phonemes", "SplitModel", "StreamResampler", "alignments",
           "split_model"]

logger = logging.getLogger(__name__)

Phonemes = tuple[tuple[str, int], ...]


def split_model(model: Any, ceil: str) -> tuple[Any, Any, str, str] | None:
    """A VITS voice (Piper's) as its text side, up to the latent ``z`` and the durations
    (``ceil``), and its vocoder (the ``/dec/`` nodes: HiFi-GAN, ``z`` to samples); None when
    the graph is not shaped so (no ``/dec/`` nodes, inputs other than Piper's single-speaker
    three, or a vocoder that takes more than ``z``)."""
    from onnx.utils import Extractor

    graph = model.graph
    if sorted(i.name for i in graph.input) != ["input", "input_lengths", "scales"]:
        return None
    vocoder = [n for n in graph.node if n.name.startswith("/dec/")]
    made = {o for n in vocoder for o in n.output}
    weights = {t.name for t in graph.initializer}
    needs = {i for n in vocoder for i in n.input if i and i not in made and i not in weights}
    if len(needs) != 1 or len(graph.output) < 1:
        return None
    z_name, out_name = needs.pop(), graph.output[0].name
    try:
        extractor = Extractor(model)
        front = extractor.extract_model([i.name for i in graph.input], [z_name, ceil])
        back = extractor.extract_model([z_name], [out_name])
    except Exception as exc:  # noqa: BLE001 - an unusual graph: the whole model, as before
        logger.info("Piper voice not split into text side and vocoder (%s)", exc)
        return None
    if [i.name for i in back.graph.input] != [z_name]:
        return None
    return front, back, z_name, out_name


# The vocoder sees this many latent frames on either side of a sample (HiFi-GAN's receptive
# field; measured: parts decoded with this overlap join to the whole decode's samples within
# float rounding, 124 dB).
VOCODER_CONTEXT = 12


class SplitModel:
    """A Piper voice's model as two ONNX Runtime sessions, the text side and the vocoder.
    ``run`` runs both as the whole model would (Piper's own synthesis calls it); ``front``
    and ``decode`` let a caller hear a sentence's start before its end is decoded."""

    def __init__(self, front: Any, vocoder: Any, *, z_name: str, ceil_name: str,
                 out_name: str) -> None:
        self._front = front
        self._vocoder = vocoder
        self._z = z_name
        self._ceil = ceil_name
        self._out = out_name

    def front(self, feeds: dict[str, Any], run_options: Any = None) -> tuple[Any, Any]:
        """(z, durations in frames per phoneme id)."""
        z, ceil = self._front.run([self._z, self._ceil], feeds, run_options)
        return z, ceil

    def decode(self, z: Any, start: int, stop: int, run_options: Any = None) -> np.ndarray:
        """The float samples of latent frames ``start:stop`` (``hop`` each), decoded with
        ``VOCODER_CONTEXT`` frames of context on either side."""
        frames = int(z.shape[-1])
        a, b = max(0, start - VOCODER_CONTEXT), min(frames, stop + VOCODER_CONTEXT)
        out = np.asarray(self._vocoder.run([self._out], {self._z: z[:, :, a:b]},
                                           run_options)[0]).reshape(-1)
        hop = out.size // max(1, b - a)
        return out[(start - a) * hop: (stop - a) * hop]

    def run(self, output_names: Any, feeds: Any, run_options: Any = None) -> list[Any]:
        z, ceil = self.front(feeds, run_options)
        audio = self._vocoder.run([self._out], {self._z: z}, run_options)[0]
        return [audio, ceil]


class StreamResampler:
    """libswresample across the pieces of one sentence, so its parts join without a click."""

    def __init__(self, src_rate: int, dst_rate: int) -> None:
        self._src = src_rate
        self._resampler = (None if src_rate == dst_rate else
                           av.AudioResampler(format="s16", layout="mono", rate=dst_rate))

    def push(self, pcm: np.ndarray | None) -> np.ndarray:
        """Resampled ``pcm`` (int16), as far as it is ready; None: the rest."""
        if self._resampler is None:
            return np.zeros(0, np.int16) if pcm is None else pcm
        frame = None
        if pcm is not None:
            frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = self._src
        out = [f.to_ndarray().reshape(-1) for f in self._resampler.resample(frame)]
        return np.concatenate(out).astype(np.int16) if out else np.zeros(0, np.int16)


def alignments(config: Any, phonemes: list[str], ids: list[int],
                per_id: np.ndarray) -> Phonemes:
    """(phoneme, samples) for a sentence: each phoneme's ids, and the pad after it, as
    ``phonemes_to_ids`` laid them out, summed; () when the ids do not follow that layout."""
    from piper.const import BOS, EOS, PAD

    table = config.phoneme_id_map
    pad = list(table.get(PAD, []))
    out: list[tuple[str, int]] = []
    i = 0
    for name in [BOS, *phonemes, EOS]:
        want = list(table.get(name, [])) + (pad if name != EOS else [])
        if list(ids[i:i + len(want)]) != want or i + len(want) > len(per_id):
            return ()
        out.append((name, int(per_id[i:i + len(want)].sum())))
        i += len(want)
    return tuple(out) if i == len(ids) else ()
