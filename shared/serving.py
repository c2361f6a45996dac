"""The serving view of a trained classifier, shared by the worker's TF backend and the ONNX export.

Both must expose the same outputs, so both build them here:

* ``probabilities`` — (N, 2) softmax, column 1 = crack;
* ``features`` — (N, 1280) output of the ``pooled`` layer, for callers that
  want the embedding (e.g. an out-of-domain detector).

To add an output, add one entry to the dict below; the ONNX export names its
outputs after the dict keys.
"""

from __future__ import annotations


def serving_model(keras_model):
    """A ``keras.Model`` mapping the classifier's image input to ``{"probabilities", "features"}``.

    No weights are copied: the returned model shares the layers of ``keras_model``.
    """
    import keras

    outputs = {
        "probabilities": keras_model.get_layer("probabilities").output,
        "features": keras_model.get_layer("pooled").output,
    }
    return keras.Model(keras_model.inputs, outputs, name="crackq_serving")
