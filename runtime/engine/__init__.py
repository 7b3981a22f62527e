"""The runtime's lowest layer: a bundle opened and checked (:mod:`.manifest`, :mod:`.bundle`), its
graphs run by a backend (:mod:`.backends`: ONNX Runtime or TensorRT), chained into image, caption
and score features by :mod:`.retriever`, in the feature types of :mod:`.features`. It imports no
other runtime layer."""
