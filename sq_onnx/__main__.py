"""``python -m sq_onnx`` is the ``sq-onnx`` command."""

from sq_onnx.cli import main

raise SystemExit(main())
