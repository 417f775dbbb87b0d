"""Calibration: statistics inside ONNX Runtime, the calibration and verification text (built-in mix, the model's own samples), and GPTQ's Hessians (one pass, or segment by segment)."""
