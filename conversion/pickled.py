"""torch-pickled state dicts (.bin / .pt / .pth) -> arrays, and to safetensors files the library reads.

d4k_jax reads safetensors and orbax only. Weights published as torch pickles (torch-fidelity's FID
Inception, torchvision's VGG16 / AlexNet and lpips' heads for LPIPS, the LAION aesthetic head, legacy
`pytorch_model.bin` component folders) are converted once here, with torch.load(weights_only=True): no
arbitrary unpickling. The tensors keep their names, so the library's key maps read the converted file.

    python -m conversion.pickled SRC.pth [DST.safetensors]     # DST defaults to SRC with .safetensors
"""

from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from d4k_jax.io.load import PICKLED, pickled_files
from d4k_jax.io.safetensors_io import save_file


def read(file: str | os.PathLike) -> dict[str, np.ndarray]:
    """A torch .bin/.pt/.pth state dict, read with weights_only=True (no arbitrary unpickling)."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"{file}: reading torch-pickled weights needs torch (pip install torch)") from e
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:  # truncated, corrupt, unsafe
        raise ValueError(f"{file} is not a readable torch state dict ({type(e).__name__}: {e})") from None
    out = {}
    for k, t in state.items():
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            out[k] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[k] = t.numpy()
    return out


def folder_weights(folder: Path) -> dict[str, np.ndarray] | None:
    """The tensors of a component folder that holds torch-pickled weights and no safetensors, else None."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return None
    files = pickled_files(folder)
    if len(files) > 1:
        raise ValueError(f"{folder}: several torch-pickled weight files {[f.name for f in files]}, expected one")
    return read(files[0]) if files else None


def to_safetensors(src: str | os.PathLike, dst: str | os.PathLike | None = None) -> Path:
    """Write the state dict `src` as a safetensors file with the same tensor names (default: beside it)."""
    src = Path(src)
    if src.suffix not in PICKLED:
        raise ValueError(f"{src}: expected a torch-pickled state dict ({', '.join(PICKLED)})")
    dst = Path(dst) if dst else src.with_suffix(".safetensors")
    if dst.exists():
        raise FileExistsError(f"{dst} exists; remove it or pass another destination")
    save_file(read(src), dst, metadata={"format": "pt"})
    return dst


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python -m conversion.pickled SRC.pth [DST.safetensors]")
    print(to_safetensors(*sys.argv[1:]))
