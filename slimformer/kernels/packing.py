"""INT4 weight packing in ONNX Runtime's `MatMulNBits` layout (com.microsoft, bits=4).

Motivation: one packed weight must serve both lowerings, the Triton kernel on the GPU and
ORT's `MatMulNBits` on the CPU, so the packed form *is* ORT's (checked against ORT itself in
tests/kernels/test_int4_ort.py). For a weight W (N, K) quantized in blocks of `block_size`
along K (n_blocks = ceil(K / block_size)):

    qweight      uint8 (N, n_blocks, block_size // 2)  two codes a byte, the LOWER nibble
                                                       holds the even k
    scales       float (N, n_blocks)                    ORT wants A's dtype here
    zero_points  uint8 (N, ceil(n_blocks / 2))          packed like qweight; absent = 8

    W[n, k] = (q[n, k] - zp[n, k // block_size]) * scale[n, k // block_size]

The codes of the last block past K are padding; they are set to the zero point so the padded
weights dequantize to exactly 0. The quantizers (RTN here, GPTQ/AWQ elsewhere) all produce
the unpacked triple (q (N, K) uint8 in [0, 15], scales (N, n_blocks), zp (N, n_blocks) uint8
or None) and hand it to `pack_int4_matmulnbits`.
"""

from __future__ import annotations

import torch

DEFAULT_ZERO_POINT = 8  # MatMulNBits' zero point when the input is absent: 2 ** (bits - 1)


def n_blocks(K: int, block_size: int) -> int:
    return -(-K // block_size)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., 2 * L) codes in [0, 15] -> (..., L) uint8, element 2i in the low nibble."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """(..., L) uint8 -> (..., 2 * L) uint8 codes, inverse of `_pack_nibbles`."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def pack_int4_matmulnbits(
    q: torch.Tensor,  # (N, K) uint8 codes in [0, 15]
    scales: torch.Tensor,  # (N, n_blocks) float
    zero_points: torch.Tensor | None,  # (N, n_blocks) uint8 in [0, 15], or None (= 8)
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pack the unpacked triple into (qweight, scales, zero_points) in MatMulNBits' layout.

    Returns qweight (N, n_blocks, block_size // 2) uint8, scales (N, n_blocks) in the dtype
    given, zero_points (N, ceil(n_blocks / 2)) uint8 or None.
    """
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    N, K = q.shape
    nb = n_blocks(K, block_size)
    if scales.numel() != N * nb:
        raise ValueError(f"scales must hold N * n_blocks = {N * nb} values, got {tuple(scales.shape)}")
    if int(q.min()) < 0 or int(q.max()) > 15:
        raise ValueError("int4 codes must lie in [0, 15]")
    q = q.to(torch.uint8)
    zp = None if zero_points is None else zero_points.reshape(N, nb).to(torch.uint8)
    pad = nb * block_size - K
    if pad:  # pad the last block with the zero point: padded weights dequantize to 0
        fill = torch.full((N, pad), DEFAULT_ZERO_POINT, dtype=torch.uint8, device=q.device)
        if zp is not None:
            fill = zp[:, -1:].expand(N, pad)
        q = torch.cat((q, fill), dim=1)
    qweight = _pack_nibbles(q.reshape(N, nb, block_size)).contiguous()  # (N, nb, bs/2)
    packed_zp = None
    if zp is not None:
        if nb % 2:  # each row holds ceil(nb / 2) bytes; the spare high nibble is 0
            zp = torch.cat((zp, torch.zeros((N, 1), dtype=torch.uint8, device=zp.device)), dim=1)
        packed_zp = _pack_nibbles(zp).contiguous()  # (N, ceil(nb/2))
    return qweight, scales.reshape(N, nb).contiguous(), packed_zp


def unpack_int4_matmulnbits(
    qweight: torch.Tensor,  # (N, n_blocks, block_size // 2) uint8 (or flat with N rows)
    scales: torch.Tensor,  # (N, n_blocks) or (N * n_blocks,)
    zero_points: torch.Tensor | None,  # (N, ceil(n_blocks/2)) or flat, uint8
    K: int,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `pack_int4_matmulnbits`: q (N, K) uint8, scales (N, n_blocks), zp (N, n_blocks).

    An absent zero point comes back as the default 8, materialized.
    """
    nb = n_blocks(K, block_size)
    N = qweight.numel() // (nb * (block_size // 2))
    q = _unpack_nibbles(qweight.reshape(N, nb * (block_size // 2)))[:, :K]  # (N, K)
    scales = scales.reshape(N, nb)
    if zero_points is None:
        zp = torch.full((N, nb), DEFAULT_ZERO_POINT, dtype=torch.uint8, device=qweight.device)
    else:
        zp = _unpack_nibbles(zero_points.reshape(N, -1))[:, :nb]  # (N, nb)
    return q, scales, zp


def quantize_int4_rtn(
    w: torch.Tensor,  # (N, K) float
    block_size: int,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest blockwise int4: the baseline every smarter quantizer must beat.

    Asymmetric (default): per block, the range [min(w, 0), max(w, 0)] maps onto codes 0..15,
    scale = (max - min) / 15, zp = round(-min / scale). Symmetric: scale = absmax / 7, codes
    round(w / scale) + 8 in [1, 15], zp None (MatMulNBits' default 8).
    Returns q (N, K) uint8, scales (N, n_blocks) fp32, zp (N, n_blocks) uint8 or None.
    """
    N, K = w.shape
    nb = n_blocks(K, block_size)
    wf = torch.nn.functional.pad(w.float(), (0, nb * block_size - K))  # pad with 0: in range
    blocks = wf.reshape(N, nb, block_size)
    if symmetric:
        scale = blocks.abs().amax(dim=-1) / 7.0  # (N, nb)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(blocks / scale[..., None]) + DEFAULT_ZERO_POINT, 0, 15)
        zp = None
    else:
        lo = blocks.amin(dim=-1).clamp(max=0.0)
        hi = blocks.amax(dim=-1).clamp(min=0.0)
        scale = (hi - lo) / 15.0
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        zpf = torch.clamp(torch.round(-lo / scale), 0, 15)
        q = torch.clamp(torch.round(blocks / scale[..., None]) + zpf[..., None], 0, 15)
        zp = zpf.to(torch.uint8)
    q = q.reshape(N, nb * block_size)[:, :K].to(torch.uint8)
    return q, scale, zp


def quantize_rows_int4(
    table: torch.Tensor,  # (V, D) float, e.g. an embedding table
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row asymmetric int4 (one scale and zero point a row): for embedding tables.

    Returns packed (V, ceil(D / 2)) uint8 (low nibble = even column), scales (V,) fp32,
    zp (V,) uint8. Dequantize with `dequantize_rows_int4`.
    """
    V, D = table.shape
    t = table.float()
    lo = t.amin(dim=1).clamp(max=0.0)
    hi = t.amax(dim=1).clamp(min=0.0)
    scale = (hi - lo) / 15.0
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # (V,)
    zp = torch.clamp(torch.round(-lo / scale), 0, 15)  # (V,)
    q = torch.clamp(torch.round(t / scale[:, None]) + zp[:, None], 0, 15).to(torch.uint8)
    if D % 2:
        q = torch.cat((q, zp.to(torch.uint8)[:, None]), dim=1)
    return _pack_nibbles(q).contiguous(), scale, zp.to(torch.uint8)


def dequantize_rows_int4(
    packed: torch.Tensor,  # (V, ceil(D/2)) uint8
    scales: torch.Tensor,  # (V,)
    zero_points: torch.Tensor,  # (V,) uint8
    D: int,
) -> torch.Tensor:
    """(V, D) fp32 = (q - zp) * scale, row by row. Works on any subset of rows (a gather)."""
    q = _unpack_nibbles(packed)[..., :D].float()
    return (q - zero_points.float()[..., None]) * scales.float()[..., None]
