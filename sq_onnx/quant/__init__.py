"""Quantization arithmetic that knows nothing of graphs: block grids and MatMulNBits' packing
(``blockwise``), int8 per-channel / per-token / static / dynamic rounding (``int8``), SmoothQuant's scales
(``smoothing``) and GPTQ (``gptq``). The passes, the α search, the per-layer error and the report all use
these; only the tests keep an independent reference (tests/quant_reference.py) to check them against."""
