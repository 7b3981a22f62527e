"""Torch-free serving runtime for FB-Net bundles (ONNX Runtime or TensorRT).

Four layers, each importing only those below it: ``engine`` (bundle, manifest, backends,
retriever, feature types) <- ``gallery`` (building, stores, items, first stage, shards, Ray) <-
``search`` (the searcher) <- ``serving`` (service, batching, HTTP server, metrics, Triton);
:mod:`fbnet.runtime.cli` (``fbnet-serve-cli``) sits on top. ``tests/test_layers.py`` checks it.
"""
