"""The adapted model's head: which feature-row columns it reads and the Keras layers that compute it.

Used by both stages of ``crackq adapt`` (:mod:`training.adapt`, :mod:`training.adapt_deep`), so neither
has to import the other.  TensorFlow is imported inside :func:`linear_head` only.
"""

from __future__ import annotations

import numpy as np


def head_columns(layers: tuple[str, ...]) -> np.ndarray:
    """Row columns of a head on ``pooled`` plus the spatial means of ``layers`` (in the model's concat order)."""
    from training import multisource as ms

    return ms.head_columns(ms.HeadConfig(extra=tuple(layers)))


def linear_head(model, layers: tuple[str, ...]):
    """The same backbone with a new Dense softmax on ``pooled`` + the spatial means of ``layers``.

    The adapted head is a logistic regression on those columns, so the init model's head (a Dense on the
    pooled features, or the multi-source MLP on pooled + earlier-block means) is replaced, not refilled.
    Layer names follow :func:`training.model.build_model`, so serving, ``head_model`` and a later
    ``crackq adapt`` of the adapted model find what they expect.
    """
    import keras

    from training.model import DROPOUT_LAYER, FEATURES_LAYER, HEAD_INPUT_LAYER, OUTPUT_LAYER

    names = {layer.name for layer in model.layers}
    parts = [model.get_layer(FEATURES_LAYER).output]
    for name in layers:
        mean = f"mean_{name}"
        parts.append(model.get_layer(mean).output if mean in names else
                     keras.layers.GlobalAveragePooling2D(name=mean)(model.get_layer(name).output))
    x = keras.layers.Concatenate(name=HEAD_INPUT_LAYER)(parts) if len(parts) > 1 else parts[0]
    x = keras.layers.Dropout(0.0, name=DROPOUT_LAYER)(x)
    probs = keras.layers.Dense(2, activation="softmax", name=OUTPUT_LAYER)(x)
    return keras.Model(model.inputs, probs, name=model.name)
