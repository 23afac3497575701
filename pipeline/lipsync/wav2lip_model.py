"""Wav2Lip weights: checkpoint loading, ONNX export (cached), and a random-weight test network.

The runtime only ever runs ONNX: ``resolve_wav2lip_model`` turns the configured
``lipsync.wav2lip_model`` (an ``.onnx`` file or an official PyTorch checkpoint) into an ONNX
file with inputs ``mel`` (B, 1, 80, 16) and ``face`` (B, 6, 96, 96) and output ``frames``
(B, 3, 96, 96), batch axis dynamic (see ``Wav2LipGenerator`` for what they hold).

Command line::

    python -m pipeline.lipsync.wav2lip_model export wav2lip_gan.pth wav2lip_gan.onnx
    python -m pipeline.lipsync.wav2lip_model random random.onnx [--seed N]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from common.errors import PipelineError
from pipeline.lipsync.mel import MAX_ABS, MEL_STEP, N_MELS
from pipeline.lipsync.wav2lip_io import FACE_SIZE
from pipeline.lipsync.wav2lip_net import Wav2LipGenerator

INPUT_NAMES = ("mel", "face")
OUTPUT_NAMES = ("frames",)
OPSET = 17
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".tar")
_FIX = "use the Wav2Lip generator weights, e.g. wav2lip_gan.pth, or their ONNX export"


class ModelError(PipelineError):
    """A configured model file is missing, unreadable or not the expected network.

    ``path`` is the file concerned; the message says what to do about it."""

    code = "model_error"

    def __init__(self, detail: str, *, path: Path | None = None) -> None:
        super().__init__(detail)
        self.path = path


def _sha256_prefix(path: Path, n_hex: int = 16) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:n_hex]


def load_checkpoint_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PyTorch checkpoint (``{"state_dict": {...}}`` or a bare state dict),
    with DataParallel's ``module.`` prefixes removed. Raises ModelError."""
    path = Path(path)
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError(
            f"lipsync.wav2lip_model: {path} does not exist; {_FIX}", path=path
        ) from None
    except Exception as e:
        raise ModelError(
            f"lipsync.wav2lip_model: {path} is not a readable PyTorch checkpoint "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); {_FIX}",
            path=path,
        ) from e
    state = loaded.get("state_dict", loaded) if isinstance(loaded, Mapping) else loaded
    if not isinstance(state, Mapping) or not state:
        raise ModelError(f"lipsync.wav2lip_model: {path} holds no state dict; {_FIX}", path=path)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ModelError(
                f"lipsync.wav2lip_model: {path} is not a Wav2Lip generator checkpoint "
                f"(entry {key!r} is not a tensor); {_FIX}",
                path=path,
            )
        tensors[key.removeprefix("module.")] = value
    return tensors


def _mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """A short account of how ``state`` differs from ``model``'s own state dict ("" if it fits)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", wrong)):
        if items:
            parts.append(f"{len(items)} {label}, e.g. {items[0]}")
    return "; ".join(parts)


def load_generator(path: Path) -> Wav2LipGenerator:
    """The generator with the weights of checkpoint ``path`` (strict), in eval mode."""
    state = load_checkpoint_state(path)
    model = Wav2LipGenerator()
    problem = _mismatch(model, state)
    if not problem:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            problem = str(e).splitlines()[0]
    if problem:
        raise ModelError(
            f"lipsync.wav2lip_model: {path} is not a Wav2Lip generator checkpoint ({problem}); "
            f"{_FIX} (not lipsync_expert.pth or the discriminator)",
            path=path,
        )
    return model.eval()


def export_onnx(model: Wav2LipGenerator, path: Path) -> Path:
    """Write ``model`` as ONNX (opset 17, dynamic batch) to ``path``, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o644)  # mkstemp makes it 0600; the cache may be shared with the server's user
    model = model.eval()
    mel = torch.zeros(1, 1, N_MELS, MEL_STEP)
    face = torch.zeros(1, 6, FACE_SIZE, FACE_SIZE)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch >= 2.9 defaults to the torch.export-based exporter, which needs onnxscript;
            # the TorchScript exporter handles this plain convolutional graph well (and folds
            # each BatchNorm into its convolution).
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (mel, face),
                str(tmp),
                dynamo=False,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_axes={name: {0: "batch"} for name in INPUT_NAMES + OUTPUT_NAMES},
                opset_version=OPSET,
                do_constant_folding=True,
            )
        os.replace(tmp, path)
    except Exception as e:
        raise ModelError(
            f"lipsync.wav2lip_model: exporting to {path} failed ({type(e).__name__}: {e}); "
            "check that lipsync.model_cache_dir is writable and has space",
            path=path,
        ) from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check_onnx(path: Path) -> None:
    """Raise ModelError unless ``path`` is an ONNX file with Wav2Lip's inputs and output."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise ModelError(
            f"lipsync.wav2lip_model: {path} is not a readable ONNX file "
            f"({type(e).__name__}); {_FIX}",
            path=path,
        ) from e
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i.name for i in proto.graph.input if i.name not in initializers]
    outputs = [o.name for o in proto.graph.output]
    if sorted(inputs) != sorted(INPUT_NAMES) or outputs != list(OUTPUT_NAMES):
        raise ModelError(
            f"lipsync.wav2lip_model: {path} has inputs {inputs} and outputs {outputs}, "
            f"expected inputs {list(INPUT_NAMES)} and outputs {list(OUTPUT_NAMES)}; export "
            "the generator with `python -m pipeline.lipsync.wav2lip_model export IN.pth OUT.onnx`",
            path=path,
        )


def fp16_copy(model: Path, cache_dir: Path) -> Path:
    """An fp16 copy of ``model`` (inputs/outputs stay float32), converted once and cached."""
    out = cache_dir / f"{model.stem}-fp16.onnx"
    if out.is_file() and out.stat().st_mtime >= model.stat().st_mtime:
        return out
    import onnx
    from onnxconverter_common import float16

    converted = float16.convert_float_to_float16(onnx.load(str(model)), keep_io_types=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    onnx.save(converted, str(tmp))
    tmp.replace(out)
    return out


def resolve_wav2lip_model(path: Path, cache_dir: Path) -> Path:
    """The ONNX file to run for the configured ``path``.

    ``.onnx``: checked and returned. ``.pth``/``.pt``/``.tar``: exported once to
    ``cache_dir/wav2lip-<sha256 prefix>.onnx`` and reused from there. Raises ModelError."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"lipsync.wav2lip_model: {path} does not exist; {_FIX}", path=path)
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        check_onnx(path)
        return path
    if suffix not in CHECKPOINT_SUFFIXES:
        raise ModelError(
            f"lipsync.wav2lip_model: {path} has an unknown suffix {suffix!r}; give an .onnx "
            f"file or a PyTorch checkpoint ({', '.join(CHECKPOINT_SUFFIXES)})",
            path=path,
        )
    target = Path(cache_dir).expanduser() / f"wav2lip-{_sha256_prefix(path)}.onnx"
    if target.is_file():
        return target
    return export_onnx(load_generator(path), target)


def build_random_wav2lip(seed: int = 0) -> Wav2LipGenerator:
    """A generator with random weights (deterministic for ``seed``), in eval mode.

    BatchNorm scales and shifts are random and the running statistics are measured on one
    random batch, so every layer works at a plausible scale and the output depends on both
    inputs (a stand-in for real weights in tests; it draws nothing like a mouth)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        model = Wav2LipGenerator()
        norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        for norm in norms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
            norm.reset_running_stats()
            norm.momentum = None  # the running stats become this one batch's stats
        mel = torch.rand(16, 1, N_MELS, MEL_STEP) * (2 * MAX_ABS) - MAX_ABS
        face = torch.rand(16, 6, FACE_SIZE, FACE_SIZE)
        model.train()(mel, face)
        for norm in norms:
            norm.momentum = 0.1
    return model.eval()


def write_random_wav2lip_onnx(path: Path, seed: int = 0) -> Path:
    """Export ``build_random_wav2lip(seed)`` to ``path``."""
    return export_onnx(build_random_wav2lip(seed), path)


def write_random_wav2lip_checkpoint(path: Path, seed: int = 0) -> Path:
    """Save ``build_random_wav2lip(seed)`` as the official files are laid out:
    ``{"state_dict": {"module.<key>": tensor}}``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"module.{k}": v for k, v in build_random_wav2lip(seed).state_dict().items()}
    torch.save({"state_dict": state}, path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.lipsync.wav2lip_model", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="export a generator checkpoint to ONNX")
    export.add_argument("checkpoint", type=Path)
    export.add_argument("onnx", type=Path)
    random = commands.add_parser("random", help="write a random-weight generator as ONNX")
    random.add_argument("onnx", type=Path)
    random.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.command == "export":
            out = export_onnx(load_generator(args.checkpoint), args.onnx)
        else:
            out = write_random_wav2lip_onnx(args.onnx, args.seed)
    except ModelError as e:
        parser.exit(1, f"error: {e}\n")
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
