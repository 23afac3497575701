"""The Wav2Lip generator (Prajwal et al. 2020), layer for layer as the official checkpoints.

Parameter names and shapes match the official ``wav2lip.pth`` / ``wav2lip_gan.pth`` state
dicts (once their ``module.`` prefix is stripped), so they load with ``strict=True``. Only this
module and ``wav2lip_model`` import torch.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvBlock(nn.Module):
    """Conv2d + BatchNorm2d, plus the input when ``residual``, then ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int | tuple[int, int],
        padding: int,
        *,
        residual: bool = False,
    ) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size, stride, padding), nn.BatchNorm2d(cout)
        )
        self.act = nn.ReLU()
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv_block(x)
        if self.residual:
            out = out + x
        return self.act(out)


class ConvTransposeBlock(nn.Module):
    """ConvTranspose2d + BatchNorm2d, then ReLU."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel_size: int,
        stride: int,
        padding: int,
        output_padding: int = 0,
    ) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ConvTranspose2d(cin, cout, kernel_size, stride, padding, output_padding),
            nn.BatchNorm2d(cout),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv_block(x))


def _same(channels: int, count: int) -> list[nn.Module]:
    """``count`` residual 3x3 blocks that keep ``channels`` and the spatial size."""
    return [ConvBlock(channels, channels, 3, 1, 1, residual=True) for _ in range(count)]


def _down(cin: int, cout: int, residuals: int) -> nn.Sequential:
    """A stride-2 3x3 block halving the size, then ``residuals`` residual blocks."""
    return nn.Sequential(ConvBlock(cin, cout, 3, 2, 1), *_same(cout, residuals))


def _up(cin: int, cout: int, residuals: int) -> nn.Sequential:
    """A stride-2 transposed 3x3 block doubling the size, then ``residuals`` residual blocks."""
    return nn.Sequential(ConvTransposeBlock(cin, cout, 3, 2, 1, 1), *_same(cout, residuals))


class Wav2LipGenerator(nn.Module):
    """Wav2Lip's generator: a mel window and two face crops in, the lip-synced crop out.

    ``forward(mel, face)``:
      mel: (B, 1, 80, 16) float32, the frame's window of ``pipeline.lipsync.mel.wav2lip_mel``.
      face: (B, 6, 96, 96) float32 in 0..1 (uint8 / 255): channels 0-2 the target crop with
      its lower half (rows 48..95) set to 0, channels 3-5 a reference crop of the same face.
      Both are **BGR**: the official weights were trained on cv2 frames.
    Returns (B, 3, 96, 96) float32 in 0..1, BGR: the crop with the mouth drawn for the audio.
    """

    def __init__(self) -> None:
        super().__init__()
        # Face encoder: 96 -> 48 -> 24 -> 12 -> 6 -> 3 -> 1; each block's output is kept
        # for the decoder's skip connections.
        self.face_encoder_blocks = nn.ModuleList(
            [
                nn.Sequential(ConvBlock(6, 16, 7, 1, 3)),  # 96x96
                _down(16, 32, 2),  # 48x48
                _down(32, 64, 3),  # 24x24
                _down(64, 128, 2),  # 12x12
                _down(128, 256, 2),  # 6x6
                _down(256, 512, 1),  # 3x3
                nn.Sequential(ConvBlock(512, 512, 3, 1, 0), ConvBlock(512, 512, 1, 1, 0)),  # 1x1
            ]
        )
        # Audio encoder: (1, 80, 16) -> (512, 1, 1).
        self.audio_encoder = nn.Sequential(
            ConvBlock(1, 32, 3, 1, 1),
            *_same(32, 2),
            ConvBlock(32, 64, 3, (3, 1), 1),  # 27x16
            *_same(64, 2),
            ConvBlock(64, 128, 3, 3, 1),  # 9x6
            *_same(128, 2),
            ConvBlock(128, 256, 3, (3, 2), 1),  # 3x3
            *_same(256, 1),
            ConvBlock(256, 512, 3, 1, 0),  # 1x1
            ConvBlock(512, 512, 1, 1, 0),
        )
        # Face decoder: each block's output is concatenated with the encoder feature of the
        # same size, hence the input widths (previous output + skip channels).
        self.face_decoder_blocks = nn.ModuleList(
            [
                nn.Sequential(ConvBlock(512, 512, 1, 1, 0)),  # 1x1, + 512
                nn.Sequential(ConvTransposeBlock(1024, 512, 3, 1, 0), *_same(512, 1)),  # 3x3
                _up(1024, 512, 2),  # 6x6, + 256
                _up(768, 384, 2),  # 12x12, + 128
                _up(512, 256, 2),  # 24x24, + 64
                _up(320, 128, 2),  # 48x48, + 32
                _up(160, 64, 2),  # 96x96, + 16
            ]
        )
        self.output_block = nn.Sequential(
            ConvBlock(80, 32, 3, 1, 1),
            nn.Conv2d(32, 3, kernel_size=1, stride=1, padding=0),
            nn.Sigmoid(),
        )

    def forward(self, mel: torch.Tensor, face: torch.Tensor) -> torch.Tensor:
        skips = []
        x = face
        for block in self.face_encoder_blocks:
            x = block(x)
            skips.append(x)
        x = self.audio_encoder(mel)
        for block in self.face_decoder_blocks:
            x = torch.cat((block(x), skips.pop()), dim=1)
        return self.output_block(x)
