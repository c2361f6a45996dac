"""The serving view of a trained classifier, shared by the worker's TF backend and the ONNX export.

Both must expose the same outputs, so both build them here:

* ``probabilities`` — (N, 2) softmax, column 1 = crack;
* ``features`` — (N, 1280 + S): the 1280 values of the ``pooled`` layer first
  (the embedding), then S texture statistics of earlier layers (per-channel
  mean and standard deviation of each layer in :data:`DOMAIN_STAT_LAYERS`).
  The in-domain check (:mod:`shared.domain`) reads both: pooled features alone
  miss imagery that differs in texture, scale or colour but not in "what it
  shows" (docs/drone.md has the measurements).  They cost nothing extra: the
  forward pass computes those layers anyway.

To add an output, add one entry to the dict below; the ONNX export names its
outputs after the dict keys.
"""

from __future__ import annotations

#: Layers (-> channels) whose per-channel mean and std follow the pooled features in ``features``:
#: the ReLU6 expansions at the 40×40 and 20×20 stages of MobileNetV2 (at 160 px input).
DOMAIN_STAT_LAYERS = {"block_3_expand_relu": 144, "block_6_expand_relu": 192}
POOLED_DIM = 1280


def feature_layout() -> list[tuple[str, int, int]]:
    """``(name, start, stop)`` column ranges of ``features``: ``pooled`` then one block per stats layer."""
    layout = [("pooled", 0, POOLED_DIM)]
    for name, channels in DOMAIN_STAT_LAYERS.items():
        start = layout[-1][2]
        layout.append((name, start, start + 2 * channels))
    return layout


def serving_model(keras_model):
    """A ``keras.Model`` mapping the classifier's image input to ``{"probabilities", "features"}``.

    No weights are copied: the returned model shares the layers of ``keras_model``.
    """
    import keras

    outputs = {
        "probabilities": keras_model.get_layer("probabilities").output,
        "features": _features(keras_model),
    }
    return keras.Model(keras_model.inputs, outputs, name="crackq_serving")


def _features(keras_model):
    """``pooled`` followed by [mean, std] over the spatial axes of each statistics layer."""
    import keras

    parts = [keras_model.get_layer("pooled").output]
    for name in DOMAIN_STAT_LAYERS:
        activation = keras_model.get_layer(name).output
        if activation.shape[-1] != DOMAIN_STAT_LAYERS[name]:
            raise ValueError(f"layer {name} has {activation.shape[-1]} channels, expected {DOMAIN_STAT_LAYERS[name]}")
        parts += [keras.ops.mean(activation, axis=(1, 2)), keras.ops.std(activation, axis=(1, 2))]
    return keras.layers.Concatenate(axis=-1, name="features")(parts)
