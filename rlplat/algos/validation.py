"""Input checks used at the entry points of every ``rlplat.algos`` function.

One policy (STYLE.md §12): bad user input raises ``ValueError`` that names the tensor and says what to fix.
Values at padding positions are never checked and never reach the maths: ``masked_values`` replaces them by
zero with ``torch.where`` (not a multiply, which would turn a NaN at padding into NaN * 0 = NaN).
"""

import torch


def as_mask(mask_BT: torch.Tensor, shape: torch.Size, name: str = "mask_BT") -> torch.Tensor:
    """Return ``mask_BT`` as a bool tensor after checking its shape and that it holds only 0/1."""
    if not isinstance(mask_BT, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask_BT).__name__}")
    if mask_BT.shape != shape:
        raise ValueError(f"{name} has shape {tuple(mask_BT.shape)}, expected {tuple(shape)}")
    if mask_BT.dtype == torch.bool:
        return mask_BT
    if not ((mask_BT == 0) | (mask_BT == 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1 (or be a bool tensor)")
    return mask_BT != 0


def check_finite(name: str, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """Raise ``ValueError`` if ``x`` (restricted to ``mask`` when given) holds NaN or ±inf."""
    values = x if mask is None else x[mask]
    bad = ~torch.isfinite(values)
    if bad.any():
        n_nan = int(torch.isnan(values).sum())
        n_inf = int(bad.sum()) - n_nan
        where = " at valid (unmasked) positions" if mask is not None else ""
        raise ValueError(
            f"{name} is not finite: {n_nan} NaN and {n_inf} inf value(s){where}; "
            "drop or repair these samples before the update"
        )


def check_shape(name: str, x: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")


def as_float(x: torch.Tensor) -> torch.Tensor:
    """Bool/int rewards (e.g. correctness) become float32; floating tensors keep their dtype."""
    return x if x.is_floating_point() else x.to(torch.float32)


def masked_values(name: str, x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Check ``x_BT`` is finite where ``mask_BT`` (bool) is set and return it with zeros at padding."""
    check_shape(name, x_BT, mask_BT.shape)
    x_BT = as_float(x_BT)
    check_finite(name, x_BT, mask_BT)
    return torch.where(mask_BT, x_BT, 0.0)


def check_2d(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [B, T], got shape {tuple(x.shape)}")


def check_group_size(batch_size: int, group_size: int, min_size: int = 1) -> None:
    if not isinstance(group_size, int) or group_size < min_size:
        raise ValueError(f"group_size must be an int >= {min_size}, got {group_size!r}")
    if batch_size % group_size != 0:
        raise ValueError(
            f"batch size {batch_size} is not a multiple of group_size {group_size}; "
            "responses to one prompt must be stored contiguously, n per prompt"
        )
